"""Supervised fine-tuning loss: the token-mean NLL of slot 0 of each group.

Slot 0 is the demonstration of SFT data (K=1) and the chosen completion of paired data (K=2), so
``sft`` serves plain SFT and, combined with a preference loss in ``combine``, RPO (dpo + sft) and
CPO/SimPO-style NLL regularisers.

Normalisation: the summed log-probs of slot 0 over the whole batch divided by the number of slot-0
target tokens in the batch (clamped at 1), i.e. every target token weighs the same and long
completions weigh more than short ones, as TRL's SFT and DPO ``sft`` losses. Gradient accumulation
across micro-batches of different token counts is the trainer's business.

Left out: per-token weighting (e.g. ignoring the prompt is the data pipeline's job: only target
tokens are summed into ``logps``) and label smoothing.
"""

from __future__ import annotations

import torch

from alignkit.losses.common import token_mean_nll
from alignkit.losses.registry import SequenceLogps, register_loss


@register_loss(view="sft", needs_reference=False)
def sft(inputs: SequenceLogps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean negative log-likelihood of slot 0 (the demonstration or the chosen completion)."""
    return token_mean_nll(inputs), {"logps/chosen": inputs.logps[:, 0].detach().mean()}
