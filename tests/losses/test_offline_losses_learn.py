"""Each offline loss, minimised by Adam over free per-completion parameters, learns the preference.

The "model" is one parameter per completion: summed log-prob = length * log sigmoid(theta), so
log-probs stay negative and length-normalised losses see a per-token probability. The reference is
the starting point, where every preference is inverted (chosen below rejected). After 120 Adam
steps the implicit rewards must rank every preferred completion above every less preferred one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignkit.losses import SequenceLogps, available_losses

torch.set_num_threads(1)
LOSSES = available_losses()
PAIRED = ["dpo", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "exo_pair", "apo_zero",
          "apo_down", "aot", "discopop", "sigmoid_norm", "simpo", "cpo", "orpo", "sft"]
LISTWISE = ["lipo", "pro", "softmax_dpo"]
UNPAIRED = ["kto", "apo_zero_unpaired"]
K_OF = {"pairwise": 2, "sft": 2, "listwise": 4, "unpaired": 1}
STEPS = 120


def _train(name: str, **hparams) -> tuple[SequenceLogps, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    spec = LOSSES[name]
    g, k = 6, K_OF[spec.view]
    lengths = torch.tensor([[5.0, 3.0, 4.0, 6.0][:k]] * g, dtype=torch.float64)
    # inverted start: completion 0 (the best) least likely; unpaired: all alike
    theta0 = torch.linspace(-1.0, 1.0, k, dtype=torch.float64).expand(g, k).clone()
    theta = torch.nn.Parameter(theta0.clone())
    extra = {"labels": (torch.arange(g) % 2 == 0).double().view(g, 1)} if spec.view == "unpaired" else {}

    def inputs() -> SequenceLogps:
        logps = lengths * F.logsigmoid(theta)
        ref = (lengths * F.logsigmoid(theta0)).detach()
        return SequenceLogps(
            logps=logps, lengths=lengths, mask=torch.ones(g, k, dtype=torch.bool), ref_logps=ref,
            scores=torch.arange(k, 0, -1, dtype=torch.float64).expand(g, k).clone(),
            kl_logps=logps[:, 0].detach(), ref_kl_logps=ref[:, 0], **extra,
        )

    _, before = spec.fn(inputs(), **hparams)
    optimiser = torch.optim.Adam([theta], lr=0.1)
    for _ in range(STEPS):
        optimiser.zero_grad()
        loss, _ = spec.fn(inputs(), **hparams)
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        final = inputs()
        _, after = spec.fn(final, **hparams)
    return final, before, after


@pytest.mark.parametrize("name", PAIRED + LISTWISE)
def test_ranked_losses_learn_the_preference(name):
    final, before, after = _train(name, **({"tau": 0.3} if name == "discopop" else {}))
    if name == "sft":
        assert after["logps/chosen"] > before["logps/chosen"] + 1.0
        return
    if name == "apo_down":  # pushes the chosen down too, but the rejected further
        assert after["rewards/chosen"] < 0
    assert before["rewards/accuracy"] == 0.0
    assert after["rewards/accuracy"] == 1.0
    assert after["rewards/margin"] > before["rewards/margin"]


@pytest.mark.parametrize("name", UNPAIRED)
def test_unpaired_losses_raise_desirable_and_lower_undesirable(name):
    _, _, after = _train(name)
    assert after["rewards/chosen"] > 0 > after["rewards/rejected"]


def test_discopop_with_default_tau_stalls_in_its_local_minimum_from_a_tie():
    """Documented in dpo.discopop: at tau=0.05 the loss has a local minimum at z = beta*margin ~ -0.12."""
    _, _, after = _train("discopop")
    assert after["rewards/margin"].item() == pytest.approx(-0.119, abs=0.01)
