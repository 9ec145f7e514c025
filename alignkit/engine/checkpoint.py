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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
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
_DAMAGED_PREFIX = "damaged-"
_CLIENT_KEY = "alignkit_client_state"  # DeepSpeed returns its own keys next to ours; ours live under this one
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "alignkit-checkpoint/1"


class UnsafeCheckpoint(UserError):
    """A checkpoint file holds Python objects that loading would run (refused, nothing executed)."""


class NonFiniteWeights(UserError):
    """The weights after a step are NaN/inf: that step is not saved (exit code 3, as a non-finite loss)."""

    exit_code = 3


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
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_RE.match(p.name)) and not p.is_symlink() and p.is_dir()]
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
    from alignkit import runfiles

    runfiles.write_text(path, text)  # temp file opened O_EXCL|O_NOFOLLOW: a planted link is never followed


def has_frozen_parameters(engine) -> bool:
    """True for e.g. LoRA: frozen base weights stay out of checkpoints (the model source restores them)."""
    return any(not p.requires_grad for p in engine.module.parameters())


# --- loading DeepSpeed's files without running code --------------------------------------------------


def safe_globals() -> list:
    """The non-tensor types DeepSpeed 0.19 pickles into model/optimizer state files (nothing else loads).

    Found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on checkpoints of ZeRO 0-3,
    fp32/bf16/fp16, CPU optimizer/parameter offload and LoRA: the loss scalers and the ZeRO stage
    enum of the optimizer states, ``fragment_address`` (ZeRO 1/2 parameter slices), and
    ``argparse.Namespace`` (the ``args`` DeepSpeed saves when ``deepspeed.initialize`` got them).
    All are rebuilt from plain attributes: unpickling them runs no user code.
    """
    import argparse

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [argparse.Namespace, LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | os.PathLike, map_location=None):
    """``torch.load(weights_only=True)`` with ``safe_globals()`` allowed; anything else -> ``UnsafeCheckpoint``."""
    with torch.serialization.safe_globals(safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            found = re.search(r"GLOBAL (\S+)", str(error)) or re.search(r"global[s]?:? (\S+)", str(error))
            what = f" ({found.group(1).rstrip('.,')})" if found else ""
            raise UnsafeCheckpoint(
                f"{path} holds Python objects other than tensors and DeepSpeed's bookkeeping{what}; loading it "
                "would run code, so it was refused and nothing in it ran. If this checkpoint did not come from "
                "alignkit, do not use it; otherwise resume from another one with resume=PATH, or start fresh "
                "with resume=null."
            ) from None


@contextlib.contextmanager
def weights_only_loading(engine):
    """While active, ``engine``'s checkpoint engine (and any direct ``torch.load``) load weights only."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    replaced = checkpoint_engine is not None
    if replaced:
        previous = checkpoint_engine.__dict__.get("load")
        checkpoint_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location)
    saved_env = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(safe_globals()):
            yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if replaced:
            if previous is None:
                del checkpoint_engine.load
            else:
                checkpoint_engine.load = previous


# --- integrity: a manifest of sizes and sha256 ---------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, step: int) -> Path:
    """``folder/manifest.json``: size and sha256 of every file below ``folder`` (written atomically)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        if path.name.startswith(f".{MANIFEST}."):
            continue
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    out = folder / MANIFEST
    _write_text_atomic(out, json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": files}, indent=1))
    return out


def _check_rng_files(path: Path) -> str | None:
    for rng_file in sorted((path / "rng").glob("rank-*.json")):
        try:
            state = json.loads(rng_file.read_text())["state"]
            for key in ("python", "numpy", "torch"):
                state[key]
        except Exception as error:  # garbage, truncated JSON, wrong layout
            return f"{rng_file.relative_to(path)} is not an RNG state ({type(error).__name__}: {error})"
    return None


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """What is wrong with checkpoint ``path`` (``step-N``), or None when it is intact.

    Intact: every file its manifest lists has the recorded size and sha256, and its RNG files parse.
    A checkpoint without a manifest (written before manifests existed) gets only the RNG check.
    """
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    manifest_file = path / MANIFEST
    if manifest_file.is_file():
        try:
            manifest = json.loads(manifest_file.read_text())
            files = manifest["files"]
            if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
                raise ValueError(f"format {manifest.get('format')!r}")
            if not all(isinstance(entry, dict) for entry in files.values()):
                raise ValueError("a file entry is not {size, sha256}")
        except Exception as error:
            return f"{MANIFEST} is unreadable ({type(error).__name__}: {error})"
        present = sorted(f.relative_to(path).as_posix() for f in path.rglob("*")
                         if (f.is_file() or f.is_symlink()) and f.name != MANIFEST
                         and not f.name.startswith(f".{MANIFEST}."))
        unlisted = [name for name in present if name not in files]
        if unlisted:  # loading would read files nothing vouches for (a manifest naming other files)
            return f"{unlisted[0]} is not in its {MANIFEST} (the manifest does not describe this checkpoint)"
        for name, entry in files.items():
            file = path / name
            if ".." in Path(name).parts or not file.is_file():
                return f"{name} is missing"
            size = file.stat().st_size
            if size != entry.get("size"):
                return f"{name} has {size} bytes instead of {entry.get('size')} (truncated or replaced)"
            if _sha256(file) != entry.get("sha256"):
                return f"{name} was changed after it was saved (sha256 mismatch)"
    else:
        log.warning("%s has no %s (saved by an older alignkit): its files cannot be verified", path, MANIFEST)
    return _check_rng_files(path)


def last_good_message(run_dir: str | os.PathLike) -> str:
    """One sentence: the newest checkpoint of ``run_dir`` (resume=auto continues from it), or that there is none."""
    existing = list_checkpoints(checkpoints_root(run_dir))
    if not existing:
        return ("No checkpoint was saved before it (trainer.save_every=0, or none was due yet): there is nothing "
                "to resume from.")
    step, path = existing[-1]
    return f"The last good checkpoint, {path}, is kept: resume=auto continues from step {step}."


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
    tmp_tag = f"{_TMP_PREFIX}{step}"
    if _rank() == 0:
        from alignkit import runfiles

        runfiles.make_dir(root, "checkpoints folder")  # a planted link would take every checkpoint elsewhere
        for leftover in root.iterdir():  # crashed saves, including an earlier try at this step
            if leftover.is_symlink() and not _STEP_RE.match(leftover.name):
                # alignkit makes no links here: a planted one (e.g. zero_to_fp32.py, which DeepSpeed copies its
                # recovery script onto with shutil.copyfile) would be written through
                leftover.unlink()
            elif leftover.name.startswith((_TMP_PREFIX, _STALE_PREFIX)):
                shutil.rmtree(leftover, ignore_errors=True)
    _barrier()

    _save_engine(engine, root, tmp_tag, client_state={_CLIENT_KEY: dict(client_state)})
    for name, extra in (extra_engines or {}).items():
        _save_engine(extra, root / tmp_tag, _extra_tag(name), client_state={})
    rng_dir = root / tmp_tag / "rng"
    rng_dir.mkdir(parents=True, exist_ok=True)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rng = {"world_size": world, "step": step, "state": capture_rng_state()}
    _write_text_atomic(rng_dir / f"rank-{_rank()}.json", json.dumps(rng))
    _barrier()

    final = root / f"step-{step}"
    if _rank() == 0:
        write_manifest(root / tmp_tag, step)  # last: a manifest vouches for every file written before it
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
        stale = final.with_name(f"{_STALE_PREFIX}{final.name[len('step-') :]}")
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


# --- resume ----------------------------------------------------------------------------------------


def _latest_in(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one, else None."""
    pointer = root / LATEST
    if pointer.is_file() and not pointer.is_symlink():
        # only a plain ``step-N`` entry of this folder: never ``../elsewhere/step-N`` or a link to one
        name = pointer.read_bytes()[:64].decode("ascii", errors="replace").strip()
        named = root / name
        if _STEP_RE.match(name) and not named.is_symlink() and named.is_dir():
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


def _candidates(run_dir: str | os.PathLike, resume: str | None) -> tuple[list[Path], bool]:
    """Checkpoints to try, newest first, and whether they may be moved aside (this run's own, resume=auto)."""
    first = find_resume_checkpoint(run_dir, resume)
    if first is None:
        return [], False
    if str(resume).strip().lower() != "auto" and first == Path(str(resume)).expanduser():
        return [first], False  # an explicit step-N: that one or an error
    first_step = int(_STEP_RE.match(first.name).group(1))
    older = [p for step, p in reversed(list_checkpoints(first.parent)) if step < first_step]
    return [first, *older], str(resume).strip().lower() == "auto"


def _agreed(value):
    """Rank 0's ``value`` on every rank (verification is done once, on rank 0)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _move_aside(path: Path) -> Path:
    target = path.with_name(f"{_DAMAGED_PREFIX}{path.name}-{int(time.time())}")
    os.replace(path, target)
    return target


def resume_checkpoint(
    engine,
    run_dir: str | os.PathLike,
    resume: str | None,
    *,
    extra_engines: Mapping[str, Any] | None = None,
    say=None,
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
        problem = _agreed(verify_checkpoint(path) if _rank() == 0 else None)
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
        if own and _rank() == 0:
            where = f"; moved aside to {_move_aside(path).name}"
        _barrier()
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
