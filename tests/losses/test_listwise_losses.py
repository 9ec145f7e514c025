"""Listwise losses (lipo, pro, softmax_dpo) against scalar formulas; ragged lists, ties, degenerate groups."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import SequenceLogps, available_losses
from offline_loss_cases import log_sigmoid, mean

torch.set_num_threads(1)
LOSSES = available_losses()

# Two groups of up to 4 completions: (logp, ref_logp, length, score); None = absent (ragged list).
GROUPS = [
    [(-4.0, -4.4, 4, 3.0), (-5.0, -4.6, 5, 1.0), (-3.0, -3.5, 2, 2.0), (-6.0, -5.0, 6, 0.0)],
    [(-2.0, -2.5, 2, 1.0), (-3.0, -2.0, 3, 1.0), (-7.0, -6.0, 4, 0.0), None],  # tie at the top, one absent
]


def _inputs(groups=GROUPS) -> SequenceLogps:
    k = max(len(g) for g in groups)
    filler = (0.0, 0.0, 1, 0.0)
    rows = [[c if c is not None else filler for c in g] + [filler] * (k - len(g)) for g in groups]
    col = lambda i: torch.tensor([[c[i] for c in row] for row in rows], dtype=torch.float64)  # noqa: E731
    mask = torch.tensor([[c is not None for c in g] + [False] * (k - len(g)) for g in groups])
    return SequenceLogps(logps=col(0), ref_logps=col(1), lengths=col(2), scores=col(3), mask=mask)


def _present(group):
    return [c for c in group if c is not None]


def _lipo_group(group, beta):
    cands = _present(group)
    s = [beta * (c[0] - c[1]) for c in cands]
    order = sorted(range(len(cands)), key=lambda i: -s[i])  # Python's sort is stable too
    rank = {i: pos + 1 for pos, i in enumerate(order)}
    total = 0.0
    for i, ci in enumerate(cands):
        for j, cj in enumerate(cands):
            if ci[3] > cj[3]:
                delta = abs(2 ** ci[3] - 2 ** cj[3]) * abs(1 / math.log2(1 + rank[i]) - 1 / math.log2(1 + rank[j]))
                total += delta * -log_sigmoid(s[i] - s[j])
    return total


def _pro_group(group, beta):
    cands = _present(group)
    s = [beta * c[0] / c[2] for c in cands]
    total = 0.0
    for i, ci in enumerate(cands):
        worse = [j for j, cj in enumerate(cands) if cj[3] < ci[3]]
        if worse:
            total += -(s[i] - math.log(math.exp(s[i]) + sum(math.exp(s[j]) for j in worse)))
    return total


def _softmax_dpo_group(group, beta):
    cands = _present(group)
    s = [beta * (c[0] - c[1]) for c in cands]
    top = max(c[3] for c in cands)
    best = [i for i, c in enumerate(cands) if c[3] == top]
    worse = [j for j, c in enumerate(cands) if c[3] < top]
    return mean(math.log(math.exp(s[b]) + sum(math.exp(s[j]) for j in worse)) - s[b] for b in best)


@pytest.mark.parametrize(
    "name,formula,beta",
    [("lipo", _lipo_group, 0.5), ("pro", _pro_group, 2.0), ("softmax_dpo", _softmax_dpo_group, 0.5)],
)
def test_listwise_value_with_ragged_lists_and_ties(name, formula, beta):
    expected = mean(formula(g, beta) for g in GROUPS)
    loss, metrics = LOSSES[name].fn(_inputs(), beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert "loss" not in metrics


def test_absent_completions_do_not_change_the_loss():
    """Filling the masked slot with extreme numbers must not move any value."""
    inputs = _inputs()
    poisoned = SequenceLogps(**inputs.__dict__)
    poisoned.logps = inputs.logps.clone()
    poisoned.scores = inputs.scores.clone()
    poisoned.logps[1, 3], poisoned.scores[1, 3] = 50.0, 99.0
    for name in ("lipo", "pro", "softmax_dpo"):
        a, _ = LOSSES[name].fn(inputs)
        b, _ = LOSSES[name].fn(poisoned)
        assert a.item() == pytest.approx(b.item()), name


@pytest.mark.parametrize("junk", [float("nan"), float("inf")])
def test_junk_in_absent_slots_reaches_neither_loss_nor_gradient(junk):
    for name in ("lipo", "pro", "softmax_dpo"):
        inputs = _inputs()
        inputs.scores[1, 3] = junk
        logps = inputs.logps.detach().clone()
        logps[1, 3] = junk
        inputs.logps = logps.requires_grad_(True)
        loss, metrics = LOSSES[name].fn(inputs)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(inputs.logps.grad).all(), name
        assert all(torch.isfinite(v) for v in metrics.values()), name
        assert loss.item() == pytest.approx(LOSSES[name].fn(_inputs())[0].item()), name


def test_groups_without_a_strict_preference_are_left_out_of_the_mean():
    all_tied = [(-1.0, -1.0, 1, 1.0), (-2.0, -1.0, 1, 1.0), (-3.0, -1.0, 1, 1.0), (-4.0, -1.0, 1, 1.0)]
    for name, formula in (("lipo", _lipo_group), ("pro", _pro_group), ("softmax_dpo", _softmax_dpo_group)):
        only_first, _ = LOSSES[name].fn(_inputs([GROUPS[0]]), beta=0.5)
        with_tied, _ = LOSSES[name].fn(_inputs([GROUPS[0], all_tied]), beta=0.5)
        assert with_tied.item() == pytest.approx(only_first.item()), name
        inputs = _inputs([all_tied])
        inputs.logps.requires_grad_(True)
        nothing, metrics = LOSSES[name].fn(inputs)
        assert nothing.item() == 0.0 and nothing.requires_grad
        assert "rewards/accuracy" not in metrics


def test_listwise_gradients_favour_better_completions():
    for name in ("lipo", "pro", "softmax_dpo"):
        inputs = _inputs()
        inputs.logps.requires_grad_(True)
        loss, _ = LOSSES[name].fn(inputs)
        loss.backward()
        grad = inputs.logps.grad
        assert grad[0, 0] < 0, name  # best of group 0: raising it lowers the loss
        assert grad[0, 3] > 0, name  # worst of group 0: raising it raises the loss
        assert grad[1, 3] == 0, name  # absent


def test_listwise_metrics():
    beta = 0.5
    _, metrics = LOSSES["softmax_dpo"].fn(_inputs(), beta=beta)
    best = [beta * (c[0] - c[1]) for g in GROUPS for c in _present(g) if c[3] == max(x[3] for x in _present(g))]
    others = [beta * (c[0] - c[1]) for g in GROUPS for c in _present(g) if c[3] < max(x[3] for x in _present(g))]
    assert metrics["rewards/chosen"].item() == pytest.approx(mean(best))
    assert metrics["rewards/rejected"].item() == pytest.approx(mean(others))
    pairs = [
        (beta * (ci[0] - ci[1]) > beta * (cj[0] - cj[1]))
        for g in GROUPS for ci in _present(g) for cj in _present(g) if ci[3] > cj[3]
    ]
    assert metrics["rewards/accuracy"].item() == pytest.approx(mean(map(float, pairs)))


def test_lipo_large_margins_stay_finite():
    inputs = _inputs()
    inputs.logps = inputs.logps * 1e4
    for name in ("lipo", "pro", "softmax_dpo"):
        loss, _ = LOSSES[name].fn(inputs)
        assert torch.isfinite(loss), name


# PRO as the authors' code computes it (AlibabaResearch/DAMO-ConvAI, PRO/train/utils/process_manager.py,
# compute_loss), transcribed onto floats: completions sorted best first (a strict ranking), scores
# s = logp / len; for each stage k the score gaps to the later ones are the temperatures, the largest of
# them k's own; the SFT term is sft_weight * (n - 1)**2 * -logp of the best, averaged over the batch.
STRICT_GROUPS = [
    [(-4.0, 0.0, 4, 3.0), (-5.0, 0.0, 5, 1.0), (-3.0, 0.0, 2, 2.5), (-6.0, 0.0, 6, 0.0)],
    [(-2.0, 0.0, 2, 0.7), (-3.0, 0.0, 3, 0.2), (-7.0, 0.0, 4, 1.9), (-1.0, 0.0, 1, -0.4)],
]


def _pro_reference_batch(groups, sft_weight):
    ranking, sft = [], []
    for group in groups:
        ranked = sorted(group, key=lambda c: -c[3])
        s = [c[0] / c[2] for c in ranked]
        r = [c[3] for c in ranked]
        n = len(ranked)
        total = 0.0
        for k in range(n - 1):
            neg_t = [r[k] - r[i] for i in range(k + 1, n)]
            pos_t = max(neg_t)
            total += math.log(math.exp(s[k] * pos_t) + sum(math.exp(s[i] * t) for i, t in zip(range(k + 1, n), neg_t)))
            total -= s[k] * pos_t
        ranking.append(total)
        sft.append(sft_weight * (n - 1) ** 2 * -ranked[0][0])
    return mean(ranking) + mean(sft)


@pytest.mark.parametrize("sft_weight", [0.0, 2.0, 0.5])
def test_pro_matches_the_authors_code_with_temperatures_and_sft(sft_weight):
    loss, metrics = LOSSES["pro"].fn(_inputs(STRICT_GROUPS), sft_weight=sft_weight, reward_temperatures=True)
    assert float(loss) == pytest.approx(_pro_reference_batch(STRICT_GROUPS, sft_weight), rel=1e-9)
    assert ("loss/sft" in metrics) == (sft_weight > 0)


def test_pro_temperatures_and_sft_on_ragged_lists_with_ties():
    """Ties never compete (here or in the temperatures); the tied best's first one carries the SFT term."""
    def group_terms(group):
        cands = _present(group)
        s = [c[0] / c[2] for c in cands]
        total = 0.0
        for i, ci in enumerate(cands):
            worse = [(j, ci[3] - cj[3]) for j, cj in enumerate(cands) if cj[3] < ci[3]]
            if worse:
                own = s[i] * max(t for _, t in worse)
                total += math.log(math.exp(own) + sum(math.exp(s[j] * t) for j, t in worse)) - own
        top = max(c[3] for c in cands)
        first_best = next(c for c in cands if c[3] == top)
        return total, (len(cands) - 1) ** 2 * -first_best[0]
    terms = [group_terms(g) for g in GROUPS]
    expected = mean(t for t, _ in terms) + 2.0 * mean(n for _, n in terms)
    loss, _ = LOSSES["pro"].fn(_inputs(), sft_weight=2.0, reward_temperatures=True)
    assert float(loss) == pytest.approx(expected, rel=1e-9)


def test_pro_sft_term_pulls_up_the_best_completion_only():
    inputs = _inputs(STRICT_GROUPS)
    logps = inputs.logps.clone().requires_grad_(True)
    plain = SequenceLogps(**{**inputs.__dict__, "logps": logps})
    with_sft, _ = LOSSES["pro"].fn(plain, sft_weight=2.0)
    without, _ = LOSSES["pro"].fn(plain)
    (grad,) = torch.autograd.grad(with_sft - without, logps)
    best = inputs.scores == inputs.scores.amax(-1, keepdim=True)
    assert torch.all(grad[best] < 0)  # descending the loss raises the best completion's log-prob
    assert torch.all(grad[~best] == 0)


def test_pro_negative_sft_weight_is_a_config_error():
    from alignkit.errors import ConfigError

    with pytest.raises(ConfigError, match="sft_weight"):
        LOSSES["pro"].fn(_inputs(STRICT_GROUPS), sft_weight=-1.0)
