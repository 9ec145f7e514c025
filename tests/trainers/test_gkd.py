"""GKD (``runner=gkd``) end to end on the tiny model: the compose-time rules, a teacher with another
vocabulary refused before the first step, the on-policy coin, and that training brings the student
towards a differently seeded teacher (held-out JSD falls) and exports a model transformers loads."""

import json
from pathlib import Path

import pytest

from alignkit.config.compose import compose
from alignkit.errors import ConfigError
from alignkit.run import train_from_overrides


def _rows(run_dir: Path, split: str) -> list[dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r.get("split", "train") == split]


@pytest.mark.parametrize("overrides, match", [
    (["recipe=sft_tiny", "loss=gkd", "runner=sft"], "trained by runner=gkd only"),
    (["recipe=gkd_tiny", "loss=sft"], "runner=gkd trains loss=gkd alone"),
    (["recipe=gkd_tiny", "rl.lmbda=1.5"], r"rl.lmbda=1.5 must lie in \[0, 1\]"),
    (["recipe=gkd_tiny", "loss.beta=2"], "beta=2"),
    (["recipe=gkd_tiny", "loss.temperature=0"], "temperature=0"),
    (["recipe=gkd_tiny", "deepspeed.zero_stage=3"], "zero_stage=3"),
    (["recipe=gkd_tiny", "generation.engine=vllm"], "generation.engine=vllm"),
    (["recipe=gkd_tiny", "rl.teacher=smollm2"], "rl.teacher_seed=1 seeds a tiny teacher"),
    (["recipe=sft_tiny", "rl.teacher=tiny"], "read by runner=gkd only"),
    (["recipe=sft_tiny", "rl.lmbda=0.2"], "read by runner=gkd only"),
])
def test_bad_gkd_config_fails_at_compose_time(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose(overrides)


def test_gkd_defaults_follow_trl():
    cfg = compose(["recipe=gkd_tiny"])
    assert (cfg.rl.lmbda, cfg.rl.seq_kd, cfg.generation.temperature) == (0.5, False, 0.9)
    from alignkit.losses import resolve_loss

    assert resolve_loss("gkd").hparams() == {"beta": 0.5, "temperature": 1.0}


def test_a_teacher_with_another_vocabulary_stops_before_the_first_step(tmp_path, monkeypatch):
    from alignkit.trainers import gkd

    real = gkd.check_same_vocabulary

    def smaller_teacher(student, student_tok, teacher, teacher_tok, *names):
        teacher.resize_token_embeddings(teacher.get_output_embeddings().weight.shape[0] - 8)
        return real(student, student_tok, teacher, teacher_tok, *names)

    monkeypatch.setattr(gkd, "check_same_vocabulary", smaller_teacher)
    with pytest.raises(ConfigError, match="has a vocabulary of 1016 logits, the student .* 1024") as error:
        train_from_overrides(["recipe=gkd_tiny", "trainer.max_steps=1", f"output_dir={tmp_path}", "run_name=v"])
    assert "Use a teacher with the student's tokenizer" in str(error.value)
    metrics = tmp_path / "v" / "metrics.jsonl"
    assert not metrics.exists() or not _rows(tmp_path / "v", "train")  # no step ran


def test_gkd_tiny_trains_the_student_towards_the_teacher_and_exports(tmp_path):
    """lmbda=0.5: both kinds of steps in 4; the held-out JSD (the data's completions) falls; final/ loads."""
    assert train_from_overrides(["recipe=gkd_tiny", "trainer.max_steps=4", "trainer.eval_every=4",
                                 "generation.max_new_tokens=8", f"output_dir={tmp_path}", "run_name=run",
                                 "logger.backends=[jsonl]"]) == 0
    run_dir = tmp_path / "run"
    train, evals = _rows(run_dir, "train"), _rows(run_dir, "eval")
    assert all(r["loss"] == r["loss"] and r["loss"] >= 0 for r in train), train
    assert {r["on_policy"] for r in train} == {0.0, 1.0}, train  # seeded coin: both kinds of step happen
    assert all("response_length" in r for r in train if r["on_policy"] == 1.0)
    first, last = evals[0]["jsd"], evals[-1]["jsd"]
    assert last < 0.95 * first, evals  # measured: 0.00632 -> 0.00503 over 4 steps (lr 1e-3)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert model.config.vocab_size > 0


def test_the_on_policy_coin_follows_lmbda():
    from types import SimpleNamespace

    from alignkit.trainers.gkd import on_policy_step

    def share(lmbda):
        run = SimpleNamespace(trainer=SimpleNamespace(seed=0), rl=SimpleNamespace(lmbda=lmbda))
        return sum(on_policy_step(run, s) for s in range(1, 2001)) / 2000

    assert share(0.0) == 0.0 and share(1.0) == 1.0
    assert share(0.5) == pytest.approx(0.5, abs=0.04) and share(0.2) == pytest.approx(0.2, abs=0.04)


def test_seq_kd_samples_from_the_teacher_and_self_distillation_starts_at_zero(tmp_path):
    """rl.seq_kd with lmbda=0: every step trains on the teacher's samples; with the teacher = the starting
    student (no rl.teacher_seed) the first step's JSD is 0 (same positions, same logits)."""
    common = ["recipe=gkd_tiny", "trainer.max_steps=2", "trainer.eval_every=0", "trainer.export=false",
              "generation.max_new_tokens=6", f"output_dir={tmp_path}", "logger.backends=[jsonl]"]
    assert train_from_overrides([*common, "rl.seq_kd=true", "rl.lmbda=0.0", "run_name=seq"]) == 0
    rows = _rows(tmp_path / "seq", "train")
    assert [r["on_policy"] for r in rows] == [0.0, 0.0] and all(r["response_length"] > 0 for r in rows), rows
    assert rows[0]["jsd"] > 1e-4  # another teacher: a divergence to learn from
    assert train_from_overrides([*common, "rl.teacher_seed=null", "rl.lmbda=1.0", "run_name=self"]) == 0
    first = _rows(tmp_path / "self", "train")[0]
    assert first["on_policy"] == 1.0 and abs(first["jsd"]) < 1e-6, first
