"""``alignkit eval``: a run (or any model) scored on the run's own held-out data, with 95% intervals.

What is evaluated, and on what:

* ``alignkit eval RUN_DIR`` -- the run's ``final/`` model (a folder inside a run, e.g. a
  checkpoint export, works too) against the run's starting model, on the run's held-out data as
  its frozen ``config.yaml`` rebuilds it: ``data.eval`` sources, else the seeded
  ``data.eval_fraction`` of ``data.train`` (the same split training held out). A run without an
  eval set is refused with the overrides that give one; it is never scored on the demo task
  unless it trained on it.
* ``alignkit eval MODEL data=FILE`` -- any transformers folder (or a hub name, or ``tiny``); it
  needs data (``data=FILE``: every record of FILE, a path/glob/folder/hub name; or
  ``data.train=...``/``data.eval=...`` as in training; or a ``recipe=...``), and says so without
  it. The baseline is ``--baseline`` (none without it: the model's rates alone).
* ``data=FILE`` on a run evaluates on FILE instead; ``reward.fns=[...]`` replaces the reward
  functions; any other ``key=value`` goes into the config as in training. A run's ``config.yaml``
  naming reward code outside alignkit (``mod:fn``, ``file.py:fn``) is not imported unless
  ``reward.fns=[...]`` is given on the command line (a copied run directory may have been edited;
  nothing read from disk executes code). ``eval/`` and its files are never written through a link.

What it measures (each with N and a 95% interval, ``alignkit.stats``):

* **answer accuracy** first -- the share of prompts whose greedy reply's final answer equals the
  record's reference (``answer`` / ``reward_model.ground_truth`` / ``ground_truth`` / ``solution``
  column; ``alignkit.rewards.answer`` reads both sides with the same parser), Wilson intervals; and
  the model-minus-baseline difference on the same prompts with Newcombe's paired interval
  (method 10). Records without a reference are left out of N (and counted).
* every reward function's mean (the run's ``reward.fns`` with their ``reward.options``, as the
  trainers build them; with the demo ``judge`` also its ``format`` and ``concise`` parts beside it),
  model and baseline, and the paired difference: a
  0/1 reward as a proportion (Wilson, Newcombe's paired difference), any other with the normal
  interval of the mean (of the per-prompt differences); the win rate of the model's total reward
  over the baseline's (ties 1/2),
  a mean with a normal interval clipped to [0, 1].
* preference accuracy on held-out pairs (paired/listwise/unpaired data): the share whose implicit
  reward ``(log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))`` is
  positive, the reference being the baseline (as DPO's reward is defined), and the likelihood
  accuracy ``log p(chosen) > log p(rejected)``; Wilson intervals.

A reward function that cannot score the data (a demo judge on data without ``answer``) is an error
when the user named it or the run trained on it (RL runs); for an offline run's default it is
left out with a printed note. Duplicate prompts are scored once (counted). The model and the
baseline run on the GPU when ``torch.cuda.is_available()``. Greedy replies go to ``samples.jsonl``;
everything to ``eval.json`` (``metrics``: ``{name: {n, rate, ci_low, ci_high}}``; the plain
values also at the top level, as before). One process, plain PyTorch, no DeepSpeed engine.
Left out: sampling-based (pass@k) accuracy, reward-model accuracy of ``rm`` runs (their eval
metrics are in ``metrics.jsonl``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from alignkit.config.compose import compose, conf_dir, load_frozen
from alignkit.errors import ConfigError, DataError, UserError
from alignkit.stats import Interval, mean_interval, paired_difference, paired_mean_difference, wilson

JUDGE_PARTS = ("format", "concise")  # shown beside the demo judge, never instead of answer accuracy


@dataclass
class EvalTarget:
    cfg: DictConfig
    model: str
    baseline: str | None
    run_dir: Path | None
    data_source: str  # where the eval records come from, in words
    use_train_split: bool  # evaluate every record of data.train (a data=FILE / a model with its own data)
    reward_explicit: bool  # the user named reward.fns, or the run trained on them
    notes: list[str] = field(default_factory=list)


def _is_data_group(name: str) -> bool:
    return (conf_dir() / "data" / f"{name}.yaml").is_file()


def _split_overrides(overrides: list[str]) -> tuple[str | None, list[str]]:
    """(``data=FILE`` shorthand's FILE or None, the other overrides)."""
    data, rest = None, []
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and key.strip() == "data" and not _is_data_group(value.strip()):
            data = value.strip().strip("'\"")
        else:
            rest.append(o)
    return data, rest


def _own_data(cfg: DictConfig, path: str, where: Path | str = "the config") -> DictConfig:
    """Every record of ``data=PATH`` (a path, or Hydra's list/entry form ``[{path: F, column_map: {..}}]``)."""
    from alignkit.data.config import SourceConfig

    if path.startswith(("[", "{")):
        value = path if path.startswith("[") else f"[{path}]"
        cfg = _apply_overrides(cfg, [f"data.train={value}"], Path(str(where)))
    else:
        cfg.data.train = [SourceConfig(path=path)]
    cfg.data.eval = []
    cfg.data.eval_fraction = 0.0
    return cfg


def _names_key(overrides: list[str], prefix: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0].strip().startswith(prefix) for o in overrides)


