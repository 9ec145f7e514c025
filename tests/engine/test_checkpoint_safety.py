"""Checkpoints that cannot run code, never hold NaN weights, and fall back when damaged.

* a planted ``__reduce__`` payload in DeepSpeed's model or optimizer states is refused with
  ``UnsafeCheckpoint`` and does not run (it would create a marker file), ZeRO 0, 2 and 3;
* every ZeRO stage and dtype alignkit builds loads under ``weights_only=True`` (the allowlist);
* a save after a step that left NaN weights raises ``NonFiniteWeights`` naming the last good
  checkpoint (or saying there is none) and writes nothing;
* ``resume=auto`` with a damaged latest checkpoint (truncated / missing model states, garbage
  RNG, changed bytes) says so, moves it aside and resumes from the previous one, exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_tiny import micro_batch, tiny_model

from alignkit.engine import checkpoint as ckpt
from alignkit.engine.config import DeepSpeedConfig, build_train_ds_config
from alignkit.engine.engine import init_train_engine, setup_distributed
from alignkit.engine.export import gathered_cpu_copy
from alignkit.engine.precision import cpu_fp16_supported
from alignkit.errors import UserError


@pytest.fixture(scope="module", autouse=True)
def dist():
    torch.set_num_threads(1)
    return setup_distributed()


def make_engine(stage=0, dtype="fp32", **ds):
    config = build_train_ds_config(DeepSpeedConfig(zero_stage=stage, dtype=dtype, **ds), micro_batch_size=2,
                                   grad_accum_steps=1, world_size=1)
    return init_train_engine(tiny_model(), config, lr=1e-2, warmup_steps=1, total_steps=8, scheduler="linear")


def train(engine, start, stop):
    for step in range(start, stop):
        ids = micro_batch(step, 0, 2, 1)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()


def weights(engine):
    return gathered_cpu_copy(engine.module).state_dict()


class Payload:
    """Unpickling this creates ``path``: stands for any code a planted checkpoint would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def plant(path, marker):
    """Add a payload to a DeepSpeed state file, keeping everything else, and re-vouch for it in the manifest."""
    state = _load_trusted(path)
    state["planted"] = Payload(marker)
    torch.save(state, path)
    folder = path.parent
    ckpt.write_manifest(folder, 2)  # an attacker can rewrite the manifest too: only weights_only stops it


def _load_trusted(path):
    with torch.serialization.safe_globals(ckpt.safe_globals()):
        return torch.load(path, weights_only=True, map_location="cpu")


@pytest.mark.parametrize("stage, victim", [(0, "mp_rank_00_model_states.pt"),
                                           (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                           (3, "zero_pp_rank_0_mp_rank_00_model_states.pt")])
def test_planted_payload_is_refused_and_never_runs(tmp_path, stage, victim):
    engine = make_engine(stage)
    train(engine, 0, 2)
    path = ckpt.save_checkpoint(engine, tmp_path, 2, {"step": 2}, keep_last=0)
    marker = tmp_path / "marker"
    plant(path / victim, marker)
    assert ckpt.verify_checkpoint(path) is None  # the manifest was forged to match
    with pytest.raises(ckpt.UnsafeCheckpoint) as error:
        ckpt.load_checkpoint(make_engine(stage), path)
    assert not marker.exists(), "the planted payload ran"
    message = str(error.value)
    assert victim in message and "system" in message and "nothing in it ran" in message
    with pytest.raises(ckpt.UnsafeCheckpoint):  # resume=auto does not skip it silently either
        ckpt.resume_checkpoint(make_engine(stage), tmp_path, "auto")
    assert not marker.exists() and path.is_dir()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the switch is scoped to the load


@pytest.mark.parametrize("stage, dtype, extra", [(0, "bf16", {}), (1, "fp32", {}), (2, "bf16", {}),
                                                 (3, "bf16", {}),
                                                 pytest.param(2, "fp16", {}, marks=pytest.mark.skipif(
                                                     not torch.cuda.is_available() and not cpu_fp16_supported(),
                                                     reason="DeepSpeed takes fp16 on a CPU only with oneDNN fp16")),
                                                 (2, "fp32", {"offload_optimizer": "cpu"})])
def test_every_layout_loads_weights_only_and_exactly(tmp_path, stage, dtype, extra):
    engine = make_engine(stage, dtype, **extra)
    train(engine, 0, 2)
    ckpt.save_checkpoint(engine, tmp_path, 2, {"step": 2}, keep_last=0)
    expected = weights(engine)
    fresh = make_engine(stage, dtype, **extra)
    path, state = ckpt.resume_checkpoint(fresh, tmp_path, "auto")
    assert path.name == "step-2" and state == {"step": 2}
    got = weights(fresh)
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    engine = make_engine(2)
    train(engine, 0, 1)
    path = ckpt.save_checkpoint(engine, tmp_path, 1, {"step": 1}, keep_last=0)
    manifest = json.loads((path / "manifest.json").read_text())
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert manifest["format"] == "alignkit-checkpoint/1" and set(manifest["files"]) == on_disk
    assert {"mp_rank_00_model_states.pt", "rng/rank-0.json"} <= on_disk
    entry = manifest["files"]["mp_rank_00_model_states.pt"]
    assert entry["size"] == (path / "mp_rank_00_model_states.pt").stat().st_size and len(entry["sha256"]) == 64


def _poison(engine):
    with torch.no_grad():
        next(p for p in engine.module.parameters() if p.requires_grad).view(-1)[0] = float("nan")


def test_nan_weights_are_never_saved_and_the_message_names_the_last_good_one(tmp_path):
    engine = make_engine(0)
    train(engine, 0, 1)
    with pytest.raises(ckpt.NonFiniteWeights) as none_yet:
        bad = make_engine(0)
        _poison(bad)
        ckpt.save_checkpoint(bad, tmp_path, 1, {"step": 1}, keep_last=0)
    assert "non-finite weights after step 1 (" in str(none_yet.value)
    assert "No checkpoint was saved before it" in str(none_yet.value) and none_yet.value.exit_code == 3
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())

    ckpt.save_checkpoint(engine, tmp_path, 1, {"step": 1}, keep_last=0)
    _poison(engine)
    with pytest.raises(ckpt.NonFiniteWeights) as after_good:
        ckpt.save_checkpoint(engine, tmp_path, 2, {"step": 2}, keep_last=0)
    root = tmp_path / "checkpoints"
    assert f"The last good checkpoint, {root / 'step-1'}, is kept: resume=auto continues from step 1" in str(
        after_good.value)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-1"]  # nothing half-written
    assert (root / "latest").read_text().strip() == "step-1"


