"""Paired losses with a reference model: DPO and its family, under TRL 1.16's ``loss_type`` names.

Every loss reads slot 0 (chosen) and slot 1 (rejected) of ``SequenceLogps`` [G, 2], needs
``ref_logps``, and returns the mean over pairs of a per-pair loss. With ``h = logp - ref_logp``
the implicit reward reported in the metrics is ``beta * h``.

Knobs, accepted where TRL accepts them:

* ``f_divergence`` / ``f_alpha`` (f-DPO): replaces ``h`` by ``f'(exp h)`` inside the chosen -
  rejected difference; only on the losses built on that difference (dpo, hinge, ipo, exo_pair,
  robust, discopop, sigmoid_norm), the others have no f-divergence form and do not take the knob.
* ``use_weighting`` (WPO): multiplies each pair's loss by the detached ``common.wpo_weights``; needs
  ``token_logps``, ``token_log_sq_mass``, ``token_mask``. Not on ``aot`` (batch-sorted, as TRL).
* ``ld_alpha`` (LD-DPO): recomputes policy and reference sums from the per-token tensors, weighting
  tokens past the shorter completion's length by ``ld_alpha``; needs ``token_logps`` (with grad),
  ``ref_token_logps``, ``token_mask``. ``reads_token_logps``, each loss's ``needs_token_logps``,
  tells the trainer when.

Deliberate differences from TRL 1.16 (tests check each): ``dpo`` honours ``label_smoothing``
(conservative DPO, (1-e)*l(z) + e*l(-z)); TRL's ``sigmoid`` ignores it. ``bco_pair`` takes the
running reward mean as a keyword ``delta`` (default 0, which is TRL 1.16's value: it keeps no running
mean for the paired variant); a pure function keeps no state, the trainer may pass one.
``discopop`` evaluates ``exp(-z) * sigmoid(z/tau)`` in log space, so huge negative margins give a
finite loss where TRL gives nan. ``robust`` defaults to ``label_smoothing=0.1`` (the rDPO paper's
value; TRL's 0 makes it plain DPO).

Left out: stateful variants (TR-DPO reference sync, BCO's running mean) and ``aot_unpaired``; TDPO
(per-token KL to the reference) lives in ``tdpo.py``, reference-free losses in ``reference_free.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.common import (
    PairTerms,
    f_divergence_scores,
    pair_terms,
    preference_metrics,
    register_knob_rules,
    smoothed_logistic,
    validate_knobs,
    wpo_weights,
)
from alignkit.losses.registry import SequenceLogps, register_loss

Out = tuple[torch.Tensor, dict[str, torch.Tensor]]

register_knob_rules("robust", label_smoothing=(lambda v: 0.0 <= v < 0.5, "a label-flip rate in [0, 0.5)"))
register_knob_rules("exo_pair", label_smoothing=(lambda v: 1e-12 <= v < 1.0, "EXO's epsilon in (0, 1), e.g. 1e-3"))


def reads_token_logps(hparams: dict) -> bool:
    """WPO (``use_weighting``) and LD-DPO (``ld_alpha``) read the per-token tensors; the plain sums do not."""
    return bool(hparams.get("use_weighting")) or hparams.get("ld_alpha") is not None


def _terms(name: str, inputs: SequenceLogps, knobs: dict) -> PairTerms:
    validate_knobs(name, knobs)
    return pair_terms(inputs, ld_alpha=knobs.get("ld_alpha"))


def _delta(t: PairTerms, f_divergence: str, f_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """f-transformed chosen and rejected scores."""
    return (f_divergence_scores(t.chosen_logratios, f_divergence, f_alpha),
            f_divergence_scores(t.rejected_logratios, f_divergence, f_alpha))


def _finish(per_pair: torch.Tensor, t: PairTerms, beta: float, inputs: SequenceLogps, use_weighting: bool) -> Out:
    if use_weighting:
        per_pair = per_pair * wpo_weights(inputs)
    metrics = preference_metrics(beta * t.chosen_logratios, beta * t.rejected_logratios,
                                 t.chosen_logps, t.rejected_logps)
    return per_pair.mean(), metrics


@register_loss(view="pairwise", needs_reference=True, needs_token_logps=reads_token_logps)
def dpo(inputs: SequenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.0,
        f_divergence: str = "reverse_kl", f_alpha: float = 0.5, use_weighting: bool = False,
        ld_alpha: float | None = None) -> Out:
    """DPO (sigmoid): -log sigmoid(beta * (h_c - h_r)); label_smoothing > 0 gives conservative DPO."""
    t = _terms("dpo", inputs, locals())
    chosen, rejected = _delta(t, f_divergence, f_alpha)
    return _finish(smoothed_logistic(beta * (chosen - rejected), label_smoothing), t, beta, inputs, use_weighting)


@register_loss(view="pairwise", needs_reference=True, needs_token_logps=reads_token_logps)
def hinge(inputs: SequenceLogps, *, beta: float = 0.1, f_divergence: str = "reverse_kl", f_alpha: float = 0.5,
          use_weighting: bool = False, ld_alpha: float | None = None) -> Out:
    """SLiC / RSO hinge: relu(1 - beta * (h_c - h_r))."""
    t = _terms("hinge", inputs, locals())
    chosen, rejected = _delta(t, f_divergence, f_alpha)
    return _finish(torch.relu(1.0 - beta * (chosen - rejected)), t, beta, inputs, use_weighting)


def _length_normalised_delta(t: PairTerms, f_divergence: str, f_alpha: float) -> torch.Tensor:
    chosen, rejected = _delta(t, f_divergence, f_alpha)
    return chosen / t.chosen_lengths - rejected / t.rejected_lengths


@register_loss(view="pairwise", needs_reference=True, needs_token_logps=reads_token_logps)
def ipo(inputs: SequenceLogps, *, beta: float = 0.1, f_divergence: str = "reverse_kl", f_alpha: float = 0.5,
        use_weighting: bool = False, ld_alpha: float | None = None) -> Out:
    """IPO: (d - 1/(2*beta))^2 with d the difference of per-token (length-normalised) log-ratios.

    The per-token normalisation follows TRL (confirmed there with the IPO authors); beta is IPO's tau.
    Lengths are clamped at 1 so an empty completion cannot divide by zero.
    """
    t = _terms("ipo", inputs, locals())
    d = _length_normalised_delta(t, f_divergence, f_alpha)
    return _finish((d - 1.0 / (2.0 * beta)) ** 2, t, beta, inputs, use_weighting)


@register_loss(view="pairwise", needs_reference=True, needs_token_logps=reads_token_logps)
def sigmoid_norm(inputs: SequenceLogps, *, beta: float = 0.1, f_divergence: str = "reverse_kl",
                 f_alpha: float = 0.5, use_weighting: bool = False, ld_alpha: float | None = None) -> Out:
    """DPO on per-token log-ratios: -log sigmoid(beta * (h_c/len_c - h_r/len_r)), lengths clamped at 1."""
    t = _terms("sigmoid_norm", inputs, locals())
    d = _length_normalised_delta(t, f_divergence, f_alpha)
    return _finish(F.softplus(-beta * d), t, beta, inputs, use_weighting)


@register_loss(view="pairwise", needs_reference=True, needs_token_logps=reads_token_logps)
def robust(inputs: SequenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.1,
           f_divergence: str = "reverse_kl", f_alpha: float = 0.5, use_weighting: bool = False,
           ld_alpha: float | None = None) -> Out:
    """rDPO: [(1-e) l(z) - e l(-z)] / (1 - 2e), z = beta*(h_c - h_r), e = label-flip rate in [0, 0.5)."""
    t = _terms("robust", inputs, locals())
    chosen, rejected = _delta(t, f_divergence, f_alpha)
    z = beta * (chosen - rejected)
    e = label_smoothing
    per_pair = ((1.0 - e) * F.softplus(-z) - e * F.softplus(z)) / (1.0 - 2.0 * e)
    return _finish(per_pair, t, beta, inputs, use_weighting)


@register_loss(view="pairwise", needs_reference=True, needs_token_logps=reads_token_logps)
def exo_pair(inputs: SequenceLogps, *, beta: float = 0.1, label_smoothing: float = 1e-3,
             f_divergence: str = "reverse_kl", f_alpha: float = 0.5, use_weighting: bool = False,
             ld_alpha: float | None = None) -> Out:
    """EXO (pairwise): KL(q || p) with q = softmax(beta*h) over the pair, p = (1-e, e), e = label_smoothing > 0."""
    t = _terms("exo_pair", inputs, locals())
    chosen, rejected = _delta(t, f_divergence, f_alpha)
    z = beta * (chosen - rejected)
    e = torch.tensor(label_smoothing, dtype=z.dtype)
    per_pair = (torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-e))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(e)))
    return _finish(per_pair, t, beta, inputs, use_weighting)


@register_loss(view="pairwise", needs_reference=True, needs_token_logps=reads_token_logps)
def discopop(inputs: SequenceLogps, *, beta: float = 0.1, tau: float = 0.05, f_divergence: str = "reverse_kl",
             f_alpha: float = 0.5, use_weighting: bool = False, ld_alpha: float | None = None) -> Out:
    """DiscoPOP (log-ratio modulated): (1 - s) * l(z) + s * exp(-z), s = sigmoid(z / tau) (TRL's discopop_tau).

    Not monotone near z = 0 for small tau (the modulation's slope dominates): at the default tau=0.05
    it has a local minimum at z ~ -0.12, so from policy == reference (z = 0) plain gradient descent
    drifts there and stays; tau >= ~0.2 removes it. The formula is the paper's and TRL's.
    """
    t = _terms("discopop", inputs, locals())
    chosen, rejected = _delta(t, f_divergence, f_alpha)
    z = beta * (chosen - rejected)
    per_pair = torch.sigmoid(-z / tau) * F.softplus(-z) + torch.exp(-z + F.logsigmoid(z / tau))
    return _finish(per_pair, t, beta, inputs, use_weighting)


@register_loss(view="pairwise", needs_reference=True, needs_token_logps=reads_token_logps)
def nca_pair(inputs: SequenceLogps, *, beta: float = 0.1, use_weighting: bool = False,
             ld_alpha: float | None = None) -> Out:
    """NCA (pairwise): -log sigmoid(r_c) - 0.5 log sigmoid(-r_c) - 0.5 log sigmoid(-r_r), r = beta*h."""
    t = _terms("nca_pair", inputs, locals())
    r_c, r_r = beta * t.chosen_logratios, beta * t.rejected_logratios
    per_pair = F.softplus(-r_c) + 0.5 * F.softplus(r_c) + 0.5 * F.softplus(r_r)
    return _finish(per_pair, t, beta, inputs, use_weighting)


@register_loss(view="pairwise", needs_reference=True, needs_token_logps=reads_token_logps)
def bco_pair(inputs: SequenceLogps, *, beta: float = 0.1, delta: float = 0.0, use_weighting: bool = False,
             ld_alpha: float | None = None) -> Out:
    """BCO (pairwise): -log sigmoid(r_c - delta) - log sigmoid(-(r_r - delta)), r = beta*h.

    ``delta`` is BCO's running mean of rewards; pass it from the trainer (default 0, as TRL 1.16).
    """
    t = _terms("bco_pair", inputs, locals())
    r_c, r_r = beta * t.chosen_logratios, beta * t.rejected_logratios
    return _finish(F.softplus(-(r_c - delta)) + F.softplus(r_r - delta), t, beta, inputs, use_weighting)


@register_loss(view="pairwise", needs_reference=True, needs_token_logps=reads_token_logps)
def sppo_hard(inputs: SequenceLogps, *, beta: float = 0.1, use_weighting: bool = False,
              ld_alpha: float | None = None) -> Out:
    """SPPO with hard labels: (h_c - 1/(2 beta))^2 + (h_r + 1/(2 beta))^2."""
    t = _terms("sppo_hard", inputs, locals())
    target = 0.5 / beta
    per_pair = (t.chosen_logratios - target) ** 2 + (t.rejected_logratios + target) ** 2
    return _finish(per_pair, t, beta, inputs, use_weighting)


@register_loss(view="pairwise", needs_reference=True, needs_token_logps=reads_token_logps)
def aot(inputs: SequenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.0,
        ld_alpha: float | None = None) -> Out:
    """AOT (paired): smoothed logistic loss on sorted(logp_c - logp_r) - sorted(ref_c - ref_r) over the batch.

    Couples the pairs of a batch through the sort, so its value depends on the batch composition.
    """
    t = _terms("aot", inputs, locals())
    policy_sorted = torch.sort(t.chosen_logps - t.rejected_logps).values
    ref_sorted = torch.sort(t.ref_chosen_logps - t.ref_rejected_logps).values
    per_pair = smoothed_logistic(beta * (policy_sorted - ref_sorted), label_smoothing)
    return _finish(per_pair, t, beta, inputs, use_weighting=False)


@register_loss(view="pairwise", needs_reference=True, needs_token_logps=reads_token_logps)
def apo_zero(inputs: SequenceLogps, *, beta: float = 0.1, use_weighting: bool = False,
             ld_alpha: float | None = None) -> Out:
    """APO-zero: (1 - sigmoid(beta*h_c)) + sigmoid(beta*h_r); for chosen better than the model's own outputs."""
    t = _terms("apo_zero", inputs, locals())
    per_pair = torch.sigmoid(-beta * t.chosen_logratios) + torch.sigmoid(beta * t.rejected_logratios)
    return _finish(per_pair, t, beta, inputs, use_weighting)


@register_loss(view="pairwise", needs_reference=True, needs_token_logps=reads_token_logps)
def apo_down(inputs: SequenceLogps, *, beta: float = 0.1, use_weighting: bool = False,
             ld_alpha: float | None = None) -> Out:
    """APO-down: sigmoid(beta*h_c) + (1 - sigmoid(beta*(h_c - h_r))); for chosen worse than the model's outputs."""
    t = _terms("apo_down", inputs, locals())
    margin = t.chosen_logratios - t.rejected_logratios
    per_pair = torch.sigmoid(beta * t.chosen_logratios) + torch.sigmoid(-beta * margin)
    return _finish(per_pair, t, beta, inputs, use_weighting)
