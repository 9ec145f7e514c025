"""alignkit.models: load models and tokenizers from every source, the tiny model, fast target log-probs.

Public surface (import from the submodules for anything else):

* ``ModelConfig``, ``TinyModelConfig``, ``LoraConfig`` (config.py): the ``model`` config group's schema.
* ``load_causal_lm``, ``load_reward_model``, ``load_tokenizer``, ``load_tokenizer_for``, ``export_pretrained``,
  ``disabled_adapter``, ``unwrap_model`` (load.py).
* ``TargetLogProbs``, ``naive_target_logps``, ``prepare_attention_mask`` (logprobs.py).
* ``ValueModel``, ``load_value_model`` (value.py): the PPO critic.
* ``smollm2_dir`` (smollm2.py), ``build_tiny_model``, ``tiny_tokenizer_dir`` (tiny.py).
"""

from alignkit.models.config import LoraConfig, ModelConfig, TinyModelConfig
from alignkit.models.load import (
    disabled_adapter,
    export_pretrained,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    load_tokenizer_for,
    unwrap_model,
)
from alignkit.models.logprobs import TargetLogProbs, naive_target_logps, prepare_attention_mask
from alignkit.models.smollm2 import smollm2_dir
from alignkit.models.tiny import build_tiny_model, tiny_tokenizer_dir
from alignkit.models.value import ValueModel, load_value_model

__all__ = [
    "LoraConfig",
    "ModelConfig",
    "TargetLogProbs",
    "TinyModelConfig",
    "ValueModel",
    "build_tiny_model",
    "disabled_adapter",
    "export_pretrained",
    "load_causal_lm",
    "load_reward_model",
    "load_tokenizer",
    "load_tokenizer_for",
    "load_value_model",
    "naive_target_logps",
    "prepare_attention_mask",
    "smollm2_dir",
    "tiny_tokenizer_dir",
    "unwrap_model",
]
