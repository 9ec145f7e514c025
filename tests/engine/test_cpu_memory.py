"""``cpu_memory``: the block cache keeps peak RSS at the live peak; the glibc fallback; the trainer switch.

Each allocator check runs in a fresh process: the block cache replaces torch's CPU allocator for the
life of the process that installs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc / mmap")

PRELUDE = r"""
import json, sys, torch
from alignkit.engine import cpu_memory

def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1024

def mib(n):  # a float32 tensor of n MiB
    return torch.empty(n * 2**18)
"""


def run_probe(body: str, *args: str, env: dict | None = None) -> dict:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", PRELUDE + body, *args], capture_output=True, text=True, env=full_env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reuse_resize_and_small_requests():
    stats = run_probe(r"""
cpu_memory.install_block_cache()
first = mib(1); del first
again = mib(1)                      # the same size: the cached mapping
other = torch.empty(250_000)        # 1,000,000 bytes (page-rounded 1,003,520), nothing cached: fresh
small = torch.empty(1000)           # 4 KB: the replaced allocator
after_small = cpu_memory.block_cache_stats()
del again
bigger = mib(3)                     # grows the freed 1 MiB mapping with mremap
print(json.dumps({"small": after_small, "end": cpu_memory.block_cache_stats()}))
""")
    small, end = stats["small"], stats["end"]
    assert small["hits"] == 1 and small["fresh_mappings"] == 2 and small["resizes"] == 0
    assert small["live_bytes"] == 2**20 + 1_003_520  # page-rounded; the 4 KB tensor is not ours
    assert end["resizes"] == 1 and end["fresh_mappings"] == 2
    assert end["live_bytes"] == 3 * 2**20 + 1_003_520 and end["cached_bytes"] == 0


def test_live_tensors_keep_their_values_and_mapped_bytes_stay_within_the_live_peak():
    result = run_probe(r"""
