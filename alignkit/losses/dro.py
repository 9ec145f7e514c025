"""DRO: Direct Reward Optimisation (Richemond et al. 2024, "Offline Regularised Reinforcement Learning
for Large Language Models Alignment", arXiv:2405.19107), view "scalar" (K=1 with a scalar reward).

Data are single trajectories ``(x, y, r)``: a prompt, one completion and a scalar reward (a score, a
thumbs up/down). With ``h = log pi_theta(y|x) - log pi_ref(y|x)`` (summed over the completion's
target tokens) and a value function ``V(x)`` of the prompt, DRO minimises jointly over the policy and
the value

    L(theta, V) = 1/2 * E[(r - V(x) - tau * h)^2]

whose minimiser is the KL-regularised optimum: ``tau * h* = r - V*`` with ``V* = tau * log Z(x)``,
the soft value. ``dro`` returns exactly this ``L`` (the mean over the groups of the batch) from
``SequenceLogps.scores[:, 0]`` (``r``), ``.values[:, 0]`` (``V(x)``, with gradient into the value
model) and ``.logps``/``.ref_logps``.

What the paper's DRO-V algorithm does and how this maps onto it. Algorithm 1 (DRO-V) updates the
policy with the gradient of ``L`` in theta, the value held fixed, and the value with the gradient of
``L`` in V, the policy held fixed (as LLNL/protein_tune_rl's ``optimizer/dro.py`` implements it,
citing that algorithm: policy loss ``-tau*(log pi*(r - sg V) - tau/2 * h^2)``, value loss
``(sg V - r + tau * sg h) * V``). Those are the two partial gradients of the single loss above, so
the runner (``trainers/dro.py``) calls ``dro`` twice per micro-batch, once with the values detached
(backward through the policy engine) and once with the log-probs detached (backward through the
value engine): the same residual, each engine getting its own partial derivative. The directions:
the policy's gradient in ``h`` is ``-tau * (r - V - tau*h)``, so descent moves ``h`` toward
``(r - V)/tau``; the value's gradient is ``-(r - V - tau*h)``, so ``V`` moves toward ``r - tau*h``.

Differences from the paper (its text was not reachable from this machine; the points below rest on
the two public re-implementations named here, on the paper's abstract, and on memory, marked [K?]):

* The value is a separate network (a copy of the policy's decoder plus a scalar head, PPO's critic
  ``models.value.ValueModel``) read at the last prompt token. The paper reports that sharing
  parameters between policy and value hurts [K?]; b-faye/rpo's DRO baseline uses a separate MLP on
  the (encoder-decoder) policy's encoder states instead.
* ``tau`` defaults to 1.0, b-faye/rpo's DRO baseline value and LLNL/protein_tune_rl's example; the
  paper's own setting is not checked [K?].
* The paper (and LLNL's ``rescaling`` switch) may rescale the policy gradient by ``1/tau`` [K?].
  Under Adam (the optimizer here) a constant factor on the policy's loss alone changes almost
  nothing (Adam normalises each parameter's gradient, and the value network has its own
  parameters), so no knob for it exists.
* ``h`` is the summed sequence log-ratio, as in the paper's objective; both re-implementations
  above offer (LLNL: by default) a per-token mean instead. Not offered here.
* No regularisation term on the value loss: the objective is the squared residual only.

Left out: DRO-V's variant with a value that is not a neural network (a per-prompt table), reward
normalisation (the data's rewards are used as given; boolean labels are 1.0 / 0.0, see
``data/views.py``), and a length-normalised ``h``.
"""

from __future__ import annotations

import math

import torch

from alignkit.losses.common import register_knob_rules, validate_knobs
from alignkit.losses.registry import SequenceLogps, register_loss

Out = tuple[torch.Tensor, dict[str, torch.Tensor]]

register_knob_rules("dro", tau=(lambda v: math.isfinite(v) and v > 0, "DRO's KL-regularisation temperature must be finite and > 0 (e.g. 1.0)"))


def _terms(inputs: SequenceLogps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logps, h, rewards, values) of the K=1 completions, flattened to [G]."""
    missing = [name for name in ("ref_logps", "scores", "values") if getattr(inputs, name) is None]
    if missing:
        raise ValueError(f"dro needs SequenceLogps.{', .'.join(missing)} (the reference log-probs, the scalar "
                         "rewards and the value model's V(x)); the dro runner fills them.")
    rewards = inputs.scores[:, 0].to(inputs.logps.dtype)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("dro: a reward is not finite (nan/inf); the data layer refuses such rows, so a batch "
                         "holding one was collated from records without a reward.")
    logps = inputs.logps[:, 0]
    return logps, logps - inputs.ref_logps[:, 0].detach(), rewards, inputs.values[:, 0].to(inputs.logps.dtype)


@register_loss(view="scalar", needs_reference=True)
def dro(inputs: SequenceLogps, *, tau: float = 1.0) -> Out:
    """DRO: 1/2 * mean((r - V(x) - tau*h)^2), h = logp - ref_logp, joint in the policy and the value V."""
    validate_knobs("dro", locals())
    logps, h, rewards, values = _terms(inputs)
    residual = rewards - values - tau * h
    loss = 0.5 * residual.pow(2).mean()
    metrics = {
        "reward/mean": rewards.detach().mean(),
        "rewards/mean": (tau * h).detach().mean(),  # the implicit reward tau*h (DPO family: beta*h)
        "logps/mean": logps.detach().mean(),
        "dro/value": values.detach().mean(),
        "dro/residual": residual.detach().mean(),
        "dro/abs_residual": residual.detach().abs().mean(),
    }
    return loss, metrics
