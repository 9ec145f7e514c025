"""From a composed config to a running job: run directory, launch, dispatch to a trainer.

One process runs in-process; several re-exec the DeepSpeed launcher, whose workers load the
frozen config of the run directory (``alignkit worker``) and never re-compose. Every path, 1
process included, ends in the same trainer code on a DeepSpeed engine.

A run directory belongs to one run (``alignkit.runfiles``): created exclusively
(``output_dir/run_name``, or ``output_dir/<recipe>-<timestamp>``), locked by the process that
started it for the life of the run (the launcher's parent process when there are several
workers), written without following symlinks, and re-entered only with ``resume=auto|PATH``,
whose config must equal the frozen one (``alignkit.config.resume``). A fresh run that fails or
is stopped before it trained anything (no checkpoint, no metrics) leaves no directory behind, so
the corrected command with the same ``run_name`` works.

Exit codes (README "Exit codes"): 0 done; 1 an internal error (a bug: traceback); 2 a user
error (config, data, model, path, resume mismatch, disk full: one paragraph, no traceback); 3
stopped on a non-finite loss; 128 + N stopped by signal N (130 SIGINT, 143 SIGTERM), resumable
with ``resume=auto`` when a checkpoint was written.

Left out: the sweep path (``alignkit.sweep``), which calls ``create_run_dir`` and ``start_run``.
"""

from __future__ import annotations

import errno
import importlib
import shutil
import signal
import threading
import time
from pathlib import Path

from omegaconf import DictConfig

from alignkit import runfiles
from alignkit.config.compose import compose, freeze, load_frozen
from alignkit.config.resume import DATA_STAMP
from alignkit.config.validate import runner_for, world_size
from alignkit.engine.precision import RUN_PRECISION
from alignkit.errors import ConfigError, UserError

FROZEN = "config.yaml"
OVERRIDES = "overrides.txt"
# what a run directory holds before its trainer has trained anything: removable on a failed start
_START_FILES = {FROZEN, OVERRIDES, runfiles.LOCK, DATA_STAMP, RUN_PRECISION}  # RUN_PRECISION: the worker's start


