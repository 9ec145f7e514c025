"""Reference log-probs behind one switch: ``trainer.reference`` = separate | precomputed | lora | none.

* ``separate``: a frozen copy of the starting model as a DeepSpeed inference engine (ZeRO-3 shards it).
* ``precomputed``: a pre-pass with the starting policy writes every example's reference log-probs to
  a cache file keyed by model, tokenization and data; training then holds no reference at all, and
  a later run or sweep job with the same key reuses the file.
* ``lora``: the policy with its LoRA adapter disabled (no second copy).
* ``none``: reference-free losses; nothing is loaded.
``auto`` picks none for reference-free losses, lora when training LoRA, else precomputed.

Every strategy answers ``logps(batch, with_tokens)`` with the per-slot sums ``[G, K]`` and, when
asked, the per-target values ``[N]`` in the batch's target order. The live ones (``separate``,
``lora``) also answer ``head(batch)``: a ``models.logprobs.ReferenceHead`` (the reference's hidden
states at the targets, through its own engine, and its LM head) from which the policy's forward
computes the per-token full-vocabulary KL of a loss with ``needs_token_kl`` (TDPO) and the
reference's target log-probs in the same chunked pass; ``precomputed`` cannot (compose-time error).

The precomputed cache lives in ``trainer.reference_cache_dir``, else ``$ALIGNKIT_CACHE/ref_logps``
(``~/.cache/alignkit/ref_logps``), as ``ref-<key>.safetensors``: the values as one float32 tensor,
a JSON tensor with the key's inputs (model section, layout, compute dtype), the example ids and
per-completion lengths, and the sha256 of both in the header. Reading it runs no code. A file
whose checksum, key, ids or lengths do not match (changed values, truncation, a missing entry) is
reported, moved aside to ``<name>.bad-<time>`` and recomputed; every rank agrees before using it.
The pre-pass forwards the batches training will forward first (``chunks``: each group in the micro-batch
of its first step, held-out groups in their eval batches), and its sums per completion use the same
``sum_per_slot`` as the policy's: in bf16 a row's numbers depend on what else is in the batch (kernel
blocking, packing), so only the same batches give a step-0 loss of exactly ln 2.
Left out: sharing one cache between runs of different world sizes mid-write (the write is atomic,
the last writer wins).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from alignkit.data.batch import Batch, TokenizedGroup, sum_per_slot
from alignkit.models.fsutil import atomic_write
from alignkit.models.logprobs import ReferenceHead, forward_logps


def choose_strategy(requested: str, needs_reference: bool, lora: bool) -> str:
    if not needs_reference:
        return "none"
    if requested != "auto":
        return requested
    return "lora" if lora else "precomputed"


class NoReference:
    """Reference-free losses: no reference log-probs."""

    def logps(self, batch: Batch, with_tokens: bool = False) -> tuple[None, None]:
        return None, None


class ModuleReference:
    """``separate`` (a frozen engine) and ``lora`` (the policy with the adapter disabled)."""

    def __init__(self, module: Any, context: Callable[[], Any] = contextlib.nullcontext):
        self.module = module
        self.context = context

    @torch.no_grad()
    def logps(self, batch: Batch, with_tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self.context():
            out = forward_logps(self.module, batch)
        tokens = out["logps"].detach().float()
        return sum_per_slot(tokens, batch), (tokens if with_tokens else None)

    @torch.no_grad()
    def head(self, batch: Batch) -> ReferenceHead:
        """The reference at ``batch``'s targets, for the policy's per-token KL (``needs_token_kl``)."""
        with self.context():
            hidden = forward_logps(self.module, batch, hidden_only=True)["hidden"].detach()
        inner = getattr(self.module, "module", self.module)  # the TargetLogProbs inside an engine
        context = self.context

        @torch.no_grad()
        def logits(chunk: torch.Tensor) -> torch.Tensor:
            with context():  # lora: the base model's head, also when backward recomputes a chunk
                return inner.target_logits(chunk)

        return ReferenceHead(hidden=hidden, logits=logits)


class PrecomputedReference:
    """Reference log-probs looked up by ``example_id`` from a cache built once before training."""

    def __init__(self, table: dict[str, list[list[float]]]):
        self.table = table

    def logps(self, batch: Batch, with_tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        # targets of slot s are emitted left to right: rebuild the flat [N] vector in batch order and sum
        # it as the policy's values are summed (bit-equal sums when the values are)
        values: list[float] = []
        seen: dict[int, int] = {}
        for slot in batch.target_slot.cpu().tolist():
            g, k = divmod(slot, batch.group_size)
            i = seen.get(slot, 0)
            values.append(self.table[batch.example_ids[g]][k][i])
            seen[slot] = i + 1
        flat = torch.tensor(values, dtype=torch.float32)
        flat = flat.to(batch.target_ids.device)
        return sum_per_slot(flat, batch), (flat if with_tokens else None)


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


CACHE_FORMAT = "alignkit-ref-logps/1"


class CacheDamaged(Exception):
    """A reference cache file that must not be used (the message says why)."""


def default_cache_dir() -> Path:
    """``$ALIGNKIT_CACHE/ref_logps`` (default ``~/.cache/alignkit/ref_logps``), like every alignkit cache."""
    from alignkit.models.smollm2 import cache_root

    return cache_root() / "ref_logps"


def _digest(values: torch.Tensor, meta: torch.Tensor) -> str:
    h = hashlib.sha256()
    for tensor in (values, meta):
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def _expected_lengths(group: TokenizedGroup) -> list[int]:
    """Targets per completion: every train-mask token is predicted once."""
    return [sum(1 for m in mask if m) for mask in group.completion_train_mask]


def write_table(path: Path, key: str, identity: dict, table: dict[str, list[list[float]]]) -> None:
    """Write ``table`` atomically in the cache format (see the module docstring)."""
    from safetensors.torch import save

    ids = sorted(table)
    flat = [v for example_id in ids for values in table[example_id] for v in values]
    meta = json.dumps({"key": key, "identity": identity, "ids": ids,
                       "lengths": [[len(values) for values in table[i]] for i in ids]}, default=str)
    tensors = {"values": torch.tensor(flat, dtype=torch.float32),
               "meta": torch.frombuffer(bytearray(meta.encode()), dtype=torch.uint8).clone()}
    payload = save(tensors, metadata={"format": CACHE_FORMAT, "key": key, "sha256": _digest(**tensors)})
    atomic_write(path, payload)  # a random temp name, created exclusively: a planted link is never followed


def read_table(path: Path, key: str, groups: list[TokenizedGroup]) -> dict[str, list[list[float]]]:
    """The cached table, checked against ``key`` and ``groups`` (ids, completions, lengths); else ``CacheDamaged``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if header.get("format") != CACHE_FORMAT or set(handle.keys()) != {"values", "meta"}:
                raise CacheDamaged(f"not an {CACHE_FORMAT} file")
            tensors = {name: handle.get_tensor(name) for name in ("values", "meta")}
    except CacheDamaged:
        raise
    except Exception as error:  # truncated or not safetensors at all
        raise CacheDamaged(f"unreadable ({type(error).__name__}: {error})") from error
    if header.get("key") != key:
        raise CacheDamaged(f"it holds key {header.get('key')!r}, not {key!r}")
    if header.get("sha256") != _digest(**tensors):
        raise CacheDamaged("checksum mismatch (the values were changed after they were written)")
    try:
        meta = json.loads(tensors["meta"].numpy().tobytes().decode())
        ids, lengths = meta["ids"], meta["lengths"]
        flat = tensors["values"].tolist()
    except Exception as error:
        raise CacheDamaged(f"inconsistent content ({type(error).__name__}: {error})") from error
    if meta.get("key") != key or sum(map(sum, lengths)) != len(flat) or len(ids) != len(lengths):
        raise CacheDamaged("its lengths do not add up")
    table: dict[str, list[list[float]]] = {}
    pos = 0
    for example_id, counts in zip(ids, lengths):
        table[example_id] = []
        for n in counts:
            table[example_id].append(flat[pos : pos + n])
            pos += n
    for group in groups:
        if group.example_id not in table:
            raise CacheDamaged(f"example {group.example_id!r} is missing")
        if [len(v) for v in table[group.example_id]] != _expected_lengths(group):
            raise CacheDamaged(f"example {group.example_id!r} has the wrong number of values")
    return table