def _apply_overrides(cfg: DictConfig, dotlist: list[str], where: Path) -> DictConfig:
    """Hydra-syntax ``key=value`` overrides (``data.eval=[{path: F}]``, ``reward.fns=[a,b]``) onto a frozen config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not dotlist:
        return cfg
    try:
        parsed = OverridesParser.create().parse_overrides([o.lstrip("+") for o in dotlist])
        nested: dict = {}
        for override in parsed:
            node = nested
            *parents, leaf = override.key_or_group.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = override.value()
        return OmegaConf.merge(cfg, OmegaConf.create(nested))
    except Exception as exc:  # noqa: BLE001 - Hydra's parser and OmegaConf raise many kinds
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot apply the overrides {dotlist} to {where}: {first}") from None


def resolve_target(target: str, overrides: list[str], baseline: str | None = None) -> EvalTarget:
    """What to evaluate, against what, on which data (see the module docstring)."""
    from alignkit.config.validate import runner_for
    from alignkit.losses.runners import is_online
    from alignkit.data.overrides import expand_shorthand

    data_file, rest = _split_overrides(list(overrides))
    path = Path(target)
    run_dir = path if (path / "config.yaml").is_file() else (
        path.parent if path.is_dir() and (path.parent / "config.yaml").is_file() else None)
    reward_named = _names_key(rest, "reward.fns")
    if run_dir is not None:
        cfg = load_frozen(run_dir / "config.yaml")
        dotlist = [expand_shorthand(o) for o in rest if "=" in o]
        if any(o.lstrip("+~").split("=", 1)[0].strip() == "recipe" for o in dotlist):
            raise ConfigError("recipe=... does not apply to a run directory (its config is frozen); give data=FILE "
                              "or data.eval=[{path: FILE}] to evaluate on other data.")
        cfg = _apply_overrides(cfg, dotlist, run_dir / "config.yaml")
        if not reward_named:
            _refuse_code_named_by(cfg, run_dir / "config.yaml")
        model = str(run_dir / "final") if path == run_dir else str(path)
        if not Path(model).is_dir():
            raise UserError(f"{run_dir} has no final/ model yet (the run did not finish); evaluate a checkpoint's "
                            "export folder instead (alignkit eval RUN_DIR/checkpoints/...).")
        base = baseline or str(cfg.model.name_or_path)
        explicit = reward_named or is_online(runner_for(cfg))
        if data_file is not None:
            cfg = _own_data(cfg, data_file, run_dir / "config.yaml")
            return EvalTarget(cfg, model, base, run_dir, f"every record of {data_file} (data=...)", True, explicit)
        if not cfg.data.eval and not cfg.data.eval_fraction > 0:
            raise UserError(
                f"{run_dir} has no held-out data: its data.eval is empty and data.eval_fraction=0, so every record "
                "was trained on. Evaluate on other data: alignkit eval RUN_DIR data=FILE "
                "(or data.eval=[{path: FILE}]).")
        where = (f"the run's data.eval ({', '.join(str(s.path) for s in cfg.data.eval)})" if cfg.data.eval else
                 f"the run's held-out {cfg.data.eval_fraction:g} of data.train (data.seed={cfg.data.seed})")
        return EvalTarget(cfg, model, base, run_dir, where, False, explicit)
    # a model folder / hub name: it brings no data and no reward functions of its own
    data_given = data_file is not None or _names_key(rest, "data.train") or _names_key(rest, "data.eval") or any(
        o.split("=", 1)[0].strip() in ("recipe", "data") for o in rest)
    if not data_given:
        raise UserError(
            f"{target} is a model, not a run directory, so there is no run data to evaluate it on. Give the data: "
            f"alignkit eval {target} data=FILE (prompt records with a reference 'answer' column score answer "
            "accuracy; paired records score preference accuracy), or data.eval=[{path: FILE}], or recipe=NAME "
            "for a preset's data.")
    cfg = compose([*rest, f"model.name_or_path={target}"])
    if data_file is not None:
        cfg = _own_data(cfg, data_file)
        where = f"every record of {data_file} (data=...)"
    else:
        where = ("data.eval (" + ", ".join(str(s.path) for s in cfg.data.eval) + ")" if cfg.data.eval else
                 "data.train (no eval set given: every record)")
    use_train = data_file is not None or not (cfg.data.eval or cfg.data.eval_fraction > 0)
    notes = []
    recipe_named = any(o.lstrip("+~").split("=", 1)[0].strip() == "recipe" for o in rest)
    if data_file is not None and not reward_named and not recipe_named and list(cfg.reward.fns):
        # the default config's reward.fns are the demo task's judge: a model on the user's data is not scored on it
        notes.append(f"no reward.fns given: the default {list(cfg.reward.fns)} (the demo task's) not scored; "
                     "answer accuracy only (reward.fns=[correctness,my_rewards:fn] to add rewards)")
        cfg.reward.fns = []
    return EvalTarget(cfg, target, baseline, None, where, use_train, reward_named or is_online(runner_for(cfg)),
                      notes)


# ---------------------------------------------------------------- models and data


def eval_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _load(name_or_path: str, cfg: DictConfig, device: torch.device):
    from alignkit.models.load import load_causal_lm

    model_cfg = OmegaConf.to_object(cfg.model)
    model_cfg.name_or_path = name_or_path
    model_cfg.lora.r = 0
    model, tokenizer = load_causal_lm(model_cfg, dtype=cfg.deepspeed.dtype)
    return model.eval().to(device), tokenizer


def _tokenizer(name_or_path: str, cfg: DictConfig):
    from alignkit.models.load import load_tokenizer_for

    model_cfg = OmegaConf.to_object(cfg.model)
    model_cfg.name_or_path = name_or_path
    return load_tokenizer_for(model_cfg)


def _records(target: EvalTarget, view: str, tokenizer, limit: int) -> list:
    from alignkit.data.pipeline import prepare_data

    prepared = prepare_data(OmegaConf.to_object(target.cfg.data), view, tokenizer)
    groups = prepared.train if target.use_train_split else prepared.eval
    return list(groups[:limit]) if limit > 0 else list(groups)


def _unique_prompts(groups: list) -> tuple[list, int]:
    seen, out = set(), []
    for g in groups:
        key = tuple(g.prompt_ids)
        if key not in seen:
            seen.add(key)
            out.append(g)
    return out, len(groups) - len(out)


@torch.no_grad()
def preference_accuracy(model, reference, groups, cfg: DictConfig, pad_id: int) -> dict[str, Interval]:
    from alignkit.data.batch import sum_per_slot
    from alignkit.models.logprobs import TargetLogProbs
    from alignkit.trainers.common import collate_groups
    from alignkit.trainers.reference import forward_logps

    device = next(model.parameters()).device
    policy, ref = TargetLogProbs(model), TargetLogProbs(reference)
    implicit, likelihood = [], []
    for i in range(0, len(groups), 8):
        batch = collate_groups(groups[i : i + 8], cfg, pad_id).to(device)
        lp = sum_per_slot(forward_logps(policy, batch)["logps"].float(), batch)
        lr = sum_per_slot(forward_logps(ref, batch)["logps"].float(), batch)
        margin = (lp[:, 0] - lr[:, 0]) - (lp[:, 1] - lr[:, 1])
        implicit += (margin > 0).tolist()
        likelihood += (lp[:, 0] > lp[:, 1]).tolist()
    return {"preference_accuracy": wilson(sum(implicit), len(implicit)),
            "likelihood_accuracy": wilson(sum(likelihood), len(likelihood))}


def _refuse_code_named_by(cfg, config_file: Path) -> None:
    """A run's frozen config naming reward code outside alignkit (a module path or a .py file) is not imported.

    ``config.yaml`` is a file read from disk (a run directory copied from a shared disk may have been
    edited): importing what it names would run code the user never typed. Registered rewards are
    alignkit's own; anything else must be named again on the command line.
    """
    from alignkit.rewards.registry import reward_names

    foreign = [str(n) for n in cfg.reward.fns if str(n) not in reward_names()]
    if foreign:
        listed = ",".join(str(n) for n in cfg.reward.fns)
        raise UserError(
            f"{config_file} names reward code outside alignkit ({', '.join(foreign)}); alignkit eval does not import "
            "code named by a file it reads (nothing read from disk executes code). If you trust that code, name it "
            f"on the command line: alignkit eval ... 'reward.fns=[{listed}]' (or reward.fns=[] for answer accuracy "
            "alone).")


def _reward_names(target: EvalTarget) -> list[str]:
    from alignkit.rewards.registry import reward_names, short_name

    names = [str(n) for n in target.cfg.reward.fns]
    if "judge" in [short_name(n) for n in names]:
        names += [p for p in JUDGE_PARTS if p in reward_names() and p not in names]
    return names


def _first_sentence(exc: BaseException, width: int = 240) -> str:
    """An error's first sentence, whole (a note cut mid-word reads as garbage)."""
    text = " ".join(str(exc).split())
    head = re.split(r"(?<=[.;])\s", text, maxsplit=1)[0].rstrip(".;")
    return head if len(head) <= width else head[:width].rsplit(" ", 1)[0] + " ..."


