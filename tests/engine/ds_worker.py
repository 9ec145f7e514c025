"""Test worker: train the tiny Llama N steps on fixed data through alignkit.engine, report losses.

Runs as a plain process (world of 1) or under the DeepSpeed launcher (``-m ds_worker`` with this
folder on PYTHONPATH). Every optimizer step consumes the same global batch of
``micro * accum * world`` rows, split by (rank, accumulation index), so runs with different world
sizes but the same global batch follow the same math. Writes ``--out`` (JSON: the mean loss of
each step over the global batch, and the LR) and ``--out``.safetensors (final full weights, rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import engine_tiny
import torch

from alignkit.engine.checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
from alignkit.engine.config import DeepSpeedConfig, build_train_ds_config
from alignkit.engine.engine import init_train_engine, setup_distributed, shutdown_distributed
from alignkit.engine.export import export_hf_model, gathered_cpu_copy


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--kill-after", type=int, default=0, help="SIGKILL itself right after step k")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--export", default=None)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    info = setup_distributed()
    torch.manual_seed(1234 + info.rank)  # the trainer's seeding; dropout draws from this RNG
    cfg = DeepSpeedConfig(zero_stage=args.stage, dtype="fp32")
    ds_config = build_train_ds_config(
        cfg, micro_batch_size=args.micro, grad_accum_steps=args.accum, world_size=info.world_size
    )
    engine = init_train_engine(
        engine_tiny.tiny_model(dropout=args.dropout),
        ds_config,
        lr=args.lr,
        weight_decay=0.01,
        warmup_steps=1,
        total_steps=args.steps,
        scheduler="cosine",
    )
    start = 0
    checkpoint = find_resume_checkpoint(args.run_dir, args.resume) if args.run_dir else None
    if checkpoint is not None:
        start = load_checkpoint(engine, checkpoint)["step"]

    n_micro = args.accum * info.world_size
    losses, lrs = {}, {}
    for step in range(start, args.steps):
        total = torch.zeros(())
        for a in range(args.accum):
            ids = engine_tiny.micro_batch(step, info.rank * args.accum + a, args.micro, n_micro)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        torch.distributed.all_reduce(total)
        losses[step + 1] = total.item() / n_micro
        lrs[step + 1] = engine.get_lr()[0]
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(engine, args.run_dir, step + 1, {"step": step + 1}, keep_last=2)
        if args.kill_after == step + 1:
            os.kill(os.getpid(), signal.SIGKILL)

    weights = gathered_cpu_copy(engine.module)
    if args.export:
        export_hf_model(engine, None, args.export)
    if info.rank == 0:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in weights.state_dict().items() if k != "lm_head.weight"}
        save_file(state, args.out + ".safetensors")
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "lrs": lrs, "world_size": info.world_size}, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
