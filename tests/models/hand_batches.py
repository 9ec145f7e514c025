"""Hand-built batches in the three layouts (padded, packed, prefix-shared) for one prompt + two completions.

Built here independently of the data pipeline's collator, straight from the layout rules of
``alignkit.data.batch``, so the model tests do not depend on the collator being right.
"""

from __future__ import annotations

import torch

from alignkit.data.batch import Batch

NEG = torch.finfo(torch.float32).min

# token ids inside the tiny vocabulary (1024), away from the 4 special tokens
PROMPT = [17, 301, 45, 222]
COMPLETIONS = [[88, 410, 9], [515, 61, 700, 33, 2]]
PAD = 3


def _batch(input_ids, position_ids, attention_mask, targets) -> Batch:
    index, ids, slots = (sum((t[i] for t in targets), []) for i in range(3))
    return Batch(
        input_ids=torch.tensor(input_ids),
        position_ids=torch.tensor(position_ids),
        attention_mask=attention_mask,
        target_index=torch.tensor(index),
        target_ids=torch.tensor(ids),
        target_slot=torch.tensor(slots),
        num_groups=1,
        group_size=2,
        slot_mask=torch.ones(1, 2, dtype=torch.bool),
    )


def padded_batch() -> Batch:
    """Two rows ``prompt + completion_k``, right-padded, 2D mask."""
    length = len(PROMPT) + max(map(len, COMPLETIONS)) + 1  # one extra pad column
    rows, masks, targets = [], [], []
    for k, completion in enumerate(COMPLETIONS):
        seq = PROMPT + completion
        rows.append(seq + [PAD] * (length - len(seq)))
        masks.append([1] * len(seq) + [0] * (length - len(seq)))
        # completion token j sits at len(PROMPT) + j and is predicted by the position before it
        targets.append(
            ([k * length + len(PROMPT) - 1 + j for j in range(len(completion))], completion, [k] * len(completion))
        )
    positions = [list(range(length))] * len(rows)
    return _batch(rows, positions, torch.tensor(masks), targets)


def _block_mask(length: int, blocks: list[list[int]]) -> torch.Tensor:
    """Additive mask ``[L, L]``: position i may see j <= i when ``blocks`` lets i see j (by block id)."""
    mask = torch.full((length, length), NEG)
    for i in range(length):
        for j in range(i + 1):
            if j in blocks[i]:
                mask[i, j] = 0.0
    return mask


def packed_batch() -> Batch:
    """Row 0: a pad row (fully masked); row 1: ``prompt+c0 | prompt+c1 | pad`` packed, positions restarting."""
    seqs = [PROMPT + c for c in COMPLETIONS]
    length = sum(map(len, seqs)) + 2
    row = sum(seqs, []) + [PAD] * 2
    positions = sum((list(range(len(s))) for s in seqs), []) + [0, 0]
    starts = [0, len(seqs[0])]
    visible = []
    for start, seq in zip(starts, seqs):
        visible += [list(range(start, start + len(seq)))] * len(seq)
    visible += [[], []]  # pads see nothing (fully masked rows)
    mask = torch.stack([torch.full((length, length), NEG), _block_mask(length, visible)]).unsqueeze(1)
    targets = [
        ([length + start + len(PROMPT) - 1 + j for j in range(len(c))], c, [k] * len(c))
        for k, (start, c) in enumerate(zip(starts, COMPLETIONS))
    ]
    return _batch([[PAD] * length, row], [[0] * length, positions], mask, targets)


def prefix_shared_batch() -> Batch:
    """One row ``prompt | c0 | c1 | pad``: each completion sees the prompt and itself, positions continue the prompt."""
    p, (c0, c1) = len(PROMPT), COMPLETIONS
    length = p + len(c0) + len(c1) + 1
    row = PROMPT + c0 + c1 + [PAD]
    positions = list(range(p)) + list(range(p, p + len(c0))) + list(range(p, p + len(c1))) + [0]
    prompt_cols = list(range(p))
    c0_cols = list(range(p, p + len(c0)))
    c1_cols = list(range(p + len(c0), p + len(c0) + len(c1)))
    visible = [prompt_cols] * p + [prompt_cols + c0_cols] * len(c0) + [prompt_cols + c1_cols] * len(c1) + [[]]
    mask = _block_mask(length, visible)[None, None]
    # the last prompt position predicts the first token of each completion
    t0 = [p - 1] + c0_cols[:-1]
    t1 = [p - 1] + c1_cols[:-1]
    return _batch([row], [positions], mask, [(t0, c0, [0] * len(c0)), (t1, c1, [1] * len(c1))])


LAYOUTS = {"padded": padded_batch, "packed": packed_batch, "prefix_shared": prefix_shared_batch}
