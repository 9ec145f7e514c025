"""Load policies, reward models and tokenizers from every supported source; export; LoRA helpers.

Sources (``ModelConfig.name_or_path``): ``tiny`` (built from config + the shipped tokenizer),
``smollm2`` (the cached conversion of the packaged GGUF), a local transformers folder, a ``.gguf``
file (or a folder plus ``gguf_file``), or a hub id, which goes through transformers and, without
network, fails with a ``ModelLoadError`` naming the id. Local folders load their safetensors weights
(transformers prefers them over ``.bin``); GGUF weights are dequantised to plain tensors so the model
trains and saves like any other. ``trust_remote_code`` is passed to every transformers load, as
``False`` unless configured: transformers never asks on stdin (a ``y`` from a terminal or ``yes |``
cannot run a folder's code), and a folder that needs its own code fails with a ``ModelLoadError``.
``load_tokenizer_for(cfg.model)`` is the one tokenizer loader of the trainers (it honours
``gguf_file``, ``trust_remote_code`` and ``revision``).

After loading: a pad token is set when the tokenizer has none (eos, else unk), gradient
checkpointing (non-reentrant) is enabled when asked, and LoRA adapters wrap the model through peft
when ``lora.r > 0``. ``disabled_adapter`` yields the same model with its adapters off (the frozen
reference of LoRA training); ``export_pretrained`` writes a transformers-loadable folder atomically.

Deliberately left out: device placement and sharding (the engine's job: DeepSpeed moves and
partitions the modules returned here), quantised loading, and ZeRO-3 gathering inside
``export_pretrained`` (call it on full parameters, e.g. within ``deepspeed.zero.GatheredParameters``).
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from alignkit.errors import ConfigError, ModelLoadError
from alignkit.models.config import SPECIAL_SOURCES, LoraConfig, ModelConfig
from alignkit.models.fsutil import atomic_directory
from alignkit.models.lean import make_lean
from alignkit.models.smollm2 import smollm2_dir, strip_gguf_quantization_config
from alignkit.models.tiny import build_tiny_model, load_tiny_tokenizer

LOCAL_WEIGHT_FILES = ("config.json",)


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: ``kind`` is tiny | folder | gguf | hub."""

    kind: str
    location: str = ""  # folder (folder, gguf) or hub id
    gguf_file: str | None = None

    def describe(self) -> str:
        if self.kind == "gguf":
            return str(Path(self.location) / (self.gguf_file or ""))
        return self.location or self.kind


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a missing path."""
    return name.startswith(("/", ".", "~")) or name.endswith(".gguf") or name.count("/") > 1 or "\\" in name


def resolve_source(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """Classify ``name_or_path``; raises ``ModelLoadError`` for a local path that does not exist."""
    if name_or_path == "tiny":
        return ModelSource("tiny")
    if name_or_path == "smollm2":
        return ModelSource("folder", str(smollm2_dir()))
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise ModelLoadError(
                    f"model.gguf_file={gguf_file!r} is not a file in {path}. Name a .gguf file inside "
                    "model.name_or_path, or give the file's full path as model.name_or_path."
                )
            return ModelSource("gguf", str(path), gguf_file)
        if not any((path / name).is_file() for name in LOCAL_WEIGHT_FILES):
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" It holds GGUF files ({', '.join(ggufs)}): set model.gguf_file to one." if ggufs else ""
            raise ModelLoadError(
                f"{path} is a folder but not a transformers model folder (no config.json).{hint} "
                "Point model.name_or_path at a folder written by save_pretrained, a .gguf file, "
                f"or one of {', '.join(SPECIAL_SOURCES)}."
            )
        return ModelSource("folder", str(path))
    if _looks_like_path(name_or_path):
        raise ModelLoadError(
            f"model path {name_or_path!r} does not exist. Check the path, or use one of "
            f"{', '.join(SPECIAL_SOURCES)} or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'."
        )
    return ModelSource("hub", name_or_path)


def _load_error(source: ModelSource, what: str, error: Exception) -> ModelLoadError:
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    if source.kind == "hub":
        return ModelLoadError(
            f"could not load the {what} of hub model {source.location!r} ({reason}). Hub access needs a network "
            "connection (and a token for gated models). Download the model elsewhere (e.g. "
            f"`huggingface-cli download {source.location} --local-dir DIR`) and set model.name_or_path=DIR."
        )
    if "Weights only load failed" in str(error):  # a pickle (.bin / .pt) holding more than tensors
        return ModelLoadError(
            f"the {what} at {source.describe()} has pickle weights (pytorch_model.bin / *.pt) holding Python objects "
            "besides tensors: alignkit reads pickles with torch.load(weights_only=True), so it was refused and "
            "nothing in it ran. Do not load it with weights_only=False; get the model as safetensors from a source "
            "you trust (or convert a trusted copy with save_pretrained(..., safe_serialization=True))."
        )
    if "trust_remote_code" in str(error):
        return ModelLoadError(
            f"the {what} at {source.describe()} needs custom code from its folder ({reason}). Read that code, "
            "and only if you trust it, set model.trust_remote_code=true."
        )
    return ModelLoadError(
        f"could not load the {what} from {source.describe()} ({reason}). Check that the folder was written by "
        "save_pretrained (config.json plus weights) or that the .gguf file is a supported architecture."
    )


def _pretrained_kwargs(source: ModelSource, cfg: ModelConfig | None = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": False}  # never None: None makes transformers prompt
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    if cfg is not None:
        kwargs["trust_remote_code"] = bool(cfg.trust_remote_code)
        if cfg.revision is not None and source.kind == "hub":
            kwargs["revision"] = cfg.revision
    return kwargs


def ensure_pad_token(tokenizer, model: nn.Module | None = None) -> None:
    """Give ``tokenizer`` a pad token when it has none (eos, else unk); mirror it in the model config."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelLoadError(
                "the tokenizer has no pad, eos or unk token to pad batches with. Add a pad token to the "
                "tokenizer folder (tokenizer.add_special_tokens({'pad_token': ...}) and save it)."
            )
        tokenizer.pad_token = fallback
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and generation_config.pad_token_id is None:
            generation_config.pad_token_id = tokenizer.pad_token_id


