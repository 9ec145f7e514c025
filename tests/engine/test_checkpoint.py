"""Checkpoints: RNG round trip, resume lookup, keep-last-K, crash atomicity, exact resume (in and across processes)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_tiny import micro_batch, tiny_model
from safetensors.torch import load_file

from alignkit.engine import checkpoint as ckpt
from alignkit.engine.config import DeepSpeedConfig, build_train_ds_config
from alignkit.engine.engine import init_train_engine, setup_distributed
from alignkit.engine.export import gathered_cpu_copy
from alignkit.errors import UserError

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module", autouse=True)
def dist():
    torch.set_num_threads(1)
    return setup_distributed()


def make_engine(stage=0, dropout=0.1, steps=6, lora=False):
    ds = build_train_ds_config(
        DeepSpeedConfig(zero_stage=stage, dtype="fp32"), micro_batch_size=2, grad_accum_steps=1, world_size=1
    )
    model = tiny_model(dropout=dropout)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return init_train_engine(model, ds, lr=1e-2, warmup_steps=1, total_steps=steps, scheduler="linear")


def train(engine, start, stop):
    losses = []
    for step in range(start, stop):
        ids = micro_batch(step, 0, 2, 1)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def weights(engine):
    return gathered_cpu_copy(engine.module).state_dict()


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trips_through_json():
    state = json.loads(json.dumps(ckpt.capture_rng_state()))
    first = draws()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    ckpt.restore_rng_state(state)
    assert draws() == first


def test_find_resume_checkpoint(tmp_path):
    assert ckpt.find_resume_checkpoint(tmp_path, None) is None
    assert ckpt.find_resume_checkpoint(tmp_path, "none") is None
    assert ckpt.find_resume_checkpoint(tmp_path, "auto") is None  # nothing saved yet: start fresh
    root = tmp_path / "checkpoints"
    for step in (2, 10, 4):
        (root / f"step-{step}").mkdir(parents=True)
    (root / ".tmp-step-12").mkdir()  # an interrupted save is never picked
    assert ckpt.find_resume_checkpoint(tmp_path, "auto") == root / "step-10"  # no pointer: newest complete
    (root / "latest").write_text("step-4\n")
    assert ckpt.find_resume_checkpoint(tmp_path, "auto") == root / "step-4"
    (root / "latest").write_text("step-99\n")  # dangling pointer: fall back to the newest complete
    assert ckpt.find_resume_checkpoint(tmp_path, "auto") == root / "step-10"
    assert ckpt.find_resume_checkpoint("elsewhere", str(root / "step-2")) == root / "step-2"
    assert ckpt.find_resume_checkpoint("elsewhere", str(tmp_path)) == root / "step-10"
    assert ckpt.find_resume_checkpoint("elsewhere", str(root)) == root / "step-10"
    with pytest.raises(UserError, match="resume=auto"):
        ckpt.find_resume_checkpoint(tmp_path, str(tmp_path / "nope"))


def test_keep_last_k_and_latest_pointer(tmp_path):
    engine = make_engine()
    for step in range(1, 5):
        train(engine, step - 1, step)
        path = ckpt.save_checkpoint(engine, tmp_path, step, {"step": step}, keep_last=2)
        assert path == tmp_path / "checkpoints" / f"step-{step}"
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-3", "step-4"]
    assert (root / "latest").read_text().strip() == "step-4"
    assert (root / "step-4" / "rng" / "rank-0.json").is_file()
    ckpt.save_checkpoint(engine, tmp_path, 5, {"step": 5}, keep_last=0)  # 0 keeps everything
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3, 4, 5]


def test_crash_between_save_and_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    engine = make_engine(dropout=0.0)
    train(engine, 0, 1)
    ckpt.save_checkpoint(engine, tmp_path, 1, {"step": 1, "note": "good"}, keep_last=1)
    saved = weights(engine)
    train(engine, 1, 2)

    def crash(tmp, final):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(ckpt.state, "_commit", crash)  # where save_checkpoint looks it up
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(engine, tmp_path, 2, {"step": 2}, keep_last=1)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step-2").is_dir()  # the half-finished save is there but not named step-N
    resume = ckpt.find_resume_checkpoint(tmp_path, "auto")
    assert resume == root / "step-1"
    fresh = make_engine(dropout=0.0)
    assert ckpt.load_checkpoint(fresh, resume) == {"step": 1, "note": "good"}
    for name, value in saved.items():
        assert torch.equal(weights(fresh)[name], value), name
    ckpt.save_checkpoint(fresh, tmp_path, 2, {"step": 2}, keep_last=1)  # the next save cleans the leftover
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2"]


@pytest.mark.parametrize("stage, lora", [(0, False), (3, False), (0, True), (3, True)])
def test_exact_resume_in_a_fresh_engine(tmp_path, stage, lora):
    """Train 2 steps, save, train 2 more; a fresh engine loading the checkpoint repeats the last 2 exactly."""
    engine = make_engine(stage, lora=lora)
    torch.manual_seed(1)
    train(engine, 0, 2)
    path = ckpt.save_checkpoint(engine, tmp_path, 2, {"step": 2}, keep_last=1)
    expected_losses = train(engine, 2, 4)
    expected = weights(engine)
    if lora and stage == 0:  # frozen base weights stay out of the checkpoint: adapters only
        saved = torch.load(path / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        frozen = [n for n, p in engine.module.named_parameters() if not p.requires_grad]
        assert frozen and not set(frozen) & set(saved) and any("lora_" in n for n in saved)

    fresh = make_engine(stage, lora=lora)
    torch.manual_seed(12345)  # a different RNG: dropout masks only match if the RNG is restored
    assert ckpt.load_checkpoint(fresh, ckpt.find_resume_checkpoint(tmp_path, "auto"))["step"] == 2
    assert train(fresh, 2, 4) == expected_losses
    got = weights(fresh)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_extra_engines_share_the_checkpoint(tmp_path):
    """An actor and a critic (PPO) saved together, resumed together, both exactly."""
    actor, critic = make_engine(0), make_engine(2, dropout=0.0)
    torch.manual_seed(1)
    train(actor, 0, 2), train(critic, 0, 2)
    path = ckpt.save_checkpoint(
        actor, tmp_path, 2, {"step": 2}, keep_last=1, extra_engines={"critic": critic}
    )
    assert (path / "engine-critic").is_dir()
    expected = train(actor, 2, 4), train(critic, 2, 4)

    actor2, critic2 = make_engine(0), make_engine(2, dropout=0.0)
    torch.manual_seed(12345)
    assert ckpt.load_checkpoint(actor2, path, extra_engines={"critic": critic2}) == {"step": 2}
    assert (train(actor2, 2, 4), train(critic2, 2, 4)) == expected
    with pytest.raises(UserError, match="could not be loaded"):
        ckpt.load_checkpoint(make_engine(0), path, extra_engines={"value": make_engine(2)})


def run_worker(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(HERE), str(HERE.parent))), OMP_NUM_THREADS="1")  # + tests/: tiny_llama
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each worker is its own world of one
    return subprocess.run(
        [sys.executable, str(HERE / "ds_worker.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_sigkill_then_resume_in_a_new_process_is_exact(tmp_path):
    """Kill -9 after step 3 (last checkpoint: step 2), resume=auto: steps 3..6 and final weights equal a straight run."""
    common = ["--steps", "6", "--dropout", "0.1", "--stage", "2"]
    straight = run_worker(*common, "--out", str(tmp_path / "straight.json"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "run"
    killed = run_worker(
        *common,
        "--out",
        str(tmp_path / "killed.json"),
        "--run-dir",
        str(run_dir),
        "--save-every",
        "2",
        "--kill-after",
        "3",
    )
    assert killed.returncode == -9
    assert ckpt.find_resume_checkpoint(run_dir, "auto") == run_dir / "checkpoints" / "step-2"
    resumed = run_worker(
        *common, "--out", str(tmp_path / "resumed.json"), "--run-dir", str(run_dir), "--resume", "auto"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = json.loads((tmp_path / "straight.json").read_text())
    got = json.loads((tmp_path / "resumed.json").read_text())
    assert sorted(got["losses"], key=int) == ["3", "4", "5", "6"]
    assert got["losses"] == {k: expected["losses"][k] for k in got["losses"]}
    assert got["lrs"] == {k: expected["lrs"][k] for k in got["lrs"]}
    a, b = load_file(tmp_path / "straight.json.safetensors"), load_file(tmp_path / "resumed.json.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
