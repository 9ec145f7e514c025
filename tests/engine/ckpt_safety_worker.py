"""Test worker (2 processes under the DeepSpeed launcher): damaged-checkpoint fallback and NaN refusal agree across ranks.

Saves step-1 and step-2, truncates rank 1's part of step-2, then a fresh engine's
``resume_checkpoint(resume=auto)`` must pick step-1 on both ranks with step-1's weights; a NaN in
rank 1's shard only must make ``save_checkpoint`` raise ``NonFiniteWeights`` on both ranks.
Rank 0 writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import engine_tiny
import torch

from alignkit.engine import checkpoint as ckpt
from alignkit.engine.config import DeepSpeedConfig, build_train_ds_config
from alignkit.engine.engine import init_train_engine, setup_distributed, shutdown_distributed
from alignkit.engine.export import gathered_cpu_copy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = setup_distributed()
    ds = build_train_ds_config(DeepSpeedConfig(zero_stage=args.stage, dtype="fp32"), micro_batch_size=2,
                               grad_accum_steps=1, world_size=info.world_size)

    def engine():
        return init_train_engine(engine_tiny.tiny_model(), ds, lr=1e-2, warmup_steps=1, total_steps=4,
                                 scheduler="linear")

    def step(e, s):
        ids = engine_tiny.micro_batch(s, info.rank, 2, info.world_size)
        e.backward(e(input_ids=ids, labels=ids).loss)
        e.step()

    first = engine()
    step(first, 0)
    ckpt.save_checkpoint(first, args.run_dir, 1, {"step": 1}, keep_last=0)
    copy = gathered_cpu_copy(first.module)  # a collective; the copy exists on rank 0
    good = {k: v.clone() for k, v in copy.state_dict().items()} if copy is not None else {}
    step(first, 1)
    latest = ckpt.save_checkpoint(first, args.run_dir, 2, {"step": 2}, keep_last=0)
    if info.rank == 0:
        victim = sorted(latest.glob("*rank_1*optim_states.pt"))[0]
        victim.write_bytes(victim.read_bytes()[:100])
    torch.distributed.barrier()

    said: list[str] = []
    fresh = engine()
    path, state = ckpt.resume_checkpoint(fresh, args.run_dir, "auto", say=said.append)
    copy = gathered_cpu_copy(fresh.module)
    same = copy is not None and all(torch.equal(copy.state_dict()[k], v) for k, v in good.items())

    with torch.no_grad():
        if info.rank == 1:
            param = next(p for p in fresh.module.parameters() if p.requires_grad)
            values = getattr(param, "ds_tensor", param)
            values.view(-1)[0] = float("nan")
    refused = ""
    try:
        ckpt.save_checkpoint(fresh, args.run_dir, 5, {"step": 5}, keep_last=0)
    except ckpt.NonFiniteWeights as error:
        refused = str(error)
    flags = torch.tensor([1.0 if refused else 0.0])
    torch.distributed.all_reduce(flags)
    if info.rank == 0:
        Path(args.out).write_text(json.dumps({"path": str(path), "state": state, "said": said, "same": same,
                                              "refused": refused, "refused_on": flags.item(),
                                              "step5": (Path(args.run_dir) / "checkpoints" / "step-5").exists()}))
    shutdown_distributed()


if __name__ == "__main__":
    main()
