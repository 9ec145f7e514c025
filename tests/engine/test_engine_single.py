"""One-process DeepSpeed engines: training equals a plain PyTorch loop; frozen engines; the LR schedule."""

import math

import pytest
import torch
from engine_tiny import micro_batch, tiny_model
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from alignkit.engine.config import DeepSpeedConfig, build_frozen_ds_config, build_train_ds_config
from alignkit.engine.engine import (
    init_frozen_engine,
    init_train_engine,
    lr_multiplier,
    setup_distributed,
    shm_buffer_path,
)
from alignkit.errors import ConfigError

LR, WD, WARMUP, STEPS, MICRO, ACCUM, CLIP = 1e-2, 0.1, 1, 4, 2, 2, 0.5


@pytest.fixture(scope="module", autouse=True)
def dist():
    torch.set_num_threads(1)
    return setup_distributed()


@pytest.mark.parametrize(
    "name, reference",
    [
        ("constant", lambda opt: get_constant_schedule_with_warmup(opt, 3)),
        ("linear", lambda opt: get_linear_schedule_with_warmup(opt, 3, 10)),
        ("cosine", lambda opt: get_cosine_schedule_with_warmup(opt, 3, 10)),
    ],
)
def test_lr_multiplier_matches_transformers_schedules(name, reference):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = reference(opt)
    for step in range(11):
        assert lr_multiplier(step, warmup_steps=3, total_steps=10, scheduler=name) == pytest.approx(
            opt.param_groups[0]["lr"], abs=1e-12
        )
        opt.step()
        sched.step()


def test_unknown_scheduler_is_config_error():
    with pytest.raises(ConfigError, match="constant, linear, cosine"):
        lr_multiplier(5, warmup_steps=0, total_steps=10, scheduler="poly")


def test_one_scheduler_table():
    """The compose-time check and the schedule read the same table, and every name in it is implemented."""
    from alignkit.config import schema, validate
    from alignkit.engine import engine

    assert validate.SCHEDULERS is engine.SCHEDULERS and not hasattr(schema, "SCHEDULERS")
    for name in engine.SCHEDULERS:
        lr_multiplier(5, warmup_steps=0, total_steps=10, scheduler=name)


def plain_pytorch_run():
    """The same training written without DeepSpeed: AdamW, decay on non-norm weights, clipping, warmup+cosine."""
    model = tiny_model()
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}], lr=LR
    )
    sched = get_cosine_schedule_with_warmup(opt, WARMUP, STEPS)
    losses = []
    for step in range(STEPS):
        total = 0.0
        for a in range(ACCUM):
            ids = micro_batch(step, a, MICRO, ACCUM)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / ACCUM).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total / ACCUM)
    return losses, model.state_dict()


@pytest.mark.parametrize(
    "stage, offload",
    [
        (0, "none"),
        (1, "none"),
        (2, "none"),
        (3, "none"),
        # DeepSpeedCPUAdam: JIT-compiles DeepSpeed's cpu_adam op on first use (minutes on 2 cores)
        pytest.param(2, "cpu", marks=pytest.mark.slow),
    ],
)
def test_train_engine_equals_plain_pytorch_loop(stage, offload):
    ds_config = build_train_ds_config(
        DeepSpeedConfig(zero_stage=stage, offload_optimizer=offload, dtype="fp32", gradient_clipping=CLIP),
        micro_batch_size=MICRO,
        grad_accum_steps=ACCUM,
        world_size=1,
    )
    engine = init_train_engine(
        tiny_model(),
        ds_config,
        lr=LR,
        weight_decay=WD,
        warmup_steps=WARMUP,
        total_steps=STEPS,
        scheduler="cosine",
    )
    assert next(engine.module.parameters()).dtype is torch.float32
    losses = []
    for step in range(STEPS):
        total = 0.0
        for a in range(ACCUM):
            ids = micro_batch(step, a, MICRO, ACCUM)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            total += loss.item()
        losses.append(total / ACCUM)
    assert engine.get_lr()[0] == pytest.approx(
        LR * 0.5 * (1 + math.cos(math.pi * (STEPS - WARMUP) / (STEPS - WARMUP)))
    )

    expected_losses, expected_state = plain_pytorch_run()
    assert losses == pytest.approx(expected_losses, abs=1e-5)
    assert losses[-1] < losses[0] - 0.01  # it learned something, so the comparison is not vacuous
    from alignkit.engine.export import gathered_cpu_copy

    got_state = gathered_cpu_copy(engine.module).state_dict()
    for name, value in expected_state.items():
        torch.testing.assert_close(got_state[name], value, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("stage, offload_params", [(0, "none"), (3, "none"), (3, "cpu")])
def test_frozen_engine_matches_module_and_has_no_grads(stage, offload_params):
    ids = micro_batch(0, 0, 2, 1)
    with torch.no_grad():
        expected = tiny_model()(input_ids=ids).logits
    cfg = DeepSpeedConfig(zero_stage=stage, offload_params=offload_params, dtype="fp32")
    engine = init_frozen_engine(tiny_model(), build_frozen_ds_config(cfg))
    assert not engine.module.training
    assert not any(p.requires_grad for p in engine.module.parameters())
    with torch.no_grad():
        got = engine(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    if stage == 3:  # sharded: the module's own parameters are empty placeholders between forwards
        assert all(p.numel() == 0 for p in engine.module.parameters())


def test_deepspeed_shared_memory_file_is_not_left_behind(dist):
    """DeepSpeed's CPU all-reduce maps a ~67 MB /dev/shm file per rank and never deletes it."""
    from deepspeed.comm import comm as ds_comm

    if torch.cuda.is_available():
        pytest.skip("the shared-memory all-reduce is the CPU backend's")
    assert ds_comm.cdb.shm_comm_op is not None  # the op is built and initialised in this process
    assert not shm_buffer_path(dist.rank).exists()
