"""Cross-field rules checked at compose time, before anything expensive happens.

Each area's dataclass checks its own enums (``validate()``); this module checks what spans
areas: the loss exists and takes the given hyper-parameters, the runner fits the loss (the pairs the
runner table declares: ``alignkit.losses.runners.check_exclusive``; each runner's other rules here), a knob
one runner reads is not set under another (the table's ``knobs``: ``runners.check_knobs``), the batch
divides into micro-batches across processes, the reference strategy fits the loss and model.
``runner_for`` and ``loss_terms`` are also what the trainers use, so the rules live once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from alignkit.config import values
from alignkit.config.schema import REFERENCE_STRATEGIES
from alignkit.config.values import check_loss_weights
from alignkit.engine.engine import SCHEDULERS  # the one table, next to lr_multiplier that implements it
from alignkit.errors import ConfigError
from alignkit.losses.runners import RUNNERS, check_exclusive, check_knobs, is_online, offline_runners, runner_of

RESERVED_LOSS_KEYS = ("name", "weights")


def _choice(value: str, valid: tuple[str, ...], key: str) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid. Valid choices: {', '.join(valid)}.")


def loss_terms(loss_cfg: Any) -> list[tuple[Any, float, dict[str, Any]]]:
    """``[(LossSpec, weight, hparams)]`` for the ``loss`` node; flat hyper-parameters go to every
    term that takes them, ``loss.<term_name>.<hparam>`` to one term only."""
    from alignkit.losses.registry import check_hparams, resolve_loss

    node = OmegaConf.to_container(loss_cfg, resolve=True) if isinstance(loss_cfg, DictConfig) else dict(loss_cfg)
    names = node.get("name")
    if not names:
        raise ConfigError("loss.name is missing: choose a loss with loss=NAME (see `alignkit recipes`).")
    names = [names] if isinstance(names, str) else list(names)
    check_loss_weights(node)
    weights = node.get("weights") or [1.0] * len(names)
    if len(weights) != len(names):
        raise ConfigError(f"loss.weights has {len(weights)} values for {len(names)} losses {names}.")
    specs = [_registered(resolve_loss(n), n) for n in names]
    per_term = {k: v for k, v in node.items() if k in names and isinstance(v, dict)}
    flat = {k: v for k, v in node.items() if k not in RESERVED_LOSS_KEYS and k not in per_term}
    unused = set(flat)
    terms = []
    for spec, weight in zip(specs, weights):
        valid = spec.hparams()
        hp = {k: v for k, v in flat.items() if k in valid}
        unused -= set(hp)
        hp.update(per_term.get(spec.name, {}))
        check_hparams(spec, hp)
        terms.append((spec, float(weight), hp))
    if unused:
        accepted = sorted({k for s in specs for k in s.hparams()})
        raise ConfigError(
            f"loss hyper-parameter(s) {', '.join(sorted(unused))} are taken by none of {names}. "
            f"Valid: {', '.join(accepted) or '(none)'}."
        )
    return terms


def _registered(spec: Any, name: str) -> Any:
    """A dotted path must name a loss: registered, or decorated with ``@register_loss`` (which sets
    ``fn.loss_spec``). Any other callable (``os:system``, ``builtins:print``) is refused."""
    if getattr(spec.fn, "loss_spec", None) is None:
        raise ConfigError(
            f"loss.name={name!r} is not a loss: {name!r} resolves to {getattr(spec.fn, '__qualname__', spec.fn)!r}, "
            "which is neither a registered loss nor decorated with @alignkit.losses.registry.register_loss(view=..., "
            "needs_reference=...). Decorate your loss function, or give a registered name (see `alignkit recipes`)."
        )
    return spec


def objective_from_cfg(loss_cfg: Any):
    """The ``WeightedLoss`` the ``loss`` node describes (knob values checked)."""
    from alignkit.losses.combine import build_objective

    terms = loss_terms(loss_cfg)
    return build_objective(
        [spec.name for spec, _, _ in terms],
        [w for _, w, _ in terms],
        {spec.name: hp for spec, _, hp in terms},
    )


def runner_for(cfg: DictConfig) -> str:
    """The runner that trains ``cfg``: explicit ``runner``, or the one its losses declare
    (``LossSpec.runner``; ``alignkit.losses.runners`` holds the table and the rule)."""
    terms = loss_terms(cfg.loss)
    if cfg.runner != "auto":
        return cfg.runner
    return runner_of(spec for spec, _, _ in terms)


def world_size(cfg: DictConfig) -> int:
    return int(cfg.launcher.nproc_per_node) * int(cfg.launcher.nnodes)


def _validate_sections(cfg: DictConfig) -> None:
    for section in ("model", "data", "deepspeed", "logger"):
        obj = OmegaConf.to_object(cfg[section])
        check = getattr(obj, "validate", None)
        if callable(check):
            check()


def validate(cfg: DictConfig) -> None:
    _choice(cfg.runner, ("auto", *RUNNERS), "runner")
    _choice(cfg.trainer.scheduler, SCHEDULERS, "trainer.scheduler")
    _choice(cfg.trainer.reference, REFERENCE_STRATEGIES, "trainer.reference")
    _choice(cfg.trainer.on_nonfinite, ("stop", "skip"), "trainer.on_nonfinite")
    values.check_names(cfg)
    values.check_launcher(cfg)
    values.check_trainer(cfg)
    _validate_sections(cfg)
    values.check_data_paths(cfg)
    terms = loss_terms(cfg.loss)
    values.check_hparam_types(terms)
    runner = runner_for(cfg)
    objective_from_cfg(cfg.loss)  # views combine, knob values valid
    _check_batch(cfg)
    values.check_raw_json_batch(cfg, int(cfg.trainer.micro_batch_size), grad_accum_steps(cfg), world_size(cfg))
    from alignkit.plan import check_scale_rules  # packing + flash attention, KTO's mismatched pairs

    check_scale_rules(cfg)
    if cfg.deepspeed.get("optimizer_in_backward", False):
        _check_optimizer_in_backward(cfg, runner)
    check_exclusive(runner, (spec for spec, _, _ in terms), cfg.loss.name)  # the table's loss-runner pairs, both ways
    check_knobs(runner, cfg)  # the table's runner-only knobs (rl.lmbda: gkd) at their defaults under any other runner
    _check_second_sampler(cfg, runner)  # before the online rules: it refuses vllm before vllm is looked for
    if is_online(runner):
        _check_online(cfg, runner)
    _check_prm(cfg, runner)
    from alignkit.rl.judges import check_judge

    check_judge(cfg, runner)
    if runner == "raft" and {spec.view for spec, _, _ in terms} != {"sft"}:
        raise ConfigError(f"runner=raft fine-tunes on the best sample of each prompt with an SFT loss; loss.name="
                          f"{cfg.loss.name} is not one. Use loss=sft (recipe=raft_tiny).")
    if runner == "raft" and cfg.rl.raft_min_reward is not None and not math.isfinite(cfg.rl.raft_min_reward):
        raise ConfigError(f"rl.raft_min_reward={cfg.rl.raft_min_reward} must be a finite number (or null: keep every "
                          "prompt's best sample).")  # under another runner: check_knobs
    if runner == "dro" and cfg.data.label_threshold is not None:
        raise ConfigError(f"data.label_threshold={cfg.data.label_threshold} turns scores into labels, but runner=dro "
                          "trains on the scores themselves as rewards (a label-only row is reward 1.0 / 0.0). "
                          "Remove data.label_threshold.")
    _check_gkd(cfg, runner)
    _check_sppo(cfg, runner, terms)
    needs_ref = any(spec.reference_needed(hp) for spec, _, hp in terms)
    ref = cfg.trainer.reference
    if ref == "lora" and int(cfg.model.lora.r) <= 0:
        raise ConfigError("trainer.reference=lora needs LoRA training: set model.lora.r (e.g. model.lora.r=16).")
    if needs_ref and ref == "none":
        names = [s.name for s, _, hp in terms if s.reference_needed(hp)]
        raise ConfigError(f"loss {names} needs a reference model; trainer.reference=none is not possible. "
                          "Valid: auto, separate, precomputed, lora.")
    _check_token_kl(cfg, terms, runner)
    if not needs_ref and ref not in ("auto", "none") and not is_online(runner):
        names = [s.name for s, _, _ in terms]
        raise ConfigError(f"loss {names} is reference-free: trainer.reference={ref} would build a reference that no "
                          "loss term reads. Use trainer.reference=auto (or none), or a loss that needs a reference "
                          "(e.g. loss=dpo).")


def _check_prm(cfg: DictConfig, runner: str) -> None:
    """The process reward model (loss=prm alone under runner=prm, its data knob only there: ``RUNNERS``,
    ``check_exclusive``, ``check_knobs``): reward.prm (a trained PRM as a reward) needs an online runner, a model
    folder and a known aggregate."""
    reward = cfg.reward
    from alignkit.rewards.process import AGGREGATES

    _choice(reward.prm_aggregate, AGGREGATES, "reward.prm_aggregate")
    if reward.prm is None:
        return
    if not is_online(runner):
        raise ConfigError(f"reward.prm={reward.prm!r} scores sampled completions, which only the online runners "
                          f"have; this run's runner is {runner}. Remove it, or use e.g. recipe=grpo_tiny.")
    if not (Path(reward.prm) / "config.json").is_file():
        raise ConfigError(f"reward.prm={reward.prm!r} is not a model folder (no config.json); give the final/ folder "
                          "of a process-reward-model run (recipe=prm_*).")
    labels = json.loads((Path(reward.prm) / "config.json").read_text()).get("id2label") or {}
    if len(labels) != 2:
        raise ConfigError(f"reward.prm={reward.prm!r} has {len(labels) or 'no'} labels in its config.json; a process "
                          "reward model has 2 (incorrect, correct): give the final/ folder of a recipe=prm_* run.")


def _check_token_kl(cfg: DictConfig, terms: list, runner: str) -> None:
    """A loss with ``needs_token_kl`` (TDPO's per-token full-vocabulary KL) needs the reference's logits at
    every target: the preference runner with a live reference (separate, lora; auto picks one), ZeRO 0-2."""
    names = [spec.name for spec, _, _ in terms if spec.needs_token_kl]
    if not names:
        return
    what = f"loss {names} needs the per-token KL to the reference over the full vocabulary"
    if runner != "preference":
        raise ConfigError(f"{what}, which only the preference runner computes; runner={runner} does not. "
                          "Use runner=auto (preference).")
    if cfg.trainer.reference == "precomputed":
        raise ConfigError(f"{what}: trainer.reference=precomputed caches only the reference's target log-probs, "
                          "from which that KL cannot be computed. Use trainer.reference=separate (a frozen copy), "
                          "lora (with LoRA training) or auto (picks one of those for this loss).")
    if int(cfg.deepspeed.zero_stage) == 3:
        raise ConfigError(f"{what}, computed inside the policy's LM-head pass; under deepspeed.zero_stage=3 the "
                          "reference's head is sharded outside that pass. Use deepspeed.zero_stage 0, 1 or 2.")


def _check_reward_callable(name: str, fn) -> None:
    """Compose-time check of a reward function named by path: a Python function (not a builtin such as
    ``os:system`` or a class) that can receive the completions (TRL's ``completions``, verl's
    ``solution_str``, or ``**kwargs``). The call itself is tried once before any model loads (dry call)."""
    import inspect
    import sys

    from alignkit.rewards.registry import reward_style

    if reward_style(fn) == "alignkit":
        return
    what = f"reward.fns: {name!r}"
    module = (getattr(fn, "__module__", None) or "").split(".")[0]
    stdlib = inspect.isfunction(fn) and (module in sys.stdlib_module_names or module == "builtins")
    if inspect.isbuiltin(fn) or inspect.isclass(fn) or stdlib:
        kind = "a class" if inspect.isclass(fn) else ("a built-in" if inspect.isbuiltin(fn) else "a standard-library "
                                                                                              "function")
        raise ConfigError(f"{what} is {kind}, not a reward function. Give your own function: TRL-style "
                          "fn(prompts, completions, **columns) -> one float per completion, or verl-style "
                          "compute_score(data_source, solution_str, ground_truth, extra_info).")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    takes = {k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if params and not any(p.kind is p.VAR_KEYWORD for p in params.values()) and not takes & {"completions",
                                                                                                 "solution_str"}:
        raise ConfigError(f"{what} takes ({', '.join(params)}): no 'completions' (TRL convention), 'solution_str' "
                          "(verl convention) or **kwargs, so it could never see what it scores. Add a completions "
                          "parameter (alignkit calls reward functions by keyword).")


def _check_online(cfg: DictConfig, runner: str) -> None:
    """Reward functions, advantage estimator and KL estimator resolve; sample counts make sense."""
    from alignkit.rewards.registry import resolve_reward
    from alignkit.rl.advantages import GRPO_SCALES, resolve_advantage
    from alignkit.rl.generation import check_engine
    from alignkit.rl.kl import validate_kl_estimator

    if not cfg.reward.fns and not cfg.reward.model and not cfg.reward.prm:
        raise ConfigError("no reward source: set reward.fns (e.g. [judge]), reward.model (a reward-model folder) "
                          "and/or reward.prm (a process-reward-model folder).")
    if cfg.reward.model and not (Path(cfg.reward.model) / "config.json").is_file():
        raise ConfigError(f"reward.model={cfg.reward.model!r} is not a model folder (no config.json); give the final/ "
                          "folder of a reward-model run (recipe=rm_*).")
    for name in cfg.reward.fns:
        _check_reward_callable(str(name), resolve_reward(name))
    if cfg.reward.weights and len(cfg.reward.weights) != len(cfg.reward.fns):
        raise ConfigError(f"reward.weights has {len(cfg.reward.weights)} values for {len(cfg.reward.fns)} "
                          f"reward functions {list(cfg.reward.fns)}.")
    resolve_advantage(cfg.rl.advantage)
    if cfg.rl.advantage == "gae" and runner != "ppo":
        raise ConfigError(f"rl.advantage=gae needs a critic (values per token), which only the ppo runner trains; "
                          f"{runner} has none. Use rl.advantage=grpo, rloo, reinforce_pp or reinforce_pp_baseline, "
                          "or train PPO (recipe=ppo_tiny / loss=ppo).")
    values.check_rollout_knobs(loss_terms(cfg.loss), cfg)
    values.check_generation(cfg, runner)
    _choice(cfg.rl.scale_rewards, GRPO_SCALES, "rl.scale_rewards")
    validate_kl_estimator(cfg.rl.kl_estimator)
    check_engine(cfg)  # generation.engine (vllm: installed, fits this environment), before any model loads
    minimum = 2 if runner in ("grpo", "online_dpo", "sppo") else 1
    if cfg.rl.num_generations < minimum:
        raise ConfigError(f"rl.num_generations={cfg.rl.num_generations}: {runner} needs at least {minimum} samples "
                          "per prompt.")


SECOND_SAMPLER_RUNNERS = ("xpo", "nash_md")  # each pair: a policy sample against a reference / mixture sample


def _check_second_sampler(cfg: DictConfig, runner: str) -> None:
    """XPO and Nash-MD (their losses under their runner only, nash_md alone, Nash-MD's own knobs only there:
    ``RUNNERS``, ``check_exclusive``, ``check_knobs``): runner=xpo a pairwise loss, an even number of samples
    (half policy, half reference / mixture), the HF engine, no rounds, Nash-MD's knobs in range."""
    from alignkit.trainers.nash_md import PREFERENCES

    rl = cfg.rl
    if runner not in SECOND_SAMPLER_RUNNERS:
        return
    if runner == "xpo" and objective_from_cfg(cfg.loss).view != "pairwise":
        raise ConfigError(f"runner=xpo trains a pairwise loss on (policy, reference) sample pairs; loss.name="
                          f"{cfg.loss.name} is not one. Use loss=xpo (recipe=xpo_tiny).")
    if int(rl.num_generations) < 2 or int(rl.num_generations) % 2:
        raise ConfigError(f"rl.num_generations={rl.num_generations}: {runner} samples half of each prompt's "
                          "completions from the policy and half from the " + ("reference" if runner == "xpo" else
                          "mixture") + ", so it must be even and >= 2 (2 = one pair per prompt, as TRL).")
    if str(cfg.generation.engine) == "vllm":
        raise ConfigError(f"generation.engine=vllm: {runner} samples from the " + ("reference model" if runner ==
                          "xpo" else "geometric mixture of policy and reference") + " with the HF engine "
                          "(alignkit/rl/mixture.py), which vLLM cannot serve here. Use generation.engine=hf.")
    if int(rl.rounds) != 1:
        raise ConfigError(f"rl.rounds={rl.rounds}: {runner} keeps its reference fixed (no rounds). Use rl.rounds=1.")
    if not (math.isfinite(float(rl.mixture_coef)) and 0.0 <= float(rl.mixture_coef) <= 1.0):
        raise ConfigError(f"rl.mixture_coef={rl.mixture_coef} must lie in [0, 1] (0 = the policy, 1 = the reference).")
    _choice(str(rl.preference), PREFERENCES, "rl.preference")


def _check_sppo(cfg: DictConfig, runner: str, terms: list) -> None:
    """SPPO (loss=sppo alone under runner=sppo, and the reverse; ``rl.sppo_samples`` read there only:
    ``RUNNERS``, ``check_exclusive``, ``check_knobs``): ``rl.sppo_samples`` a choice, a reference that moves to
    the last iterate (no ZeRO-3, no fixed reference)."""
    from alignkit.trainers.sppo import SAMPLE_CHOICES

    if runner != "sppo":
        return
    from alignkit.losses.common import validate_knobs

    spec, _, hp = terms[0]
    validate_knobs("sppo", {**spec.hparams(), **hp})  # beta > 0 (eta = 1 / beta); rollout losses are not checked above
    _choice(str(cfg.rl.sppo_samples), SAMPLE_CHOICES, "rl.sppo_samples")
    if not cfg.rl.update_reference_each_round:
        raise ConfigError("rl.update_reference_each_round=false: SPPO's reference is the last iterate pi_t by "
                          "definition, moved to the policy at every round start. Remove the setting.")
    if int(cfg.deepspeed.zero_stage) == 3:
        raise ConfigError("runner=sppo moves its reference to the current policy at each round start, which is not "
                          "supported under deepspeed.zero_stage=3 yet. Use zero_stage 0, 1 or 2.")


def _check_gkd(cfg: DictConfig, runner: str) -> None:
    """GKD (loss=gkd alone under runner=gkd, and the reverse; its rl knobs only there: ``RUNNERS``,
    ``check_exclusive``, ``check_knobs``): lmbda a probability, a teacher that the run can build (teacher_seed: a
    tiny teacher), ZeRO 0-2 and the HF engine."""
    rl = cfg.rl
    if runner != "gkd":
        return
    if not (math.isfinite(float(rl.lmbda)) and 0.0 <= float(rl.lmbda) <= 1.0):
        raise ConfigError(f"rl.lmbda={rl.lmbda} must lie in [0, 1]: the probability that a step trains on the "
                          "student's own samples (0 = never, 1 = every step).")
    teacher = rl.teacher or cfg.model.name_or_path
    if rl.teacher_seed is not None and teacher != "tiny":
        raise ConfigError(f"rl.teacher_seed={rl.teacher_seed} seeds a tiny teacher's random weights; the teacher is "
                          f"{teacher!r}. Remove rl.teacher_seed, or set rl.teacher=tiny.")
    if Path(teacher).is_dir() and not (Path(teacher) / "config.json").is_file():
        raise ConfigError(f"rl.teacher={teacher!r} is a path without config.json; give a transformers model folder "
                          "(e.g. the final/ folder of a run), tiny, smollm2 or a hub id.")
    if int(cfg.deepspeed.zero_stage) == 3:
        raise ConfigError("runner=gkd computes the teacher's logits inside the student's LM-head pass; under "
                          "deepspeed.zero_stage=3 the teacher's head is sharded outside that pass. Use "
                          "deepspeed.zero_stage 0, 1 or 2.")
    if str(cfg.generation.engine) == "vllm":
        raise ConfigError("generation.engine=vllm: runner=gkd samples with the HF engine (the teacher's samples "
                          "too, rl.seq_kd). Use generation.engine=hf.")
    values.check_generation(cfg, runner)


def _check_batch(cfg: DictConfig) -> None:
    t, world = cfg.trainer, world_size(cfg)
    per_step = t.micro_batch_size * world
    if t.batch_size <= 0 or t.micro_batch_size <= 0:
        raise ConfigError("trainer.batch_size and trainer.micro_batch_size must be positive.")
    if t.batch_size % per_step:
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} is not divisible by trainer.micro_batch_size={t.micro_batch_size} "
            f"x {world} process(es) = {per_step}. Choose a batch size that is a multiple of {per_step}."
        )


def _check_optimizer_in_backward(cfg: DictConfig, runner: str) -> None:
    problems = []
    if world_size(cfg) != 1:
        problems.append(f"one process (the run asks for {world_size(cfg)}; gradients would be updated "
                        "before they are averaged)")
    if grad_accum_steps(cfg) != 1:
        problems.append(f"no gradient accumulation (trainer.batch_size={cfg.trainer.batch_size} must equal "
                        f"trainer.micro_batch_size={cfg.trainer.micro_batch_size})")
    if is_online(runner):
        offline = offline_runners()
        problems.append(f"an offline runner: {', '.join(offline[:-1])} or {offline[-1]} (got {runner})")
    if problems:
        raise ConfigError("deepspeed.optimizer_in_backward=true needs " + "; ".join(problems) + ".")


def grad_accum_steps(cfg: DictConfig) -> int:
    return cfg.trainer.batch_size // (cfg.trainer.micro_batch_size * world_size(cfg))
