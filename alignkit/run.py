"""From a composed config to a running job: run directory, launch, dispatch to a trainer.

One process runs in-process; several re-exec the DeepSpeed launcher, whose workers load the
frozen ``config.yaml`` of the run directory (``alignkit worker``) and never re-compose. Every
path, 1 process included, ends in the same trainer code on a DeepSpeed engine.

A run directory belongs to one run: it is created exclusively (``output_dir/run_name``, or
``output_dir/<recipe>-<timestamp>``), locked while the run lives, and re-entered only with
``resume=auto|PATH``. Left out: the sweep path (``alignkit.sweep``), which calls ``start_run``.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig

from alignkit.config.compose import compose, freeze, load_frozen
from alignkit.config.validate import runner_for, world_size
from alignkit.errors import ConfigError, UserError

TRAINER_MODULES = {
    "sft": "alignkit.trainers.preference",
    "preference": "alignkit.trainers.preference",
    "reward": "alignkit.trainers.reward",
    "ppo": "alignkit.trainers.ppo",
    "grpo": "alignkit.trainers.grpo",
    "online_dpo": "alignkit.trainers.online_dpo",
}
_LOCKS: list = []  # open lock files, held for the life of the process


def train_from_overrides(overrides: list[str]) -> int:
    cfg = compose(overrides)
    run_dir = create_run_dir(cfg)
    (run_dir / "overrides.txt").write_text("\n".join(overrides) + "\n")
    return start_run(cfg, run_dir)


def create_run_dir(cfg: DictConfig, run_dir: Path | None = None) -> Path:
    """Create (or, when resuming, re-enter) the run directory and freeze the config into it."""
    if run_dir is None:
        name = cfg.run_name or f"{cfg.recipe or runner_for(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(cfg.output_dir) / name
    run_dir = Path(run_dir)
    _check_writable(run_dir.parent)
    if cfg.resume and cfg.resume != "auto" and not Path(cfg.resume).exists():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint. Use resume=auto or a checkpoint path.")
    frozen = run_dir / "config.yaml"
    if frozen.exists() and not cfg.resume:
        raise UserError(
            f"{run_dir} already holds a run. Two runs never share a run directory: pass resume=auto to continue "
            "it, or choose another run_name."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    _lock(run_dir)
    freeze(cfg, frozen)
    return run_dir


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".alignkit-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to the output directory {folder}: {exc.strerror}. Set output_dir=...") from None
    free_gb = shutil.disk_usage(folder).free / 2**30
    if free_gb < 0.5:
        raise UserError(f"only {free_gb:.2f} GiB free under {folder}; checkpoints will not fit. Free space first.")


def _lock(run_dir: Path) -> None:
    handle = open(run_dir / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{run_dir} is in use by another running alignkit process.") from None
    _LOCKS.append(handle)


def start_run(cfg: DictConfig, run_dir: Path) -> int:
    """Run in this process when one process suffices, else launch the DeepSpeed workers."""
    if world_size(cfg) == 1:
        return run_in_process(cfg, run_dir)
    from alignkit.engine.launcher import build_launch_command, find_free_port, launch, launch_env

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
        module_args=["alignkit", "worker", str((run_dir / "config.yaml").resolve())],
    )
    _release_locks()  # the workers take the lock in turn
    return launch(argv, launch_env())


def _release_locks() -> None:
    while _LOCKS:
        _LOCKS.pop().close()


def run_worker(config_path: str) -> int:
    cfg = load_frozen(Path(config_path))
    return run_in_process(cfg, Path(config_path).parent)


def run_in_process(cfg: DictConfig, run_dir: Path) -> int:
    runner = runner_for(cfg)
    module = importlib.import_module(TRAINER_MODULES[runner])
    result = module.train(cfg, run_dir)
    return 0 if result is None else int(result.get("exit_code", 0)) if isinstance(result, dict) else int(result)
