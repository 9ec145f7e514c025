"""The DeepSpeed launcher with 2 CPU processes, Hydra multirun sweeps, and exact resume."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


ALIGNKIT = [sys.executable, "-m", "alignkit"]


def _losses(run_dir: Path, split: str = "train") -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split") == split]


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
# in-process tests set these in this pytest process; a child must not inherit (and collide with) them
ENV = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       # DeepSpeed's JIT-built ops (cpu_adam for offload) live with the venv, as in scripts/test.sh
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = ENV
    return subprocess.run([*ALIGNKIT, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("recipe", ["sft_tiny", "dpo_tiny", "grpo_tiny"])
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_processes_match_one_process(tmp_path, recipe, stage):
    """Same global batch on 1 and 2 processes: the loss sequences agree to 1e-4 (relative).

    GRPO samples per rank with different seeds, so for it only the run completing is checked."""
    common = [f"recipe={recipe}", "trainer.max_steps=3", "trainer.export=false", f"deepspeed={stage}",
              f"output_dir={tmp_path}", f"trainer.reference_cache_dir={tmp_path / 'ref'}",
              "generation.max_new_tokens=8"]
    one = _cli("train", *common, "run_name=one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli("train", "-g", "2", *common, "run_name=two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(_losses(tmp_path / "two")) == 3
    if recipe != "grpo_tiny":
        assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)


@pytest.mark.slow
@pytest.mark.distributed
def test_tdpo_two_processes_match_one_process(tmp_path):
    """TDPO's per-token KL (live separate reference, ZeRO-2; ZeRO-3 is refused at compose time): the losses
    and the KL metric of 1 and 2 processes agree to 1e-4 (relative)."""
    common = ["recipe=tdpo_tiny", "trainer.max_steps=3", "trainer.export=false", "deepspeed=zero2",
              f"output_dir={tmp_path}"]
    for name, extra in (("one", []), ("two", ["-g", "2"])):
        done = _cli("train", *extra, *common, f"run_name={name}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
    kl = {name: [json.loads(line).get("kl/rejected") for line in (tmp_path / name / "metrics.jsonl").read_text()
                 .splitlines()] for name in ("one", "two")}
    assert kl["two"] == pytest.approx(kl["one"], rel=1e-4) and max(kl["one"]) > 1e-3


OFFLOAD_RUNS = [(recipe, "zero3_offload") for recipe in
                ("sft_tiny", "dpo_tiny", "rm_tiny", "grpo_tiny", "ppo_tiny", "online_dpo_tiny")]
OFFLOAD_RUNS += [("sft_tiny", "zero2_offload"), ("dpo_tiny", "zero2_offload")]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("recipe, stage", OFFLOAD_RUNS)
def test_two_process_offload_runs(tmp_path, recipe, stage):
    """Every trainer on 2 processes with the optimizer state (zero3: also the parameters) offloaded
    to CPU through DeepSpeed's cpu_adam: 2 steps, finite losses, one train row per step, and the
    model (PPO: also the critic) exported from the sharded engines."""
    proc = _cli("train", "-g", "2", f"recipe={recipe}", f"deepspeed={stage}", "trainer.max_steps=2",
                "trainer.eval_every=0", "generation.max_new_tokens=6", f"output_dir={tmp_path}", "run_name=run",
                f"trainer.reference_cache_dir={tmp_path / 'ref'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(tmp_path / "run")
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    if recipe == "ppo_tiny":
        from test_e2e_tiny import check_exported_critic

        check_exported_critic(tmp_path / "run")


def test_multirun_sweep_writes_one_run_per_job_and_a_table(tmp_path):
    proc = _cli("train", "-m", "recipe=sft_tiny", "trainer.lr=1e-4,3e-4", "trainer.max_steps=2",
                "trainer.export=false", f"output_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((tmp_path / "sweeps").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and (p / "config.yaml").exists())
    assert len(jobs) == 2
    for job in jobs:
        assert len(_losses(job)) == 2
    table = (sweeps[0] / "results.csv").read_text()
    assert "trainer.lr=0.0001" in table and "trainer.lr=0.0003" in table and "ok" in table
    rebuilt = _cli("sweep-report", str(sweeps[0]), cwd=tmp_path)
    assert rebuilt.returncode == 0 and "trainer.lr=0.0003" in rebuilt.stdout.replace("\n", "")


def test_failed_sweep_job_is_recorded_and_others_run(tmp_path):
    proc = _cli("train", "-m", "recipe=dpo_tiny", "trainer.reference=separate,lora", "trainer.max_steps=1",
                "trainer.export=false", f"output_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the sweep ran every job, and says one failed
    sweep = next((tmp_path / "sweeps").iterdir())
    rows = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/job_result.json"))]
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "model.lora.r" in rows[1]["error"]


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(tmp_path):
    """A run killed with SIGKILL after its step-2 checkpoint and resumed ends with the same metrics and
    the same weights as an uninterrupted run (same data order, RNG state and LR schedule)."""
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    common = ["recipe=dpo_tiny", "trainer.max_steps=5", "trainer.save_every=2", "trainer.eval_every=0",
              f"output_dir={tmp_path}", f"trainer.reference_cache_dir={tmp_path / 'ref'}"]
    assert _cli("train", *common, "run_name=full", cwd=tmp_path).returncode == 0
    proc = subprocess.Popen([*ALIGNKIT, "train", *common, "run_name=cut"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "cut" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip().endswith("2"):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "final").exists(), "the run finished before it could be killed"
    resumed = _cli("train", *common, "run_name=cut", "resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(tmp_path / "cut") == pytest.approx(_losses(tmp_path / "full"), rel=1e-6)
    full = load_file(tmp_path / "full" / "final" / "model.safetensors")
    cut = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert full.keys() == cut.keys()
    for name in full:
        torch.testing.assert_close(cut[name], full[name], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_optuna_sweeper_searches_loss_beta_and_lr(tmp_path):
    """Each job returns its objective (held-out preference accuracy), so Hydra's Optuna sweeper can search
    the loss type, beta and the learning rate."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = _cli("train", "-m", "recipe=dpo_tiny", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
                "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=0",
                "loss=choice(dpo,ipo)", "loss.beta=interval(0.05,0.5)", "trainer.lr=tag(log,interval(1e-4,1e-2))", "trainer.max_steps=2",
                "trainer.export=false", f"output_dir={tmp_path}", f"trainer.reference_cache_dir={tmp_path / 'ref'}",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "sweeps").iterdir())
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in results and "loss.beta" in results and "best_value" in results
    assert "loss: " in results  # the loss type is one of the searched parameters
    rows = [json.loads(p.read_text()) for p in sweep.glob("*/job_result.json")]
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    assert all("final eval/rewards/accuracy" in r for r in rows)
