"""Precision choice: ``deepspeed.dtype=auto`` per CPU kind, the cached matmul probe, the DeepSpeed block,
and a bf16 run's step-0 DPO loss (policy == reference) of ln 2 through the real trainer.

The choice is tested as a pure function with made-up CPUs (an AMX Xeon, an AVX2-only EPYC) and
made-up probe results; the switch ``ALIGNKIT_CPU_AUTO_BF16`` is tested off (fp32 on every CPU; the test
suite's setting, tests/conftest.py) and on (the default since the flip).
"""

from __future__ import annotations

import os

import json
import math

import pytest
import torch

from alignkit.engine import precision
from alignkit.engine.config import DeepSpeedConfig, build_frozen_ds_config, build_train_ds_config, torch_dtype
from alignkit.engine.precision import CpuInfo, ProbeResult, cached_probe, choose_dtype, read_cpu_info
from alignkit.errors import ConfigError

XEON_FLAGS = frozenset("fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8".split())
EPYC_FLAGS = frozenset("fpu sse avx avx2 fma bmi2 sha_ni".split())
CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {model}
flags\t\t: {flags}

processor\t: 1
model name\t: {model}
flags\t\t: {flags}
"""


def compute_dtype_name(ds_config: dict) -> str:
    """``fp32 | bf16 | fp16 | bf16_autocast``: the precision a built DeepSpeed config computes in."""
    if ds_config.get("torch_autocast", {}).get("enabled"):
        return "bf16_autocast" if str(ds_config["torch_autocast"].get("dtype", "bfloat16")) in (
            "bfloat16", "bf16", "torch.bfloat16") else "fp16_autocast"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(torch_dtype(ds_config), "fp32")


def fake_probe(fp32=(160.0, 160.0), bf16=(1200.0, 400.0), model="Intel(R) Xeon(R) Processor") -> ProbeResult:
    return ProbeResult(shapes=((1024, 576, 576), (512, 576, 49152)), fp32_gflops=fp32, bf16_gflops=bf16,
                       threads=1, torch_version="x", cpu_model=model)


# --- the pure choice -------------------------------------------------------------------------------

def test_amx_xeon_picks_bf16_autocast_only_with_the_switch_and_a_faster_probe():
    amx = dict(has_cuda=False, cpu_flags=XEON_FLAGS)
    assert choose_dtype("auto", **amx, probe_speedup=2.5, cpu_auto_bf16=True).dtype == "bf16_autocast"
    assert choose_dtype("auto", **amx, probe_speedup=2.5, cpu_auto_bf16=False).dtype == "fp32"  # switch off
    assert choose_dtype("auto", **amx, probe_speedup=1.2, cpu_auto_bf16=True).dtype == "fp32"  # measured, not faster
    assert choose_dtype("auto", **amx, probe_speedup=None, cpu_auto_bf16=True).dtype == "fp32"  # not measured
    only_avx512_bf16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
    assert choose_dtype("auto", has_cuda=False, cpu_flags=only_avx512_bf16, probe_speedup=1.6,
                        cpu_auto_bf16=True).dtype == "bf16_autocast"


def test_avx2_epyc_stays_fp32_whatever_the_probe_says():
    for switch in (False, True):
        for speedup in (None, 0.005, 10.0):
            choice = choose_dtype("auto", has_cuda=False, cpu_flags=EPYC_FLAGS, probe_speedup=speedup,
                                  cpu_auto_bf16=switch)
            assert choice.dtype == "fp32" and "amx_bf16" in choice.reason


def test_cuda_and_explicit_choices():
    assert choose_dtype("auto", has_cuda=True, cuda_bf16=True).dtype == "bf16"
    assert choose_dtype("auto", has_cuda=True, cuda_bf16=False).dtype == "fp32"
    for explicit in ("fp32", "bf16", "fp16", "bf16_autocast"):
        assert choose_dtype(explicit, has_cuda=False, cpu_flags=EPYC_FLAGS).dtype == explicit


def test_the_speedup_is_the_worst_probed_shape():
    assert fake_probe().speedup == pytest.approx(2.5)  # 400 / 160 on the LM-head shape, not 1200 / 160
    assert "worst ratio 2.50x" in fake_probe().describe()


# --- reading the CPU --------------------------------------------------------------------------------

def test_read_cpu_info_of_both_cpu_kinds(tmp_path):
    xeon, epyc = tmp_path / "xeon", tmp_path / "epyc"
    xeon.write_text(CPUINFO.format(vendor="GenuineIntel", model="Intel(R) Xeon(R) Processor", flags=" ".join(sorted(XEON_FLAGS))))
    epyc.write_text(CPUINFO.format(vendor="AuthenticAMD", model="AMD EPYC 7B13", flags=" ".join(sorted(EPYC_FLAGS))))
    assert read_cpu_info(str(xeon)) == CpuInfo("Intel(R) Xeon(R) Processor", XEON_FLAGS)
    assert read_cpu_info(str(xeon)).bf16_flags == ("amx_bf16", "avx512_bf16")
    assert read_cpu_info(str(epyc)).model == "AMD EPYC 7B13" and read_cpu_info(str(epyc)).bf16_flags == ()
    assert read_cpu_info(str(tmp_path / "missing")).flags == frozenset()


# --- the probe and its cache ------------------------------------------------------------------------

def test_probe_is_measured_once_and_cached_per_cpu_model(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return fake_probe()

    xeon = CpuInfo("Intel(R) Xeon(R) Processor", XEON_FLAGS)
    first, path, cached = cached_probe(xeon, cache_dir=tmp_path, measure=measure)
    assert not cached and len(calls) == 1 and path.is_file()
    stored = json.loads(path.read_text())
    assert stored["cpu_model"] == xeon.model and stored["format"] == precision.PROBE_FORMAT
    again, path_again, cached = cached_probe(xeon, cache_dir=tmp_path, measure=measure)
    assert cached and len(calls) == 1 and path_again == path and again.speedup == first.speedup
    other, other_path, cached = cached_probe(CpuInfo("Intel(R) Xeon(R) Platinum 8480+", XEON_FLAGS),
                                             cache_dir=tmp_path, measure=measure)
    assert not cached and other_path != path and len(calls) == 2  # another CPU model: measured again


@pytest.mark.parametrize("damage", ["{not json", json.dumps({"format": "other"}), json.dumps(
    {"format": precision.PROBE_FORMAT, "cpu_model": "Intel(R) Xeon(R) Processor", "shapes": [[1, 2, 3]],
     "fp32_gflops": [], "bf16_gflops": [1.0], "threads": 1, "torch_version": "x"})])
def test_a_damaged_cache_file_is_measured_again(tmp_path, damage):
    xeon = CpuInfo("Intel(R) Xeon(R) Processor", XEON_FLAGS)
    _, path, _ = cached_probe(xeon, cache_dir=tmp_path, measure=fake_probe)
    path.write_text(damage)
    result, _, cached = cached_probe(xeon, cache_dir=tmp_path, measure=fake_probe)
    assert not cached and result.speedup == pytest.approx(2.5)
    assert json.loads(path.read_text())["fp32_gflops"] == [160.0, 160.0]  # rewritten


def test_real_probe_returns_positive_rates_quickly():
    result = precision.probe_matmul(shapes=((64, 64, 64),), seconds=0.01)
    assert result.shapes and all(x > 0 for x in result.fp32_gflops + result.bf16_gflops)


# --- resolve_dtype on "this" machine, both switch settings ------------------------------------------

@pytest.fixture
def amx_machine(monkeypatch, tmp_path):
    """This process sees an AMX Xeon whose (fake) probe measured bf16 2.5x faster."""
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "read_cpu_info", lambda path="/proc/cpuinfo": CpuInfo("Fake Xeon", XEON_FLAGS))
    monkeypatch.setattr(precision, "probe_matmul", lambda *a, **k: fake_probe(model="Fake Xeon"))
    monkeypatch.setattr(precision, "_RESOLVED", {})
    said = []
    return said


def test_auto_is_fp32_without_the_switch_even_on_amx(amx_machine, monkeypatch):
    from alignkit.engine.config import resolve_dtype

    monkeypatch.setenv(precision.AUTO_BF16_ENV, "0")
    assert resolve_dtype("auto", has_cuda=False) == "fp32"
    block = build_train_ds_config(DeepSpeedConfig(), micro_batch_size=1, grad_accum_steps=1, world_size=1, has_cuda=False)
    assert compute_dtype_name(block) == "fp32" and "torch_autocast" not in block


def test_auto_with_the_switch_on_amx_is_bf16_autocast(amx_machine, monkeypatch, tmp_path):
    monkeypatch.setenv(precision.AUTO_BF16_ENV, "1")
    said = []
    choice = precision.resolve_auto("auto", has_cuda=False, say=said.append)
    assert choice.dtype == "bf16_autocast"
    assert len(said) == 1 and "Fake Xeon" in said[0] and "2.5x" in said[0]
    assert list((tmp_path / "precision").glob("probe-*.json"))  # measured once, cached under $ALIGNKIT_CACHE
    block = build_train_ds_config(DeepSpeedConfig(), micro_batch_size=1, grad_accum_steps=1, world_size=1, has_cuda=False)
    assert block["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert not block["bf16"]["enabled"] and not block["fp16"]["enabled"]  # fp32 weights, master weights, states
    assert compute_dtype_name(block) == "bf16_autocast"
    assert compute_dtype_name(build_frozen_ds_config(DeepSpeedConfig(), has_cuda=False)) == "bf16_autocast"


def test_the_switch_reads_1_and_0_and_falls_back_to_the_default(monkeypatch):
    monkeypatch.setattr(precision, "AUTO_BF16_DEFAULT", False)
    monkeypatch.delenv(precision.AUTO_BF16_ENV, raising=False)
    assert not precision.auto_bf16_switch()
    monkeypatch.setenv(precision.AUTO_BF16_ENV, "1")
    assert precision.auto_bf16_switch()
    monkeypatch.setattr(precision, "AUTO_BF16_DEFAULT", True)  # after the flip
    monkeypatch.setenv(precision.AUTO_BF16_ENV, "0")
    assert not precision.auto_bf16_switch()
    monkeypatch.delenv(precision.AUTO_BF16_ENV)
    assert precision.auto_bf16_switch()


def test_the_shipped_default_lets_auto_pick_bf16_and_the_suite_pins_fp32(monkeypatch):
    import importlib

    assert importlib.reload(precision).AUTO_BF16_DEFAULT is True  # flipped after the DPO comparison
    assert os.environ.get(precision.AUTO_BF16_ENV) == "0"  # tests/conftest.py: the suite runs fp32 everywhere


def test_auto_with_the_switch_on_an_epyc_never_probes(monkeypatch, tmp_path):
    monkeypatch.setenv(precision.AUTO_BF16_ENV, "1")
    monkeypatch.setattr(precision, "read_cpu_info", lambda path="/proc/cpuinfo": CpuInfo("AMD EPYC 7B13", EPYC_FLAGS))
    monkeypatch.setattr(precision, "probe_matmul", lambda *a, **k: pytest.fail("probed a CPU without bf16"))
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    assert precision.resolve_auto("auto", has_cuda=False, say=lambda _: None).dtype == "fp32"


def test_optimizer_in_backward_refuses_16_bit_weights():
    for dtype in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match="bf16_autocast"):
            DeepSpeedConfig(dtype=dtype, optimizer_in_backward=True, gradient_clipping=0).validate()
    DeepSpeedConfig(dtype="bf16_autocast", optimizer_in_backward=True, gradient_clipping=0).validate()
    with pytest.raises(ConfigError, match="bf16_autocast"):
        DeepSpeedConfig(dtype="bf16x").validate()


def test_fp16_on_a_cpu_without_fp16_is_refused_and_allowed_where_it_runs(monkeypatch):
    monkeypatch.setattr(precision, "cpu_fp16_supported", lambda: False)
    with pytest.raises(ConfigError, match=r"deepspeed.dtype=fp16 is not possible.*deepspeed.dtype=fp32"):
        precision.check_supported("fp16", has_cuda=False)
    precision.check_supported("fp16", has_cuda=True)  # a GPU takes fp16
    for other in ("fp32", "bf16", "bf16_autocast", "auto"):
        precision.check_supported(other, has_cuda=False)
    monkeypatch.setattr(precision, "cpu_fp16_supported", lambda: True)  # a CPU with AVX512-FP16 / AMX-FP16
    precision.check_supported("fp16", has_cuda=False)


def test_fp16_refusal_comes_before_the_model_loads(monkeypatch, tmp_path):
    """DeepSpeed itself says ``Type fp16 is not supported on your device`` only inside
    ``deepspeed.initialize``, after the model (and the reference pre-pass) loaded."""
    import alignkit.models.load as load
    from alignkit.run import train_from_overrides

    monkeypatch.setattr(precision, "cpu_fp16_supported", lambda: False)
    monkeypatch.setattr(load, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="fp16"):
        train_from_overrides(["recipe=dpo_tiny", "deepspeed.dtype=fp16", f"output_dir={tmp_path}", "run_name=fp16"])
    assert not (tmp_path / "fp16").exists()  # nothing left behind


# --- step 0 of a bf16 DPO run through the trainer -----------------------------------------------------

def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype", ["bf16_autocast", "bf16"])
def test_step0_dpo_loss_is_ln2_in_bf16(tmp_path, dtype):
    """The pre-pass forwards the training's own micro-batches in the same precision: at step 1 (and in
    the held-out pass before it) policy == reference bit for bit, so every DPO loss is ln 2 (1e-6)."""
    from alignkit.run import train_from_overrides

    code = train_from_overrides([
        "recipe=dpo_tiny", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.micro_batch_size=2",
        "trainer.eval_every=1", "trainer.max_eval_groups=6", "trainer.eval_batch_size=3", "trainer.export=false",
        "data.layout=prefix_shared", "data.max_tokens_per_row=512", f"deepspeed.dtype={dtype}",
        f"output_dir={tmp_path}", "run_name=bf16", f"trainer.reference_cache_dir={tmp_path}/ref"])
    assert code == 0
    records = _records(tmp_path / "bf16")
    first_train = next(r for r in records if r["split"] == "train")
    first_eval = next(r for r in records if r["split"] == "eval")
    assert first_train["step"] == 1 and first_eval["step"] == 0
    assert abs(first_train["loss"] - math.log(2)) < 1e-6, first_train["loss"]
    assert abs(first_eval["loss"] - math.log(2)) < 1e-6, first_eval["loss"]
    later = [r["loss"] for r in records if r["split"] == "train" and r["step"] == 2]
    assert later and abs(later[0] - math.log(2)) > 1e-4  # it did learn: the check is not vacuous


def test_plan_warns_about_bf16_only_on_a_cpu_without_bf16(monkeypatch):
    import alignkit.plan as plan
    from alignkit.config.compose import compose

    cfg = compose(["recipe=dpo_tiny", "deepspeed.dtype=bf16_autocast"])
    monkeypatch.setattr(plan.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "read_cpu_info", lambda path="/proc/cpuinfo": CpuInfo("Fake Xeon", XEON_FLAGS))
    assert not [w for w in plan._warnings(cfg, "preference", None) if "slower" in w]
    monkeypatch.setattr(precision, "read_cpu_info", lambda path="/proc/cpuinfo": CpuInfo("AMD EPYC", EPYC_FLAGS))
    assert [w for w in plan._warnings(cfg, "preference", None) if "far slower than fp32" in w]


def test_the_run_records_its_precision_and_a_resume_in_another_one_is_said(tmp_path):
    """precision.json holds what auto became (a card reads it); a resume that trains in another precision (auto
    on another CPU kind) is said, once, and kept in the history; the same precision again says nothing."""
    from alignkit.engine.precision import RUN_PRECISION, record_run_precision

    said = []
    assert record_run_precision(tmp_path, "auto", "bf16_autocast", "AMD EPYC", say=said.append) is None
    first = json.loads((tmp_path / RUN_PRECISION).read_text())
    assert first["resolved"] == "bf16_autocast" and first["requested"] == "auto" and first["cpu"] == "AMD EPYC"
    assert record_run_precision(tmp_path, "auto", "bf16_autocast", "AMD EPYC", say=said.append) is None and not said
    change = record_run_precision(tmp_path, "auto", "fp32", "Intel Xeon", say=said.append)
    assert said == [change] and "bf16_autocast" in change and "fp32" in change and "Intel Xeon" in change
    assert "deepspeed.dtype=bf16_autocast" in change  # how to keep the old one
    last = json.loads((tmp_path / RUN_PRECISION).read_text())
    assert last["resolved"] == "fp32" and [h["resolved"] for h in last["history"]] == ["bf16_autocast"] * 2 + ["fp32"]
    (tmp_path / RUN_PRECISION).write_text("{not json")  # a damaged file: said, and the history starts again
    said.clear()
    assert record_run_precision(tmp_path, "auto", "fp32", "Intel Xeon", say=said.append) is None
    assert len(said) == 1 and "unreadable" in said[0] and RUN_PRECISION in said[0]
    assert [h["resolved"] for h in json.loads((tmp_path / RUN_PRECISION).read_text())["history"]] == ["fp32"]


def test_a_tiny_run_writes_precision_json(tmp_path):
    """The worker's start writes it (rank 0), with the requested and the resolved precision."""
    from alignkit.run import train_from_overrides

    code = train_from_overrides(["recipe=sft_tiny", f"output_dir={tmp_path}", "run_name=r", "trainer.max_steps=1",
                                 "deepspeed.dtype=fp32", "trainer.eval_every=0"])
    assert code == 0
    record = json.loads((tmp_path / "r" / "precision.json").read_text())
    assert record["requested"] == "fp32" and record["resolved"] == "fp32"
