"""``deepspeed.optimizer_in_backward``: the same training run, without ever holding every gradient."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.run import train_from_overrides

COMMON = ["recipe=dpo_tiny", "trainer.max_steps=4", "trainer.batch_size=2", "trainer.micro_batch_size=2",
          "trainer.eval_every=0", "trainer.export=false", "trainer.lr=3e-4", "deepspeed.gradient_clipping=0"]


def _losses(run_dir) -> list[float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if r["split"] == "train"]


def test_same_losses_as_the_plain_step(tmp_path, monkeypatch):
    """Losses after the first step depend on every earlier update: equal losses = equal updates."""
    import alignkit.engine.engine as engine

    hooked, original = [], engine.step_in_backward
    monkeypatch.setattr(engine, "step_in_backward", lambda opt: hooked.append(opt) or original(opt))
    for name, switch in (("plain", "false"), ("in_backward", "true")):
        code = train_from_overrides([*COMMON, f"deepspeed.optimizer_in_backward={switch}", f"output_dir={tmp_path}",
                                     f"run_name={name}", f"trainer.reference_cache_dir={tmp_path}/ref"])
        assert code == 0
        assert len(hooked) == (switch == "true")
    plain, in_backward = _losses(tmp_path / "plain"), _losses(tmp_path / "in_backward")
    assert len(plain) == 4 and plain[0] != plain[-1]
    assert in_backward == plain  # the same fused AdamW kernel on the same tensors: bit-identical


def test_gradients_are_freed_during_backward(monkeypatch):
    from alignkit.engine.engine import setup_distributed, step_in_backward

    setup_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    step_in_backward(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    model[0].weight.register_post_accumulate_grad_hook(lambda p: seen.append(sum(q.grad is not None for q in model.parameters())))
    model(torch.randn(3, 4)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert seen and max(seen) <= 1  # never more than the parameter being updated holds a gradient


@pytest.mark.parametrize("overrides, expected", [
    (["deepspeed.gradient_clipping=1.0"], "gradient_clipping=0"),
    (["trainer.batch_size=4"], "no gradient accumulation"),
    (["deepspeed=zero2"], "zero_stage 0"),
])
def test_incompatible_settings_fail_at_compose_time(overrides, expected):
    from alignkit.config.compose import compose

    with pytest.raises(ConfigError, match=expected):
        compose([*COMMON, "deepspeed.optimizer_in_backward=true", *overrides])