def build_scoring(target: EvalTarget, first, tokenizer):
    """The reward mix for eval: the run's (or the named) functions that can score this data."""
    from alignkit.rewards.registry import DRY_RUN_COMPLETION
    from alignkit.trainers.rollout import decode_prompt

    names = _reward_names(target)
    if not names:
        return None
    columns = {k: v for k, v in first.extra.items() if k != "prompt"}
    call = dict(raw_prompt=first.extra.get("prompt"),
                completion_ids=tokenizer.encode(DRY_RUN_COMPLETION, add_special_tokens=False))
    prompt = decode_prompt(first, tokenizer)
    if target.reward_explicit:
        _note_unused_options(target, names)
        mix = _reward_mix(target, names)
        try:
            mix.dry_run(prompt, columns, **call)
        except (DataError, ConfigError) as exc:
            raise type(exc)(f"{exc} -- eval scores with reward.fns={names}; pass reward.fns=[...] to choose others "
                            "(or reward.fns=[] for answer accuracy alone).") from None
        return mix
    kept, left_out = [], {}
    for name in names:
        try:
            _reward_mix(target, [name]).dry_run(prompt, columns, **call)
            kept.append(name)
        except (DataError, ConfigError) as exc:
            left_out.setdefault(_first_sentence(exc), []).append(name)
    for why, left in left_out.items():  # one note per reason (the demo judge and its parts fail alike)
        target.notes.append(f"reward{'s' if len(left) > 1 else ''} {', '.join(repr(n) for n in left)} left out: "
                            f"{'they' if len(left) > 1 else 'it'} cannot score this data ({why}); "
                            "pass reward.fns=[...] to choose")
    _note_unused_options(target, kept)
    return _reward_mix(target, kept) if kept else None