def _move_aside(path: Path) -> Path | None:
    target = path.with_name(f"{path.name}.bad-{int(time.time())}-{os.getpid()}")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    return target


def _model_identity(model_cfg: dict) -> dict:
    identity = dict(model_cfg)
    path = Path(str(identity.get("name_or_path", "")))
    if path.is_dir():  # a local folder: weights may change under the same name
        identity["_mtimes"] = sorted((p.name, p.stat().st_mtime_ns) for p in path.glob("*.safetensors"))
    return identity


@torch.no_grad()
def precompute(
    module: Any,
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
    chunks: list[list[TokenizedGroup]] | None = None,
) -> PrecomputedReference:
    """Compute (or load) the reference log-probs of ``groups`` with ``module`` as it is now, forwarding
    ``chunks`` (the batches training forwards first; default: ``batch_groups`` at a time)."""
    from alignkit.engine.faults import any_rank

    unique = {g.example_id: g for g in groups}
    ordered = [unique[k] for k in sorted(unique)]
    identity = _model_identity(model_cfg)
    first = next(iter(module.parameters()), None)
    from alignkit.engine.precision import compute_precision

    identity["_compute_dtype"] = compute_precision(module) if first is not None else ""
    if chunks is not None:  # the training batches: their composition decides the numbers in bf16
        identity["_batches"] = hashlib.sha256(json.dumps([[g.example_id for g in c] for c in chunks]).encode()).hexdigest()
    else:
        chunks = [ordered[i : i + batch_groups] for i in range(0, len(ordered), batch_groups)]
    first_chunk: dict[str, int] = {}
    for c, chunk in enumerate(chunks + [[g] for g in ordered]):  # every group, once, in its first batch
        for group in chunk:
            first_chunk.setdefault(group.example_id, c)
    chunks = chunks + [[g] for g in ordered if first_chunk[g.example_id] >= len(chunks)]
    key = cache_key(identity, ordered, layout)
    path = Path(cache_dir) / f"ref-{key}.safetensors"
    table, problem = None, None
    if path.is_file():
        try:
            table = read_table(path, key, ordered)
        except CacheDamaged as damaged:
            problem = str(damaged)
    if not any_rank(table is None):  # every rank read an intact file
        log(f"reference log-probs: reusing cache {path}")
        return PrecomputedReference(table)
    if problem is not None and rank == 0:
        moved = _move_aside(path)
        log(_escape(f"reference log-probs: cache {path} is damaged ({problem}): moved aside to "
                    f"{moved.name if moved else '(gone)'}; recomputing"))
    log(f"reference log-probs: pre-pass over {len(ordered)} examples -> {path}")
    mine: dict[str, list[list[float]]] = {}
    from alignkit.trainers.common import rank_share

    for (c, chunk), counted in rank_share(list(enumerate(chunks)), rank, world):
        batch = collate(chunk).to(device)
        values = forward_logps(module, batch)["logps"].float().cpu()
        slots = batch.target_slot.cpu()
        if not counted:
            continue
        for g, group in enumerate(chunk):
            if first_chunk[group.example_id] != c:
                continue  # its first batch is another one
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
        write_table(path, key, identity, table)
    return PrecomputedReference(table)


def _escape(text: str) -> str:
    """Rich markup off for paths and reasons (the trainers' ``log`` is a rich console)."""
    from rich.markup import escape

    return escape(text)