def test_nan_in_an_extra_engine_is_named(tmp_path):
    actor, critic = make_engine(0), make_engine(2)
    _poison(critic)
    with pytest.raises(ckpt.NonFiniteWeights, match=r"\(critic:"):
        ckpt.save_checkpoint(actor, tmp_path, 1, {"step": 1}, keep_last=0, extra_engines={"critic": critic})


def _damage(path, how):
    model = path / "mp_rank_00_model_states.pt"
    if how == "truncated":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
        return "mp_rank_00_model_states.pt has"
    if how == "missing":
        model.unlink()
        return "mp_rank_00_model_states.pt is missing"
    if how == "rng":
        (path / "rng" / "rank-0.json").write_text("garbage{")
        return "rng/rank-0.json has"
    if how == "bytes":
        data = bytearray(model.read_bytes())
        data[-100] ^= 0xFF
        model.write_bytes(bytes(data))
        return "mp_rank_00_model_states.pt was changed after it was saved"
    if how == "rng_no_manifest":
        (path / "manifest.json").unlink()
        (path / "rng" / "rank-0.json").write_text("garbage{")
        return "rng/rank-0.json is not an RNG state"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "missing", "rng", "bytes", "rng_no_manifest"])
def test_damaged_latest_falls_back_to_the_previous_checkpoint(tmp_path, how):
    engine = make_engine(0)
    train(engine, 0, 1)
    ckpt.save_checkpoint(engine, tmp_path, 1, {"step": 1}, keep_last=0)
    good = weights(engine)
    train(engine, 1, 2)
    latest = ckpt.save_checkpoint(engine, tmp_path, 2, {"step": 2}, keep_last=0)
    expected = _damage(latest, how)
    said: list[str] = []
    fresh = make_engine(0)
    path, state = ckpt.resume_checkpoint(fresh, tmp_path, "auto", say=said.append)
    assert path.name == "step-1" and state == {"step": 1}
    assert len(said) == 1 and f"checkpoint {latest} is damaged ({expected}" in said[0]
    assert "moved aside to damaged-step-2-" in said[0] and "trying the previous one, step-1" in said[0]
    got = weights(fresh)
    assert all(torch.equal(got[k], v) for k, v in good.items())
    root = tmp_path / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [1]
    assert len(list(root.glob("damaged-step-2-*"))) == 1
    # the next save of step 2 works normally, and resume picks it
    train(fresh, 1, 2)
    ckpt.save_checkpoint(fresh, tmp_path, 2, {"step": 2}, keep_last=0)
    assert ckpt.resume_checkpoint(make_engine(0), tmp_path, "auto")[0].name == "step-2"


