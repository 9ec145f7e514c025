"""Reference log-probs behind one switch: ``trainer.reference`` = separate | precomputed | lora | none.

* ``separate``: a frozen copy of the starting model as a DeepSpeed inference engine (ZeRO-3 shards it).
* ``precomputed``: a pre-pass with the starting policy writes every example's reference log-probs to
  a cache file keyed by model, tokenization and data; training then holds no reference at all, and
  a later run or sweep job with the same key reuses the file.
* ``lora``: the policy with its LoRA adapter disabled (no second copy).
* ``none``: reference-free losses; nothing is loaded.
``auto`` picks none for reference-free losses, lora when training LoRA, else precomputed.

Every strategy answers ``logps(batch, with_tokens)`` with the per-slot sums ``[G, K]`` and, when
asked, the per-target values ``[N]`` in the batch's target order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from alignkit.data.batch import Batch, TokenizedGroup, sum_per_slot


def choose_strategy(requested: str, needs_reference: bool, lora: bool) -> str:
    if not needs_reference:
        return "none"
    if requested != "auto":
        return requested
    return "lora" if lora else "precomputed"


def forward_logps(engine_or_module, batch: Batch, **flags: bool) -> dict[str, torch.Tensor]:
    """One forward of a ``TargetLogProbs`` module (or the engine wrapping one) over ``batch``."""
    return engine_or_module(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        target_index=batch.target_index,
        target_ids=batch.target_ids,
        **flags,
    )


class NoReference:
    def logps(self, batch: Batch, with_tokens: bool = False):
        return None, None


class ModuleReference:
    """``separate`` (a frozen engine) and ``lora`` (the policy with the adapter disabled)."""

    def __init__(self, module, context: Callable[[], Any] = contextlib.nullcontext):
        self.module = module
        self.context = context

    @torch.no_grad()
    def logps(self, batch: Batch, with_tokens: bool = False):
        with self.context():
            out = forward_logps(self.module, batch)
        tokens = out["logps"].detach().float()
        return sum_per_slot(tokens, batch), (tokens if with_tokens else None)


class PrecomputedReference:
    """Reference log-probs looked up by ``example_id`` from a cache built once before training."""

    def __init__(self, table: dict[str, list[list[float]]]):
        self.table = table

    def logps(self, batch: Batch, with_tokens: bool = False):
        seq = torch.zeros(batch.num_groups, batch.group_size, dtype=torch.float32)
        for g, example_id in enumerate(batch.example_ids):
            for k, values in enumerate(self.table[example_id]):
                seq[g, k] = float(sum(values))
        if with_tokens:
            # targets of slot s are emitted left to right; rebuild the flat [N] vector in batch order
            flat = torch.zeros(batch.target_slot.numel(), dtype=torch.float32)
            slots = batch.target_slot.cpu()
            seen: dict[int, int] = {}
            for n, slot in enumerate(slots.tolist()):
                g, k = divmod(slot, batch.group_size)
                i = seen.get(slot, 0)
                flat[n] = self.table[batch.example_ids[g]][k][i]
                seen[slot] = i + 1
            return seq.to(batch.target_ids.device), flat.to(batch.target_ids.device)
        return seq.to(batch.target_ids.device), None


def cache_key(model_cfg: Any, groups: list[TokenizedGroup], layout: str) -> str:
    """Key = model identity + the exact token ids of every example (tokenizer, template and lengths included)."""
    h = hashlib.sha256()
    h.update(json.dumps(model_cfg, sort_keys=True, default=str).encode())
    h.update(layout.encode())
    for group in groups:
        h.update(group.example_id.encode())
        h.update(str(group.prompt_ids).encode())
        for ids, mask in zip(group.completion_ids, group.completion_train_mask):
            h.update(str(ids).encode())
            h.update(str(mask).encode())
    return h.hexdigest()[:24]


def _model_identity(model_cfg: dict) -> dict:
    identity = dict(model_cfg)
    path = Path(str(identity.get("name_or_path", "")))
    if path.is_dir():  # a local folder: weights may change under the same name
        identity["_mtimes"] = sorted((p.name, p.stat().st_mtime_ns) for p in path.glob("*.safetensors"))
    return identity


@torch.no_grad()
def precompute(
    module,
    groups: list[TokenizedGroup],
    collate: Callable[[list[TokenizedGroup]], Batch],
    *,
    model_cfg: dict,
    layout: str,
    cache_dir: Path,
    batch_groups: int,
    rank: int,
    world: int,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> PrecomputedReference:
    """Compute (or load) the reference log-probs of ``groups`` with ``module`` as it is now."""
    unique = {g.example_id: g for g in groups}
    ordered = [unique[k] for k in sorted(unique)]
    key = cache_key(_model_identity(model_cfg), ordered, layout)
    path = Path(cache_dir) / f"ref-{key}.pt"
    if path.is_file():
        log(f"reference log-probs: reusing cache {path}")
        return PrecomputedReference(torch.load(path, weights_only=True))
    log(f"reference log-probs: pre-pass over {len(ordered)} examples -> {path}")
    mine: dict[str, list[list[float]]] = {}
    chunks = [ordered[i : i + batch_groups] for i in range(0, len(ordered), batch_groups)]
    from alignkit.trainers.common import rank_share

    for chunk, counted in rank_share(chunks, rank, world):
        batch = collate(chunk).to(device)
        values = forward_logps(module, batch)["logps"].float().cpu()
        slots = batch.target_slot.cpu()
        if not counted:
            continue
        for g, group in enumerate(chunk):
            mine[group.example_id] = [
                values[slots == g * batch.group_size + k].tolist() for k in range(group.group_size)
            ]
    if world > 1:
        from alignkit.engine.collectives import all_gather_object

        parts = all_gather_object(mine)
        table = {k: v for part in parts for k, v in part.items()}
    else:
        table = mine
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(table, tmp)
        tmp.replace(path)
    return PrecomputedReference(table)
