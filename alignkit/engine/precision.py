"""Which precision ``deepspeed.dtype=auto`` trains in: detected from the CPU, measured once, cached.

bf16 is only worth it where the hardware computes it: on an Intel Xeon with AMX (``amx_bf16``) one
thread's bf16 matmul ran 3.7-8x its fp32 one at SmolLM2's shapes, on an AVX2-only AMD EPYC ~200x
*slower*. So ``auto`` on a CPU needs both

* the CPU's flags (``amx_bf16`` or ``avx512_bf16`` in ``/proc/cpuinfo``; without them no probe
  runs at all: one bf16 matmul there takes seconds), and
* a short probe (``probe_matmul``): fp32 vs bf16 matmuls at SmolLM2-like shapes, timed in this
  thread's CPU seconds (``time.thread_time``), so a loaded machine that preempts the probe does
  not distort the ratio. The result is cached as JSON under ``$ALIGNKIT_CACHE/precision`` keyed by
  the CPU model, its bf16 flags, the torch version and the thread count (``cached_probe``).

``choose_dtype`` is the decision itself, a pure function of (requested dtype, CUDA, CPU flags,
probe result, switch); ``resolve_auto`` gathers those inputs on this machine. On a CPU the
mixed-precision choice is ``bf16_autocast``: fp32 weights, gradients and optimizer states, with
matmuls and attention in bf16 under ``torch.autocast`` (DeepSpeed's ``torch_autocast`` block, see
``alignkit.engine.config``).

**Switch**: ``ALIGNKIT_CPU_AUTO_BF16=0`` keeps ``auto`` at fp32 on every CPU (the test suite sets it, so
its results do not depend on the CPU kind); unset or ``1``, ``auto`` picks bf16 mixed precision where the
flags and the probe say so (``AUTO_BF16_DEFAULT``). Measured before the flip, on an AMD EPYC with
``avx512_bf16`` (no AMX), one thread, a 50-step ``dpo_smollm2`` run: 7.8 s per step vs 12.6 s in fp32,
held-out answer accuracy 0.540 in both, step 0's loss ln 2 in both, per-step losses within 0.065.

``check_supported`` refuses an explicit fp16 on a CPU DeepSpeed cannot run it on, before any model loads.

Left out: choosing fp16 on a CPU (``auto`` never does), per-layer precision choices, re-probing
when a machine's load changes (the thread-CPU-time ratio does not depend on it).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # either one: the CPU has bf16 dot-product instructions
AUTO_BF16_ENV = "ALIGNKIT_CPU_AUTO_BF16"  # "0": auto stays fp32 on every CPU; "1"/unset: bf16 where measured faster
MIN_SPEEDUP = 1.5  # bf16 must beat fp32 by this factor on every probed shape
# (M, K, N) of SmolLM2-135M's matmuls for ~1k tokens: q/o-sized, MLP up, MLP down, the LM head
PROBE_SHAPES = ((1024, 576, 576), (1024, 576, 1536), (1024, 1536, 576), (512, 576, 49152))
PROBE_FORMAT = "alignkit-precision-probe/1"


@dataclass(frozen=True)
class CpuInfo:
    """The CPU model name and its feature flags (empty where ``/proc/cpuinfo`` does not exist)."""

    model: str
    flags: frozenset = field(default_factory=frozenset)

    @property
    def bf16_flags(self) -> tuple[str, ...]:
        return tuple(f for f in BF16_CPU_FLAGS if f in self.flags)


def read_cpu_info(path: str = "/proc/cpuinfo") -> CpuInfo:
    """Model name and flags of the first processor listed in ``path`` (Linux), else ``platform``'s name."""
    model, flags = "", frozenset()
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return CpuInfo(model=model or platform.processor() or platform.machine() or "unknown", flags=flags)


@dataclass(frozen=True)
class ProbeResult:
    """GFLOP/s per probed shape (thread CPU time), fp32 and bf16; ``speedup`` is the worst shape's ratio."""

    shapes: tuple
    fp32_gflops: tuple
    bf16_gflops: tuple
    threads: int
    torch_version: str
    cpu_model: str

    @property
    def speedup(self) -> float:
        ratios = [b / f for f, b in zip(self.fp32_gflops, self.bf16_gflops) if f > 0]
        return min(ratios) if ratios else 0.0

    def describe(self) -> str:
        pairs = ", ".join(f"{m}x{k}x{n}: {f:.0f} vs {b:.0f}" for (m, k, n), f, b
                          in zip(self.shapes, self.fp32_gflops, self.bf16_gflops))
        return f"matmul GFLOP/s fp32 vs bf16 ({self.threads} thread(s), CPU time) {pairs}; worst ratio {self.speedup:.2f}x"


