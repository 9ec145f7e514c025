"""HFGenerationEngine under DeepSpeed ZeRO-3 with 2 CPU processes: gathered parameters give the
same output as the plain model, and ranks that decode a different number of steps do not hang."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.engine.engine import find_free_port

WORKER = Path(__file__).with_name("zero3_generation_worker.py")


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_generation_matches_plain_model_and_ranks_stay_in_step(tmp_path):
    port = str(find_free_port())
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(WORKER.parents[1]),  # tests/: the shared tiny_llama helper
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("ZeRO-3 generation hung (ranks out of step?)")
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["partitioned"] and result["shard_numel"] == 0
        assert result["greedy_equal"] and result["sampled_equal"]
        assert result["logprob_max_diff"] < 1e-5
    # rank 0 stops after 3 tokens, rank 1 decodes up to 9: the ranks ran different numbers of steps
    assert json.loads((tmp_path / "rank0.json").read_text())["lengths"] == [3] * 4
    assert max(json.loads((tmp_path / "rank1.json").read_text())["lengths"]) == 9
