"""Two nodes on this machine: two per-node DeepSpeed launcher invocations (``--no_ssh --node_rank 0|1``,
one process each, one hostfile, rendezvous on 127.0.0.1) train exactly as one node with two processes.

This is the start a scheduler makes with one task per node (SLURM ``srun``) or a cluster without ssh
between nodes; the ssh/pdsh start differs only in who runs the per-node launchers. Same global batch
(2 ranks x micro 2), ZeRO-2: the per-step losses agree to 1e-6 and the final weights to 1e-6.
"""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from alignkit.engine.launcher import build_launch_command, find_free_port, launch
from alignkit.errors import UserError

from test_distributed import HERE, STEPS, worker_env  # noqa: E402 - tests/engine is on sys.path (rootdir conftest)

WORKER = ["ds_worker", "--stage", "2", "--micro", "2", "--accum", "1", "--steps", str(STEPS)]


def test_per_node_start_command(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    argv = build_launch_command(nproc_per_node=8, nnodes=2, hostfile=str(hostfile), master_addr="10.0.0.1",
                                master_port=29500, node_rank=1, module_args=["alignkit", "worker", "c.yaml"],
                                python="python")
    assert argv == ["python", "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--num_nodes", "2",
                    "--num_gpus", "8", "--master_addr", "10.0.0.1", "--master_port", "29500", "--no_ssh",
                    "--node_rank", "1", "--no_local_rank", "--module", "alignkit", "worker", "c.yaml"]
    for bad in (dict(master_addr=None), dict(node_rank=2)):
        with pytest.raises(UserError, match="node_rank"):
            build_launch_command(**{**dict(nproc_per_node=8, nnodes=2, hostfile=str(hostfile), master_addr="10.0.0.1",
                                           node_rank=1, module_args=["alignkit"]), **bad})


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_match_one_node_with_two_processes(tmp_path):
    port = find_free_port()
    one_node = tmp_path / "one_node.json"
    assert launch(build_launch_command(nproc_per_node=2, master_port=port,
                                       module_args=[*WORKER, "--out", str(one_node)]), worker_env()) == 0

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    two_nodes = tmp_path / "two_nodes.json"
    port = find_free_port()
    nodes = [
        subprocess.Popen(build_launch_command(nproc_per_node=1, nnodes=2, hostfile=str(hostfile),
                                              master_addr="127.0.0.1", master_port=port, node_rank=rank,
                                              module_args=[*WORKER, "--out", str(two_nodes)]),
                         env=worker_env(), cwd=HERE)
        for rank in (0, 1)
    ]
    assert [node.wait(timeout=600) for node in nodes] == [0, 0]

    got, expected = json.loads(two_nodes.read_text()), json.loads(one_node.read_text())
    assert got["world_size"] == expected["world_size"] == 2
    assert got["losses"].keys() == expected["losses"].keys() and len(got["losses"]) == STEPS
    for step, loss in expected["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, abs=1e-6), step
    assert expected["losses"][str(STEPS)] < expected["losses"]["1"]  # it trained
    got_w, exp_w = load_file(str(two_nodes) + ".safetensors"), load_file(str(one_node) + ".safetensors")
    for name, value in exp_w.items():
        torch.testing.assert_close(got_w[name], value, atol=1e-6, rtol=0, msg=name)




@pytest.mark.slow
@pytest.mark.distributed
def test_alignkit_per_node_start_matches_one_node(tmp_path):
    """The README's per-node commands: node 0 runs ``alignkit train ... launcher.node_rank=0`` (it composes,
    freezes the run directory and starts its workers), node 1 waits for the frozen config and starts its
    launcher on ``alignkit worker RUN/config.yaml``; the losses equal a one-node ``-g 2`` run's."""
    import sys
    import time

    env = {k: v for k, v in worker_env().items() if k != "PYTHONPATH"}
    common = ["recipe=sft_tiny", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.export=false",
              f"output_dir={tmp_path}"]
    one = subprocess.run([sys.executable, "-m", "alignkit", "train", "-g", "2", *common, "run_name=one"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(find_free_port())
    node0 = subprocess.Popen([sys.executable, "-m", "alignkit", "train", *common, "run_name=two",
                              "launcher.nproc_per_node=1", "launcher.nnodes=2", f"launcher.hostfile={hostfile}",
                              "launcher.node_rank=0", "launcher.master_addr=127.0.0.1", f"launcher.master_port={port}"],
                             env=env, cwd=tmp_path)
    frozen = tmp_path / "two" / "config.yaml"
    deadline = time.time() + 300
    while not frozen.is_file() and time.time() < deadline and node0.poll() is None:
        time.sleep(0.2)
    assert frozen.is_file(), "node 0 did not freeze the run directory"
    node1 = subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                              "--num_nodes", "2", "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                              "--no_ssh", "--node_rank", "1", "--no_local_rank", "--module", "alignkit", "worker",
                              str(frozen)], env=env, cwd=tmp_path)
    assert [node0.wait(timeout=600), node1.wait(timeout=600)] == [0, 0]

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r.get("split", "train") == "train"]

    assert len(losses("two")) == 3
    assert losses("two") == pytest.approx(losses("one"), abs=1e-6)
