"""TargetLogProbs as the root module of a DeepSpeed ZeRO-3 engine (1 CPU rank): same log-probs and grads.

Checks that calling the decoder and the LM head as submodules (with the head chunks recomputed in
backward) works with ZeRO-3's parameter gathering hooks, tied embeddings included. Tolerances:
log-probs 1e-5 absolute, gradients 1e-4 of each parameter's largest gradient.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_target_logprobs_under_zero3_match_naive():
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(HERE / "zero_check.py"), "3", "tie"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["logps_diff"] < 1e-5
    assert numbers["grad_rel_diff"] < 1e-4
