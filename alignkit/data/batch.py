"""The one batch format every recipe consumes.

A *group* is one prompt with K candidate completions (SFT K=1, unpaired K=1, paired K=2 with
completion 0 = chosen and 1 = rejected, listwise K=n, RL rollouts K=G samples). A group's
completion k occupies *slot* ``g * K + k`` of the batch.

Tokens are laid out in rows (``input_ids [B, L]``) in one of three layouts, all of which yield
the same per-token log-probs:

* ``padded``: one row per (prompt, completion) sequence, right-padded, 2D ``attention_mask [B, L]``
  of 1/0;
* ``packed`` (padding-free): several sequences concatenated per row; a 4D additive float mask
  ``[B, 1, L, L]`` (0 = may attend, large negative = may not) keeps attention inside each sequence
  and ``position_ids`` restart at 0 for each sequence;
* ``prefix_shared``: the prompt appears once per group followed by all K completions; completion k
  attends to the prompt and to itself only, and its positions continue from the end of the prompt
  as if it followed the prompt alone. Groups may also be packed together in a row.

Instead of labels aligned with ``input_ids``, the batch lists its *targets*: every token whose
log-prob is needed, as the flat index (``b * L + t``) of the position whose next-token distribution
predicts it, the token id, and the slot it belongs to. This is what lets prefix sharing work (the
last prompt position predicts the first token of every completion) and lets the LM head run on
target positions only.

``TokenizedGroup`` is the input to the collator: token ids of a prompt and of K completions, with a
per-token train mask on each completion (False for tokens that are context, e.g. user turns of a
multi-turn SFT conversation, which then sit in the completion with no target).
``decode_prompt`` gives a group's prompt as text (what reward functions score).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass
class TokenizedGroup:
    """One prompt and its K tokenized completions, ready for collation."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    # per completion, per token: True where the token is a training target (same length as completion_ids[k])
    completion_train_mask: list[list[bool]]
    scores: list[float] | None = None  # per completion (listwise scores, paired margins as [s_c, s_r])
    labels: list[float] | None = None  # per completion, 1.0 desirable / 0.0 undesirable (unpaired)
    example_id: str = ""  # stable id (hash of the canonical record), used for reference log-prob caches
    extra: dict[str, Any] = field(default_factory=dict)  # record's extra columns (e.g. reference answer)

    @property
    def group_size(self) -> int:
        return len(self.completion_ids)


@dataclass
class Batch:
    """A collated batch; see the module docstring for the layouts."""

    input_ids: torch.Tensor  # [B, L] long
    position_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long (padded) or [B, 1, L, L] float additive (packed/shared)
    target_index: torch.Tensor  # [N] long, flat index b * L + t of the predicting position
    target_ids: torch.Tensor  # [N] long, the token predicted
    target_slot: torch.Tensor  # [N] long, slot g * K + k the target belongs to
    num_groups: int  # G
    group_size: int  # K (max over the batch's groups; missing completions are masked out)
    slot_mask: torch.Tensor  # [G, K] bool, True where the completion exists
    scores: torch.Tensor | None = None  # [G, K] float
    labels: torch.Tensor | None = None  # [G, K] float
    ref_logps: torch.Tensor | None = None  # [G, K] float, precomputed reference sequence log-probs
    example_ids: list[str] = field(default_factory=list)  # [G]
    extras: list[dict[str, Any]] = field(default_factory=list)  # [G]

    @property
    def num_slots(self) -> int:
        return self.num_groups * self.group_size

    def slot_lengths(self) -> torch.Tensor:
        """Number of target tokens per slot, shaped [G, K]."""
        counts = torch.bincount(self.target_slot, minlength=self.num_slots)
        return counts.view(self.num_groups, self.group_size)

    def num_real_tokens(self) -> int:
        """Non-pad tokens in the batch (for tokens/s)."""
        if self.attention_mask.dim() == 2:
            return int(self.attention_mask.sum())
        # packed / shared: a real token attends at least to itself (its diagonal entry is 0)
        diag = torch.diagonal(self.attention_mask[:, 0], dim1=-2, dim2=-1)
        return int((diag == 0).sum())

    def to(self, device: torch.device | str) -> "Batch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return Batch(**moved)


def sum_per_slot(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum per-target ``values [N]`` into per-slot sums ``[G, K]`` (differentiable)."""
    out = values.new_zeros(batch.num_slots)
    out = out.index_add(0, batch.target_slot, values)
    return out.view(batch.num_groups, batch.group_size)


def per_token_view(values: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter per-target ``values [N]`` into a padded ``[G, K, T]`` tensor plus its bool mask.

    Targets keep their order within a slot (the collator emits them left to right).
    """
    lengths = torch.bincount(batch.target_slot, minlength=batch.num_slots)
    max_len = int(lengths.max()) if lengths.numel() else 0
    # position of each target within its slot
    order = torch.argsort(batch.target_slot, stable=True)
    sorted_slots = batch.target_slot[order]
    starts = torch.cumsum(lengths, 0) - lengths
    pos_sorted = torch.arange(sorted_slots.numel(), device=values.device) - starts[sorted_slots]
    pos = torch.empty_like(pos_sorted)
    pos[order] = pos_sorted
    padded = values.new_zeros(batch.num_slots, max(max_len, 1))
    mask = torch.zeros(batch.num_slots, max(max_len, 1), dtype=torch.bool, device=values.device)
    padded = padded.index_put((batch.target_slot, pos), values)
    mask[batch.target_slot, pos] = True
    shape = (batch.num_groups, batch.group_size, padded.shape[-1])
    return padded.view(shape), mask.view(shape)


def decode_prompt(group: TokenizedGroup, tokenizer: Any) -> str:
    """The prompt's text as reward functions see it: the record's own text, else its decoded ids."""
    return group.extra.get("prompt_text") or tokenizer.decode(group.prompt_ids, skip_special_tokens=True)
