"""A trained process reward model as a reward for the online runners (``reward.prm``, GRPO/PPO/...).

``ProcessReward(folder, ...)`` loads a ``recipe=prm_*`` export (``AutoModelForTokenClassification``, 2
labels) frozen, and scores each sampled completion: split into steps at the separator
(``data.stepwise.split_steps``: every ``reward.prm_separator``, default the one the PRM was trained with,
read from its ``alignkit_prm.json``, else ``"\\n"``; pieces stripped, empty pieces left out), tokenized
as the PRM's training data were (``data.stepwise.prompt_ids`` / ``step_ids``: the prompt as the data has
it, messages through the chat template, a string as plain text with BOS), each step's P(correct) read
at its last token, then aggregated (``reward.prm_aggregate``, ``aggregate``):

* ``min`` (default): the lowest step probability -- "PRM-min", the solution is as good as its worst
  step (Lightman et al. 2023 score a solution by the product; Wang et al. 2024, Math-Shepherd, and
  later best-of-N studies use the minimum, which does not fall with the number of steps);
* ``prod``: the product of the step probabilities (Lightman et al. 2023: the probability that every
  step is correct);
* ``last``: the last step's probability.

A completion with no step (empty, or only separators) scores 0.0 and is counted (``empty``). Consecutive
completions of one prompt (GRPO's G samples) are scored in one prefix-shared unit (``data.collate``'s
``prefix_shared`` layout: the prompt encoded once, each completion attending to it and to itself), about
``batch_size`` completions per forward; ``layout="padded"`` scores each alone (the same probabilities).
Under ``deepspeed.dtype=bf16_autocast`` (fp32 weights) the PRM's forward runs under ``torch.autocast(bf16)`` as
the policy's does. The
total reward is ``rule mix + model_weight * reward model + prm_weight * this`` (``trainers.rollout.
CombinedReward``), logged as ``reward/prm``. Left out: step-level (per-token) advantages -- the
aggregate is one sequence-level reward, as the online runners' advantages take -- and the weighted
and learned aggregations of the literature.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

AGGREGATES = ("min", "prod", "last")
DEFAULT_SEPARATOR = "\n"


def aggregate(step_probs: Sequence[float], how: str = "min") -> float:
    """One reward from a completion's step probabilities (see the module docstring); 0.0 for no steps."""
    if how not in AGGREGATES:
        raise ValueError(f"unknown PRM aggregate {how!r}; valid: {', '.join(AGGREGATES)}")
    if not step_probs:
        return 0.0
    if how == "min":
        return float(min(step_probs))
    if how == "prod":
        return float(math.prod(step_probs))
    return float(step_probs[-1])


def trained_separator(folder: str | Path) -> str | None:
    """The step separator a PRM folder was trained with (its ``alignkit_prm.json``), or None."""
    sidecar = Path(folder) / "alignkit_prm.json"
    if not sidecar.is_file():
        return None
    value = json.loads(sidecar.read_text()).get("step_separator")
    return value if isinstance(value, str) else None


