"""The pm runner's pair layout: each (chosen, rejected) record becomes both orders of the PairRM-style
sequence, the record's scores ride along (equal scores: a tie, target 0.5), ties are counted."""

from __future__ import annotations

import math

import torch

from alignkit.data.batch import TokenizedGroup
from alignkit.data.collate import collate
from alignkit.losses import available_losses
from alignkit.losses.registry import SequenceLogps
from alignkit.trainers.pm import as_pairs

MARKERS = ([90, 91], [92])


def _group(scores=None) -> TokenizedGroup:
    return TokenizedGroup(prompt_ids=[1, 2, 3], completion_ids=[[10, 11, 2], [20, 2]],
                          completion_train_mask=[[True] * 3, [True] * 2], scores=scores, example_id="e")


def test_both_orders_in_one_group_and_ties_counted():
    pairs, ties = as_pairs([_group([1.5, 0.0]), _group([1.0, 1.0]), _group()], MARKERS)
    assert ties == 1 and len(pairs) == 3
    first = pairs[0]
    assert first.prompt_ids == [1, 2, 3]
    assert first.completion_ids == [[90, 91, 10, 11, 2, 92, 20, 2], [90, 91, 20, 2, 92, 10, 11, 2]]
    assert all(all(mask) for mask in first.completion_train_mask)
    assert first.scores == [1.5, 0.0] and pairs[1].scores == [1.0, 1.0] and pairs[2].scores is None


def test_targets_reach_the_loss_through_the_collated_batch():
    """One preference and one tie, collated: the loss sees targets (1, 0) and (0.5, 0.5)."""
    pairs, _ = as_pairs([_group([1.5, 0.0]), _group([1.0, 1.0])], MARKERS)
    batch = collate(pairs, layout="prefix_shared", pad_token_id=0)
    logits = torch.tensor([[0.4, -0.2], [0.4, -0.2]], dtype=torch.float64)
    loss, _ = available_losses()["pairwise_bce"].fn(SequenceLogps(
        logps=logits, lengths=batch.slot_lengths().double(), mask=batch.slot_mask, scores=batch.scores))
    log_sig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    bce = lambda s, t: -(t * log_sig(s) + (1 - t) * log_sig(-s))  # noqa: E731
    expected = (bce(0.4, 1.0) + bce(-0.2, 0.0) + bce(0.4, 0.5) + bce(-0.2, 0.5)) / 4
    assert abs(loss.item() - expected) < 1e-12
