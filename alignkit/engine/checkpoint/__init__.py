"""Atomic, resumable DeepSpeed checkpoints: ``RUN_DIR/checkpoints/step-N`` plus a ``latest`` pointer.

Saving (every rank calls ``save_checkpoint``):

1. rank 0 removes leftovers of crashed saves (``.tmp-step-*``); barrier;
2. every rank writes its part with DeepSpeed's ``engine.save_checkpoint`` into
   ``checkpoints/.tmp-step-N`` (model, optimizer, LR scheduler, the trainer's ``client_state``)
   and its own RNG states (torch, CUDA, python, numpy) as ``rng/rank-R.json``; barrier;
3. rank 0 renames ``.tmp-step-N`` to ``step-N`` (the commit point: a directory named ``step-N``
   is always complete), then rewrites ``latest`` atomically (temp file + ``os.replace``), then
   deletes the oldest ``step-*`` beyond ``keep_last``; barrier.

Before step 2 every rank checks that its (shard of the) trainable weights is finite: a step that
produced NaN/inf weights is never saved; ``NonFiniteWeights`` is raised instead, naming the last
good checkpoint or saying there is none. Last in the temporary folder, rank 0 writes
``manifest.json`` (every file's size and sha256) atomically; the rename commits it with the rest.

A crash at any point leaves the previous ``step-*`` and ``latest`` untouched. Frozen parameters
(a LoRA model's base weights) are not saved: a resumed run reloads them from the model source, so
a LoRA checkpoint holds only adapters, optimizer state and RNG. The run directory
must be on a filesystem every node sees (rank 0 renames the directory all ranks wrote into).

RNG states are JSON. DeepSpeed's own files are ``torch.save`` pickles: ``load_checkpoint`` makes
DeepSpeed read them with ``torch.load(weights_only=True)`` (its checkpoint engine's ``load`` is
replaced, and ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` covers any direct ``torch.load``), allowing only
tensors, containers and the few bookkeeping types DeepSpeed 0.19 stores (``SAFE_GLOBALS``, found
with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3, fp32/bf16/fp16, CPU
offload, LoRA). A file holding anything else (a planted ``__reduce__`` payload) is refused with
``UnsafeCheckpoint`` before any of it runs. ``load_checkpoint`` restores this rank's RNG if the
file exists (a run resumed with another world size keeps the fresh RNG and says so).

Resume (``resume_checkpoint``) verifies a checkpoint against its manifest (and that its RNG files
parse) before loading it; a damaged one (truncated or missing files, changed bytes, garbage RNG)
is reported and, for ``resume=auto``, moved aside to ``damaged-step-N-<time>`` and the previous
checkpoint is tried. A checkpoint without a manifest (older alignkit) is loaded with a warning.

Left out: DeepSpeed's universal checkpoints (changing ZeRO stage / world size across a resume;
refused, as DeepSpeed reads them with full pickle),
asynchronous saving, and the trainer's data-order bookkeeping (it goes in ``client_state``).

The package, by concern: ``layout`` (names, listing, RNG files, errors), ``safe_load`` (weights-only
loading), ``manifest`` (integrity), ``state`` (save and load one checkpoint), ``resume`` (which one
to resume from). The names below are the public ones, importable from here as before.
"""

from __future__ import annotations

from alignkit.engine.checkpoint.layout import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    MANIFEST_FORMAT,
    TMP_PREFIX as _TMP_PREFIX,
    NonFiniteWeights,
    UnsafeCheckpoint,
    capture_rng_state,
    checkpoints_root,
    has_frozen_parameters,
    last_good_message,
    list_checkpoints,
    restore_rng_state,
)
from alignkit.engine.checkpoint.manifest import verify_checkpoint, write_manifest
from alignkit.engine.checkpoint.resume import find_resume_checkpoint, resume_checkpoint
from alignkit.engine.checkpoint.safe_load import safe_globals, safe_torch_load, weights_only_loading
from alignkit.engine.checkpoint.state import load_checkpoint, save_checkpoint

__all__ = [
    "CHECKPOINTS", "LATEST", "MANIFEST", "MANIFEST_FORMAT", "NonFiniteWeights", "UnsafeCheckpoint", "_TMP_PREFIX",
    "capture_rng_state", "checkpoints_root", "find_resume_checkpoint", "has_frozen_parameters", "last_good_message",
    "list_checkpoints", "load_checkpoint", "restore_rng_state", "resume_checkpoint", "safe_globals",
    "safe_torch_load", "save_checkpoint", "verify_checkpoint", "weights_only_loading", "write_manifest",
]