class ProcessReward:
    """Frozen PRM scoring (prompt, completion text) pairs; see the module docstring."""

    def __init__(self, scorer: torch.nn.Module, tokenizer: Any, data: Any, *, separator: str | None = None,
                 how: str = "min", device: Any = "cpu", batch_size: int = 8, layout: str = "prefix_shared",
                 autocast: torch.dtype | None = None) -> None:
        from alignkit.models.step_head import StepScorer

        if how not in AGGREGATES:
            raise ValueError(f"unknown PRM aggregate {how!r}; valid: {', '.join(AGGREGATES)}")
        self.scorer = StepScorer(scorer.eval().requires_grad_(False)).to(device)
        if layout not in ("prefix_shared", "padded"):
            raise ValueError(f"unknown PRM scoring layout {layout!r}; valid: prefix_shared, padded")
        self.tokenizer, self.data, self.how, self.device, self.batch_size = tokenizer, data, how, device, batch_size
        self.layout, self.autocast = layout, autocast  # autocast: the matmul dtype under torch.autocast, or None
        self.device_type = torch.device(device).type
        self.separator = separator if separator is not None else DEFAULT_SEPARATOR
        self.empty = 0  # completions without a step (scored 0.0)

    def groups(self, prompts: Sequence[Any], completions: Sequence[str]) -> tuple[list, list[list[int]]]:
        """Stepwise groups (labelled at every step end) of the completions that have steps, and per group the
        indices of its completions: under ``prefix_shared`` consecutive completions of one prompt (GRPO's G
        samples, a best-of-K's K) share one group, so the prompt is encoded once; ``padded``: one each."""
        from alignkit.data.batch import TokenizedGroup
        from alignkit.data.stepwise import prompt_ids, split_steps, step_ids

        members: list[list[int]] = []
        parts: list[tuple[list[int], list[list[int]], list[list[bool]]]] = []
        for i, (prompt, text) in enumerate(zip(prompts, completions)):
            steps = split_steps(str(text or ""), self.separator)
            if not steps:
                self.empty += 1
                continue
            ids, ends = step_ids(self.tokenizer, steps, self.separator)
            mask = [False] * len(ids)
            for end in ends:  # >= 1: a step is a non-empty piece plus the separator, so no target is a
                mask[end] = True  # completion's first token (whose predecessor a shared prefix moves away)
            if self.layout == "prefix_shared" and members and members[-1][-1] == i - 1 and prompts[i - 1] == prompt:
                members[-1].append(i)
                parts[-1][1].append(ids)
                parts[-1][2].append(mask)
                continue
            members.append([i])
            parts.append((prompt_ids(self.tokenizer, prompt, self.data), [ids], [mask]))
        groups = [TokenizedGroup(prompt_ids=p, completion_ids=c, completion_train_mask=m) for p, c, m in parts]
        return groups, members

    @torch.no_grad()
    def step_probs(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[list[float]]:
        """P(correct) of every step of every completion ([] for a completion without steps)."""
        from alignkit.data.collate import collate
        from alignkit.models.step_head import step_logits

        groups, members = self.groups(prompts, completions)
        out: list[list[float]] = [[] for _ in completions]
        pad = self.tokenizer.pad_token_id
        start = 0
        while start < len(groups):  # forwards of about batch_size completions (at least one group)
            stop, count = start, 0
            while stop < len(groups) and (stop == start or count + groups[stop].group_size <= self.batch_size):
                count += groups[stop].group_size
                stop += 1
            chunk = groups[start:stop]
            batch = collate(chunk, layout=self.layout, pad_token_id=pad).to(self.device)
            with torch.autocast(self.device_type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
                probs = torch.softmax(step_logits(self.scorer, batch).float(), -1)[:, 1].cpu()
            slots = batch.target_slot.cpu()
            for g in range(len(chunk)):
                for k, index in enumerate(members[start + g]):
                    out[index] = probs[slots == g * batch.group_size + k].tolist()
            start = stop
        return out

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        return [aggregate(p, self.how) for p in self.step_probs(prompts, completions)]


def load_process_reward(folder: str, model: Any, data: Any, deepspeed: Any, *, separator: str | None = None,
                        how: str = "min") -> ProcessReward:
    """A ``ProcessReward`` from a ``recipe=prm_*`` final/ folder, loaded as ``model`` (a ``ModelConfig``) says but
    from that folder and without LoRA, in ``deepspeed.dtype``, on this rank's accelerator."""
    from dataclasses import replace

    from alignkit.engine.collectives import accelerator_device
    from alignkit.models.load import load_reward_model

    cfg = replace(model, name_or_path=folder, lora=replace(model.lora, r=0))
    scorer, tokenizer = load_reward_model(cfg, per_token=True, num_labels=2, dtype=deepspeed.dtype)
    from alignkit.engine.config import resolve_dtype

    chosen = separator if separator is not None else trained_separator(folder)
    autocast = torch.bfloat16 if resolve_dtype(deepspeed.dtype) == "bf16_autocast" else None  # as the policy computes
    return ProcessReward(scorer, tokenizer, data, separator=chosen, how=how, device=accelerator_device(),
                         autocast=autocast)
