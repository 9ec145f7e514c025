"""Scale-dependent bugs of KTO, PPO and online DPO, checked on the tiny model.

* KTO's KL reference point is estimated over the whole optimizer step (every micro-batch and
  rank), so the loss does not depend on ``trainer.micro_batch_size``; at ``micro_batch_size=1``
  it is not stuck at 0.5 (the old per-micro-batch rotation paired each example with itself).
* PPO whitens advantages over the rollout batch, so they do not depend on ``micro_batch_size``.
* Online DPO with LoRA moves its reference to the current policy between rounds.
"""

import json
from pathlib import Path

import pytest

from alignkit.run import train_from_overrides


def _train_rows(run_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split", "train") == split]


def _kto(tmp_path: Path, micro: int) -> Path:
    name = f"kto_micro{micro}"
    assert train_from_overrides(["recipe=kto_tiny", "trainer.max_steps=3", "trainer.batch_size=4",
                                 f"trainer.micro_batch_size={micro}", "trainer.export=false",
                                 "trainer.eval_every=3", "trainer.eval_batch_size=1",
                                 f"output_dir={tmp_path}", f"run_name={name}"]) == 0
    return tmp_path / name


def test_kto_loss_does_not_depend_on_micro_batch_size_and_is_not_degenerate(tmp_path):
    one, four = _train_rows(_kto(tmp_path, 1)), _train_rows(_kto(tmp_path, 4))
    assert [r["step"] for r in one] == [1, 2, 3]
    for a, b in zip(one, four):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-4)  # padding changes rounding only
    # step 1: policy == reference, so h = z0 = 0 and the loss is 0.5 whatever the pairs; afterwards the
    # old per-micro-batch estimate at micro 1 gave z0 = h and exactly 0.5 again
    assert one[0]["loss"] == pytest.approx(0.5, abs=1e-7)
    assert all(abs(r["loss"] - 0.5) > 1e-4 for r in one[1:]), [r["loss"] for r in one]
    evals = _train_rows(tmp_path / "kto_micro1", "eval")
    assert abs(evals[-1]["loss"] - 0.5) > 1e-4  # eval_batch_size=1: one estimate over the held-out set


def test_kto_with_one_example_per_step_is_refused_at_compose_time():
    from alignkit.config.compose import compose
    from alignkit.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_size >= 2"):
        compose(["recipe=kto_tiny", "trainer.batch_size=1", "trainer.micro_batch_size=1"])


def _ppo_advantages(tmp_path: Path, micro: int, monkeypatch) -> list[list[float]]:
    """Per step, the advantages the PPO loss receives, in sample order (first PPO epoch)."""
    import alignkit.trainers.ppo as ppo

    seen: list[list[float]] = []
    real = ppo.loss_terms

    def recording_terms(loss_cfg):
        (spec, weight, hparams), *rest = real(loss_cfg)

        def fn(inputs, **hp):
            seen.append(inputs.advantages[inputs.mask.bool()].tolist())
            return spec.fn(inputs, **hp)

        class Spec:
            pass

        wrapped = Spec()
        wrapped.fn = fn
        return [(wrapped, weight, hparams), *rest]

    monkeypatch.setattr(ppo, "loss_terms", recording_terms)
    assert train_from_overrides(["recipe=ppo_tiny", "trainer.max_steps=2", "trainer.batch_size=4",
                                 f"trainer.micro_batch_size={micro}", "rl.ppo_epochs=1", "trainer.eval_every=0",
                                 "generation.max_new_tokens=8", "trainer.export=false",
                                 f"output_dir={tmp_path}", f"run_name=ppo{micro}"]) == 0
    per_step = 4 // micro
    return [sum(seen[i : i + per_step], []) for i in range(0, len(seen), per_step)]