def _measure(m: int, k: int, n: int, dtype, seconds: float) -> float:
    """GFLOP/s of ``[m, k] @ [k, n]`` in ``dtype`` over ~``seconds`` of this thread's CPU time."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    a @ b  # warm-up: oneDNN builds its kernel for the shape here
    count, start = 0, time.thread_time()
    while True:
        a @ b
        count += 1
        spent = time.thread_time() - start
        if spent >= seconds or count >= 200:
            break
    return 2.0 * m * k * n * count / max(spent, 1e-9) / 1e9


def probe_matmul(shapes=PROBE_SHAPES, seconds: float = 0.15) -> ProbeResult:
    """Time fp32 and bf16 matmuls at ``shapes`` (~2 s in all on an AMX CPU); see the module docstring.

    Starts with a small matmul and stops early when bf16 is not faster there: the full shapes would
    take seconds each on a CPU that emulates bf16."""
    import torch

    small = _measure(256, 576, 576, torch.float32, seconds / 3), _measure(256, 576, 576, torch.bfloat16, seconds / 3)
    if small[1] < small[0]:
        fp32, bf16, shapes = (small[0],), (small[1],), ((256, 576, 576),)
    else:
        fp32 = tuple(_measure(*s, torch.float32, seconds) for s in shapes)
        bf16 = tuple(_measure(*s, torch.bfloat16, seconds) for s in shapes)
    return ProbeResult(shapes=tuple(tuple(s) for s in shapes), fp32_gflops=fp32, bf16_gflops=bf16,
                       threads=torch.get_num_threads(), torch_version=torch.__version__, cpu_model="")


def probe_cache_path(cpu: CpuInfo, threads: int, torch_version: str, cache_dir: Optional[Path] = None) -> Path:
    """``<cache>/precision/probe-<key>.json``; the key: CPU model, its bf16 flags, torch version, threads."""
    from alignkit.models.smollm2 import cache_root

    key = json.dumps([cpu.model, cpu.bf16_flags, torch_version, threads, PROBE_SHAPES])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(cache_dir or cache_root() / "precision") / f"probe-{digest}.json"


def _read_probe(path: Path, cpu: CpuInfo) -> Optional[ProbeResult]:
    try:
        data = json.loads(path.read_text())
        if data.get("format") != PROBE_FORMAT or data.get("cpu_model") != cpu.model:
            return None
        result = ProbeResult(shapes=tuple(tuple(s) for s in data["shapes"]),
                             fp32_gflops=tuple(float(x) for x in data["fp32_gflops"]),
                             bf16_gflops=tuple(float(x) for x in data["bf16_gflops"]),
                             threads=int(data["threads"]), torch_version=str(data["torch_version"]),
                             cpu_model=str(data["cpu_model"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: measured again and rewritten
    if len(result.shapes) != len(result.fp32_gflops) or len(result.shapes) != len(result.bf16_gflops):
        return None
    return result


def cached_probe(cpu: CpuInfo, cache_dir: Optional[Path] = None, measure=None) -> tuple[ProbeResult, Path, bool]:
    """The probe result for this CPU, torch and thread count: ``(result, cache file, was cached)``.

    A missing, damaged or foreign file is measured again and replaced atomically (JSON only)."""
    import torch

    threads, version = torch.get_num_threads(), torch.__version__
    path = probe_cache_path(cpu, threads, version, cache_dir)
    cached = _read_probe(path, cpu)
    if cached is not None and cached.threads == threads and cached.torch_version == version:
        return cached, path, True
    result = (measure or probe_matmul)()
    result = ProbeResult(shapes=result.shapes, fp32_gflops=result.fp32_gflops, bf16_gflops=result.bf16_gflops,
                         threads=threads, torch_version=version, cpu_model=cpu.model)
    try:
        from alignkit.models.fsutil import atomic_write

        atomic_write(path, json.dumps({"format": PROBE_FORMAT, **asdict(result)}, indent=1))
    except OSError:
        pass  # a read-only cache: the probe is repeated next time, the choice is the same
    return result, path, False


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``auto`` (or an explicit dtype) resolved to, and why, in one line for the run's log."""

    dtype: str  # fp32 | bf16 | fp16 | bf16_autocast
    reason: str


