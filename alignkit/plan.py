"""``alignkit plan``: what a run would do, without loading weights.

Prints the batch accounting (groups / micro-batches / accumulation / processes, completions per
step for the online runners), the parameter count (the model is built on the ``meta`` device from
its config, so nothing is allocated; known hub models whose config is public ship it in
``alignkit/assets/`` so the count works offline), the model-state memory per device for ZeRO
stages 0, 1, 2 and 3 (the ZeRO paper's accounting: ZeRO-1 shards the optimizer states, ZeRO-2 also
the gradients, ZeRO-3 also the parameters) plus DeepSpeed's own estimators for the offload
variants, a rough activation estimate per micro-batch, and warnings for settings that do not fit
together. Exits non-zero on errors (the compose-time checks, e.g. ``check_scale_rules``).
Left out: allocator fragmentation, communication buffers and temporary tensors (the bench measures
real peaks); the activation estimate assumes a Llama-style block with SDPA (no score matrix).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from alignkit.config.compose import compose
from alignkit.config.validate import grad_accum_steps, objective_from_cfg, runner_for, world_size
from alignkit.losses.runners import is_online

console = Console()


DENSE_MASK_ATTENTION = ("sdpa", "eager")  # the attentions that take packed rows' dense 4D masks (tested)


def check_attention_layout(cfg: DictConfig) -> None:
    """Compose-time rule: packed and prefix-shared rows need an attention that takes dense masks.

    Both layouts describe which tokens see which with a 4D additive mask ``[B, 1, L, L]`` and
    per-row ``position_ids``; flash-attention kernels take no such mask (transformers would drop
    it or fail on the GPU), and ``flex_attention`` with such a mask crashed on the CPU here (torch
    2.13: "double free or corruption" in the packed forward), so those combinations are refused
    rather than mixing sequences silently. ``sdpa``/``eager`` run the dense masks and are what the
    log-prob equality tests (and ``scripts/gpu_check.sh``) cover.
    """
    from alignkit.errors import ConfigError

    layout, attn = str(cfg.data.layout), str(cfg.model.attn_implementation)
    if layout in ("packed", "prefix_shared") and attn not in DENSE_MASK_ATTENTION:
        raise ConfigError(
            f"data.layout={layout} needs dense 4D attention masks, which model.attn_implementation={attn} does not "
            "take here. Use model.attn_implementation=sdpa (the default) or eager with this layout, or "
            "data.layout=padded with flash attention.")


def check_scale_rules(cfg: DictConfig) -> None:
    """The compose-time checks of settings that only break at scale or on a GPU (called by ``validate``)."""
    from alignkit.losses.unpaired import check_kl_pairs_config

    check_attention_layout(cfg)
    check_kl_pairs_config(cfg)


# hub ids whose public config.json ships in alignkit/assets (same shapes for base and instruct)
KNOWN_CONFIGS = {
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama3_8b_instruct",
    "meta-llama/Meta-Llama-3-8B": "llama3_8b_instruct",
}


def model_config(cfg: DictConfig):
    """The transformers config of ``model.name_or_path`` without downloading anything for known models."""
    from pathlib import Path

    from transformers import AutoConfig

    name = str(cfg.model.name_or_path)
    if name == "tiny":
        from alignkit.models.load import load_tokenizer
        from alignkit.models.tiny import tiny_llama_config

        return tiny_llama_config(OmegaConf.to_object(cfg.model).tiny, load_tokenizer("tiny"))
    if name == "smollm2":
        from alignkit.models.smollm2 import smollm2_dir

        return AutoConfig.from_pretrained(smollm2_dir())
    if name in KNOWN_CONFIGS and not Path(name).is_dir():
        return AutoConfig.from_pretrained(Path(__file__).parent / "assets" / KNOWN_CONFIGS[name])
    return AutoConfig.from_pretrained(name, trust_remote_code=bool(cfg.model.trust_remote_code))


def count_parameters(cfg: DictConfig) -> tuple[int, int]:
    """(total parameters, largest layer's parameters) from the model's config on the meta device."""
    from transformers import AutoModelForCausalLM

    config = model_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def state_bytes(dtype: str) -> tuple[int, int, int]:
    """Bytes per parameter of (parameters, gradients, optimizer states) for AdamW training.

    bf16/fp16 (``auto`` is bf16 on GPUs): 2 + 2 + 12 (fp32 master copy, momentum, variance: the ZeRO
    paper's K=12); fp32: 4 + 4 + 8.
    """
    return (4, 4, 8) if dtype == "fp32" else (2, 2, 12)


def zero_stage_rows(total: int, devices: int, dtype: str) -> list[tuple[str, float]]:
    """(stage, model-state GiB per device) for ZeRO 0-3 over ``devices`` data-parallel ranks."""
    p, g, k = state_bytes(dtype)
    n, gib = max(devices, 1), 2**30
    return [
        ("zero0 (replicated)", (p + g + k) * total / gib),
        ("zero1 (optimizer states sharded)", ((p + g) + k / n) * total / gib),
        ("zero2 (+ gradients sharded)", (p + (g + k) / n) * total / gib),
        ("zero3 (+ parameters sharded)", (p + g + k) / n * total / gib),
    ]


def memory_estimates(total: int, largest: int, gpus: int, nodes: int, dtype: str = "bf16") -> list[tuple[str, float, float]]:
    """(setting, per-device GiB, per-node CPU GiB): ZeRO 0-3 by ``zero_stage_rows``, then DeepSpeed's
    model-state estimators for the offload variants."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gib = 2**30
    rows = [(label, dev, 0.0) for label, dev in zero_stage_rows(total, gpus * nodes, dtype)]
    cpu, dev = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=True)
    rows.append(("zero2 + optimizer offload (DeepSpeed estimate)", dev / gib, cpu / gib))
    for offload, params in ((True, False), (True, True)):
        cpu, dev, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=offload,
                                                            cpu_offload_params=params)
        label = "zero3 + optimizer offload" + (" + param offload" if params else "") + " (DeepSpeed estimate)"
        rows.append((label, dev / gib, cpu / gib))
    return rows