def test_ppo_whitens_advantages_over_the_rollout_batch(tmp_path, monkeypatch):
    one = _ppo_advantages(tmp_path, 1, monkeypatch)
    four = _ppo_advantages(tmp_path, 4, monkeypatch)
    assert len(one) == len(four) == 2
    for a, b in zip(one, four):
        assert len(a) == len(b) > 4
        assert a == pytest.approx(b, abs=1e-4)
        mean = sum(b) / len(b)
        var = sum((x - mean) ** 2 for x in b) / (len(b) - 1)
        assert mean == pytest.approx(0.0, abs=1e-5) and var == pytest.approx(1.0, abs=1e-4)


def test_whiten_batch_equals_whiten_of_the_whole_batch():
    import torch

    from alignkit.rl.advantages import whiten, whiten_batch

    torch.manual_seed(0)
    x, mask = torch.randn(6, 9), torch.rand(6, 9) > 0.3
    parts = whiten_batch([x[:1, :5], x[1:4], x[4:, :7]], [mask[:1, :5], mask[1:4], mask[4:, :7]])
    got = torch.cat([parts[0].flatten(), parts[1].flatten(), parts[2].flatten()])
    keep = torch.cat([mask[:1, :5].flatten(), mask[1:4].flatten(), mask[4:, :7].flatten()])
    # compare on the kept entries of the cut tensors against whitening those same entries at once
    values = torch.cat([x[:1, :5].flatten(), x[1:4].flatten(), x[4:, :7].flatten()])
    torch.testing.assert_close(got[keep], whiten(values, keep)[keep])
    first = mask[:1, :5]
    assert not torch.allclose(whiten(x[:1, :5], first)[first], parts[0][first])  # per-part whitening differs


def test_online_dpo_lora_reference_moves_to_the_policy_each_round(tmp_path, monkeypatch):
    import torch

    import alignkit.trainers.online_dpo as online

    batches, checks = [], []
    real_logps, real_sync = online.sequence_logps, online.sync_reference

    def recording_logps(policy, reference, batch, *args, **kwargs):
        batches.append(batch)
        return real_logps(policy, reference, batch, *args, **kwargs)

    def checking_sync(reference, policy):
        batch = batches[-1]
        before, _ = reference.logps(batch)
        real_sync(reference, policy)
        after, _ = reference.logps(batch)
        with torch.no_grad():
            from alignkit.data.batch import sum_per_slot
            from alignkit.models.logprobs import forward_logps

            current = sum_per_slot(forward_logps(policy, batch)["logps"].float(), batch)
        checks.append((before, after, current))

    monkeypatch.setattr(online, "sequence_logps", recording_logps)
    monkeypatch.setattr(online, "sync_reference", checking_sync)
    assert train_from_overrides(["recipe=online_dpo_tiny", "trainer.max_steps=4", "rl.rounds=2",
                                 "model.lora.r=8", "trainer.lr=0.01", "trainer.eval_every=0",
                                 "generation.max_new_tokens=8", "trainer.export=false",
                                 f"output_dir={tmp_path}", "run_name=odpo"]) == 0
    assert len(checks) == 1  # one round boundary (before step 3)
    before, after, current = checks[0]
    assert (after - before).abs().max() > 1e-3  # the reference moved ...
    torch.testing.assert_close(after, current, atol=1e-5, rtol=0)  # ... to the current policy


@pytest.mark.slow
@pytest.mark.distributed
def test_kto_two_processes_match_one_process(tmp_path):
    """The step's KL estimate is summed over ranks: 2 processes (micro 2 each) follow 1 process (micro 2 x 2
    accumulation). Without the all-reduce each rank would use its own half of the pairs."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    common = ["recipe=kto_tiny", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.export=false",
              f"output_dir={tmp_path}"]
    for name, extra in (("one", []), ("two", ["-g", "2"])):
        proc = subprocess.run([sys.executable, "-m", "alignkit", "train", *extra, *common, f"run_name={name}"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-6)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert one[-1]["kl"] > 0
