"""GKD's generalized JSD (``alignkit/losses/distill.py``): values against a formula written with ``math``
from the paper (Agarwal et al. 2024, Eq. 1), its beta = 0 / 1 ends and limits as KLs, gradient signs,
knob rules, TRL 1.16's ``GKDTrainer.generalized_jsd_loss`` on the same tensors, and the chunked in-head
path (``TargetLogProbs`` with a ``ReferenceHead.divergence``) against full logits."""

import math

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses.distill import DistillLogits, generalized_jsd, gkd

STUDENT = [[1.0, -0.5, 0.3, 2.0], [0.2, 0.1, -1.0, 0.0], [3.0, 0.0, 0.0, -2.0]]
TEACHER = [[0.5, 0.5, -0.2, 1.0], [-1.0, 2.0, 0.4, 0.3], [0.0, 1.0, 0.0, 0.5]]
MASK = [True, True, False]


def _softmax(row, temperature):
    exps = [math.exp(x / temperature) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _jsd(student, teacher, beta, temperature):
    """The paper's JSD(beta) with teacher P and student Q, M = beta P + (1 - beta) Q; the ends as KLs."""
    q, p = _softmax(student, temperature), _softmax(teacher, temperature)
    if beta == 0:
        return _kl(p, q)
    if beta == 1:
        return _kl(q, p)
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gkd_value(beta, temperature):
    kept = [_jsd(s, t, beta, temperature) for s, t, m in zip(STUDENT, TEACHER, MASK) if m]
    loss, metrics = gkd(DistillLogits(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(MASK)),
                        beta=beta, temperature=temperature)
    assert float(loss) == pytest.approx(sum(kept) / len(kept), rel=1e-5)
    assert float(metrics["jsd"]) == pytest.approx(float(loss))
    every = gkd(DistillLogits(torch.tensor(STUDENT), torch.tensor(TEACHER)), beta=beta, temperature=temperature)[0]
    assert float(every) == pytest.approx(sum(_jsd(s, t, beta, temperature) for s, t in zip(STUDENT, TEACHER)) / 3,
                                         rel=1e-5)


def test_ends_are_the_forward_and_reverse_kl_limits():
    """JSD(beta) / beta -> KL(teacher || student) as beta -> 0 and JSD / (1 - beta) -> KL(student || teacher)
    as beta -> 1: the beta = 0 / 1 cases are those limits (TRL's convention)."""
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    forward, reverse = generalized_jsd(s, t, beta=0.0), generalized_jsd(s, t, beta=1.0)
    for i, (srow, trow) in enumerate(zip(STUDENT, TEACHER)):
        assert float(forward[i]) == pytest.approx(_kl(_softmax(trow, 1.0), _softmax(srow, 1.0)), rel=1e-5)
        assert float(reverse[i]) == pytest.approx(_kl(_softmax(srow, 1.0), _softmax(trow, 1.0)), rel=1e-5)
    eps = 1e-6  # in float64 (math): the relative error of the limit is O(eps)
    for srow, trow in zip(STUDENT, TEACHER):
        p, q = _softmax(trow, 1.0), _softmax(srow, 1.0)
        assert _jsd(srow, trow, eps, 1.0) / eps == pytest.approx(_kl(p, q), rel=1e-4)
        assert _jsd(srow, trow, 1 - eps, 1.0) / eps == pytest.approx(_kl(q, p), rel=1e-4)
    # and the implementation between the ends moves towards them (float32: a coarser beta)
    near0, near1 = generalized_jsd(s, t, beta=1e-2) / 1e-2, generalized_jsd(s, t, beta=1 - 1e-2) / 1e-2
    assert near0.tolist() == pytest.approx(forward.tolist(), rel=0.05)
    assert near1.tolist() == pytest.approx(reverse.tolist(), rel=0.05)


def test_zero_at_the_teacher_and_the_gradient_pulls_the_student_towards_it():
    t = torch.tensor(TEACHER)
    same = t.clone().requires_grad_(True)
    loss, _ = gkd(DistillLogits(same, t), beta=0.5)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)
    assert same.grad.abs().max() < 1e-6
    student = torch.tensor(STUDENT, requires_grad=True)
    for beta in (0.0, 0.5, 1.0):
        student.grad = None
        loss, _ = gkd(DistillLogits(student, t), beta=beta)
        loss.backward()
        with torch.no_grad():  # a small step against the gradient lowers it, towards the teacher's distribution
            stepped = gkd(DistillLogits(student - 0.1 * student.grad, t), beta=beta)[0]
        assert float(stepped) < float(loss)
    # the gradient of a token's loss w.r.t. its student logits sums to 0 (softmax invariance to a shift)
    assert student.grad.sum(-1).abs().max() < 1e-6