def _reward_mix(target: EvalTarget, names: list[str]):
    """``names`` as the trainers build a mix (``RewardMix.from_config``): each with its ``reward.options``
    and the eval's ``generation.max_new_tokens`` (``overlong``'s default L_max)."""
    from alignkit.rewards.registry import RewardMix

    return RewardMix.from_config(target.cfg, names=names)


def _note_unused_options(target: EvalTarget, names: list[str]) -> None:
    """Options of a function eval does not score are not used: said, not silent."""
    from alignkit.rewards.registry import config_options, short_name

    unused = sorted(str(k) for k in config_options(target.cfg) if k not in {short_name(n) for n in names})
    if unused:
        target.notes.append(f"reward.options for {', '.join(unused)} not used: not among the scored reward "
                            "functions")


@torch.no_grad()
def generate(model, tokenizer, prompts: list, cfg: DictConfig, mix) -> tuple[list[str], dict[str, list[float]],
                                                                             list[float]]:
    """Greedy replies, each reward function's scores and the total (empty without reward functions)."""
    from alignkit.rl.generation import HFGenerationEngine

    engine = HFGenerationEngine(model, tokenizer)
    texts: list[str] = []
    parts: dict[str, list[float]] = {}
    total: list[float] = []
    for i in range(0, len(prompts), 16):
        chunk = prompts[i : i + 16]
        rollouts = sorted(engine.generate([p.prompt_ids for p in chunk], num_samples=1,
                                          max_new_tokens=int(cfg.generation.max_new_tokens), temperature=0.0,
                                          seed=0), key=lambda r: r.prompt_index)
        replies = [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
        texts += replies
        if mix is not None:
            from alignkit.trainers.rollout import decode_prompt

            columns = {k: [p.extra.get(k) for p in chunk] for k in sorted({k for p in chunk for k in p.extra})}
            columns["completion_ids"] = [list(r.completion_ids) for r in rollouts]
            scored = mix([decode_prompt(p, tokenizer) for p in chunk], replies, **columns)
            total += scored.total
            for name, values in scored.per_function.items():
                parts.setdefault(name, []).extend(values)
    return texts, parts, total


def _reference(group) -> Any:
    from alignkit.rewards.math import reference_of

    try:
        return reference_of({k: [v] for k, v in group.extra.items()}, 0)
    except DataError:
        return None


def answer_metrics(samples: list[dict]) -> dict[str, float]:
    """Plain answer accuracy of the model's and the baseline's replies (samples with an ``answer``),
    scored with the same parser (``alignkit.rewards.answer.is_correct``) on both sides, and beside it
    the demo judge's ``format`` and ``concise`` means (for ``scripts/write_card.py`` and old samples)."""
    from alignkit.rewards.answer import is_correct

    from alignkit.rewards.registry import resolve_reward, reward_names

    rows = [r for r in samples if r.get("answer") is not None]
    out: dict[str, float] = {}
    if not rows:
        return out
    parts = [name for name in JUDGE_PARTS if name in reward_names()]  # the demo judge's format and brevity
    answers = [r["answer"] for r in rows]
    for side, prefix in (("model", ""), ("baseline", "baseline_")):
        if all(side in r and r[side] is not None for r in rows):
            replies = [r[side] for r in rows]
            out[f"{prefix}answer_accuracy"] = sum(is_correct(c, a) for c, a in zip(replies, answers)) / len(rows)
            for name in parts:
                values = resolve_reward(name)([""] * len(rows), replies, answer=answers)
                out[f"{prefix}{name}"] = sum(values) / len(values)
    return out


def _binary(values: list[float]) -> bool:
    return bool(values) and all(v in (0.0, 1.0) for v in values)


def _reward_interval(values: list[float]) -> Interval:
    """A 0/1 reward is a proportion (Wilson); any other a mean (normal interval); NaN (not applicable) left out."""
    kept = [v for v in values if not math.isnan(v)]
    return wilson(sum(kept), len(kept)) if _binary(kept) else mean_interval(kept)


def _reward_difference(model: list[float], baseline: list[float]) -> Interval:
    if _binary(model) and _binary(baseline):
        return paired_difference(model, baseline)
    return paired_mean_difference(model, baseline)


# ---------------------------------------------------------------- the command


def run_eval(target: str, overrides: list[str], *, baseline: str | None, limit: int, out_dir: str | None) -> dict:
    plan = resolve_target(target, overrides, baseline)
    device = eval_device()
    tokenizer = _tokenizer(plan.model, plan.cfg)
    try:  # the data is read (and any problem in it reported) before a model loads
        pairs = _records(plan, "pairwise", tokenizer, limit)
    except ConfigError:  # sft / prompt data: no pairs to rank
        pairs = []
    all_prompts = _records(plan, "prompt", tokenizer, 0)
    model, tokenizer = _load(plan.model, plan.cfg, device)
    reference = _load(plan.baseline, plan.cfg, device)[0] if plan.baseline else None
    metrics: dict[str, Interval] = {}
    result: dict[str, Any] = {"model": plan.model, "baseline": plan.baseline, "data": plan.data_source,
                              "device": str(device)}

    if pairs and reference is not None:
        metrics.update(preference_accuracy(model, reference, pairs, plan.cfg, tokenizer.pad_token_id))
    prompts, duplicates = _unique_prompts(all_prompts)
    prompts = prompts[:limit] if limit > 0 else prompts
    if duplicates:
        plan.notes.append(f"{duplicates} duplicate prompts scored once")
    if not prompts:
        raise DataError(f"no prompts to evaluate on in {plan.data_source}")
    mix = build_scoring(plan, prompts[0], tokenizer)
    if plan.cfg.reward.model:
        plan.notes.append(f"the run's reward model ({plan.cfg.reward.model}) is not scored by eval: reward.fns only")
    texts, parts, total = generate(model, tokenizer, prompts, plan.cfg, mix)
    base_texts, base_parts, base_total = (generate(reference, tokenizer, prompts, plan.cfg, mix) if reference
                                          is not None else (None, {}, []))

    golds = [_reference(p) for p in prompts]
    with_ref = [i for i, g in enumerate(golds) if g is not None]
    correct = base_correct = None
    if with_ref:
        from alignkit.rewards.answer import is_correct

        correct = [is_correct(texts[i], golds[i]) for i in with_ref]
        metrics["answer_accuracy"] = wilson(sum(correct), len(correct))
        if base_texts is not None:
            base_correct = [is_correct(base_texts[i], golds[i]) for i in with_ref]
            metrics["baseline_answer_accuracy"] = wilson(sum(base_correct), len(base_correct))
            metrics["answer_accuracy_diff"] = paired_difference(correct, base_correct)
        if len(with_ref) < len(prompts):
            plan.notes.append(f"{len(prompts) - len(with_ref)} of {len(prompts)} prompts carry no reference answer: "
                              "left out of answer accuracy")
    else:
        plan.notes.append("no prompt carries a reference answer ('answer', 'reward_model.ground_truth', "
                          "'ground_truth', 'solution' or OpenRLHF's 'label' column): answer accuracy not measured")
    for name, values in parts.items():
        metrics[f"reward/{name}"] = _reward_interval(values)
        if name in base_parts:
            metrics[f"baseline_reward/{name}"] = _reward_interval(base_parts[name])
            pairs_ok = [(a, b) for a, b in zip(values, base_parts[name]) if not (math.isnan(a) or math.isnan(b))]
            metrics[f"reward/{name}_diff"] = _reward_difference([a for a, _ in pairs_ok], [b for _, b in pairs_ok])
    if total and base_total:
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(total, base_total)]
        metrics["win_rate"] = mean_interval(wins, bounds=(0.0, 1.0))

    result["metrics"] = {k: v.as_dict() for k, v in metrics.items()}
    result["metrics"].get("answer_accuracy_diff", {}).update(method="Newcombe paired (method 10)")
    # the plain values at the top level too (read by scripts/write_card.py and earlier eval.json readers)
    legacy = {"judge_score": "reward/judge", "baseline_judge_score": "baseline_reward/judge",
              "format": "reward/format", "baseline_format": "baseline_reward/format",
              "concise": "reward/concise", "baseline_concise": "baseline_reward/concise"}
    for key, interval in metrics.items():
        result[key] = interval.rate
    for old, new in legacy.items():
        if new in metrics:
            result[old] = metrics[new].rate
    result["prompts"] = float(len(prompts))
    if pairs and reference is not None:
        result["pairs"] = float(len(pairs))
    result["notes"] = plan.notes

    out = Path(out_dir) if out_dir else (plan.run_dir / "eval" if plan.run_dir is not None else Path("eval"))
    from alignkit import runfiles

    if out_dir:
        out.mkdir(parents=True, exist_ok=True)  # typed by the user
    else:
        runfiles.make_dir(out, "eval folder")  # a planted link in a run directory is refused
    from alignkit.rewards.answer import gold_answer

    samples = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": tokenizer.decode(prompt.prompt_ids, skip_special_tokens=True), "answer": golds[i],
               "reference": gold_answer(golds[i]), "model": texts[i], "model_score": total[i] if total else None}
        if with_ref and golds[i] is not None:
            row["model_correct"] = correct[with_ref.index(i)]
        if base_texts is not None:
            row.update(baseline=base_texts[i], baseline_score=base_total[i] if base_total else None)
            if base_correct is not None and golds[i] is not None:
                row["baseline_correct"] = base_correct[with_ref.index(i)]
        samples.append(row)
    runfiles.write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    runfiles.write_text(out / "eval.json", json.dumps(result, indent=1))
    result["out_dir"] = str(out)
    result["intervals"] = metrics
    return result


