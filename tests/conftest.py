"""Shared test settings: CPU DeepSpeed, few threads, no hub access, a private cache per session."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 threads on 2 busy cores spin-wait badly

import pytest  # noqa: E402

DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_stale_rendezvous_env():
    """In-process runs set RANK/MASTER_PORT... in os.environ; children started by later tests must not
    inherit them (they would try to bind this process's rendezvous port)."""
    yield
    for key in DIST_VARS:
        os.environ.pop(key, None)