import random
cpu_memory.install_block_cache()
rng = random.Random(0)
live, expected_live, peak_expected = {}, 0, 0
for step in range(3000):
    if live and rng.random() < 0.45:
        key = rng.choice(list(live))
        tensor, value = live.pop(key)
        assert bool((tensor == value).all()), f"tensor {key} was overwritten"
        expected_live -= -(-tensor.numel() * 4 // 4096) * 4096
    else:
        numel = rng.randint(32_768, 2_000_000)  # 128 KiB .. 8 MB
        tensor = torch.full((numel,), float(step))
        live[step] = (tensor, float(step))
        expected_live += -(-numel * 4 // 4096) * 4096
        peak_expected = max(peak_expected, expected_live)
ok = all(bool((t == v).all()) for t, v in live.values())
print(json.dumps({"ok": ok, "expected_live": expected_live, "peak_expected": peak_expected,
                  **cpu_memory.block_cache_stats()}))
""")
    assert result["ok"]
    # a reused mapping may be up to 1/8 larger than the request
    assert result["expected_live"] <= result["live_bytes"] <= result["expected_live"] * 9 / 8
    assert result["peak_expected"] <= result["peak_live_bytes"] <= result["peak_expected"] * 9 / 8
    assert result["peak_mapped_bytes"] <= result["peak_live_bytes"]
    assert result["hits"] > 300 and result["resizes"] > 300  # both reuse paths were exercised


FRAGMENTING = r"""
mode = sys.argv[1]
if mode == "cache":
    cpu_memory.install_block_cache()
big = torch.ones(2 * 2**20); del big  # glibc then raises its mmap threshold past 4 MB: blocks come from its heap
before = rss_mb()
pinned, short = [], []
for _ in range(100):
    short.append(torch.ones(2**20))   # 4 MB, freed below
    pinned.append(torch.ones(40_000))  # 160 KB, kept: glibc cannot merge the freed 4 MB holes around it
del short
longer = [torch.ones(int(1.2 * 2**20)) for _ in range(100)]  # 4.8 MB each: no 4 MB hole fits
live_mb = (100 * 1.2 * 4 * 2**20 + 100 * 160_000) / 2**20
print(json.dumps({"above_live_mb": rss_mb() - before - live_mb}))
"""


def test_block_cache_keeps_rss_at_the_live_peak_where_glibc_fragments():
    glibc, cache = run_probe(FRAGMENTING, "glibc"), run_probe(FRAGMENTING, "cache")
    assert glibc["above_live_mb"] > 300  # the freed 4 MB holes stay resident beside the new blocks
    assert cache["above_live_mb"] < 40  # the 4 MB mappings were grown into the 4.8 MB ones


def test_falls_back_to_the_glibc_threshold_without_a_compiler(tmp_path):
    result = run_probe(r"""
released = cpu_memory.release_freed_memory()
big = torch.ones(2 * 2**20); del big
before = rss_mb()
blocks = [torch.ones(2**20) for _ in range(100)]
keep = blocks[-1]
del blocks
print(json.dumps({"mechanism": released.mechanism, "reason": released.reason, "kept_mb": rss_mb() - before,
                  "stats": cpu_memory.block_cache_stats()}))
""", env={"CXX": "no-such-compiler", "ALIGNKIT_CACHE": str(tmp_path)})
    assert result["mechanism"] == "mmap_threshold" and "no-such-compiler" in result["reason"]
    assert result["kept_mb"] < 20  # freed 4 MB blocks were unmapped, only the live one remains
    assert result["stats"]["live_bytes"] == 0


def test_compile_errors_are_reported_and_nothing_is_left_behind(tmp_path, monkeypatch):
    from alignkit.engine import cpu_memory

    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_memory, "SOURCE", broken)
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cpu_memory.BlockCacheUnavailable, match="compiling broken.cpp failed"):
        cpu_memory.build_block_cache()
    assert list((tmp_path / "cache" / "extensions").iterdir()) == []


def test_the_library_is_built_once_per_source(tmp_path, monkeypatch):
    from alignkit.engine import cpu_memory

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    first = cpu_memory.build_block_cache()
    stamp = first.stat().st_mtime_ns
    assert cpu_memory.build_block_cache() == first and first.stat().st_mtime_ns == stamp


def test_user_setting_wins(monkeypatch):
    from alignkit.engine.cpu_memory import release_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert release_freed_memory().mechanism == ""


@pytest.mark.parametrize("switch", [True, False])
def test_the_trainer_switch_applies_it_on_cpu(tmp_path, monkeypatch, switch):
    from alignkit.engine import cpu_memory
    from alignkit.run import train_from_overrides

    calls = []
    monkeypatch.setattr(cpu_memory, "release_freed_memory", lambda: calls.append(1) or cpu_memory.Released(""))
    code = train_from_overrides(["recipe=dpo_tiny", "trainer.max_steps=1", "trainer.eval_every=0",
                                 "trainer.export=false", f"trainer.cpu_release_freed_memory={switch}",
                                 f"output_dir={tmp_path}", "run_name=r", f"trainer.reference_cache_dir={tmp_path}/ref"])
    assert code == 0 and len(calls) == int(switch)


def test_the_trainer_warns_when_it_falls_back(tmp_path, monkeypatch, capsys):
    from alignkit.engine import cpu_memory
    from alignkit.run import train_from_overrides

    monkeypatch.setattr(cpu_memory, "release_freed_memory",
                        lambda: cpu_memory.Released("mmap_threshold", reason="no C++ compiler ('c++' not found; set CXX)"))
    code = train_from_overrides(["recipe=dpo_tiny", "trainer.max_steps=1", "trainer.eval_every=0",
                                 "trainer.export=false", f"output_dir={tmp_path}", "run_name=r",
                                 f"trainer.reference_cache_dir={tmp_path}/ref"])
    assert code == 0
    assert "CPU block cache unavailable" in capsys.readouterr().err


def test_an_unwritable_cache_folder_is_reported(tmp_path, monkeypatch):
    from alignkit.engine import cpu_memory

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("ALIGNKIT_CACHE", str(blocker))  # extensions/ cannot be made under a file
    with pytest.raises(cpu_memory.BlockCacheUnavailable, match="cannot build"):
        cpu_memory.build_block_cache()
