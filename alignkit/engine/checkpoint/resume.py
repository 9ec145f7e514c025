"""Which checkpoint a run resumes from: discovery (``latest``, ``resume=auto|PATH``), verification, fallback.

``find_resume_checkpoint`` reads ``resume``; ``resume_checkpoint`` verifies the candidate on rank 0
(every rank gets its verdict), loads it, and on damage reports it and tries the previous one, moving a
damaged checkpoint of this run aside (``resume=auto``) to ``damaged-step-N-<time>``. An explicit
damaged ``step-N``, no intact checkpoint, or an unsafe file is a ``UserError``. Left out: writing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from alignkit.engine.checkpoint.layout import (
    CHECKPOINTS,
    DAMAGED_PREFIX,
    LATEST,
    STEP_RE,
    UnsafeCheckpoint,
    barrier,
    process_rank,
    checkpoints_root,
    list_checkpoints,
)
from alignkit.engine.checkpoint.manifest import verify_checkpoint
from alignkit.engine.checkpoint.state import load_checkpoint
from alignkit.errors import UserError

log = logging.getLogger("alignkit.engine.checkpoint")


def _latest_in(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one, else None."""
    pointer = root / LATEST
    if pointer.is_file() and not pointer.is_symlink():
        # only a plain ``step-N`` entry of this folder: never ``../elsewhere/step-N`` or a link to one
        name = pointer.read_bytes()[:64].decode("ascii", errors="replace").strip()
        named = root / name
        if STEP_RE.match(name) and not named.is_symlink() and named.is_dir():
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
        from alignkit import runfiles

        runfiles.refuse_symlink(checkpoints_root(run_dir), "checkpoints folder")
        return _latest_in(checkpoints_root(run_dir))
    path = Path(resume).expanduser()
    if path.is_dir() and STEP_RE.match(path.name):
        return path
    for root in (path, path / CHECKPOINTS):
        if root.is_dir() and (found := _latest_in(root)) is not None:
            return found
    raise UserError(
        f"resume={resume!r} is not a checkpoint: expected a 'step-N' directory, a 'checkpoints' directory "
        "or a run directory holding one. Use resume=auto to pick the latest checkpoint of this run, or "
        "resume=null to start fresh."
    )


def _candidates(run_dir: str | os.PathLike, resume: str | None) -> tuple[list[Path], bool]:
    """Checkpoints to try, newest first, and whether they may be moved aside (this run's own, resume=auto)."""
    first = find_resume_checkpoint(run_dir, resume)
    if first is None:
        return [], False
    if str(resume).strip().lower() != "auto" and first == Path(str(resume)).expanduser():
        return [first], False  # an explicit step-N: that one or an error
    first_step = int(STEP_RE.match(first.name).group(1))
    older = [p for step, p in reversed(list_checkpoints(first.parent)) if step < first_step]
    return [first, *older], str(resume).strip().lower() == "auto"


def _agreed(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (verification is done once, on rank 0)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _move_aside(path: Path) -> Path:
    target = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{int(time.time())}")
    os.replace(path, target)
    return target


def resume_checkpoint(
    engine: Any,
    run_dir: str | os.PathLike,
    resume: str | None,
    *,
    extra_engines: Mapping[str, Any] | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[Path | None, dict[str, Any]]:
    """Find, verify and load the checkpoint ``resume`` names: ``(path, client_state)``, ``(None, {})`` if none.

    A damaged checkpoint is reported through ``say`` (default: the log) and the previous one is
    tried; under ``resume=auto`` the damaged one is moved aside to ``damaged-step-N-<time>``. An
    explicit ``resume=.../step-N`` that is damaged, or no intact checkpoint at all, is a
    ``UserError``; so is a file that would run code (``UnsafeCheckpoint``: never skipped silently).
    """
    say = say or log.warning
    candidates, own = _candidates(run_dir, resume)
    problems: list[str] = []
    for index, path in enumerate(candidates):
        problem = _agreed(verify_checkpoint(path) if process_rank() == 0 else None)
        if problem is None:
            try:
                return path, load_checkpoint(engine, path, extra_engines=extra_engines)
            except UnsafeCheckpoint:
                raise
            except Exception as error:  # DeepSpeed failed on files the manifest could not vouch for
                world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
                if world > 1:
                    raise
                problem = f"DeepSpeed could not load it ({type(error).__name__}: {str(error)[:200]})"
        problems.append(f"{path.name}: {problem}")
        nxt = candidates[index + 1].name if index + 1 < len(candidates) else None
        where = ""
        if own and process_rank() == 0:
            where = f"; moved aside to {_move_aside(path).name}"
        barrier()
        say(f"checkpoint {path} is damaged ({problem}){where}; "
            + (f"trying the previous one, {nxt}" if nxt else "no older checkpoint to try"))
    if not candidates:
        return None, {}
    if len(candidates) == 1 and not own:
        raise UserError(
            f"Checkpoint {candidates[0]} is damaged ({problems[0].split(': ', 1)[1]}). Resume from another "
            "checkpoint with resume=PATH, or start fresh with resume=null."
        )
    raise UserError(
        f"No intact checkpoint to resume from in {candidates[0].parent} ({'; '.join(problems)}). Start fresh "
        "with resume=null (or another run_name), or resume from a copy with resume=PATH."
    )