def choose_dtype(
    requested: str,
    *,
    has_cuda: bool,
    cuda_bf16: bool = False,
    cpu_flags: frozenset | set | tuple = (),
    probe_speedup: Optional[float] = None,
    cpu_auto_bf16: bool = False,
    min_speedup: float = MIN_SPEEDUP,
) -> PrecisionChoice:
    """The precision for ``requested`` (``auto`` or an explicit dtype), as a pure function of its inputs.

    * explicit ``fp32|bf16|fp16|bf16_autocast``: kept as asked;
    * ``auto`` with CUDA: ``bf16`` (DeepSpeed's bf16 mode, fp32 master weights) where the GPU has
      bf16, else ``fp32``;
    * ``auto`` on a CPU: ``bf16_autocast`` only when the switch is on (``cpu_auto_bf16``), the CPU
      has a bf16 flag (``BF16_CPU_FLAGS``) and the probe measured bf16 matmuls at least
      ``min_speedup`` x fp32 on every shape; ``fp32`` otherwise (``probe_speedup=None``: not measured).
    """
    if requested != "auto":
        return PrecisionChoice(requested, "set explicitly")
    if has_cuda:
        return (PrecisionChoice("bf16", "auto: the GPU supports bf16") if cuda_bf16
                else PrecisionChoice("fp32", "auto: the GPU has no bf16"))
    flags = [f for f in BF16_CPU_FLAGS if f in set(cpu_flags)]
    if not flags:
        return PrecisionChoice("fp32", f"auto: the CPU has none of {', '.join(BF16_CPU_FLAGS)} (bf16 is emulated, "
                                       "far slower than fp32)")
    if not cpu_auto_bf16:
        return PrecisionChoice("fp32", f"auto: fp32 on CPU because {AUTO_BF16_ENV}=0 (the CPU has "
                                       f"{', '.join(flags)})")
    if probe_speedup is None:
        return PrecisionChoice("fp32", "auto: the bf16 matmul probe did not run")
    if probe_speedup < min_speedup:
        return PrecisionChoice("fp32", f"auto: bf16 matmuls measured only {probe_speedup:.2f}x fp32 here "
                                       f"(needs {min_speedup}x)")
    return PrecisionChoice("bf16_autocast", f"auto: CPU with {', '.join(flags)}, bf16 matmuls measured "
                                            f"{probe_speedup:.1f}x fp32 (worst probed shape)")


AUTO_BF16_DEFAULT = True  # flipped after the bf16/fp32 DPO comparison in the module docstring


def auto_bf16_switch() -> bool:
    """Whether ``auto`` may pick bf16 on a CPU: ``ALIGNKIT_CPU_AUTO_BF16`` (1/0), else ``AUTO_BF16_DEFAULT``."""
    value = os.environ.get(AUTO_BF16_ENV, "").strip().lower()
    if not value:
        return AUTO_BF16_DEFAULT
    return value in ("1", "true", "yes", "on")


_RESOLVED: dict = {}


def resolve_auto(requested: str, *, has_cuda: Optional[bool] = None, say=None) -> PrecisionChoice:
    """``choose_dtype`` with this machine's inputs (CUDA, ``/proc/cpuinfo``, the cached probe, the switch).

    The probe runs only when its answer matters (auto, CPU, a bf16 flag, the switch on). The choice
    is said once per process (rank 0) through ``say`` (default: a line on stderr)."""
    import torch

    if has_cuda is None:
        has_cuda = torch.cuda.is_available()
    cuda_bf16 = bool(has_cuda and torch.cuda.is_bf16_supported())
    cpu = read_cpu_info() if not has_cuda else CpuInfo(model="")
    switch = auto_bf16_switch()
    speedup, probe_note = None, ""
    if requested == "auto" and not has_cuda and cpu.bf16_flags and switch:
        result, path, was_cached = cached_probe(cpu)
        speedup = result.speedup
        probe_note = f"; probe {'cached in' if was_cached else 'measured, saved to'} {path}"
    choice = choose_dtype(requested, has_cuda=has_cuda, cuda_bf16=cuda_bf16, cpu_flags=cpu.flags,
                          probe_speedup=speedup, cpu_auto_bf16=switch)
    key = (requested, choice.dtype)
    if requested == "auto" and key not in _RESOLVED and os.environ.get("RANK", "0") == "0":
        _RESOLVED[key] = True
        where = f" on {cpu.model}" if cpu.model else ""
        line = f"precision: deepspeed.dtype=auto -> {choice.dtype}{where} ({choice.reason}{probe_note})"
        (say or (lambda text: print(text, file=__import__("sys").stderr, flush=True)))(line)
    return choice


