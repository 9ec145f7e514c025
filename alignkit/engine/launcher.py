"""Build and run the DeepSpeed launcher command line for N processes on one or several nodes.

``build_launch_command`` is a pure function (snapshot-tested) producing::

    python -m deepspeed.launcher.runner [--hostfile H --num_nodes M] --num_gpus N
        [--master_addr A] [--master_port P] --no_local_rank --module alignkit worker RUN_DIR/config.yaml

* ``python -m deepspeed.launcher.runner`` (not the ``deepspeed`` script) so the launcher runs in the
  same interpreter/venv even when the venv's ``bin`` is not on PATH; the runner starts its workers
  with that interpreter too.
* ``--num_gpus`` (alias ``--num_accelerators``) is the processes per node; it works on CPU with
  ``DS_ACCELERATOR=cpu`` because the runner then uses slots ``0..N-1`` regardless of the
  detected device count. DeepSpeed forbids it together with ``--include/--exclude``, so with a
  filter the processes come from the filter (and the hostfile's ``slots=``) alone.
* ``--no_local_rank``: workers read ``LOCAL_RANK`` from the environment instead of an extra
  ``--local_rank=N`` argument, which the alignkit CLI would reject as a stray flag.
* Multi-node needs a hostfile (``host slots=N`` lines, passwordless ssh, a shared filesystem for
  the run directory); a missing one is a ``UserError`` (DeepSpeed itself would silently fall
  back to one node).

``launch(argv, env)`` runs the command in its own session (a Ctrl-C in the terminal reaches only
alignkit) and forwards SIGINT/SIGTERM to the workers themselves on one node (DeepSpeed's
single-node runner does not forward signals), so each worker saves a checkpoint and exits 0; with a
hostfile it signals DeepSpeed's multi-node runner, which stops the remote workers. It returns the
exit code (128 + signal number when the launcher died from a signal); ``forwarded_signal()`` says
whether it forwarded one (``alignkit.run`` then exits 128 + that signal: the run was stopped).

Per-node starts (``node_rank``): every node runs the launcher itself with the same hostfile,
``--no_ssh --node_rank N`` and the first node's address -- what a scheduler that starts one task per
node (SLURM's ``srun``) or a cluster without ssh between nodes needs. The launcher then starts only
that node's workers and forwards signals to them as on one node.

Left out: DeepSpeed's MPI/SLURM launcher backends (``--launcher``; SLURM sweeps go through Hydra's
submitit launcher instead), autotuning.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

# Re-exported for callers that pick a port for single-node runs (DeepSpeed's default 29500 collides
# when two runs share a machine).
from alignkit.engine.engine import find_free_port  # noqa: F401
from alignkit.errors import UserError


def build_launch_command(
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    hostfile: str | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    include: str | None = None,
    exclude: str | None = None,
    bind_cores_to_rank: bool = False,
    node_rank: int | None = None,
    module_args: Sequence[str],
    python: str = sys.executable,
) -> list[str]:
    """The argv that starts ``python -m <module_args...>`` under the DeepSpeed launcher.

    ``module_args`` is the module and its arguments, e.g. ``["alignkit", "worker", "RUN/config.yaml"]``.
    """
    if nproc_per_node < 1:
        raise UserError(f"launcher.nproc_per_node={nproc_per_node} must be >= 1 (processes per node).")
    if nnodes < 1:
        raise UserError(f"launcher.nnodes={nnodes} must be >= 1.")
    if include and exclude:
        raise UserError(
            "launcher.include and launcher.exclude are mutually exclusive in DeepSpeed; keep one of them."
        )
    if not module_args:
        raise ValueError(
            "module_args must name the module to run, e.g. ['alignkit', 'worker', 'config.yaml']"
        )
    if hostfile is not None and not Path(hostfile).is_file():
        raise UserError(
            f"launcher.hostfile={hostfile!r} does not exist. Write one line per node, e.g. "
            "'node-1 slots=8', give its path, and make sure every node reaches the others by passwordless ssh."
        )
    if nnodes > 1 and hostfile is None:
        raise UserError(
            f"launcher.nnodes={nnodes} needs launcher.hostfile: a file with one 'HOST slots=N' line per "
            "node (DeepSpeed starts the other nodes over ssh). On SLURM, use the submitit launcher instead."
        )

    if node_rank is not None and not (hostfile and master_addr and 0 <= node_rank < nnodes):
        raise UserError(
            f"launcher.node_rank={node_rank} (a per-node start, no ssh) needs launcher.hostfile (the same on every "
            f"node), launcher.master_addr (the address of node 0) and 0 <= node_rank < launcher.nnodes={nnodes}.")

    argv = [python, "-u", "-m", "deepspeed.launcher.runner"]
    if hostfile is not None:
        argv += ["--hostfile", str(hostfile)]
    if include:
        argv += ["--include", include]
    elif exclude:
        argv += ["--exclude", exclude]
    else:
        if hostfile is not None:
            argv += ["--num_nodes", str(nnodes)]
        argv += ["--num_gpus", str(nproc_per_node)]
    if master_addr:
        argv += ["--master_addr", master_addr]
    if master_port is not None:
        argv += ["--master_port", str(master_port)]
    if bind_cores_to_rank:
        argv.append("--bind_cores_to_rank")
    if node_rank is not None:
        argv += ["--no_ssh", "--node_rank", str(node_rank)]
    argv += ["--no_local_rank", "--module", *module_args]
    return argv


def launch_env(base: Mapping[str, str] | None = None, *, has_cuda: bool | None = None) -> dict[str, str]:
    """The environment for ``launch``: ``base`` (default ``os.environ``) plus ``DS_ACCELERATOR=cpu`` without a GPU."""
    env = dict(os.environ if base is None else base)
    if has_cuda is None:
        import torch

        has_cuda = torch.cuda.is_available()
    if not has_cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _signal_targets(root_pid: int, multi_node: bool) -> list[int]:
    """Who gets a forwarded signal: the workers themselves on one node, the runner on several.

    On one node the workers are the children of DeepSpeed's per-node ``deepspeed.launcher.launch``.
    Signalling only them lets each worker save and exit 0, after which the launcher exits 0 too;
    signalling ``launch`` itself would make it terminate the workers after 30 s and exit 1. With a
    hostfile the workers are remote; DeepSpeed's multi-node runner has its own SIGINT/SIGTERM
    handler that stops them over pdsh. An empty list means no DeepSpeed worker is running (not
    started yet, or not a DeepSpeed command): the caller then signals the whole process group.
    """
    if multi_node:
        return [root_pid]
    import psutil

    try:
        root = psutil.Process(root_pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    workers: list[int] = []
    for process in family:
        try:
            if any("deepspeed.launcher.launch" in part for part in process.cmdline()):
                workers += [child.pid for child in process.children()]
        except psutil.Error:
            continue
    return workers


def launch(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run ``argv`` (from ``build_launch_command``) to completion; forward SIGINT/SIGTERM; return its exit code."""
    proc = subprocess.Popen(list(argv), env=None if env is None else dict(env), start_new_session=True)
    multi_node = "--hostfile" in argv and "--no_ssh" not in argv  # a per-node start runs local workers

    received: list[int] = []
    _FORWARDED.clear()

    def forward(signum, _frame):
        received.append(signum)
        targets = _signal_targets(proc.pid, multi_node)
        for send, pid in [(os.kill, pid) for pid in targets] or [(os.killpg, proc.pid)]:
            try:
                send(pid, signum)
            except ProcessLookupError:
                pass

    in_main_thread = threading.current_thread() is threading.main_thread()  # signal.signal needs it
    signals = (signal.SIGINT, signal.SIGTERM) if in_main_thread else ()
    previous = {sig: signal.signal(sig, forward) for sig in signals}
    try:
        returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _FORWARDED[:] = received
    return 128 - returncode if returncode < 0 else returncode


_FORWARDED: list[int] = []


def forwarded_signal() -> int | None:
    """The first signal the last ``launch`` forwarded to its workers (None: it ran undisturbed)."""
    return _FORWARDED[0] if _FORWARDED else None