def _tokenizer_for_source(source: ModelSource, **kwargs):
    from transformers import AutoTokenizer

    if source.kind == "tiny":
        tokenizer = load_tiny_tokenizer(**kwargs)
    else:
        if source.kind == "gguf":
            kwargs.setdefault("gguf_file", source.gguf_file)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        except Exception as error:  # transformers raises OSError, ValueError, KeyError, ... here
            raise _load_error(source, "tokenizer", error) from error
    ensure_pad_token(tokenizer)
    return tokenizer


def load_tokenizer(name_or_path: str, **kwargs):
    """The tokenizer of any model source (pad token guaranteed); ``kwargs`` go to ``AutoTokenizer``.

    ``gguf_file=`` selects a file inside a folder, as for models. ``trust_remote_code`` defaults to
    ``False`` (never ``None``, which would make transformers prompt on stdin). Trainers use
    ``load_tokenizer_for(cfg.model)``, which takes every relevant setting from the model section.
    """
    source = resolve_source(name_or_path, kwargs.pop("gguf_file", None))
    kwargs["trust_remote_code"] = bool(kwargs.get("trust_remote_code") or False)
    return _tokenizer_for_source(source, **kwargs)


def load_tokenizer_for(cfg: Any):
    """The tokenizer of a model section (``ModelConfig``, its OmegaConf node, or a dict).

    ``gguf_file``, ``trust_remote_code`` and (hub ids) ``revision`` are honoured exactly as by
    ``load_causal_lm``, so the tokenizer a trainer prepares data with is the model's own.
    """
    cfg = as_model_config(cfg)
    return _tokenizer_for_config(cfg, resolve_source(cfg.name_or_path, cfg.gguf_file))


def _tokenizer_for_config(cfg: ModelConfig, source: ModelSource):
    return _tokenizer_for_source(source, **_pretrained_kwargs(source, cfg))


def _weights_dtype(dtype: str):
    """The torch dtype the weights load in for a ``deepspeed.dtype`` value (``engine.config.weights_dtype``)."""
    from alignkit.engine.config import weights_dtype

    return weights_dtype(str(dtype))


def _from_pretrained(auto_class, source: ModelSource, cfg: ModelConfig, what: str, dtype: str, **extra):
    kwargs = _pretrained_kwargs(source, cfg)
    kwargs.update(dtype=_weights_dtype(dtype), attn_implementation=cfg.attn_implementation, **extra)
    try:
        model = auto_class.from_pretrained(source.location, **kwargs)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, ... here
        raise _load_error(source, what, error) from error
    if source.kind == "gguf":
        strip_gguf_quantization_config(model)
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers 5 name, 4.x fallback)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _finish(model: nn.Module, tokenizer, cfg: ModelConfig, lora_task_type: str) -> nn.Module:
    ensure_pad_token(tokenizer, model)
    if cfg.lean_activations:
        make_lean(model)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, task_type=lora_task_type)
    return model


def as_model_config(cfg: Any) -> ModelConfig:
    """Accept a ``ModelConfig``, an OmegaConf node of its schema, or a plain dict; validate it."""
    if not isinstance(cfg, ModelConfig):
        from omegaconf import OmegaConf

        node = OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg)
        cfg = OmegaConf.to_object(node)
    cfg.validate()
    return cfg


