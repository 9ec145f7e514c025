"""``alignkit plan``: what a run would do, without loading weights.

Prints the batch accounting (groups / micro-batches / accumulation / processes, completions per
step for the online runners), the parameter count (the model is built on the ``meta`` device from
its config, so nothing is allocated), DeepSpeed's estimates of model-state memory per device for
ZeRO stages 0-3 (with and without offload), and warnings for settings that do not fit together.
Exits non-zero on errors (the compose-time checks) and on warnings marked fatal.
Left out: activation memory (it depends on sequence lengths and checkpointing; see the bench).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from alignkit.config.compose import compose
from alignkit.config.validate import grad_accum_steps, objective_from_cfg, runner_for, world_size

console = Console()


FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")


def check_attention_layout(cfg: DictConfig) -> None:
    """Compose-time rule: packed and prefix-shared rows need an attention that takes dense masks.

    Both layouts describe which tokens see which with a 4D additive mask ``[B, 1, L, L]`` and
    per-row ``position_ids``; flash-attention kernels take no such mask (transformers would drop
    it or fail on the GPU), so those combinations are refused here rather than mixing sequences
    silently. ``sdpa``/``eager`` run the dense masks and are what the log-prob equality tests cover.
    """
    from alignkit.errors import ConfigError

    layout, attn = str(cfg.data.layout), str(cfg.model.attn_implementation)
    if layout in ("packed", "prefix_shared") and attn in FLASH_ATTENTION:
        raise ConfigError(
            f"data.layout={layout} needs dense 4D attention masks, which model.attn_implementation={attn} does not "
            "take. Use model.attn_implementation=sdpa (the default) with this layout, or data.layout=padded "
            "with flash attention.")


def check_scale_rules(cfg: DictConfig) -> None:
    """The compose-time checks of settings that only break at scale or on a GPU (called by ``validate``)."""
    from alignkit.losses.unpaired import check_kl_pairs_config

    check_attention_layout(cfg)
    check_kl_pairs_config(cfg)


def count_parameters(cfg: DictConfig) -> tuple[int, int]:
    """(total parameters, largest layer's parameters) from the model's config on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name = str(cfg.model.name_or_path)
    if name == "tiny":
        from alignkit.models.load import load_tokenizer
        from alignkit.models.tiny import tiny_llama_config

        config = tiny_llama_config(OmegaConf.to_object(cfg.model).tiny, load_tokenizer("tiny"))
    elif name == "smollm2":
        from alignkit.models.smollm2 import smollm2_dir

        config = AutoConfig.from_pretrained(smollm2_dir())
    else:
        config = AutoConfig.from_pretrained(name, trust_remote_code=bool(cfg.model.trust_remote_code))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def memory_estimates(total: int, largest: int, gpus: int, nodes: int) -> list[tuple[str, float, float]]:
    """(setting, per-device GiB, per-node CPU GiB) from DeepSpeed's model-state estimators."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gib = 2**30
    rows = [("zero0/1 (no sharding of params)", 18 * total / gib, 0.0)]  # fp16/bf16 params+grads, fp32 Adam
    for offload in (False, True):
        cpu, dev = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=offload)
        rows.append((f"zero2{' + optimizer offload' if offload else ''}", dev / gib, cpu / gib))
    for offload, params in ((False, False), (True, False), (True, True)):
        cpu, dev, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=offload,
                                                            cpu_offload_params=params)
        label = "zero3" + (" + optimizer offload" if offload else "") + (" + param offload" if params else "")
        rows.append((label, dev / gib, cpu / gib))
    return rows


def print_plan(overrides: list[str]) -> int:
    cfg = compose(overrides)
    runner = runner_for(cfg)
    objective = objective_from_cfg(cfg.loss)
    t = cfg.trainer
    world = world_size(cfg)
    console.print(f"[bold]recipe[/] {cfg.recipe}  [bold]runner[/] {runner}  [bold]loss[/] {cfg.loss.name}  "
                  f"[bold]model[/] {cfg.model.name_or_path}  [bold]deepspeed[/] zero{cfg.deepspeed.zero_stage}")
    unit = "prompts" if runner in ("grpo", "ppo", "online_dpo") else "groups"
    console.print(f"[bold]batch[/]: {t.batch_size} {unit}/optimizer step = {t.micro_batch_size} per micro-batch x "
                  f"{grad_accum_steps(cfg)} accumulation step(s) x {world} process(es)")
    if unit == "prompts":
        console.print(f"  completions/step = {t.batch_size} x {cfg.rl.num_generations} = "
                      f"{t.batch_size * cfg.rl.num_generations}; {cfg.rl.ppo_epochs} optimizer step(s) per batch")
    warnings = _warnings(cfg, runner, objective)
    try:
        total, largest = count_parameters(cfg)
    except Exception as exc:  # noqa: BLE001 - a plan without the count is still useful
        console.print(f"[yellow]parameters[/]: unknown ({exc.__class__.__name__}: {str(exc).splitlines()[0]})")
    else:
        console.print(f"[bold]parameters[/]: {total / 1e6:,.1f} M (largest layer {largest / 1e6:,.1f} M)")
        table = Table("setting", "model states / device (GiB)", "CPU / node (GiB)",
                      title=f"DeepSpeed estimates for {cfg.launcher.nproc_per_node} device(s) x {cfg.launcher.nnodes} node(s)")
        for label, dev, cpu in memory_estimates(total, largest, int(cfg.launcher.nproc_per_node), int(cfg.launcher.nnodes)):
            table.add_row(label, f"{dev:,.2f}", f"{cpu:,.2f}")
        console.print(table)
        if objective.needs_reference and cfg.trainer.reference in ("separate", "auto") and int(cfg.model.lora.r) == 0:
            console.print("  a separate reference model adds its parameters again "
                          "(trainer.reference=precomputed holds none during training)")
    for text in warnings:
        console.print(f"[yellow]warning[/]: {text}")
    return 0


def _warnings(cfg: DictConfig, runner: str, objective) -> list[str]:
    out = []
    if cfg.deepspeed.offload_params != "none" and int(cfg.deepspeed.zero_stage) != 3:
        out.append("deepspeed.offload_params needs zero_stage=3; it is ignored otherwise.")
    if not torch.cuda.is_available() and cfg.deepspeed.dtype in ("bf16", "fp16"):
        out.append(f"deepspeed.dtype={cfg.deepspeed.dtype} on a CPU: bf16 matmul is far slower than fp32 here.")
    if cfg.data.layout == "prefix_shared" and runner == "sft":
        out.append("data.layout=prefix_shared gains nothing for SFT (K=1); use packed.")
    if runner == "grpo" and int(cfg.rl.num_generations) < 2:
        out.append("rl.num_generations < 2: group-relative advantages are all zero.")
    return out