def tokens_per_micro_batch(cfg: DictConfig, runner: str) -> int:
    """Upper bound of the tokens one micro-batch forwards (rows at their length limits)."""
    t, d = cfg.trainer, cfg.data  # typed by the schema: no coercion needed
    if is_online(runner):
        # raft trains on one winner per prompt, nash_md on the policy's half of the samples, sppo on 2 or all
        samples = {"online_dpo": 2, "raft": 1, "nash_md": cfg.rl.num_generations // 2,
                   "sppo": 2 if cfg.rl.sppo_samples == "best_worst" else cfg.rl.num_generations}.get(
                       runner, cfg.rl.num_generations)
        per_group = samples * (d.max_prompt_length + cfg.generation.max_new_tokens)
    elif runner == "pm":  # both orders of each pair, each sequence holding the prompt and two responses
        response = d.max_length - d.max_prompt_length
        per_group = (d.max_prompt_length + 4 * response if d.layout == "prefix_shared"
                     else 2 * (d.max_prompt_length + 2 * response))
    else:
        k = 1 if runner == "sft" else (2 if runner in ("preference", "reward") else 1)
        if d.layout == "prefix_shared":
            per_group = d.max_prompt_length + k * (d.max_length - d.max_prompt_length)
        else:
            per_group = k * d.max_length
    return t.micro_batch_size * per_group


def activation_gib(config, tokens: int, *, checkpointing: bool, bytes_per_value: int = 2,
                   logprob_chunk: int = 256) -> float:
    """Rough activation memory of one micro-batch's forward kept for backward, in GiB.

    Per token and layer a Llama-style block (SDPA, no score matrix) keeps ~``6h + 2kv + 4i`` values
    (norm inputs/outputs, q, k, v, attention output; gate, up, silu(gate), their product). With
    gradient checkpointing each layer keeps only its input (``h``) and one layer is recomputed at a
    time. The LM head's fp32 log-softmax works on ``logprob_chunk`` targets at a time (~3 copies).
    """
    h = int(getattr(config, "hidden_size", 0))
    layers = int(getattr(config, "num_hidden_layers", 0))
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv = h // heads * int(getattr(config, "num_key_value_heads", heads) or heads)
    inter = int(getattr(config, "intermediate_size", 4 * h))
    vocab = int(getattr(config, "vocab_size", 0))
    per_layer = (6 * h + 2 * kv + 4 * inter) * tokens * bytes_per_value
    kept = layers * h * tokens * bytes_per_value + per_layer if checkpointing else layers * per_layer
    head = 3 * min(tokens, logprob_chunk) * vocab * 4
    return (kept + head) / 2**30


