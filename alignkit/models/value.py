"""The PPO critic: a decoder plus a scalar head giving one value per position (or per target).

``ValueModel`` reuses a transformers decoder (the body of a causal LM or of a reward model, LoRA
layers included when it was wrapped) and adds ``value_head: Linear(hidden, 1)``. Its forward takes
the same inputs as ``TargetLogProbs`` and, given ``target_index``, returns the values at the
target positions only (``[N]``), the gathering the trainers need; without it, ``[B, L]``.
``load_value_model`` builds it from any model source: from a sequence-classification (reward)
folder the head starts from the reward head's weights, from a token-classification folder (an
exported critic) it is that folder's head, otherwise it starts small and random.

Export: ``as_token_classifier`` turns a critic into a transformers ``*ForTokenClassification`` with
one label (decoder with LoRA merged, ``score`` = the value head, bias included), which is exactly a
value per position; ``save_pretrained`` writes it and ``AutoModelForTokenClassification`` or
``load_value_model`` load it back with the same values. PPO exports its critic this way through the
actor's export path (``alignkit.engine.export``). Deliberately left out: multi-head values.
"""

from __future__ import annotations

import copy
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
            score = _trained_copy(score)
            if isinstance(getattr(score, "weight", None), torch.Tensor) and score.weight.shape[0] == 1:
                head = nn.Linear(score.weight.shape[1], 1, dtype=score.weight.dtype)
                with torch.no_grad():
                    head.weight.copy_(score.weight)
                    head.bias.copy_(score.bias if score.bias is not None else torch.zeros(1))
        return cls(backbone, head, seed=seed)

    def as_token_classifier(self) -> nn.Module:
        """This critic as a transformers ``*ForTokenClassification`` (num_labels=1) sharing its modules,
        LoRA layers merged into their base weights in place: call it on a copy (the export hook does)."""
        from transformers import AutoModelForTokenClassification

        backbone = _merge_lora_layers(self.backbone)
        config = copy.deepcopy(backbone.config)
        config.num_labels, config.architectures = 1, None
        with torch.device("meta"):  # the body and head are replaced below; allocate nothing
            model = AutoModelForTokenClassification.from_config(config)
        setattr(model, model.base_model_prefix, backbone)
        model.score = self.value_head
        return model.eval()

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


def _trained_copy(module: nn.Module) -> nn.Module:
    # peft's modules_to_save wrapper keeps the trained copy in .modules_to_save["default"]
    trained = getattr(module, "modules_to_save", None)
    return next(iter(trained.values())) if trained is not None and len(trained) else module


def _merge_lora_layers(module: nn.Module) -> nn.Module:
    """Merge every peft LoRA layer inside ``module`` into its base layer and put the base layer back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, layer.get_base_layer())
    return module


def _head_kind(name_or_path: str) -> str | None:
    """``sequence`` (a reward model), ``token`` (an exported critic) or None, from a folder's config."""
    config_path = Path(name_or_path).expanduser() / "config.json"
    if not config_path.is_file():
        return None
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    for kind in ("sequence", "token"):
        if any(name.endswith(f"For{kind.title()}Classification") for name in architectures):
            return kind
    return None


def load_value_model(cfg: ModelConfig, *, dtype: str = "fp32") -> tuple[ValueModel, Any]:
    """``(ValueModel, tokenizer)`` from any source; a reward-model or critic folder also gives the head.
    ``dtype``: the run's ``deepspeed.dtype``, as in ``load_causal_lm``."""
    from alignkit.models.load import as_model_config, load_causal_lm, load_reward_model

    cfg = as_model_config(cfg)
    kind = _head_kind(cfg.name_or_path)
    if kind is None:
        model, tokenizer = load_causal_lm(cfg, dtype=dtype)
    else:
        model, tokenizer = load_reward_model(cfg, per_token=kind == "token", dtype=dtype)
    return ValueModel.from_pretrained_model(model, seed=cfg.tiny.seed), tokenizer
