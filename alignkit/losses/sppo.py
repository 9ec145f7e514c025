"""The SPPO loss (Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
arXiv 2405.00675), trained by the ``sppo`` runner (``alignkit/trainers/sppo.py``).

SPPO approximates the multiplicative-weights update ``pi_{t+1}(y) ~ pi_t(y) exp(eta P(y > pi_t))``
by regressing each sampled reply's log-ratio to the previous iterate on its centred win rate (the
paper's Algorithm 1, eq. 4.7, the log-partition term approximated by the constant ``eta / 2``)::

    loss = mean over sampled sequences y of (log pi(y|x) - log pi_t(y|x) - (P(y > pi_t | x) - 1/2) / beta)^2

with ``log pi`` the summed log-probability of the reply's tokens (not length-normalised: the paper
and the reference code use sequence log-probabilities), ``pi_t`` the reference (the runner keeps it
at the previous iterate), and ``P(y > pi_t)`` the estimated win rate the runner puts in
``RolloutLogps.advantages`` as ``P - 1/2`` on every token of the sequence (as Nash-MD's ``P - 0.5``).
Sequences without a completion token are left out of the mean.

``beta`` is ``1 / eta``: the paper writes ``eta``; the reference code (github uclaml/SPPO,
``sppo/trainer.py``, ``loss_type="sppo"``) writes ``(logits_w - (1 / self.beta) * (chosen_probs_win
- 0.5)) ** 2`` and runs ``beta=0.001`` (``scripts/pipeline.sh``, with the comment "beta=1/eta ... is
usually chosen around 1e-3"). alignkit follows the code's ``beta`` so that it means the same here as
in ``sppo_hard`` (TRL's ``loss_type="sppo_hard"``, ``alignkit/losses/dpo.py``); the default 0.001 is
that script's. The reference code averages its two terms, ``(loss_w + loss_l) / 2``, and so does the
mean here: on a (chosen, rejected) pair with P = 1 and 0 the loss is exactly half of ``sppo_hard``
(TRL sums the two terms), with gradients in the same direction (tests/losses/test_online_losses.py).

Metrics: ``kl`` (mean summed log-ratio to pi_t per sequence, Nash-MD's name), ``win_rate`` (mean P of
the trained sequences), ``sppo/residual`` (mean |log-ratio - target|). Left out: the paper's
``sppo_single`` variant (one pair probability for both terms) and any length normalisation.
"""

from __future__ import annotations

import torch

from alignkit.losses.common import validate_knobs
from alignkit.losses.registry import RolloutLogps, register_loss

Out = tuple[torch.Tensor, dict[str, torch.Tensor]]


@register_loss(view="rollout", runner="sppo", needs_reference=True)
def sppo(inputs: RolloutLogps, *, beta: float = 0.001) -> Out:
    """SPPO: mean over sampled sequences of (log pi(y)/pi_t(y) - (P(y > pi_t) - 1/2) / beta)^2."""
    validate_knobs("sppo", locals())  # beta > 0 (eta = 1 / beta)
    if inputs.ref_logps is None:
        raise ValueError("sppo needs RolloutLogps.ref_logps: the previous iterate's log-probs (the sppo runner "
                         "fills them)")
    mask = inputs.mask.bool()
    rows = mask.any(dim=-1)  # sequences with a completion token
    tokens = mask.sum(dim=-1).clamp(min=1)
    log_ratio = torch.where(mask, inputs.logps - inputs.ref_logps.detach(), 0.0).sum(dim=-1)  # [S]
    centred = torch.where(mask, inputs.advantages.detach(), 0.0).sum(dim=-1) / tokens  # P - 1/2, the same on each token
    target = centred / beta
    per_seq = (log_ratio - target) ** 2
    count = rows.sum().clamp(min=1)
    metrics = {
        "kl": (log_ratio.detach() * rows).sum() / count,
        "win_rate": ((centred + 0.5) * rows).sum() / count,
        "sppo/residual": ((log_ratio.detach() - target).abs() * rows).sum() / count,
    }
    return (per_seq * rows).sum() / count, metrics