def test_no_intact_checkpoint_is_a_clear_error_and_an_explicit_damaged_one_too(tmp_path):
    engine = make_engine(0)
    train(engine, 0, 1)
    only = ckpt.save_checkpoint(engine, tmp_path, 1, {"step": 1}, keep_last=0)
    (only / "rng" / "rank-0.json").write_text("")
    with pytest.raises(UserError, match=r"Checkpoint .*step-1 is damaged \(rng/rank-0.json has .*resume=null"):
        ckpt.resume_checkpoint(make_engine(0), tmp_path, str(only))  # explicit: never moved, never replaced
    assert only.is_dir()
    said: list[str] = []
    with pytest.raises(UserError, match=r"No intact checkpoint to resume from in .*step-1: rng/rank-0.json"):
        ckpt.resume_checkpoint(make_engine(0), tmp_path, "auto", say=said.append)
    assert "no older checkpoint to try" in said[0]
    assert ckpt.resume_checkpoint(make_engine(0), tmp_path / "fresh", "auto") == (None, {})


# --- through the CLI: a real run -------------------------------------------------------------------------

ALIGNKIT = [sys.executable, "-m", "alignkit", "train", "recipe=sft_tiny", "trainer.eval_every=0",
            "deepspeed.gradient_clipping=0"]
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "COLUMNS": "1000"}  # rich wraps long paths mid-word at 80


def test_run_whose_step_leaves_inf_weights_saves_nothing_and_says_so(tmp_path):
    """lr=1e39 overflows fp32 in the first update (the loss of step 1 is finite): that step is not saved."""
    proc = subprocess.run([*ALIGNKIT, "trainer.lr=1e39", "trainer.max_steps=3", "trainer.save_every=1",
                           f"output_dir={tmp_path}", "run_name=inf"], capture_output=True, text=True, env=ENV,
                          timeout=600)
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "non-finite weights after step 1 (" in text and "this step is not saved" in text
    assert "No checkpoint was saved before it" in text
    assert not list((tmp_path / "inf" / "checkpoints").glob("*step-*")) and not (tmp_path / "inf" / "final").exists()


def test_nonfinite_loss_with_save_every_0_says_there_is_no_checkpoint(tmp_path):
    proc = subprocess.run([*ALIGNKIT, "trainer.lr=1e12", "trainer.max_steps=6", "trainer.save_every=0",
                           f"output_dir={tmp_path}", "run_name=nan"], capture_output=True, text=True, env=ENV,
                          timeout=600)
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "non-finite loss at step" in text and "last good checkpoint" not in text
    assert "No checkpoint was saved before it (trainer.save_every=0" in text
    assert not list((tmp_path / "nan" / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_resume_auto_after_a_damaged_latest_checkpoint_continues_exactly(tmp_path):
    args = [*ALIGNKIT, "trainer.max_steps=3", "trainer.save_every=1", "trainer.keep_last=0", "trainer.export=false",
            f"output_dir={tmp_path}", "run_name=r"]
    first = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "r"

    def step3_loss():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["split"] == "train" and r["step"] == 3][-1]

    straight = step3_loss()
    model = run_dir / "checkpoints" / "step-3" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:1000])
    resumed = subprocess.run([*args, "resume=auto"], capture_output=True, text=True, env=ENV, timeout=600)
    text = " ".join(resumed.stderr.split())
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert f"checkpoint {run_dir / 'checkpoints' / 'step-3'} is damaged (mp_rank_00_model_states.pt has 1000 bytes" in text
    assert "trying the previous one, step-2" in text and "resumed from" in text and "step-2 at step 2" in text
    assert step3_loss() == straight  # step 3 replayed from step 2 exactly
    assert len(list((run_dir / "checkpoints").glob("damaged-step-3-*"))) == 1


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_agree_on_fallback_and_on_nan_refusal(tmp_path, stage):
    from alignkit.engine.launcher import build_launch_command, find_free_port, launch, launch_env

    here = Path(__file__).resolve().parent
    env = launch_env()
    env.update(PYTHONPATH=os.pathsep.join((str(here), str(here.parent))), OMP_NUM_THREADS="1")
    for key in DIST_VARS:
        env.pop(key, None)
    out = tmp_path / "out.json"
    argv = build_launch_command(nproc_per_node=2, master_port=find_free_port(),
                                module_args=["ckpt_safety_worker", "--stage", str(stage), "--run-dir",
                                             str(tmp_path / "run"), "--out", str(out)])
    assert launch(argv, env) == 0
    result = json.loads(out.read_text())
    assert result["path"].endswith("step-1") and result["state"] == {"step": 1} and result["same"]
    assert len(result["said"]) == 1 and "step-2 is damaged" in result["said"][0] and "rank_1" in result["said"][0]
    assert result["refused_on"] == 2.0 and "(on another rank)" in result["refused"] and not result["step5"]