def format_table(result: dict) -> list[str]:
    """The printed summary: answer accuracy first, then the other rates beside it, each with N and its interval."""
    metrics: dict[str, Interval] = result["intervals"]
    order = ["answer_accuracy", "baseline_answer_accuracy", "answer_accuracy_diff"]
    order += [k for k in metrics if k.startswith(("reward/", "baseline_reward/")) and k not in order]
    order += [k for k in ("win_rate", "preference_accuracy", "likelihood_accuracy") if k in metrics]
    lines = [f"model     {result['model']}", f"baseline  {result['baseline'] or '(none: --baseline MODEL to compare)'}",
             f"data      {result['data']}", f"device    {result['device']}", "",
             f"{'metric':<30} {'value':>8}  {'95% interval':<19} {'N':>6}"]
    for key in order:
        if key not in metrics:
            continue
        i = metrics[key]
        sign = "+" if key.endswith("_diff") else ""
        interval, value = f"[{i.ci_low:{sign}.3f}, {i.ci_high:{sign}.3f}]", f"{i.rate:{sign}.3f}"
        if math.isnan(i.ci_low) or math.isnan(i.ci_high):
            interval = "n/a (N < 2)" if i.n < 2 else "n/a"  # a normal interval needs a spread
        lines.append(f"{key:<30} {value:>8}  {interval:<19} {i.n:>6}")
    if "answer_accuracy_diff" in metrics:
        lines.append("(answer_accuracy_diff: model - baseline on the same prompts, Newcombe's paired interval; "
                     "rates: Wilson; rewards and win rate: mean +- 1.96 s/sqrt(N))")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    lines.append(f"samples and eval.json in {result['out_dir']}")
    return lines
