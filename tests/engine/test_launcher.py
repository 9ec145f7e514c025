"""Snapshot tests of the DeepSpeed launch command builder, and ``launch``'s exit codes and signals."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignkit.engine.launcher import build_launch_command, find_free_port, launch, launch_env
from alignkit.errors import UserError

PY = "/venv/bin/python"
RUNNER = [PY, "-u", "-m", "deepspeed.launcher.runner"]
WORKER = ["alignkit", "worker", "runs/r1/config.yaml"]
TAIL = ["--no_local_rank", "--module", *WORKER]


def build(**kwargs):
    return build_launch_command(module_args=WORKER, python=PY, **kwargs)


def test_single_node_one_process():
    assert build(nproc_per_node=1) == [*RUNNER, "--num_gpus", "1", *TAIL]


def test_single_node_n_processes_with_port_and_core_binding():
    got = build(nproc_per_node=4, master_port=29612, bind_cores_to_rank=True)
    assert got == [*RUNNER, "--num_gpus", "4", "--master_port", "29612", "--bind_cores_to_rank", *TAIL]


def test_multi_node_with_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-1 slots=8\nnode-2 slots=8\n")
    got = build(nproc_per_node=8, nnodes=2, hostfile=str(hostfile), master_addr="10.0.0.1", master_port=29500)
    assert got == [
        *RUNNER,
        "--hostfile", str(hostfile),
        "--num_nodes", "2",
        "--num_gpus", "8",
        "--master_addr", "10.0.0.1",
        "--master_port", "29500",
        *TAIL,
    ]  # fmt: skip


def test_include_filter_replaces_counts(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-1 slots=4\nnode-2 slots=4\n")
    got = build(nproc_per_node=4, nnodes=2, hostfile=str(hostfile), include="node-1:0,1@node-2")
    assert got == [*RUNNER, "--hostfile", str(hostfile), "--include", "node-1:0,1@node-2", *TAIL]
    got = build(nproc_per_node=4, exclude="localhost:1")
    assert got == [*RUNNER, "--exclude", "localhost:1", *TAIL]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"nproc_per_node": 2, "hostfile": "/no/such/hostfile"}, "does not exist"),
        ({"nproc_per_node": 2, "nnodes": 2}, "needs launcher.hostfile"),
        ({"nproc_per_node": 0}, "nproc_per_node"),
        ({"nproc_per_node": 2, "include": "a", "exclude": "b"}, "mutually exclusive"),
    ],
)
def test_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        build(**kwargs)


def test_launch_env_selects_cpu_accelerator():
    assert launch_env({}, has_cuda=False) == {"DS_ACCELERATOR": "cpu"}
    assert launch_env({"DS_ACCELERATOR": "cuda"}, has_cuda=False)["DS_ACCELERATOR"] == "cuda"
    assert "DS_ACCELERATOR" not in launch_env({}, has_cuda=True)


def test_launch_propagates_exit_code():
    assert launch([sys.executable, "-c", "raise SystemExit(7)"]) == 7
    assert launch([sys.executable, "-c", "pass"]) == 0


def test_launch_forwards_sigterm_to_the_process_group(tmp_path):
    """A child and its grandchild both receive the signal ``launch``'s caller gets."""
    marker = tmp_path / "got"
    child = (
        "import signal, subprocess, sys, time, pathlib\n"
        f"p = pathlib.Path({str(marker)!r})\n"
        "def h(s, f):\n"
        "    p.with_suffix('.' + str(__import__('os').getpid())).write_text('x'); sys.exit(3)\n"
        "signal.signal(signal.SIGTERM, h)\n"
        "if len(sys.argv) == 1:\n"
        "    subprocess.Popen([sys.executable, __file__, 'grandchild'])\n"
        "p.with_suffix('.ready' + str(len(sys.argv))).write_text('x')\n"
        "time.sleep(300)\n"  # ended by the signal; the wait below fails the test if it never comes
    )
    script = tmp_path / "child.py"
    script.write_text(child)
    driver = (
        "import sys\n"
        "from alignkit.engine.launcher import launch\n"
        f"sys.exit(launch([sys.executable, {str(script)!r}]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", driver])
    deadline = time.time() + 120  # start-up only (imports): 30 s ran out on a 2-core machine at load 6
    while not (tmp_path / "got.ready1").exists() or not (tmp_path / "got.ready2").exists():
        assert time.time() < deadline, "children did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 3
    deadline = time.time() + 10
    while len(list(tmp_path.glob("got.[0-9]*"))) < 2:
        assert time.time() < deadline, "the grandchild did not receive SIGTERM"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_reaches_deepspeed_workers_which_exit_cleanly(tmp_path):
    """Under the real launcher, SIGTERM to alignkit reaches both workers; their clean exit gives exit code 0."""
    here = Path(__file__).resolve().parent
    argv = build_launch_command(
        nproc_per_node=2, master_port=find_free_port(), module_args=["sig_worker", str(tmp_path)]
    )
    env = launch_env()
    env["PYTHONPATH"] = str(here)
    driver = "import sys; from alignkit.engine.launcher import launch; sys.exit(launch(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", driver, *argv], env=env)
    deadline = time.time() + 240
    while not all((tmp_path / f"ready-{rank}").exists() for rank in (0, 1)):
        assert proc.poll() is None and time.time() < deadline, "workers did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    assert [(tmp_path / f"stopped-{rank}").read_text() for rank in (0, 1)] == ["SIGTERM", "SIGTERM"]
