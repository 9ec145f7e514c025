"""Saving and loading one checkpoint of the engines' state (model, optimizer, scheduler, RNG, client state).

``save_checkpoint`` (every rank calls it) refuses non-finite weights, writes every rank's part into
``.tmp-step-N``, then rank 0 writes the manifest, renames the folder to ``step-N`` (the commit point),
rewrites ``latest`` and prunes beyond ``keep_last``. ``load_checkpoint`` loads a ``step-N`` with
weights-only loading and restores this rank's RNG. Left out: choosing and verifying which checkpoint
to load (``resume``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from alignkit.engine.checkpoint.layout import (
    CLIENT_KEY,
    LATEST,
    STALE_PREFIX,
    STEP_RE,
    TMP_PREFIX,
    NonFiniteWeights,
    barrier,
    process_rank,
    write_text_atomic,
    capture_rng_state,
    checkpoints_root,
    has_frozen_parameters,
    last_good_message,
    list_checkpoints,
    restore_rng_state,
)
from alignkit.engine.checkpoint.manifest import write_manifest
from alignkit.engine.checkpoint.safe_load import weights_only_loading
from alignkit.errors import UserError

log = logging.getLogger("alignkit.engine.checkpoint")


def save_checkpoint(
    engine: Any,
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
    from alignkit.engine.faults import any_rank, nonfinite_parameter

    root = checkpoints_root(run_dir)
    bad = nonfinite_parameter(engine.module)
    for name, extra in (extra_engines or {}).items():
        bad = bad or (f"{name}:{b}" if (b := nonfinite_parameter(extra.module)) else None)
    if any_rank(bad is not None):
        raise NonFiniteWeights(
            f"non-finite weights after step {step}{f' ({bad})' if bad else ' (on another rank)'}: this step is "
            f"not saved. {last_good_message(run_dir)} Lower trainer.lr, or clip harder with a smaller "
            "deepspeed.gradient_clipping (e.g. 1.0); trainer.on_nonfinite=skip would not help here: it skips steps "
            "whose loss is non-finite, and this step's loss was computed before the update overflowed the weights."
        )
    tmp_tag = f"{TMP_PREFIX}{step}"
    if process_rank() == 0:
        from alignkit import runfiles

        runfiles.make_dir(root, "checkpoints folder")  # a planted link would take every checkpoint elsewhere
        for leftover in root.iterdir():  # crashed saves, including an earlier try at this step
            if leftover.is_symlink() and not STEP_RE.match(leftover.name):
                # alignkit makes no links here: a planted one (e.g. zero_to_fp32.py, which DeepSpeed copies its
                # recovery script onto with shutil.copyfile) would be written through
                leftover.unlink()
            elif leftover.name.startswith((TMP_PREFIX, STALE_PREFIX)):
                shutil.rmtree(leftover, ignore_errors=True)
    barrier()

    _save_engine(engine, root, tmp_tag, client_state={CLIENT_KEY: dict(client_state)})
    for name, extra in (extra_engines or {}).items():
        _save_engine(extra, root / tmp_tag, _extra_tag(name), client_state={})
    rng_dir = root / tmp_tag / "rng"
    rng_dir.mkdir(parents=True, exist_ok=True)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rng = {"world_size": world, "step": step, "state": capture_rng_state()}
    write_text_atomic(rng_dir / f"rank-{process_rank()}.json", json.dumps(rng))
    barrier()

    final = root / f"step-{step}"
    if process_rank() == 0:
        write_manifest(root / tmp_tag, step)  # last: a manifest vouches for every file written before it
        _commit(root / tmp_tag, final)
        write_text_atomic(root / LATEST, final.name + "\n")
        _prune(root, keep_last, protect=final)
    barrier()
    return final


def _extra_tag(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"extra engine name {name!r} must be a plain folder name")
    return f"engine-{name}"


def _save_engine(engine: Any, save_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
    engine.save_checkpoint(
        str(save_dir),
        tag=tag,
        client_state=client_state,
        save_latest=False,
        exclude_frozen_parameters=has_frozen_parameters(engine),
    )


def _load_engine(engine: Any, load_dir: Path, tag: str) -> dict[str, Any]:
    missing = UserError(
        f"Checkpoint {load_dir / tag} could not be loaded by DeepSpeed (missing or incomplete files). "
        "Pick another one with resume=PATH, or start fresh with resume=null."
    )
    if not (load_dir / tag).is_dir():
        raise missing
    if getattr(engine, "load_universal_checkpoint", lambda: False)():
        raise UserError(
            "DeepSpeed universal checkpoints (checkpoint.load_universal in deepspeed.raw_json) are not supported: "
            "DeepSpeed reads them with full pickle. Remove that key to resume from an alignkit checkpoint."
        )
    with weights_only_loading(engine):
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
    if final.exists() or final.is_symlink():  # a planted link is moved aside too, never written through
        stale = final.with_name(f"{STALE_PREFIX}{final.name[len('step-') :]}")
        os.replace(final, stale)
    os.replace(tmp, final)
    if stale is not None:
        stale.unlink() if stale.is_symlink() else shutil.rmtree(stale, ignore_errors=True)


def _prune(root: Path, keep_last: int, *, protect: Path) -> None:
    if keep_last <= 0:
        return
    existing = list_checkpoints(root)
    for _, path in existing[: max(0, len(existing) - keep_last)]:
        if path != protect:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    engine: Any, path: str | os.PathLike, *, extra_engines: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Load model, optimizer, scheduler, this rank's RNG from ``path`` (``step-N``); return client_state.

    ``extra_engines`` must name the same engines that ``save_checkpoint`` was given.
    """
    path = Path(path)
    client_state = _load_engine(engine, path.parent, path.name)
    for name, extra in (extra_engines or {}).items():
        _load_engine(extra, path, _extra_tag(name))
    rng_file = path / "rng" / f"rank-{process_rank()}.json"
    if rng_file.is_file():
        restore_rng_state(json.loads(rng_file.read_text())["state"])
    else:
        log.warning(
            "No RNG state for rank %d in %s (different world size?); keeping the current RNG.", process_rank(), path
        )
    return dict(client_state.get(CLIENT_KEY, {}))