def compute_precision(module) -> str:
    """The precision a module (or the DeepSpeed engine wrapping it) computes in, for cache keys:
    its parameters' dtype, with ``+autocast:<dtype>`` when the engine runs its forward under autocast."""
    inner = getattr(module, "module", module)
    first = next(iter(inner.parameters()), None) if hasattr(inner, "parameters") else None
    name = str(first.dtype) if first is not None else ""
    enabled = getattr(module, "torch_autocast_enabled", None)
    if callable(enabled) and enabled():
        name += f"+autocast:{module.torch_autocast_dtype()}"
    return name


def cpu_fp16_supported() -> bool:
    """Whether DeepSpeed's CPU accelerator takes fp16 here: its own test, oneDNN's fp16 support
    (AVX512-FP16 / AMX-FP16; none on AVX2-only AMD EPYC or most Xeons)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:
        return False


def check_supported(requested: str, *, has_cuda: Optional[bool] = None) -> None:
    """Refuse ``deepspeed.dtype=fp16`` on a CPU without an fp16 path before any model loads: DeepSpeed
    would raise ``ValueError: Type fp16 is not supported on your device`` only after loading it."""
    if requested != "fp16":
        return
    import torch

    if has_cuda is None:
        has_cuda = torch.cuda.is_available()
    if has_cuda or cpu_fp16_supported():
        return
    from alignkit.errors import ConfigError

    model = read_cpu_info().model or platform.processor() or "this CPU"
    raise ConfigError(f"deepspeed.dtype=fp16 is not possible on {model}: DeepSpeed's CPU backend needs oneDNN fp16 "
                      "support (AVX512-FP16 or AMX-FP16), which this CPU lacks. Use deepspeed.dtype=fp32 (or "
                      "bf16_autocast on a CPU with bf16 instructions), or run fp16 on a GPU.")


RUN_PRECISION = "precision.json"  # in the run directory: what deepspeed.dtype became, where, per (re)start


def record_run_precision(run_dir: Path, requested: str, resolved: str, cpu_model: str, say=None) -> Optional[str]:
    """Write what ``deepspeed.dtype`` became in this (re)start of a run into ``run_dir/precision.json``
    (``{"requested", "resolved", "cpu", "history": [...]}``, rank 0 calls it), so a card or a report reads the
    precision the run trained in instead of guessing it from ``auto``. A resume whose precision differs from
    the last start's (``auto`` on another CPU kind, or an allowed ``deepspeed.dtype`` change) is said through
    ``say`` and returned: the losses after it are not computed as before. Returns None otherwise."""
    from alignkit import runfiles

    say = say or (lambda text: print(text, file=__import__("sys").stderr, flush=True))
    path = Path(run_dir) / RUN_PRECISION
    history: list = []
    if runfiles.exists(path):
        try:
            history = [h for h in json.loads(path.read_text()).get("history", []) if isinstance(h, dict)]
        except (OSError, ValueError, AttributeError) as exc:
            say(f"{path} is unreadable ({exc}); its precision history starts again with this start, so a change of "
                "precision since the earlier starts cannot be told.")
    entry = {"requested": requested, "resolved": resolved, "cpu": cpu_model}
    change = None
    if history and history[-1].get("resolved") != resolved:
        last = history[-1]
        change = (f"precision changed on resume: the run trained in {last.get('resolved')} (deepspeed.dtype="
                  f"{last.get('requested')} on {last.get('cpu') or 'a GPU'}), this start trains in {resolved} "
                  f"(deepspeed.dtype={requested} on {cpu_model or 'a GPU'}); losses from here on are not computed "
                  f"as before. Set deepspeed.dtype={last.get('resolved')} with resume_allow=[deepspeed.dtype] to keep it.")
        say(change)
    history.append(entry)
    runfiles.write_text(path, json.dumps({**entry, "history": history}, indent=1) + "\n")
    return change
