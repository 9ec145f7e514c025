"""TDPO: Token-level Direct Preference Optimization (Zeng et al., ICML 2024, arXiv 2404.11999).

With ``h = logp - ref_logp`` per completion (summed over its target tokens) and the sequential KL
``SeqKL(y) = sum_t KL(pi_ref(.|x, y_<t) || pi_theta(.|x, y_<t))``, a full-vocabulary KL at every
target position of the completion, the loss of a pair (chosen ``w``, rejected ``l``) is

* TDPO1: ``-log sigmoid(beta * ((h_w - h_l) - (SeqKL_l - SeqKL_w)))``
* TDPO2: ``-log sigmoid(beta * ((h_w - h_l) - alpha * (SeqKL_l - sg(SeqKL_w))))``, ``sg`` = stop-gradient,

averaged over pairs. This is ``tdpo_loss`` of the reference code
(github.com/Vance0124/Token-level-Direct-Preference-Optimization, ``trainers.py``), with the KL summed
over tokens (its ``average_log_prob=False``). ``alpha = 0`` gives DPO; at policy == reference both
KLs are 0 and the loss is ln 2.

Defaults, from the reference code: ``beta = 0.1`` and ``alpha = 0.5`` (``config/loss/tdpo.yaml``).
Variant: TDPO2 (``if_tdpo2=True``, the knob's name there), which is the default of its
``tdpo_loss`` function, the README's recommended command and the paper's main method; note that
the reference ``config/loss/tdpo.yaml`` itself sets ``if_tdpo2: false``. The README advises TDPO1
at low learning rates and TDPO2 at higher ones. TDPO1 has no ``alpha``; setting one with
``if_tdpo2=false`` is refused (``ConfigError``), not ignored.

Metrics as the reference code: ``rewards/chosen`` / ``rewards/rejected`` are ``beta * (h + SeqKL)``
(its ``chosen_values``), so ``rewards/accuracy`` and ``rewards/margin`` include the KL; plus the mean
SeqKL of chosen and rejected completions (``kl/chosen``, ``kl/rejected``; its ``kl_*/chosen``).

``needs_token_kl=True``: the preference runner fills ``SequenceLogps.seq_kl`` from a live
reference (``separate`` or ``lora``) in the policy's chunked LM-head pass. Left out: the reference
code's ``reference_free`` option (a uniform reference), and TDPO under the online runners.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.common import (
    pair_terms,
    preference_metrics,
    register_knob_check,
    register_knob_rules,
    validate_knobs,
)
from alignkit.losses.registry import SequenceLogps, register_loss

Out = tuple[torch.Tensor, dict[str, torch.Tensor]]

register_knob_rules("tdpo", alpha=(lambda v: 0.0 <= v < float("inf"), "it must be a finite number >= 0 (0 gives DPO)"))


@register_loss(view="pairwise", needs_reference=True, needs_token_kl=True)
def tdpo(inputs: SequenceLogps, *, beta: float = 0.1, alpha: float = 0.5, if_tdpo2: bool = True) -> Out:
    """TDPO: -log sigmoid(beta * (h_c - h_r - alpha * (SeqKL_r - sg(SeqKL_c)))) (TDPO2; TDPO1 without alpha, sg)."""
    validate_knobs("tdpo", locals())
    t = pair_terms(inputs)
    if inputs.seq_kl is None:
        raise ValueError("SequenceLogps.seq_kl is required by tdpo (needs_token_kl); the trainer must fill it.")
    kl_chosen, kl_rejected = inputs.seq_kl[:, 0], inputs.seq_kl[:, 1]
    margin = t.chosen_logratios - t.rejected_logratios
    if if_tdpo2:
        z = margin - alpha * (kl_rejected - kl_chosen.detach())
    else:
        z = margin - (kl_rejected - kl_chosen)
    metrics = preference_metrics(beta * (t.chosen_logratios + kl_chosen), beta * (t.rejected_logratios + kl_rejected),
                                 t.chosen_logps, t.rejected_logps)
    metrics["kl/chosen"] = kl_chosen.detach().mean()
    metrics["kl/rejected"] = kl_rejected.detach().mean()
    return F.softplus(-beta * z).mean(), metrics


def _alpha_is_tdpo2_only(hparams: dict) -> str | None:
    if hparams.get("if_tdpo2", True) is False and hparams.get("alpha", _DEFAULT_ALPHA) != _DEFAULT_ALPHA:
        return (f"alpha={hparams['alpha']!r} is read by TDPO2 only; TDPO1 (if_tdpo2=false) has no alpha. "
                "Remove loss.alpha, or set loss.if_tdpo2=true.")
    return None


_DEFAULT_ALPHA = tdpo.__kwdefaults__["alpha"]
register_knob_check("tdpo", _alpha_is_tdpo2_only)
