"""``TokenizedGroup``s -> one ``Batch`` in the padded, packed or prefix_shared layout.

The three layouts (documented in ``batch.py``) are built from one description: every token carries
a *unit* (a row-local block that attends only inside itself) and a *branch* (0 = shared prompt,
k + 1 = completion k). Token i may attend token j when j <= i, both are in the same unit, and j is
in the prompt branch or in i's own branch. ``packed`` makes one unit per (prompt, completion)
sequence, ``prefix_shared`` one unit per group (prompt once, then the K completions, whose
positions each continue from the prompt end); both pack units greedily, in order, into rows of at
most ``max_tokens_per_row`` tokens (None: the longest unit's length, so rows are as long as padded
rows would be and the [L, L] masks stay small; a unit longer than the budget gets a row of its own). ``padded``
puts each sequence in its own row with a 2D 0/1 mask.

The 4D masks are additive float32 with ``MASK_VALUE = torch.finfo(torch.float32).min`` where
attention is forbidden (pad rows are fully forbidden, so their diagonal is not 0). The trainer casts
the mask to the model dtype and clamps it to that dtype's minimum
(``alignkit.models.logprobs.prepare_attention_mask``): a bare cast to bf16/fp16 gives -inf, and a
fully masked pad row of -inf would turn into NaN.

Targets: a completion token with a True train mask is predicted by the row position of the token
before it in its own sequence (the last prompt token for a completion's first token), so they are
listed left to right within each slot. Deliberately left out: shuffling, sharding, device moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignkit.data.batch import Batch, TokenizedGroup
from alignkit.data.config import LAYOUTS

MASK_VALUE = torch.finfo(torch.float32).min


@dataclass
class _Unit:
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    branches: list[int] = field(default_factory=list)
    targets: list[tuple[int, int, int]] = field(default_factory=list)  # (predicting local index, token, slot)

    def add_prompt(self, prompt: list[int]) -> int:
        """Append the prompt; returns the local index of its last token (-1 if empty)."""
        start = len(self.ids)
        self.ids += prompt
        self.positions += range(len(prompt))
        self.branches += [0] * len(prompt)
        return start + len(prompt) - 1

    def add_completion(self, ids: list[int], mask: list[bool], prompt_end: int, first_position: int,
                       branch: int, slot: int) -> None:
        previous = prompt_end
        for offset, (token, trained) in enumerate(zip(ids, mask)):
            if trained:
                if previous < 0:
                    raise ValueError(f"slot {slot}: the first token is trained but nothing precedes it (empty prompt)")
                self.targets.append((previous, token, slot))
            previous = len(self.ids)
            self.ids.append(token)
            self.positions.append(first_position + offset)
            self.branches.append(branch)


def _units(groups: list[TokenizedGroup], group_size: int, layout: str) -> list[_Unit]:
    units = []
    for g, group in enumerate(groups):
        if layout == "prefix_shared":
            unit = _Unit()
            end = unit.add_prompt(group.prompt_ids)
            for k, (ids, mask) in enumerate(zip(group.completion_ids, group.completion_train_mask)):
                unit.add_completion(ids, mask, end, len(group.prompt_ids), k + 1, g * group_size + k)
            units.append(unit)
            continue
        for k, (ids, mask) in enumerate(zip(group.completion_ids, group.completion_train_mask)):
            unit = _Unit()
            end = unit.add_prompt(group.prompt_ids)
            unit.add_completion(ids, mask, end, len(group.prompt_ids), 0, g * group_size + k)
            units.append(unit)
    return units


def _pack(units: list[_Unit], budget: int) -> list[list[_Unit]]:
    rows: list[list[_Unit]] = []
    used = 0
    for unit in units:
        if not rows or used + len(unit.ids) > budget:
            rows.append([])
            used = 0
        rows[-1].append(unit)
        used += len(unit.ids)
    return rows


def _block_mask(unit_of: torch.Tensor, branch_of: torch.Tensor) -> torch.Tensor:
    """Additive [B, 1, L, L] mask from per-token unit (-1 = pad) and branch ids [B, L]."""
    length = unit_of.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_unit = (unit_of[:, :, None] == unit_of[:, None, :]) & (unit_of[:, None, :] >= 0)
    visible = (branch_of[:, None, :] == 0) | (branch_of[:, :, None] == branch_of[:, None, :])
    allowed = same_unit & visible & causal
    mask = torch.full(allowed.shape, MASK_VALUE, dtype=torch.float32)
    return mask.masked_fill(allowed, 0.0)[:, None]


def _per_group(groups: list[TokenizedGroup], group_size: int, name: str) -> torch.Tensor | None:
    values = [getattr(group, name) for group in groups]
    if all(v is None for v in values):
        return None
    out = torch.zeros(len(groups), group_size)
    for g, v in enumerate(values):
        if v is not None:
            out[g, : len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def collate(
    groups: list[TokenizedGroup], *, layout: str, pad_token_id: int, max_tokens_per_row: int | None = None
) -> Batch:
    """Collate groups into one ``Batch`` (see the module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {LAYOUTS}")
    if not groups:
        raise ValueError("collate needs at least one group")
    group_size = max(group.group_size for group in groups)
    if group_size == 0:
        raise ValueError("prompt-only groups (K=0) have nothing to score; generate from group.prompt_ids instead")
    units = _units(groups, group_size, layout)
    budget = max_tokens_per_row or max(len(unit.ids) for unit in units)
    rows = [[unit] for unit in units] if layout == "padded" else _pack(units, budget)
    length = max(sum(len(u.ids) for u in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(len(rows), length, dtype=torch.long)
    unit_of = torch.full((len(rows), length), -1, dtype=torch.long)
    branch_of = torch.zeros(len(rows), length, dtype=torch.long)
    target_index, target_ids, target_slot = [], [], []
    for b, row in enumerate(rows):
        offset = 0
        for u, unit in enumerate(row):
            span = slice(offset, offset + len(unit.ids))
            input_ids[b, span] = torch.tensor(unit.ids, dtype=torch.long)
            position_ids[b, span] = torch.tensor(unit.positions, dtype=torch.long)
            unit_of[b, span] = u
            branch_of[b, span] = torch.tensor(unit.branches, dtype=torch.long)
            for local, token, slot in unit.targets:
                target_index.append(b * length + offset + local)
                target_ids.append(token)
                target_slot.append(slot)
            offset += len(unit.ids)
    if layout == "padded":
        attention_mask = (unit_of >= 0).long()
    else:
        attention_mask = _block_mask(unit_of, branch_of)
    slot_mask = torch.zeros(len(groups), group_size, dtype=torch.bool)
    for g, group in enumerate(groups):
        slot_mask[g, : group.group_size] = True
    return Batch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        target_index=torch.tensor(target_index, dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        target_slot=torch.tensor(target_slot, dtype=torch.long),
        num_groups=len(groups),
        group_size=group_size,
        slot_mask=slot_mask,
        scores=_per_group(groups, group_size, "scores"),
        labels=_per_group(groups, group_size, "labels"),
        example_ids=[group.example_id for group in groups],
        extras=[dict(group.extra) for group in groups],
    )
