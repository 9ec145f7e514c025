"""scripts/gpu_check.sh: the maintainer's one-command GPU check, run here in its CPU dry mode."""

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args, "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, env=ENV, timeout=900)


@pytest.mark.slow
def test_dry_run_passes_every_check(tmp_path):
    proc = _run("--dry-run", "--steps", "2", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))]
    order = _module().ORDER
    vllm = "PASS" if _module().vllm_python() else "SKIP"  # an optional extra: skipped where not installed
    expected = [["PASS", name] for name in order if name != "vllm_grpo"] + [[vllm, "vllm_grpo:" if vllm == "SKIP" else "vllm_grpo"]]
    assert [line.split()[:2] for line in lines] == expected
    passed = len(order) - (vllm == "SKIP")
    assert f"{passed}/{len(order)} checks passed" in proc.stdout
    assert (tmp_path / "out" / "sft" / "final" / "config.json").is_file()


def test_one_check_in_dry_mode_and_unknown_names(tmp_path):
    proc = _run("--dry-run", "--only", "env", tmp_path=tmp_path)
    assert proc.returncode == 0 and "PASS env" in proc.stdout and "1/1 checks passed" in proc.stdout
    bad = _run("--dry-run", "--only", "env,bogus", tmp_path=tmp_path)
    assert bad.returncode == 2 and "bogus" in bad.stderr


def test_a_failing_check_prints_fail_and_the_run_exits_1():
    lines = []

    def broken():
        raise RuntimeError("packed vs padded: max |diff| 1e-1 > 1e-4")

    code = _module().run_checks([("ok", lambda: "fine"), ("logps", broken), ("after", lambda: "still runs")],
                                print_line=lines.append)
    assert code == 1
    assert lines[0].startswith("PASS ok") and lines[2].startswith("PASS after")
    assert lines[1].startswith("FAIL logps") and "max |diff| 1e-1" in lines[1]
    assert lines[-1] == "2/3 checks passed"


def test_a_skipped_check_is_not_a_failure():
    module = _module()
    lines = []

    def optional():
        raise module.Skip("vLLM is not installed (optional)")

    assert module.run_checks([("ok", lambda: "fine"), ("vllm_grpo", optional)], print_line=lines.append) == 0
    assert lines[1] == "SKIP vllm_grpo: vLLM is not installed (optional)"
    assert lines[-1] == "1/2 checks passed, 1 skipped"


def test_without_a_gpu_the_env_check_fails_with_its_reason(monkeypatch):
    import torch

    module = _module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checks = module.Checks(module.parse_args([]), Path("."))
    lines = []
    assert module.run_checks([("env", checks.env)], print_line=lines.append) == 1
    assert "torch.cuda.is_available() is False" in lines[0]
