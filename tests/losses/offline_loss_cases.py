"""Fixed, hand-chosen inputs for the offline loss tests, plus scalar math helpers.

Expected values in the tests are written with these plain-Python helpers (``math`` on floats), never
with the package's own helpers, so an implementation slip cannot hide in both places.
"""

from __future__ import annotations

import math

import torch

from alignkit.losses import SequenceLogps

# (policy chosen, policy rejected, ref chosen, ref rejected, len chosen, len rejected)
PAIRS = [
    (-5.0, -7.0, -6.0, -6.5, 4.0, 6.0),
    (-3.0, -2.0, -3.5, -2.2, 3.0, 2.0),
    (-10.0, -9.0, -9.8, -9.5, 7.0, 5.0),
]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def paired(pairs=PAIRS, *, dtype=torch.float64, requires_grad: bool = False) -> SequenceLogps:
    """A pairwise SequenceLogps [G, 2] from rows of PAIRS."""
    logps = torch.tensor([[p[0], p[1]] for p in pairs], dtype=dtype, requires_grad=requires_grad)
    return SequenceLogps(
        logps=logps,
        lengths=torch.tensor([[p[4], p[5]] for p in pairs], dtype=dtype),
        mask=torch.ones(len(pairs), 2, dtype=torch.bool),
        ref_logps=torch.tensor([[p[2], p[3]] for p in pairs], dtype=dtype),
    )


# Per-token tensors for WPO / LD-DPO: two pairs, T=4, ragged lengths (chosen 3 & 2, rejected 4 & 1).
TOKEN_LOGPS = [
    [[-0.5, -1.0, -0.2, 0.0], [-0.3, -0.7, -1.1, -0.4]],
    [[-2.0, -0.1, 0.0, 0.0], [-0.9, 0.0, 0.0, 0.0]],
]
REF_TOKEN_LOGPS = [
    [[-0.6, -0.8, -0.5, 0.0], [-0.2, -0.9, -1.0, -0.6]],
    [[-1.5, -0.3, 0.0, 0.0], [-1.2, 0.0, 0.0, 0.0]],
]
TOKEN_LOG_SQ_MASS = [
    [[-0.9, -1.2, -0.4, 0.0], [-0.5, -0.6, -1.5, -0.3]],
    [[-1.0, -0.7, 0.0, 0.0], [-0.8, 0.0, 0.0, 0.0]],
]
TOKEN_LENGTHS = [[3, 4], [2, 1]]


def token_level(*, dtype=torch.float64) -> SequenceLogps:
    """A pairwise SequenceLogps with the per-token tensors filled (sums consistent with them)."""
    token_logps = torch.tensor(TOKEN_LOGPS, dtype=dtype)
    ref_token_logps = torch.tensor(REF_TOKEN_LOGPS, dtype=dtype)
    lengths = torch.tensor(TOKEN_LENGTHS, dtype=dtype)
    token_mask = torch.arange(4).view(1, 1, 4) < lengths.unsqueeze(-1)
    return SequenceLogps(
        logps=token_logps.sum(-1),
        lengths=lengths,
        mask=torch.ones(2, 2, dtype=torch.bool),
        ref_logps=ref_token_logps.sum(-1),
        token_logps=token_logps,
        ref_token_logps=ref_token_logps,
        token_mask=token_mask,
        token_log_sq_mass=torch.tensor(TOKEN_LOG_SQ_MASS, dtype=dtype),
    )


def with_logps(inputs: SequenceLogps, logps: torch.Tensor) -> SequenceLogps:
    return SequenceLogps(**{**inputs.__dict__, "logps": logps})


OFFLINE_VIEWS = ("sft", "pairwise", "unpaired", "listwise", "scalar")


def for_view(view: str, logps: list[list[float]], ref_logps: list[list[float]] | None = None,
             lengths: list[list[float]] | None = None, *, dtype=torch.float64) -> SequenceLogps:
    """A SequenceLogps fit for ``view`` from nested lists [G][K]: slot 0 best (scores descending), labels
    alternating desirable/undesirable for unpaired data, KL pairs equal to the completions, slot 1 of a
    pair the reference's sample (xpo), and a sequential KL of 0 (``seq_kl``, TDPO: the reference's
    next-token distributions taken as the policy's), and values V(x) of 0 (view "scalar", DRO: the
    reward of slot 0 is its score, 1 for K=1)."""
    logps_t = torch.tensor(logps, dtype=dtype)
    g, k = logps_t.shape
    ref_t = logps_t.detach().clone() if ref_logps is None else torch.tensor(ref_logps, dtype=dtype)
    return SequenceLogps(
        logps=logps_t,
        lengths=torch.full((g, k), 4.0, dtype=dtype) if lengths is None else torch.tensor(lengths, dtype=dtype),
        mask=torch.ones(g, k, dtype=torch.bool),
        ref_logps=ref_t,
        scores=torch.arange(k, 0, -1, dtype=dtype).expand(g, k).clone(),
        labels=(torch.arange(g) % 2 == 0).to(dtype).view(g, 1).expand(g, k).clone(),
        kl_logps=logps_t[:, 0].detach().clone(),
        ref_kl_logps=ref_t[:, 0].clone(),
        # xpo: the rejected completion is the one the reference sampled (the other losses ignore it)
        from_reference=torch.tensor([[False, True]]).expand(g, 2).clone() if k == 2 else None,
        seq_kl=torch.zeros(g, k, dtype=dtype),
        values=torch.zeros(g, k, dtype=dtype),
    )


def user_margin_loss(inputs: SequenceLogps, *, scale: float = 1.0):
    """A user's own loss, registered by dotted path (no register_loss): scale * mean(logp_r - logp_c)."""
    return scale * (inputs.logps[:, 1] - inputs.logps[:, 0]).mean(), {}
