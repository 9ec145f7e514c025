"""``return_freed_memory_to_os``: freed tensors leave RSS instead of staying in glibc's heap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys, torch
from alignkit.engine.engine import return_freed_memory_to_os

def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1024

applied = return_freed_memory_to_os() if sys.argv[1] == "on" else False
big = torch.ones(2 * 2**20)
del big  # free an 8 MB block: glibc then raises its mmap threshold past 4 MB
before = rss_mb()
blocks = [torch.ones(2**20) for _ in range(100)]  # 100 x 4 MB
keep = blocks[-1]
del blocks  # all but the last, which sits on top of the heap when the heap served them
print(json.dumps({"applied": applied, "kept_mb": rss_mb() - before}))
"""


def _kept_mb(mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_blocks_leave_rss_once_the_threshold_is_fixed():
    default, fixed = _kept_mb("off"), _kept_mb("on")
    assert fixed["applied"]
    assert default["kept_mb"] > 300  # glibc's default keeps the 99 freed 4 MB blocks resident
    assert fixed["kept_mb"] < 20  # only the live block remains


def test_user_setting_wins(monkeypatch):
    from alignkit.engine.engine import return_freed_memory_to_os

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_freed_memory_to_os() is False


@pytest.mark.parametrize("switch", [True, False])
def test_the_trainer_switch_applies_it_on_cpu(tmp_path, monkeypatch, switch):
    import alignkit.engine.engine as engine
    from alignkit.run import train_from_overrides

    calls = []
    monkeypatch.setattr(engine, "return_freed_memory_to_os", lambda: calls.append(1) or True)
    code = train_from_overrides(["recipe=dpo_tiny", "trainer.max_steps=1", "trainer.eval_every=0",
                                 "trainer.export=false", f"trainer.cpu_release_freed_memory={switch}",
                                 f"output_dir={tmp_path}", "run_name=r", f"trainer.reference_cache_dir={tmp_path}/ref"])
    assert code == 0 and len(calls) == int(switch)
