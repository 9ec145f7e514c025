"""Same learning: the fast path (prefix-shared rows, precomputed reference log-probs) and the plain
path (one padded row per sequence, a separate frozen reference) train the same 50-step DPO run.

Both compute the same log-probs up to float rounding (tests/models/test_logprobs.py checks each
layout against the plain one), so the two runs' per-step losses and held-out accuracy must agree;
the tolerance (1e-4 relative; 1.5e-6 measured on this fixture) allows rounding differences to grow over 50 Adam steps.

The pairs are this file's own seeded fixture (``_write_pairs``), not the demo data: the test is about
the two paths learning alike, and needs a preference a random tiny model can learn in 50 steps. The
issue-16 demo pairs mostly differ only in *which* fact the reply quotes (chosen: the asked one;
rejected: another or a made-up one, same shape), which a random 2-layer model cannot separate in 50
steps (held-out accuracy 0.53 there, chance 0.5). Here the chosen reply shows the sum then the tagged
answer, the rejected one is an untagged, unsure guess of varying length: a held-out pair is told
apart by the reply's shape, with new numbers in every prompt (held-out accuracy 1.0 at steps 25 and
50 on both paths; 8 s for both runs on the 2-core Xeon)."""

import json
import random
from pathlib import Path

import pytest

from alignkit.run import train_from_overrides

COMMON = ["recipe=dpo_tiny", "trainer.max_steps=50", "trainer.eval_every=25", "trainer.max_eval_groups=64",
          "trainer.lr=3e-4", "trainer.export=false"]
HEDGES = ("I am not sure, maybe {n}.", "Hard to say. It could be {n}, or something else entirely, I would guess.",
          "Perhaps {n}?", "My guess is {n}, but please check it yourself before you rely on it.")


def _write_pairs(path: Path, count: int, seed: int) -> Path:
    """``count`` conversational {prompt, chosen, rejected} pairs (the demo data's schema), seeded."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(count):
            a, b = rng.randint(1, 49), rng.randint(1, 49)
            wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
            row = {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                   "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}. Answer: {a + b}"}],
                   "rejected": [{"role": "assistant", "content": rng.choice(HEDGES).format(n=wrong)}]}
            out.write(json.dumps(row) + "\n")
    return path


def _rows(run_dir: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.mark.slow
def test_fast_and_plain_paths_learn_the_same(tmp_path):
    train, held_out = _write_pairs(tmp_path / "train.jsonl", 400, 0), _write_pairs(tmp_path / "eval.jsonl", 64, 1)
    data = [f"data.train=[{{path:{train}}}]", f"data.eval=[{{path:{held_out}}}]"]
    fast = ["data.layout=prefix_shared", "trainer.reference=precomputed", f"trainer.reference_cache_dir={tmp_path / 'ref'}"]
    plain = ["data.layout=padded", "trainer.reference=separate"]
    for name, switches in (("fast", fast), ("plain", plain)):
        assert train_from_overrides([*COMMON, *data, *switches, f"output_dir={tmp_path}", f"run_name={name}"]) == 0
    fast_train, plain_train = _rows(tmp_path / "fast", "train"), _rows(tmp_path / "plain", "train")
    assert len(fast_train) == len(plain_train) == 50
    assert [r["loss"] for r in fast_train] == pytest.approx([r["loss"] for r in plain_train], rel=1e-4, abs=1e-6)  # measured: 1.5e-6 at most
    fast_eval, plain_eval = _rows(tmp_path / "fast", "eval"), _rows(tmp_path / "plain", "eval")
    assert [r["step"] for r in fast_eval] == [0, 25, 50]
    assert [r["rewards/accuracy"] for r in fast_eval[1:]] == [r["rewards/accuracy"] for r in plain_eval[1:]]
    assert fast_eval[-1]["rewards/accuracy"] >= 0.9  # and the run did learn: held-out pairs, chance 0.5; measured 1.0
