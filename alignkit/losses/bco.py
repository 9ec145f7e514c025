"""BCO: Binary Classifier Optimization (Jung et al. 2024), unpaired (view "unpaired": K=1 with labels).

Each completion's implicit reward ``r = beta * (logp - ref_logp)`` is the logit of a binary
classifier "desirable or not", shifted by ``delta``:

    desirable:   -log sigmoid(r - delta)          undesirable:   -log sigmoid(-(r - delta))

and the loss is the mean over all completions (TRL's BCOTrainer: ``losses.nanmean()`` over the
concatenated desirable and undesirable losses). The metrics are those of ``unpaired.py`` (class
means, no accuracy) plus ``bco/delta``.

The reward shift. The paper's ``delta`` is a running mean of the rewards; TRL's BCOTrainer (removed
by TRL 1.16; read in huggingface/trl's ``trl/trainer/bco_trainer.py`` and ``RunningMoments`` before
the removal) updated its running moments with every training batch's rewards *before* the loss, so
its ``delta`` is the count-weighted mean of all rewards seen so far, the current batch included
(gathered over ranks). A registered loss is a pure function and keeps no state, so:

* ``delta=None`` (default): the mean reward of the completions in this call (detached). That is
  TRL's value at its first step, and its exact value whenever the running mean restarts at the
  batch. Under gradient accumulation "this call" is one micro-batch on one rank.
* ``delta=<float>``: a fixed shift (``0`` gives the plain logistic classifier on ``r``).

A trainer that wants the paper's running mean must keep it across steps (the sum and count of the
rewards of every completion, all-reduced over ranks, the way the preference trainer builds KTO's
step KL estimate) and pass the value in as ``delta`` each step; the preference trainer does not do
this today.

Left out: underlying distribution matching (UDM: density-ratio weights from a classifier on prompt
embeddings, which needs an embedding model and a fitted classifier), and per-class weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alignkit.losses.common import register_knob_rules, validate_knobs
from alignkit.losses.registry import SequenceLogps, register_loss
from alignkit.losses.unpaired import _finish, _unpaired_terms

Out = tuple[torch.Tensor, dict[str, torch.Tensor]]

register_knob_rules("bco", delta=(math.isfinite, "the reward shift must be finite, or null for the batch mean"))


@register_loss(view="unpaired", needs_reference=True)
def bco(inputs: SequenceLogps, *, beta: float = 0.1, delta: float | None = None) -> Out:
    """BCO: desirable -log sigmoid(r - delta), undesirable -log sigmoid(delta - r), r = beta*h (delta=None: mean r)."""
    validate_knobs("bco", locals())
    logps, h, desirable = _unpaired_terms(inputs)
    rewards = beta * h
    shift = rewards.detach().mean() if delta is None else rewards.new_tensor(float(delta))
    loss, metrics = _finish(F.softplus(-(rewards - shift)), F.softplus(rewards - shift), desirable,
                            1.0, 1.0, rewards, logps)
    metrics["bco/delta"] = shift.detach()
    return loss, metrics
