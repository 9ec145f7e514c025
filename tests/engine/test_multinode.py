"""Two nodes on this machine: two per-node DeepSpeed launcher invocations (``--no_ssh --node_rank 0|1``,
one process each, one hostfile, rendezvous on 127.0.0.1) train exactly as one node with two processes.

This is the start a scheduler makes with one task per node (SLURM ``srun``) or a cluster without ssh
between nodes; the ssh/pdsh start differs only in who runs the per-node launchers. Same global batch
(2 ranks x micro 2), ZeRO-2: the per-step losses agree to 1e-6 and the final weights to 1e-6.
"""

import json
import subprocess
from pathlib import Path

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