class RunStopped(UserError):
    """The run was stopped by a signal; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train_from_overrides(overrides: list[str]) -> int:
    cfg = compose(overrides)
    try:
        run_dir, config_path, fresh = prepare_run_dir(cfg, overrides)
        try:
            code = start_run(cfg, run_dir, config_path)
        except BaseException:
            if fresh:
                _remove_unstarted(run_dir)
            raise
        if fresh and code != 0:
            _remove_unstarted(run_dir)
        return code
    finally:
        runfiles.release_locks()  # the run is over (several runs may follow in one process: tests, scripts)


def _run_dir_for(cfg: DictConfig) -> Path:
    name = cfg.run_name or f"{cfg.recipe or runner_for(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.output_dir) / name


def prepare_run_dir(cfg: DictConfig, overrides: list[str], run_dir: Path | None = None) -> tuple[Path, Path, bool]:
    """Create (or, when resuming, re-enter) and lock the run directory.

    A fresh run freezes ``config.yaml`` and ``overrides.txt``. A resume keeps both untouched:
    its config must equal the run's effective one except for keys allowed with
    ``resume_allow=[...]``; an allowed change is frozen as ``config.resume-N.yaml`` and recorded in
    ``resume_history.jsonl``. Returns ``(run_dir, config file the workers load, fresh)``.
    """
    from alignkit.config.resume import check_resume, write_data_stamp

    run_dir = Path(run_dir) if run_dir is not None else _run_dir_for(cfg)
    _check_writable(run_dir.parent)
    runfiles.refuse_symlink(run_dir, "run directory")
    if cfg.resume and cfg.resume != "auto" and not Path(cfg.resume).exists():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint. Use resume=auto or a checkpoint path.")
    frozen = run_dir / FROZEN
    if runfiles.exists(frozen):
        if not cfg.resume:
            raise UserError(
                f"{run_dir} already holds a run. Two runs never share a run directory: pass resume=auto to continue "
                "it, or choose another run_name."
            )
        runfiles.lock(run_dir)
        return run_dir, check_resume(cfg, run_dir, overrides), False
    if cfg.resume == "auto" and run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} has no {FROZEN}, so it is not an alignkit run to resume; choose another run_name.")
    fresh = not run_dir.exists()
    try:
        run_dir.mkdir(parents=False, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the run directory {run_dir}: {exc.strerror}. Check output_dir and run_name.") \
            from None
    try:
        runfiles.lock(run_dir)
        freeze(cfg, frozen)
        runfiles.write_text(run_dir / OVERRIDES, "\n".join(overrides) + "\n")
        write_data_stamp(cfg, run_dir)
    except BaseException:
        if fresh:
            _remove_unstarted(run_dir)
        raise
    return run_dir, frozen, fresh


def create_run_dir(cfg: DictConfig, run_dir: Path | None = None) -> Path:
    """Create (or re-enter) the run directory and freeze the config into it (the sweep's entry point)."""
    return prepare_run_dir(cfg, [], run_dir)[0]


def _check_writable(folder: Path) -> None:
    import os

    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".alignkit-write-test-{os.getpid()}"
        runfiles.write_text(probe, "ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to the output directory {folder}: {exc.strerror}. Set output_dir=...") from None
    free_gb = shutil.disk_usage(folder).free / 2**30
    if free_gb < 0.5:
        raise UserError(f"only {free_gb:.2f} GiB free under {folder}; checkpoints will not fit. Free space first.")


def _remove_unstarted(run_dir: Path) -> None:
    """Remove a fresh run's directory when it holds only what the start wrote (nothing trained)."""
    runfiles.release_locks()
    try:
        entries = {p.name for p in run_dir.iterdir()}
    except OSError:
        return
    if entries <= _START_FILES and not run_dir.is_symlink():
        shutil.rmtree(run_dir, ignore_errors=True)


def start_run(cfg: DictConfig, run_dir: Path, config_path: Path | None = None) -> int:
    """Run in this process when one process suffices, else launch the DeepSpeed workers.

    The run-directory lock stays with this process while the workers run, so a second
    ``resume=auto`` of the same run is refused whatever the number of processes.
    """
    config_path = Path(config_path or run_dir / FROZEN)
    if world_size(cfg) == 1:
        return run_in_process(cfg, run_dir)
    from alignkit.engine.launcher import build_launch_command, find_free_port, forwarded_signal, launch, launch_env

    launcher = cfg.launcher
    argv = build_launch_command(
        nproc_per_node=launcher.nproc_per_node,
        nnodes=launcher.nnodes,
        hostfile=launcher.hostfile,
        master_addr=launcher.master_addr,
        master_port=launcher.master_port if launcher.master_port is not None
        else (find_free_port() if launcher.nnodes == 1 else None),
        include=launcher.include,
        exclude=launcher.exclude,
        node_rank=launcher.get("node_rank"),
        module_args=["alignkit", "worker", str(config_path.resolve())],
    )
    code = launch(argv, launch_env())
    signum = forwarded_signal()
    return 128 + signum if signum and code == 0 else code  # stopped and saved: not a finished run


def run_worker(config_path: str) -> int:
    """One worker of a launched run: the frozen config (``config.yaml`` or ``config.resume-N.yaml``)."""
    cfg = load_frozen(Path(config_path))
    code = run_in_process(cfg, Path(config_path).parent, worker=True)
    from alignkit.engine.engine import shutdown_distributed

    shutdown_distributed()  # this process exits next; reached only when train returned on this rank
    return code


def run_in_process(cfg: DictConfig, run_dir: Path, *, worker: bool = False) -> int:
    """Run the trainer here; map its result, a stop signal or a full disk to the documented exit codes.

    A worker of a launched run that stopped after saving exits 0 (a non-zero exit would make
    DeepSpeed's launcher kill the other workers while they save); the launching process returns
    128 + the signal instead (``engine.launcher.launch``)."""
    from alignkit.engine import faults

    runner = runner_for(cfg)
    from alignkit.engine.precision import check_supported

    check_supported(str(cfg.deepspeed.dtype))  # on the machine that trains, before any model loads
    from alignkit.losses.runners import RUNNERS

    module = importlib.import_module(RUNNERS[runner].module)
    handlers = _signal_handlers()
    try:
        result = module.train(cfg, run_dir)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            _remove_partial_writes(run_dir)
            raise UserError(
                f"No space left on device while the run wrote {exc.filename or run_dir}: the partial files were "
                "removed and the last complete checkpoint (if any) is kept. Free space (or set output_dir=... on "
                "a larger disk) and continue with resume=auto."
            ) from None
        raise
    except faults.StopNow as stop:
        raise RunStopped(
            f"stopped by {stop.signal_name} before the training loop began (while loading or pre-computing): no step "
            "was taken by this start. Run the same command again (a new run's directory was removed; add "
            "resume=auto to continue a run that has a checkpoint).", 128 + stop.signum) from None
    finally:
        _restore_signal_handlers(handlers)  # a trainer that failed never uninstalled its StopRequest
    if isinstance(result, dict):
        code = int(result.get("exit_code", 0))
        if code == 0 and result.get("stopped") is not None and not worker:
            signum = faults.last_stop_signal()
            return 128 + (signum or 15)
        return code
    return 0 if result is None else int(result)


def _signal_handlers() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(handlers: dict) -> None:
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def _remove_partial_writes(run_dir: Path) -> None:
    """Uncommitted checkpoint and export folders (their names say so) of a failed write."""
    from alignkit.engine.checkpoint import checkpoints_root

    root = checkpoints_root(run_dir)
    for folder in (root, run_dir):
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".tmp-step-") or (entry.name.startswith(".final") and ".tmp-" in entry.name):
                shutil.rmtree(entry, ignore_errors=True)