def print_plan(overrides: list[str]) -> int:
    cfg = compose(overrides)
    runner = runner_for(cfg)
    objective = objective_from_cfg(cfg.loss)
    t = cfg.trainer
    world = world_size(cfg)
    console.print(f"[bold]recipe[/] {cfg.recipe}  [bold]runner[/] {runner}  [bold]loss[/] {cfg.loss.name}  "
                  f"[bold]model[/] {cfg.model.name_or_path}  [bold]deepspeed[/] zero{cfg.deepspeed.zero_stage}")
    unit = "prompts" if is_online(runner) else "groups"
    console.print(f"[bold]batch[/]: {t.batch_size} {unit}/optimizer step = {t.micro_batch_size} per micro-batch x "
                  f"{grad_accum_steps(cfg)} accumulation step(s) x {world} process(es)")
    if unit == "prompts":
        console.print(f"  completions/step = {t.batch_size} x {cfg.rl.num_generations} = "
                      f"{t.batch_size * cfg.rl.num_generations}; {cfg.rl.ppo_epochs} optimizer step(s) per batch")
    warnings = _warnings(cfg, runner, objective)
    try:
        config = model_config(cfg)
        total, largest = count_parameters(cfg)
    except Exception as exc:  # noqa: BLE001 - a plan without the count is still useful
        console.print(f"[yellow]parameters[/]: unknown ({exc.__class__.__name__}: {str(exc).splitlines()[0]})")
    else:
        console.print(f"[bold]parameters[/]: {total / 1e6:,.1f} M (largest layer {largest / 1e6:,.1f} M)")
        dtype = "fp32" if str(cfg.deepspeed.dtype) in ("fp32", "bf16_autocast") else "bf16"  # autocast: fp32 states
        stage = f"zero{cfg.deepspeed.zero_stage}"
        table = Table("setting", "model states / device (GiB)", "CPU / node (GiB)",
                      title=f"Model states ({dtype}, AdamW) on {cfg.launcher.nproc_per_node} device(s) x "
                            f"{cfg.launcher.nnodes} node(s); this run: {stage}")
        for label, dev, cpu in memory_estimates(total, largest, cfg.launcher.nproc_per_node, cfg.launcher.nnodes,
                                                dtype):
            mark = " <- this run" if label.startswith(stage + " ") and "offload" not in label else ""
            table.add_row(label + mark, f"{dev:,.2f}", f"{cpu:,.2f}")
        console.print(table)
        tokens = tokens_per_micro_batch(cfg, runner)
        checkpointing = bool(cfg.model.gradient_checkpointing)
        act = activation_gib(config, tokens, checkpointing=checkpointing, bytes_per_value=4 if dtype == "fp32" else 2,
                             logprob_chunk=cfg.model.logprob_chunk_size)
        console.print(f"[bold]activations[/]: ~{act:,.2f} GiB per device for one micro-batch of up to {tokens:,} tokens "
                      f"(gradient checkpointing {'on' if checkpointing else 'off'}; rough: Llama-style layers, SDPA)")
        if objective.needs_reference and cfg.trainer.reference in ("separate", "auto") and cfg.model.lora.r == 0:
            console.print("  a separate reference model adds its parameters again " + (
                "(needed: the loss's per-token KL reads the reference's logits)" if objective.needs_token_kl else
                "(trainer.reference=precomputed holds none during training)"))
    for text in warnings:
        console.print(f"[yellow]warning[/]: {text}")
    return 0


def _warnings(cfg: DictConfig, runner: str, objective) -> list[str]:
    out = []
    if cfg.deepspeed.offload_params != "none" and cfg.deepspeed.zero_stage != 3:
        out.append("deepspeed.offload_params needs zero_stage=3; it is ignored otherwise.")
    if not torch.cuda.is_available() and cfg.deepspeed.dtype in ("bf16", "fp16", "bf16_autocast"):
        from alignkit.engine.precision import BF16_CPU_FLAGS, read_cpu_info

        if cfg.deepspeed.dtype == "fp16" or not read_cpu_info().bf16_flags:
            out.append(f"deepspeed.dtype={cfg.deepspeed.dtype} on a CPU without {'/'.join(BF16_CPU_FLAGS)}: "
                       "16-bit matmuls are far slower than fp32 here.")
    if cfg.data.layout == "prefix_shared" and runner == "sft":
        out.append("data.layout=prefix_shared gains nothing for SFT (K=1); use packed.")
    if runner == "grpo" and cfg.rl.num_generations < 2:
        out.append("rl.num_generations < 2: group-relative advantages are all zero.")
    if (runner == "online_dpo" and cfg.rl.update_reference_each_round and cfg.rl.rounds > 1
            and cfg.deepspeed.zero_stage == 3):
        out.append("online DPO moves its reference each round, which is not supported under ZeRO-3 (the run "
                   "refuses it at start): use zero2 or rl.rounds=1.")
    return out