def test_an_all_masked_batch_gives_zero_not_nan():
    s = torch.tensor(STUDENT, requires_grad=True)
    loss, _ = gkd(DistillLogits(s, torch.tensor(TEACHER), torch.zeros(3, dtype=torch.bool)))
    loss.backward()
    assert float(loss) == 0.0 and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("hp, match", [({"beta": 1.5}, "beta=1.5"), ({"beta": -0.1}, "beta=-0.1"),
                                       ({"temperature": 0.0}, "temperature=0.0")])
def test_bad_knobs_are_refused(hp, match):
    with pytest.raises(ConfigError, match=match):
        gkd(DistillLogits(torch.tensor(STUDENT), torch.tensor(TEACHER)), **hp)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.9])
def test_matches_trl_generalized_jsd_loss(beta, temperature):
    """TRL 1.16's static ``GKDTrainer.generalized_jsd_loss`` (batchmean over labels != -100) on the same logits."""
    pytest.importorskip("trl")
    trl_gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 11, generator=g) * 2, torch.randn(3, 5, 11, generator=g) * 2
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    theirs = trl_gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta,
                                                     temperature=temperature)
    ours, _ = gkd(DistillLogits(student, teacher, labels != -100), beta=beta, temperature=temperature)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5, abs=1e-7)


def test_chunked_head_divergence_equals_full_logits():
    """The runner's path: the JSD computed chunk by chunk inside ``TargetLogProbs`` (teacher as
    ``ReferenceHead`` with ``divergence``) equals ``generalized_jsd`` on full logits, values and gradients."""
    from functools import partial

    from alignkit.data.batch import TokenizedGroup
    from alignkit.data.collate import collate
    from alignkit.models.config import TinyModelConfig
    from alignkit.models.logprobs import ReferenceHead, TargetLogProbs, forward_logps
    from alignkit.models.tiny import build_tiny_model

    student, teacher = build_tiny_model(TinyModelConfig(seed=0)), build_tiny_model(TinyModelConfig(seed=1))
    groups = [TokenizedGroup([5, 6, 7], [[8, 9, 10, 11]], [[True] * 4]), TokenizedGroup([5, 12], [[13, 14]], [[True] * 2])]
    batch = collate(groups, layout="padded", pad_token_id=0)
    divergence = partial(generalized_jsd, beta=0.3, temperature=0.9)
    wrapped_teacher = TargetLogProbs(teacher)
    with torch.no_grad():
        hidden = forward_logps(wrapped_teacher, batch, hidden_only=True)["hidden"]
    head = ReferenceHead(hidden=hidden, logits=wrapped_teacher.target_logits, divergence=divergence)
    chunked = forward_logps(TargetLogProbs(student, chunk_size=2), batch, reference=head)["kl"]
    chunked.sum().backward()
    grad_chunked = student.lm_head.weight.grad.clone()
    student.zero_grad()

    def logits(model):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        return out.logits.flatten(0, 1)[batch.target_index]

    with torch.no_grad():
        teacher_logits = logits(teacher)
    full = generalized_jsd(logits(student), teacher_logits, beta=0.3, temperature=0.9)
    full.sum().backward()
    assert chunked.detach().tolist() == pytest.approx(full.detach().tolist(), rel=1e-4, abs=1e-7)
    assert torch.allclose(grad_chunked, student.lm_head.weight.grad, rtol=1e-4, atol=1e-7)
    assert float(full.sum()) > 0  # two different models: a test that could fail
