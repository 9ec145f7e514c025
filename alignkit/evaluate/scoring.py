"""The reward side of ``alignkit eval``: which reward functions score the data, and greedy replies scored by them.

``build_scoring`` builds the mix the trainers would (``RewardMix.from_config``: each function with its
``reward.options``), with the demo ``judge``'s ``format`` and ``concise`` parts beside it; a function
that cannot score the data is an error when the user named it (or the run trained on it), else left
out with a note. ``generate`` samples one greedy reply per prompt (``generation.max_new_tokens``) and
scores it. Left out: sampling-based (pass@k) evaluation and the run's reward model.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from alignkit.config.schema import GenerationConfig
from alignkit.data.batch import TokenizedGroup, decode_prompt
from alignkit.errors import ConfigError, DataError
from alignkit.evaluate.target import EvalTarget

JUDGE_PARTS = ("format", "concise")  # shown beside the demo judge, never instead of answer accuracy


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
def generate(model: torch.nn.Module, tokenizer: Any, prompts: list[TokenizedGroup], generation: GenerationConfig,
             mix: Any) -> tuple[list[str], dict[str, list[float]], list[float]]:
    """Greedy replies (up to ``generation.max_new_tokens``), each reward function's scores and the total
    (empty without reward functions)."""
    from alignkit.rl.generation import HFGenerationEngine

    engine = HFGenerationEngine(model, tokenizer)
    texts: list[str] = []
    parts: dict[str, list[float]] = {}
    total: list[float] = []
    for i in range(0, len(prompts), 16):
        chunk = prompts[i : i + 16]
        rollouts = sorted(engine.generate([p.prompt_ids for p in chunk], num_samples=1,
                                          max_new_tokens=generation.max_new_tokens, temperature=0.0,
                                          seed=0), key=lambda r: r.prompt_index)
        replies = [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
        texts += replies
        if mix is not None:
            columns = {k: [p.extra.get(k) for p in chunk] for k in sorted({k for p in chunk for k in p.extra})}
            columns["completion_ids"] = [list(r.completion_ids) for r in rollouts]
            scored = mix([decode_prompt(p, tokenizer) for p in chunk], replies, **columns)
            total += scored.total
            for name, values in scored.per_function.items():
                parts.setdefault(name, []).extend(values)
    return texts, parts, total
