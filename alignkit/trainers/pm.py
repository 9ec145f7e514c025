"""The pairwise preference model runner (``runner=pm``, ``loss=pairwise_bce``): P(a > b | x) from one
sequence holding the prompt and both responses (PairRM-style, ``alignkit.models.pair_input``).

Same loop as the reward runner (data before model, micro-batches, held-out metrics, checkpoints,
export) and the same forward: ``trainers.reward.RewardScorer``, the decoder's hidden state at the last
token through the one-label ``score`` head of a sequence-classification model. Each canonical paired
record (the data the dpo / rm recipes read, slot 0 chosen) is trained in both orders:
``(chosen, rejected) -> 1`` and ``(rejected, chosen) -> 0``; a pair whose two scores are equal (a tie
in the record's ``score_chosen`` / ``score_rejected``, kept in the pair's ``scores``) -> 0.5 in both
orders (``losses.pairwise.ties``), counted and printed,
never dropped. (Ties the pipeline drops itself, listwise -> paired with equal scores, are counted in
its data summary.) The exported folder loads with ``AutoModelForSequenceClassification`` (1 label) and
serves as ``judge.kind=pairwise judge.path=RUN/final`` for online DPO.

Metrics (``alignkit/losses/pairwise.py``): ``rewards/accuracy`` (held-out: the share of decisive
pairs ranked right by the order-averaged P), ``pm/antisymmetry`` (mean |P(a>b) + P(b>a) - 1|),
``pm/prob_chosen``. Left out: LoRA-specific heads (the head is trained fully), PairRM's special tokens
(the markers are plain text).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from alignkit.config.validate import objective_from_cfg
from alignkit.data.batch import TokenizedGroup
from alignkit.losses.pairwise import ties
from alignkit.models.pair_input import marker_ids, pair_group
from alignkit.trainers import loop
from alignkit.trainers.reward import train_scorer


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train a pairwise preference model on preference pairs: ``{"exit_code": ...}``."""
    objective = objective_from_cfg(cfg.loss)
    setup = loop.setup(cfg, run_dir, "pairwise", kind="pairs")
    run, data = setup.run, setup.data
    markers = marker_ids(setup.tokenizer)
    train_pairs, train_ties = as_pairs(data.train, markers)
    eval_pairs, eval_ties = as_pairs(data.eval, markers)
    if train_ties or eval_ties:
        run.print(f"pm: {train_ties} training and {eval_ties} held-out pairs have equal chosen/rejected scores: "
                  "trained towards P = 0.5 in both orders (left out of rewards/accuracy)")
    return train_scorer(run, setup.steps, objective, train_pairs, eval_pairs)  # the reward model's loop


def as_pairs(groups: list[TokenizedGroup], markers: tuple[list[int], list[int]]) -> tuple[list[TokenizedGroup], int]:
    """Each (chosen, rejected) group as its two-order pair group, keeping the record's scores (equal scores:
    a tie, target 0.5 in ``pairwise_bce``); and the number of ties."""
    pairs, tied = [], 0
    for group in groups:
        pair = replace(pair_group(group, 0, 1, markers), scores=group.scores)
        tied += int(group.scores is not None and bool(ties(torch.tensor([group.scores]), 1)[0]))
        pairs.append(pair)
    return pairs, tied