def load_causal_lm(cfg: ModelConfig, *, dtype: str = "fp32") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for a policy or reference: a causal LM, LoRA-wrapped when ``lora.r > 0``.

    ``dtype`` is the run's ``deepspeed.dtype`` (the one precision knob): the weights load in the
    precision DeepSpeed keeps them in (bf16/fp16, else fp32; ``engine.config.weights_dtype``)."""
    from transformers import AutoModelForCausalLM

    cfg = as_model_config(cfg)
    source = resolve_source(cfg.name_or_path, cfg.gguf_file)
    tokenizer = _tokenizer_for_config(cfg, source)
    if source.kind == "tiny":
        model = build_tiny_model(
            cfg.tiny, tokenizer, dtype=_weights_dtype(dtype), attn_implementation=cfg.attn_implementation
        )
    else:
        model = _from_pretrained(AutoModelForCausalLM, source, cfg, "model", dtype)
    return _finish(model, tokenizer, cfg, "CAUSAL_LM"), tokenizer


def load_reward_model(cfg: ModelConfig, *, per_token: bool = False, dtype: str = "fp32",
                      num_labels: int = 1) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: ``AutoModelForSequenceClassification`` with one label (a scalar reward).

    From a causal-LM folder the decoder is reused and the ``score`` head is new (transformers
    reports it as newly initialised). The score is read at the last non-pad token, so the model's
    ``pad_token_id`` is set from the tokenizer. ``per_token=True`` loads the
    ``AutoModelForTokenClassification`` twin instead (a value per position: an exported PPO critic);
    with ``num_labels=2``, a process reward model's correct/incorrect head (``runner=prm``).
    ``dtype``: the run's ``deepspeed.dtype``, as in ``load_causal_lm``.
    """
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        LlamaForSequenceClassification,
        LlamaForTokenClassification,
    )

    cfg = as_model_config(cfg)
    source = resolve_source(cfg.name_or_path, cfg.gguf_file)
    tokenizer = _tokenizer_for_config(cfg, source)
    if source.kind == "tiny":
        model = build_tiny_model(
            cfg.tiny,
            tokenizer,
            dtype=_weights_dtype(dtype),
            attn_implementation=cfg.attn_implementation,
            model_class=LlamaForTokenClassification if per_token else LlamaForSequenceClassification,
            num_labels=num_labels,
        )
    else:
        auto_class = AutoModelForTokenClassification if per_token else AutoModelForSequenceClassification
        model = _from_pretrained(auto_class, source, cfg, "value model" if per_token else "reward model", dtype,
                                 num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    return _finish(model, tokenizer, cfg, "TOKEN_CLS" if per_token else "SEQ_CLS"), tokenizer


def apply_lora(model: nn.Module, lora: LoraConfig, *, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters (base weights frozen, adapters trainable)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as error:
        linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"model.lora.target_modules={list(lora.target_modules)} does not fit this model ({error}). "
            f"Its linear layers are named: {', '.join(linear_names)}."
        ) from error


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers/peft model inside DeepSpeed engines and alignkit wrappers (``.module``, ``.model``)."""
    from transformers import PreTrainedModel

    seen = model
    while not _is_peft(seen) and not isinstance(seen, PreTrainedModel):
        inner = getattr(seen, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(seen, "model", None)
        if not isinstance(inner, nn.Module):
            return seen
        seen = inner
    return seen


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def disabled_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Yield ``model`` with its LoRA adapters disabled: the frozen base model, used as the reference.

    Accepts the peft model or anything wrapping it (DeepSpeed engine, ``TargetLogProbs``); the
    adapters are re-enabled on exit. A model without adapters is a programming error here (the
    policy would silently serve as its own reference), so it raises ``ValueError``.
    """
    peft_model = unwrap_model(model)
    if not _is_peft(peft_model):
        raise ValueError("disabled_adapter() needs a peft (LoRA) model; load the reference model separately")
    with peft_model.disable_adapter():
        yield model


def export_pretrained(model: nn.Module, tokenizer, out_dir: str | os.PathLike, merge_lora: bool = True) -> Path:
    """Write ``model`` (+ ``tokenizer``) as a transformers-loadable safetensors folder, atomically.

    A LoRA model is merged into its base weights (on a copy; the live model keeps its adapters)
    unless ``merge_lora=False``, which saves the adapter alone (``adapter_config.json`` +
    ``adapter_model.safetensors``, loadable with peft). Returns the folder.
    """
    inner = unwrap_model(model)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp_dir:
        if _is_peft(inner) and merge_lora:
            merged = copy.deepcopy(inner).merge_and_unload()
            merged.save_pretrained(str(tmp_dir), safe_serialization=True)
            del merged
        else:
            inner.save_pretrained(str(tmp_dir), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp_dir))
    return out_dir
