"""Where checkpoints live and what a run's checkpoints are: names, listing, the RNG state files, errors.

``RUN_DIR/checkpoints/step-N`` (complete: the rename that made it was the commit point), ``latest``
naming the newest, ``.tmp-step-N`` while one is written; a checkpoint's ``rng/rank-R.json`` holds a
process's torch / CUDA / python / numpy RNG states as JSON. The rank and barrier helpers work with
and without ``torch.distributed``. Left out: writing (``state``), verifying (``manifest``), choosing
one to resume from (``resume``).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STEP_RE = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-step-"
STALE_PREFIX = ".old-step-"
DAMAGED_PREFIX = "damaged-"
CLIENT_KEY = "alignkit_client_state"  # DeepSpeed returns its own keys next to ours; ours live under this one
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "alignkit-checkpoint/1"


class UnsafeCheckpoint(UserError):
    """A checkpoint file holds Python objects that loading would run (refused, nothing executed)."""


class NonFiniteWeights(UserError):
    """The weights after a step are NaN/inf: that step is not saved (exit code 3, as a non-finite loss)."""

    exit_code = 3


def process_rank() -> int:
    """This process's rank (0 without ``torch.distributed``)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (nothing without ``torch.distributed``)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def checkpoints_root(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_RE.match(p.name)) and not p.is_symlink() and p.is_dir()]
    return sorted(found)


def last_good_message(run_dir: str | os.PathLike) -> str:
    """One sentence: the newest checkpoint of ``run_dir`` (resume=auto continues from it), or that there is none."""
    existing = list_checkpoints(checkpoints_root(run_dir))
    if not existing:
        return ("No checkpoint was saved before it (trainer.save_every=0, or none was due yet): there is nothing "
                "to resume from.")
    step, path = existing[-1]
    return f"The last good checkpoint, {path}, is kept: resume=auto continues from step {step}."


def capture_rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / python / numpy RNG states, JSON-serialisable."""
    version, py_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(py_state), gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def write_text_atomic(path: Path, text: str) -> None:
    from alignkit import runfiles

    runfiles.write_text(path, text)  # temp file opened O_EXCL|O_NOFOLLOW: a planted link is never written through


def has_frozen_parameters(engine: Any) -> bool:
    """True for e.g. LoRA: frozen base weights stay out of checkpoints (the model source restores them)."""
    return any(not p.requires_grad for p in engine.module.parameters())
