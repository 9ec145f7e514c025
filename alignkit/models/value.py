"""The PPO critic: a decoder plus a scalar head giving one value per position (or per target).

``ValueModel`` reuses a transformers decoder (the body of a causal LM or of a reward model, LoRA
layers included when it was wrapped) and adds ``value_head: Linear(hidden, 1)``. Its forward takes
the same inputs as ``TargetLogProbs`` and, given ``target_index``, returns the values at the
target positions only (``[N]``), the gathering the trainers need; without it, ``[B, L]``.
``load_value_model`` builds it from any model source: from a sequence-classification (reward)
folder the head starts from the reward head's weights, otherwise it starts small and random.

Deliberately left out: a transformers ``save_pretrained`` for the critic (it is a training-time
module; its state lives in the engine's checkpoints) and multi-head values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.models.config import ModelConfig
from alignkit.models.logprobs import model_dtype, prepare_attention_mask


class ValueModel(nn.Module):
    """Decoder + scalar head; ``forward`` -> values ``[N]`` at ``target_index`` or ``[B, L]``."""

    def __init__(self, backbone: nn.Module, value_head: nn.Linear | None = None, *, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        if value_head is None:
            hidden_size = backbone.config.hidden_size
            value_head = nn.Linear(hidden_size, 1, dtype=model_dtype(backbone))
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                value_head.weight.normal_(std=1.0 / (hidden_size + 1))
                value_head.bias.zero_()
        self.value_head = value_head

    @classmethod
    def from_pretrained_model(cls, model: nn.Module, *, seed: int = 0) -> "ValueModel":
        """Take the decoder of a causal LM or sequence-classification model (plain or peft)."""
        backbone = model.get_decoder()
        score = getattr(_unwrapped(model), "score", None)
        head = None
        if isinstance(score, nn.Module):
            weight = _module_weight(score)
            if weight is not None and weight.shape[0] == 1:
                head = nn.Linear(weight.shape[1], 1, dtype=weight.dtype)
                with torch.no_grad():
                    head.weight.copy_(weight)
                    head.bias.zero_()
        return cls(backbone, head, seed=seed)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        target_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        output = self.backbone(
            input_ids=input_ids,
            attention_mask=prepare_attention_mask(attention_mask, model_dtype(self.backbone)),
            position_ids=position_ids,
            use_cache=False,
        )
        hidden = output.last_hidden_state
        if target_index is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index)
        return self.value_head(hidden).squeeze(-1).float()


def _unwrapped(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else model


def _module_weight(module: nn.Module) -> torch.Tensor | None:
    # peft's modules_to_save wrapper keeps the trained copy in .modules_to_save["default"]
    weight = getattr(module, "weight", None)
    if weight is None:
        trained = getattr(module, "modules_to_save", None)
        if trained is not None and len(trained):
            weight = next(iter(trained.values())).weight
    return weight.detach() if weight is not None else None


def _is_reward_folder(name_or_path: str) -> bool:
    config_path = Path(name_or_path).expanduser() / "config.json"
    if not config_path.is_file():
        return False
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def load_value_model(cfg: ModelConfig) -> tuple[ValueModel, Any]:
    """``(ValueModel, tokenizer)`` from any source; a reward-model folder also seeds the value head."""
    from alignkit.models.load import as_model_config, load_causal_lm, load_reward_model

    cfg = as_model_config(cfg)
    loader = load_reward_model if _is_reward_folder(cfg.name_or_path) else load_causal_lm
    model, tokenizer = loader(cfg)
    return ValueModel.from_pretrained_model(model, seed=cfg.tiny.seed), tokenizer
