"""Atomic, resumable DeepSpeed checkpoints: ``RUN_DIR/checkpoints/step-N`` plus a ``latest`` pointer.

Saving (every rank calls ``save_checkpoint``):

1. rank 0 removes leftovers of crashed saves (``.tmp-step-*``); barrier;
2. every rank writes its part with DeepSpeed's ``engine.save_checkpoint`` into
   ``checkpoints/.tmp-step-N`` (model, optimizer, LR scheduler, the trainer's ``client_state``)
   and its own RNG states (torch, CUDA, python, numpy) as ``rng/rank-R.json``; barrier;
3. rank 0 renames ``.tmp-step-N`` to ``step-N`` (the commit point: a directory named ``step-N``
   is always complete), then rewrites ``latest`` atomically (temp file + ``os.replace``), then
   deletes the oldest ``step-*`` beyond ``keep_last``; barrier.

A crash at any point leaves the previous ``step-*`` and ``latest`` untouched. Frozen parameters
(a LoRA model's base weights) are not saved: a resumed run reloads them from the model source, so
a LoRA checkpoint holds only adapters, optimizer state and RNG. The run directory
must be on a filesystem every node sees (rank 0 renames the directory all ranks wrote into).

RNG states are JSON (no pickle). ``load_checkpoint`` restores this rank's RNG if the file exists
(a run resumed with another world size keeps the fresh RNG and says so).

Left out: DeepSpeed's universal checkpoints (changing ZeRO stage / world size across a resume),
asynchronous saving, and the trainer's data-order bookkeeping (it goes in ``client_state``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-step-"
_STALE_PREFIX = ".old-step-"
_CLIENT_KEY = "alignkit_client_state"  # DeepSpeed returns its own keys next to ours; ours live under this one


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def checkpoints_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found)


# --- RNG state as JSON ---------------------------------------------------------------------------


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


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def has_frozen_parameters(engine) -> bool:
    """True for e.g. LoRA: frozen base weights stay out of checkpoints (the model source restores them)."""
    return any(not p.requires_grad for p in engine.module.parameters())


# --- save ------------------------------------------------------------------------------------------


def save_checkpoint(
    engine,
    run_dir: str | os.PathLike,
    step: int,
    client_state: dict[str, Any],
    keep_last: int,
    *,
    extra_engines: Mapping[str, Any] | None = None,
) -> Path:
    """Save an exact-resume checkpoint of ``engine`` at optimizer step ``step``; every rank must call it.

    ``client_state`` is the trainer's own state (epoch, batches consumed, metrics, ...); it comes
    back from ``load_checkpoint``. ``keep_last`` >= 1 keeps that many newest checkpoints, 0 keeps all.
    ``extra_engines`` (e.g. ``{"critic": critic}``) are saved in the same checkpoint, each in an
    ``engine-NAME`` subfolder, and committed by the same rename. Returns ``RUN_DIR/checkpoints/step-N``.
    """
    root = checkpoints_root(run_dir)
    tmp_tag = f"{_TMP_PREFIX}{step}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.iterdir():  # crashed saves, including an earlier try at this step
            if leftover.name.startswith((_TMP_PREFIX, _STALE_PREFIX)):
                shutil.rmtree(leftover, ignore_errors=True)
    _barrier()

    _save_engine(engine, root, tmp_tag, client_state={_CLIENT_KEY: dict(client_state)})
    for name, extra in (extra_engines or {}).items():
        _save_engine(extra, root / tmp_tag, _extra_tag(name), client_state={})
    rng_dir = root / tmp_tag / "rng"
    rng_dir.mkdir(parents=True, exist_ok=True)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rng = {"world_size": world, "step": step, "state": capture_rng_state()}
    (rng_dir / f"rank-{_rank()}.json").write_text(json.dumps(rng))
    _barrier()

    final = root / f"step-{step}"
    if _rank() == 0:
        _commit(root / tmp_tag, final)
        _write_text_atomic(root / LATEST, final.name + "\n")
        _prune(root, keep_last, protect=final)
    _barrier()
    return final


def _extra_tag(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"extra engine name {name!r} must be a plain folder name")
    return f"engine-{name}"


def _save_engine(engine, save_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
    engine.save_checkpoint(
        str(save_dir),
        tag=tag,
        client_state=client_state,
        save_latest=False,
        exclude_frozen_parameters=has_frozen_parameters(engine),
    )


def _load_engine(engine, load_dir: Path, tag: str) -> dict[str, Any]:
    missing = UserError(
        f"Checkpoint {load_dir / tag} could not be loaded by DeepSpeed (missing or incomplete files). "
        "Pick another one with resume=PATH, or start fresh with resume=null."
    )
    if not (load_dir / tag).is_dir():
        raise missing
    load_path, client_state = engine.load_checkpoint(
        str(load_dir),
        tag=tag,
        load_module_strict=not has_frozen_parameters(engine),
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise missing
    return client_state or {}


def _commit(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (re-save of a step) is moved aside first."""
    stale = None
    if final.exists():
        stale = final.with_name(f"{_STALE_PREFIX}{final.name[len('step-') :]}")
        os.replace(final, stale)
    os.replace(tmp, final)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def _prune(root: Path, keep_last: int, *, protect: Path) -> None:
    if keep_last <= 0:
        return
    existing = list_checkpoints(root)
    for _, path in existing[: max(0, len(existing) - keep_last)]:
        if path != protect:
            shutil.rmtree(path, ignore_errors=True)


# --- resume ----------------------------------------------------------------------------------------


def _latest_in(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one, else None."""
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.is_dir() and _STEP_RE.match(named.name):
            return named
    existing = list_checkpoints(root)
    return existing[-1][1] if existing else None


def find_resume_checkpoint(run_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """Which checkpoint to resume from.

    ``resume``: None / ``"none"`` -> start fresh; ``"auto"`` -> the latest complete checkpoint of
    ``run_dir`` (None if there is none yet); otherwise a path: a ``step-N`` directory, a
    ``checkpoints`` directory, or a run directory (its latest checkpoint).
    """
    if resume is None or str(resume).strip().lower() in ("", "none", "null", "false", "no"):
        return None
    if str(resume).strip().lower() == "auto":
        return _latest_in(checkpoints_root(run_dir))
    path = Path(resume).expanduser()
    if path.is_dir() and _STEP_RE.match(path.name):
        return path
    for root in (path, path / CHECKPOINTS):
        if root.is_dir() and (found := _latest_in(root)) is not None:
            return found
    raise UserError(
        f"resume={resume!r} is not a checkpoint: expected a 'step-N' directory, a 'checkpoints' directory "
        "or a run directory holding one. Use resume=auto to pick the latest checkpoint of this run, or "
        "resume=null to start fresh."
    )


def load_checkpoint(
    engine, path: str | os.PathLike, *, extra_engines: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Load model, optimizer, scheduler, this rank's RNG from ``path`` (``step-N``); return client_state.

    ``extra_engines`` must name the same engines that ``save_checkpoint`` was given.
    """
    path = Path(path)
    client_state = _load_engine(engine, path.parent, path.name)
    for name, extra in (extra_engines or {}).items():
        _load_engine(extra, path, _extra_tag(name))
    rng_file = path / "rng" / f"rank-{_rank()}.json"
    if rng_file.is_file():
        restore_rng_state(json.loads(rng_file.read_text())["state"])
    else:
        log.warning(
            "No RNG state for rank %d in %s (different world size?); keeping the current RNG.", _rank(), path
        )
    return dict(client_state.get(_CLIENT_KEY, {}))
