"""The bad-input corpus: every user mistake is one paragraph, exit code != 0, no traceback, nothing left.

Each case runs the real entry point (``alignkit.cli.main``) in this process with ``sys.argv`` set,
and asserts the exit code, the pieces of the message (what, where, what to do) and that no run
directory was left behind. Compose-time cases stop before any model loads (fast); the start-time
cases (bad model path, unreadable data, bad launcher option, a dataset smaller than a batch, a
signal during loading) start the tiny trainer and must remove the run directory they created,
so the corrected command with the same ``run_name`` works. Then the files of a run: planted
symlinks are refused, a ``-g 2`` run holds its lock, exports follow the umask, the rendezvous
listens on 127.0.0.1, a full disk during a checkpoint says "No space left" and leaves no partial
checkpoint, and a resume that changes what is trained is refused unless ``resume_allow`` names
the key, which is then recorded and used.

Grow it: add a case where a mistake was found (expected pieces first, then the overrides).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignkit.cli import main

FAST = ["trainer.max_steps=1", "trainer.eval_every=0", "trainer.export=false"]


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """``alignkit ARGS`` in this process: (exit code, stderr + stdout)."""
    monkeypatch.setattr(sys, "argv", ["alignkit", *args])
    monkeypatch.delenv("ALIGNKIT_DEBUG", raising=False)
    code = 0
    try:
        main()
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    out = capsys.readouterr()
    return code, out.err + out.out


def _runs(tmp_path: Path) -> list[str]:
    out = tmp_path / "runs"
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def _assert_user_error(code: int, text: str, pieces: list[str], tmp_path: Path) -> None:
    assert code == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for piece in pieces:
        assert piece in text, f"{piece!r} not in: {text[-3000:]}"
    assert _runs(tmp_path) == [], f"left behind: {_runs(tmp_path)}"


def _raw_json(tmp_path: Path) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 7, "gradient_accumulation_steps": 3}))
    return str(path)


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)
    return str(path)


# (expected pieces of the message, overrides); callables get tmp_path
COMPOSE_CASES = {
    "nproc_zero": (["launcher.nproc_per_node=0", ">= 1"], ["recipe=dpo_tiny", "launcher.nproc_per_node=0"]),
    "beta_text": (["loss.beta='abc'", "must be a number", "'dpo'"], ["recipe=dpo_tiny", "loss.beta=abc"]),
    "weights_text": (["loss.weights[0]='abc'", "one number per loss"],
                     ["recipe=dpo_tiny", "loss=[dpo,sft]", "loss.weights=[abc,1]"]),
    "lr_negative": (["trainer.lr=-1.0", "must be > 0"], ["recipe=dpo_tiny", "trainer.lr=-1"]),
    "lr_nan": (["trainer.lr=nan", "finite"], ["recipe=dpo_tiny", "trainer.lr=nan"]),
    "raw_json_batch": (["train_batch_size=7", "gradient_accumulation_steps=3", "trainer.batch_size",
                        "remove these keys"],
                       lambda tmp: ["recipe=dpo_tiny", f"deepspeed.raw_json={_raw_json(tmp)}"]),
    "run_name_100kb": (["run_name is 100000 characters", "at most 128"], ["recipe=dpo_tiny", "run_name=" + "x" * 100_000]),
    "run_name_slash": (["cannot be a run folder name", "output_dir"], ["recipe=dpo_tiny", "run_name=../escape"]),
    "gae_under_grpo": (["rl.advantage=gae", "critic", "ppo"], ["recipe=grpo_tiny", "rl.advantage=gae"]),
    "plus_unknown_key": (["unknown config key 'trainer.lrr'", "Did you mean trainer.lr?"],
                         ["recipe=dpo_tiny", "+trainer.lrr=0.1"]),
    "unknown_key": (["unknown config key 'trainer.lrr'", "Did you mean trainer.lr?", "Valid keys under trainer"],
                    ["recipe=dpo_tiny", "trainer.lrr=0.1"]),
    "key_in_another_section": (["unknown config key 'trainer.temperature'", "Did you mean generation.temperature?"],
                               ["recipe=grpo_tiny", "trainer.temperature=0.5"]),
    "custom_deepspeed_without_json": (["deepspeed.raw_json is required", "deepspeed=custom"],
                                      ["recipe=dpo_tiny", "deepspeed=custom"]),
    "reference_free_separate": (["reference-free", "trainer.reference=separate", "trainer.reference=auto"],
                                ["recipe=simpo_tiny", "trainer.reference=separate"]),
    "keep_last_negative": (["trainer.keep_last=-1", "0 keeps all"], ["recipe=dpo_tiny", "trainer.keep_last=-1"]),
    "loss_os_system": (["loss.name='os:system' is not a loss", "register_loss"], ["recipe=dpo_tiny", "loss.name=os:system"]),
    "loss_builtins_print": (["loss.name='builtins:print' is not a loss"], ["recipe=dpo_tiny", "loss.name=builtins:print"]),
    "wrong_type": (["trainer.lr='fast' has the wrong type", "expected a number", "e.g. trainer.lr=1e-05"],
                   ["recipe=dpo_tiny", "trainer.lr=fast"]),
    "wrong_type_int": (["trainer.max_steps='1.5' has the wrong type", "an integer"],
                       ["recipe=dpo_tiny", "trainer.max_steps=1.5"]),
    "wrong_type_list": (["reward.fns='abc' has the wrong type", "a list of strings", "e.g. reward.fns=[judge]"],
                        ["recipe=grpo_tiny", "reward.fns=abc"]),
    "newline_in_value": (["'run_name'", "control character", "'\\n'"], ["recipe=dpo_tiny", "run_name=a\nb"]),
    "rich_markup_kept": (["reward.fns (e.g. [judge])"], ["recipe=grpo_tiny", "reward.fns=[]"]),
    "loss_agg": (["loss.loss_agg='bogus'", "seq_mean_token_mean"], ["recipe=grpo_tiny", "loss.loss_agg=bogus"]),
    "dr_grpo_needs_length": (["max_completion_length"], ["recipe=grpo_tiny", "loss.loss_agg=seq_mean_token_sum_norm"]),
    "importance_sampling_level": (["loss.importance_sampling_level='bogus'", "sequence"],
                                  ["recipe=grpo_tiny", "loss.importance_sampling_level=bogus"]),
    "clip_range": (["loss.epsilon_low=1.5", "[0, 1)"], ["recipe=grpo_tiny", "loss.epsilon_low=1.5"]),
    "temperature_negative": (["temperature must be >= 0"], ["recipe=grpo_tiny", "generation.temperature=-1"]),
    "temperature_greedy_grpo": (["generation.temperature=0", "identical"], ["recipe=grpo_tiny", "generation.temperature=0"]),
    "top_p": (["top_p must be in (0, 1]"], ["recipe=grpo_tiny", "generation.top_p=0"]),
    "resume_allow_without_resume": (["resume_allow", "applies only to a resume"],
                                    ["recipe=dpo_tiny", "resume_allow=[trainer.lr]"]),
    "missing_equals": (["'trainer.lr' has no '='", "trainer.lr=VALUE"], ["recipe=dpo_tiny", "trainer.lr"]),
    "recipe_typo": (["unknown preset 'dpo_tinyy'", "Did you mean dpo_tiny"], ["recipe=dpo_tinyy"]),
    "loss_typo": (["unknown option for 'loss' 'dpoo'", "Did you mean dpo"], ["recipe=dpo_tiny", "loss=dpoo"]),
    "launcher_unknown": (["unknown option for 'hydra/launcher' 'nonexistent'", "Valid choices: basic"],
                         ["recipe=dpo_tiny", "hydra/launcher=nonexistent"]),
    "huge_number": (["'loss.beta'", "too long to read"], ["recipe=dpo_tiny", "loss.beta=" + "9" * 5000]),
    "beta_overflow": (["loss.beta=inf must be a finite number"], ["recipe=dpo_tiny", "loss.beta=1e400"]),
    "fifo_as_data": (["is a FIFO", "regular files"],
                     lambda tmp: ["recipe=dpo_tiny", f"data.train=[{{path:{_fifo(tmp)}}}]", "data.cache_dir=" + str(tmp)]),
}


@pytest.mark.parametrize("case", sorted(COMPOSE_CASES))
def test_compose_time_mistake(case, tmp_path, capsys, monkeypatch):
    pieces, overrides = COMPOSE_CASES[case]
    overrides = overrides(tmp_path) if callable(overrides) else overrides
    args = ["train", *FAST, f"output_dir={tmp_path}/runs", "run_name=r", *overrides]  # FAST: quick if accepted
    code, text = run_cli(args, capsys, monkeypatch)
    _assert_user_error(code, text, pieces, tmp_path)


def test_plan_refuses_zero_processes(capsys, monkeypatch, tmp_path):
    code, text = run_cli(["plan", "recipe=dpo_tiny", "launcher.nproc_per_node=0"], capsys, monkeypatch)
    _assert_user_error(code, text, ["launcher.nproc_per_node=0", ">= 1"], tmp_path)


def _reward_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text("def no_completions(x, y):\n    return 0.0\n\n"
                    "def good(prompts, completions, **columns):\n    return [0.0] * len(completions)\n")
    return path


@pytest.mark.parametrize("fns, pieces", [
    ("[os:system]", ["'os:system' is a built-in, not a reward function", "completions"]),
    ("[builtins:print]", ["'builtins:print' is a built-in"]),
    ("[subprocess:run]", ["'subprocess:run' is a standard-library function"]),
    ("[collections:Counter]", ["'collections:Counter' is a class"]),
    ("[{file}:no_completions]", ["takes (x, y)", "no 'completions'"]),
])
@pytest.mark.parametrize("command", ["train", "config show"])
def test_reward_path_that_is_not_a_reward_function_is_refused_at_compose_time(command, fns, pieces, capsys,
                                                                               monkeypatch, tmp_path):
    """Any callable used to pass compose (``os:system`` was only caught by the dry call, after the run
    directory was made): builtins, classes, standard-library functions and functions that cannot take
    the completions are refused by ``config show`` and ``train`` alike, nothing created."""
    value = "reward.fns=" + fns.format(file=_reward_file(tmp_path))
    code, text = run_cli([*command.split(), f"output_dir={tmp_path}/runs", "run_name=r", "recipe=grpo_tiny", value],
                         capsys, monkeypatch)
    _assert_user_error(code, text, pieces, tmp_path)


def test_eval_does_not_import_reward_code_named_by_a_run_config(capsys, monkeypatch, tmp_path):
    """A run directory copied from a shared disk whose config.yaml names a .py file: eval refuses to
    import it (the file is never executed) unless reward.fns is given on the command line."""
    from alignkit.config.compose import compose, freeze

    run = tmp_path / "copied-run"
    run.mkdir()
    freeze(compose(["recipe=grpo_tiny", f"reward.fns=[{_reward_file(tmp_path)}:good]"]), run / "config.yaml")
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\ndef score(prompts, completions, **kw):\n    return 0\n")
    frozen = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(frozen.replace(f"{_reward_file(tmp_path)}:good", f"{evil}:score"))
    code, text = run_cli(["eval", str(run)], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in text, text[-3000:]
    flat = "".join(text.split())  # a long path may be wrapped by the console
    assert "namesrewardcodeoutsidealignkit" in flat and f"reward.fns=[{evil}:score]" in flat, text[-3000:]
    assert not marker.exists()
    code, text = run_cli(["eval", str(run), "reward.fns=[correctness]"], capsys, monkeypatch)
    assert "nofinal/modelyet" in "".join(text.split()) and not marker.exists(), text[-3000:]


# --- start-time failures: the run directory the start created is removed ----------------------------

def _bad_jsonl(tmp_path: Path) -> str:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b"\n')
    return str(path)


def _two_pairs(tmp_path: Path) -> str:
    path = tmp_path / "two.jsonl"
    rows = [{"prompt": f"q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _array_as_jsonl(tmp_path: Path) -> str:
    path = tmp_path / "array.jsonl"
    rows = [{"prompt": f"q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(40)]
    path.write_text(json.dumps(rows, indent=2))  # pretty-printed: ~200 lines, each invalid as JSON Lines
    return str(path)


START_CASES = {
    "json_array_as_jsonl": (["array.jsonl:1", "found a JSON array", "rename it to .json", "jq -c"],
                            lambda tmp: [f"data.train=[{{path:{_array_as_jsonl(tmp)}}}]", "data.eval=[]"]),
    "model_path": (["missing-model"], lambda tmp: [f"model.name_or_path={tmp}/missing-model"]),
    "data_unreadable": (["broken.jsonl"], lambda tmp: [f"data.train=[{{path:{_bad_jsonl(tmp)}}}]", "data.eval=[]"]),
    "smaller_than_a_batch": (["fewer than one batch", "trainer.batch_size=8"],
                             lambda tmp: [f"data.train=[{{path:{_two_pairs(tmp)}}}]", "data.eval=[]",
                                          "trainer.batch_size=8", "trainer.micro_batch_size=2"]),
    "launcher_hostfile": (["launcher.hostfile", "does not exist"],
                          lambda tmp: ["launcher.nproc_per_node=2", f"launcher.hostfile={tmp}/no-hostfile"]),
    "launcher_nnodes": (["launcher.nnodes=2 needs launcher.hostfile"], lambda tmp: ["--nnodes", "2"]),
}


@pytest.mark.parametrize("case", sorted(START_CASES))
def test_failed_start_leaves_no_run_directory(case, tmp_path, capsys, monkeypatch):
    pieces, extra = START_CASES[case]
    args = ["train", "recipe=dpo_tiny", *FAST, f"output_dir={tmp_path}/runs", "run_name=r",
            f"trainer.reference_cache_dir={tmp_path}/ref", *extra(tmp_path)]
    code, text = run_cli(args, capsys, monkeypatch)
    _assert_user_error(code, text, pieces, tmp_path)


def test_json_array_saved_as_jsonl_is_one_hint_not_a_problem_per_line(tmp_path, capsys, monkeypatch):
    code, text = run_cli(["data", "validate", _array_as_jsonl(tmp_path)], capsys, monkeypatch)
    assert code != 0 and "Traceback" not in text, text[-3000:]
    assert text.count("found a JSON array") == 1 and "1 problems" in text and "array.jsonl:2" not in text, text[-3000:]


def test_corrected_command_with_the_same_run_name_then_works(tmp_path, capsys, monkeypatch):
    common = ["train", "recipe=dpo_tiny", *FAST, f"output_dir={tmp_path}/runs", "run_name=r",
              f"trainer.reference_cache_dir={tmp_path}/ref"]
    code, text = run_cli([*common, f"model.name_or_path={tmp_path}/typo"], capsys, monkeypatch)
    _assert_user_error(code, text, ["typo"], tmp_path)
    code, text = run_cli(common, capsys, monkeypatch)
    assert code == 0, text[-3000:]
    assert (tmp_path / "runs" / "r" / "config.yaml").is_file()


@pytest.mark.parametrize("where", ["alignkit.data.pipeline.prepare_data", "alignkit.trainers.preference.precompute"])
def test_sigterm_during_loading_or_prepass_stops_at_once(where, tmp_path, capsys, monkeypatch):
    """The stop flag used to be polled only after an optimizer step: a signal while loading or
    pre-computing reference log-probs (a blocking read of a FIFO, a long pre-pass) was deferred."""
    module_name, _, attr = where.rpartition(".")
    module = __import__(module_name, fromlist=[attr])
    started = {}

    def stuck(*args, **kwargs):
        started["t"] = time.time()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # a read that never returns
        raise AssertionError("the signal did not interrupt the start")

    monkeypatch.setattr(module, attr, stuck)
    args = ["train", "recipe=dpo_tiny", *FAST, "trainer.reference=precomputed", f"output_dir={tmp_path}/runs",
            "run_name=r", f"trainer.reference_cache_dir={tmp_path}/ref"]
    code, text = run_cli(args, capsys, monkeypatch)
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert time.time() - started["t"] < 10
    assert "stopped by SIGTERM" in text and "Traceback" not in text
    assert _runs(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is not None  # the trainer's handler was taken back


# --- run files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("planted", [".lock", "overrides.txt", "config.yaml", "RUN"])
def test_planted_symlink_is_refused(planted, tmp_path, capsys, monkeypatch):
    target = tmp_path / "victim.txt"
    target.write_text("precious\n")
    runs = tmp_path / "runs"
    runs.mkdir()
    if planted == "RUN":
        (runs / "r").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        (tmp_path / "elsewhere").mkdir()
    else:
        (runs / "r").mkdir()
        (runs / "r" / planted).symlink_to(target)
    args = ["train", "recipe=dpo_tiny", *FAST, f"output_dir={runs}", "run_name=r"]
    code, text = run_cli(args, capsys, monkeypatch)
    assert code == 2 and "Traceback" not in text, text[-3000:]
    assert "symbolic link" in text, text[-3000:]
    assert target.read_text() == "precious\n"
    if planted == "RUN":
        assert list((tmp_path / "elsewhere").iterdir()) == []


def test_multi_process_run_holds_the_run_directory_lock(tmp_path, monkeypatch):
    """``-g 2``: the launching process keeps the lock while the workers run (it used to let it go)."""
    import fcntl

    import alignkit.engine.launcher as launcher
    from alignkit.config.compose import compose
    from alignkit.run import prepare_run_dir, start_run

    seen = {}

    def fake_launch(argv, env=None):
        with open(tmp_path / "runs" / "r" / ".lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen["locked"] = False
            except BlockingIOError:
                seen["locked"] = True
        return 0

    monkeypatch.setattr(launcher, "launch", fake_launch)
    cfg = compose(["recipe=dpo_tiny", "launcher.nproc_per_node=2", f"output_dir={tmp_path}/runs", "run_name=r"])
    run_dir, config_path, _ = prepare_run_dir(cfg, [])
    try:
        assert start_run(cfg, run_dir, config_path) == 0
    finally:
        from alignkit import runfiles

        runfiles.release_locks()
    assert seen == {"locked": True}


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_export_follows_the_umask(umask, file_mode, dir_mode, tmp_path):
    from alignkit.engine.export import export_hf_model
    from alignkit.models.load import load_causal_lm
    from alignkit.models.config import ModelConfig

    model, tokenizer = load_causal_lm(ModelConfig(name_or_path="tiny"))
    old = os.umask(umask)
    try:
        out = export_hf_model(model, tokenizer, tmp_path / "final")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == dir_mode
    weights = out / "model.safetensors"
    assert (weights.stat().st_mode & 0o777) == file_mode
    assert all((p.stat().st_mode & 0o777) == file_mode for p in out.iterdir() if p.is_file())


def test_rendezvous_listens_on_loopback_only():
    code = (
        "import os, psutil, torch\n"
        "from alignkit.engine.engine import setup_distributed\n"
        "setup_distributed()\n"
        "t = torch.ones(1); torch.distributed.all_reduce(t)\n"
        "port = int(os.environ['MASTER_PORT'])\n"
        "print('LISTEN', sorted({(c.laddr.ip, c.laddr.port == port) for c in psutil.Process().net_connections('tcp')"
        " if c.status == 'LISTEN'}))\n"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.pop("RANK", None)
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("LISTEN"))
    listening = eval(line[len("LISTEN "):])  # noqa: S307 - our own printout
    assert ("127.0.0.1", True) in listening, listening  # the store, on the MASTER_PORT
    assert all(ip == "127.0.0.1" for ip, _ in listening), listening


def test_disk_full_during_a_checkpoint_says_so_and_leaves_no_partial_checkpoint(tmp_path, capsys, monkeypatch):
    import torch

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoints" in str(f):
            Path(f).write_bytes(b"\0" * 100)  # half-written
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    args = ["train", "recipe=dpo_tiny", *FAST, f"output_dir={tmp_path}/runs", "run_name=r",
            f"trainer.reference_cache_dir={tmp_path}/ref"]
    code, text = run_cli(args, capsys, monkeypatch)
    assert code == 2 and "Traceback" not in text, text[-3000:]
    assert "No space left" in text and "resume=auto" in text
    root = tmp_path / "runs" / "r" / "checkpoints"
    leftovers = [p.name for p in root.iterdir()] if root.is_dir() else []
    assert not [name for name in leftovers if name.startswith(".tmp") or name.startswith("step-")], leftovers


# --- resume --------------------------------------------------------------------------------------------

RESUME_RUN = ["train", "recipe=dpo_tiny", "trainer.max_steps=2", "trainer.save_every=1", "trainer.eval_every=0",
              "trainer.export=false", "trainer.scheduler=constant", "trainer.lr=1e-5"]


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split", "train") == "train" and "lr" in r]


def test_resume_refuses_a_changed_setting_allows_it_explicitly_and_uses_it(tmp_path, capsys, monkeypatch):
    where = [f"output_dir={tmp_path}/runs", "run_name=r", f"trainer.reference_cache_dir={tmp_path}/ref"]
    code, text = run_cli([*RESUME_RUN, *where], capsys, monkeypatch)
    assert code == 0, text[-3000:]
    run_dir = tmp_path / "runs" / "r"
    frozen, overrides = (run_dir / "config.yaml").read_bytes(), (run_dir / "overrides.txt").read_bytes()

    changed = [a for a in RESUME_RUN if not a.startswith(("trainer.lr", "trainer.max_steps"))]
    more = [*changed, "trainer.max_steps=3", *where, "resume=auto"]
    code, text = run_cli([*more, "trainer.lr=1e-4"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in text, text[-3000:]
    for piece in ("trainer.lr: 1e-05 -> 0.0001", "trainer.max_steps: 2 -> 3", "resume_allow=[trainer.lr,trainer.max_steps]"):
        assert piece in text, text[-3000:]
    assert (run_dir / "config.yaml").read_bytes() == frozen and (run_dir / "overrides.txt").read_bytes() == overrides

    code, text = run_cli([*more, "trainer.lr=1e-4", "resume_allow=[trainer.lr,trainer.max_steps]",
                          "trainer.log_every=1"], capsys, monkeypatch)
    assert code == 0, text[-3000:]
    assert (run_dir / "config.yaml").read_bytes() == frozen and (run_dir / "overrides.txt").read_bytes() == overrides
    history = [json.loads(line) for line in (run_dir / "resume_history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["config"] == "config.resume-1.yaml"
    assert history[0]["allowed"] == {"trainer.lr": [1e-05, 0.0001], "trainer.max_steps": [2, 3]}
    assert "trainer.lr=1e-4" in history[0]["overrides"]
    rows = _train_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["lr"] == pytest.approx(1e-5) and rows[2]["lr"] == pytest.approx(1e-4)  # the new lr is used


def test_stopped_run_exits_with_128_plus_the_signal(tmp_path, capsys, monkeypatch):
    """SIGTERM during training: a checkpoint, "stopped at step", and exit code 143 (it used to be 0)."""
    from alignkit.trainers.loop import Loop

    real_end_step = Loop.end_step

    def end_step(self, step, *args, **kwargs):
        if step.number == 1:  # step 1 done: the signal arrives mid-run
            os.kill(os.getpid(), signal.SIGTERM)
        return real_end_step(self, step, *args, **kwargs)

    monkeypatch.setattr(Loop, "end_step", end_step)
    args = ["train", "recipe=dpo_tiny", "trainer.max_steps=5", "trainer.eval_every=0", "trainer.export=false",
            f"output_dir={tmp_path}/runs", "run_name=r", f"trainer.reference_cache_dir={tmp_path}/ref"]
    code, text = run_cli(args, capsys, monkeypatch)
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert "stopped at step 1" in text
    assert (tmp_path / "runs" / "r" / "checkpoints" / "step-1").is_dir()


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_run_holds_its_lock_listens_on_loopback_and_exits_143_when_stopped(tmp_path):
    """``-g 2`` end to end: a second ``resume=auto`` is refused while the run lives (it used to enter the
    live run), every listening socket of the workers is on 127.0.0.1, and SIGTERM exits 143 after a
    checkpoint."""
    import psutil

    env = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "alignkit", "train", "-g", "2", "recipe=sft_tiny", "trainer.max_steps=400",
            "trainer.eval_every=0", "trainer.export=false", f"output_dir={tmp_path}", "run_name=r"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    try:
        assert proc.poll() is None, "the run ended before it could be checked"
        second = subprocess.run([*args, "resume=auto"], env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "in use by another running alignkit process" in second.stderr, \
            second.stderr[-2000:]
        listening = set()
        for process in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            listening |= {c.laddr.ip for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}, listening
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped at step" in err
    assert list((tmp_path / "r" / "checkpoints").glob("step-*"))


def test_resume_refuses_a_data_file_changed_in_place_unless_allowed(tmp_path, capsys, monkeypatch):
    """The same data.train path with other content (edited, replaced) is other data: refused with the file
    named, nothing rewritten; resume_allow=[data.train] records it in resume_history.jsonl and re-stamps."""
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = ["train", "recipe=dpo_tiny", "trainer.max_steps=1", "trainer.eval_every=0", "trainer.export=false",
           "trainer.save_every=1", f"data.train=[{{path:{data}}}]", "data.eval=[]", f"output_dir={tmp_path}/runs",
           "run_name=r", f"trainer.reference_cache_dir={tmp_path}/ref"]
    code, text = run_cli(run, capsys, monkeypatch)
    assert code == 0, text[-3000:]
    run_dir = tmp_path / "runs" / "r"
    assert (run_dir / "data_stamp.json").is_file()
    data.write_text("".join(json.dumps({**r, "chosen": "other"}) + "\n" for r in rows[:12]))
    code, text = run_cli([*run, "resume=auto"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in text, text[-3000:]
    for piece in ("on other data", str(data), "1 file(s) modified", "resume_allow=[data.train]"):
        assert piece in text, text[-3000:]
    assert not (run_dir / "resume_history.jsonl").exists()
    code, text = run_cli([*run, "resume=auto", "resume_allow=[data.train]"], capsys, monkeypatch)
    assert code == 0, text[-3000:]
    history = [json.loads(line) for line in (run_dir / "resume_history.jsonl").read_text().splitlines()]
    assert [k for k in history[0]["allowed"]] == [f"data.train.files[data.train[0] {data}]"]
    code, text = run_cli([*run, "resume=auto"], capsys, monkeypatch)  # re-stamped: the same files pass now
    assert code == 0, text[-3000:]