def test_fallback_only_goes_back_in_time(tmp_path):
    """``latest`` names step-2 (step-3 exists but is not the run's latest): a damaged step-2 falls back to step-1."""
    engine = make_engine(0)
    for step in (1, 2, 3):
        train(engine, step - 1, step)
        ckpt.save_checkpoint(engine, tmp_path, step, {"step": step}, keep_last=0)
    root = tmp_path / "checkpoints"
    (root / "latest").write_text("step-2\n")
    (root / "step-2" / "rng" / "rank-0.json").write_text("{}")
    said: list[str] = []
    path, state = ckpt.resume_checkpoint(make_engine(0), tmp_path, "auto", say=said.append)
    assert path.name == "step-1" and state == {"step": 1} and "trying the previous one, step-1" in said[0]


@pytest.mark.parametrize("pointer", ["../../elsewhere/step-9", "step-9", b"\x80\x04garbage"])
def test_latest_never_leaves_the_run_and_a_linked_step_is_not_a_checkpoint(tmp_path, pointer):
    """``latest`` naming ``../`` or a symlinked ``step-N`` (planted on a shared disk) or holding garbage
    bytes: resume=auto takes this run's own newest complete checkpoint, nothing outside it."""
    outside = tmp_path / "elsewhere" / "step-9"
    outside.mkdir(parents=True)
    root = tmp_path / "run" / ckpt.CHECKPOINTS
    (root / "step-2").mkdir(parents=True)
    (root / "step-9").symlink_to(outside)
    (root / ckpt.LATEST).write_bytes(pointer if isinstance(pointer, bytes) else pointer.encode())
    assert ckpt.find_resume_checkpoint(tmp_path / "run", "auto") == root / "step-2"
    assert [p.name for _, p in ckpt.list_checkpoints(root)] == ["step-2"]


def test_planted_links_in_the_checkpoints_folder_are_never_written_through(tmp_path):
    """A shared disk: ``checkpoints`` itself a link is refused (save and resume=auto); a planted
    ``.tmp-step-N`` or ``step-N`` link is removed / moved aside, the place it points at untouched."""
    victim = tmp_path / "victim"
    victim.mkdir()
    engine = make_engine(stage=2)
    train(engine, 0, 1)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ckpt.CHECKPOINTS).symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        ckpt.save_checkpoint(engine, linked, step=1, client_state={}, keep_last=2)
    with pytest.raises(UserError, match="symbolic link"):
        ckpt.find_resume_checkpoint(linked, "auto")
    run = tmp_path / "run"
    root = run / ckpt.CHECKPOINTS
    root.mkdir(parents=True)
    (root / f"{ckpt._TMP_PREFIX}1").symlink_to(victim)
    (root / "step-1").symlink_to(victim)
    victim_file = tmp_path / "victim.py"
    victim_file.write_text("precious\n")
    (root / "zero_to_fp32.py").symlink_to(victim_file)  # DeepSpeed copies its recovery script there (ZeRO >= 1)
    (root / "zero_to_torch.py").symlink_to(victim_file)
    ckpt.save_checkpoint(engine, run, step=1, client_state={}, keep_last=2)
    assert list(victim.iterdir()) == []
    assert victim_file.read_text() == "precious\n"
    assert (root / "step-1").is_dir() and not (root / "step-1").is_symlink()
    assert ckpt.verify_checkpoint(root / "step-1") is None


@pytest.mark.parametrize("how", ["empty_files", "other_file", "entry_not_a_dict"])
def test_a_manifest_that_does_not_describe_the_checkpoint_is_damaged(tmp_path, how):
    """A manifest listing nothing, or another file, vouches for nothing: the files loading would read
    must all be listed (else a truncated model file next to a planted manifest loads unverified)."""
    engine = make_engine()
    train(engine, 0, 1)
    step = ckpt.save_checkpoint(engine, tmp_path, step=1, client_state={}, keep_last=2)
    manifest = json.loads((step / ckpt.MANIFEST).read_text())
    if how == "empty_files":
        manifest["files"] = {}
    elif how == "other_file":
        (step / "decoy.txt").write_text("x")
        manifest["files"] = {"decoy.txt": {"size": 1, "sha256": __import__("hashlib").sha256(b"x").hexdigest()}}
    else:
        manifest["files"] = {name: "ok" for name in manifest["files"]}
    (step / ckpt.MANIFEST).write_text(json.dumps(manifest))
    problem = ckpt.verify_checkpoint(step)
    assert problem is not None and ("not in its manifest.json" in problem or "unreadable" in problem), problem
