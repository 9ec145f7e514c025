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

A completion with no step (empty, or only separators) scores 0.0 and is counted (``empty``). The
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
                 how: str = "min", device: Any = "cpu", batch_size: int = 4) -> None:
        from alignkit.models.step_head import StepScorer

        if how not in AGGREGATES:
            raise ValueError(f"unknown PRM aggregate {how!r}; valid: {', '.join(AGGREGATES)}")
        self.scorer = StepScorer(scorer.eval().requires_grad_(False)).to(device)
        self.tokenizer, self.data, self.how, self.device, self.batch_size = tokenizer, data, how, device, batch_size
        self.separator = separator if separator is not None else DEFAULT_SEPARATOR
        self.empty = 0  # completions without a step (scored 0.0)

    def groups(self, prompts: Sequence[Any], completions: Sequence[str]) -> tuple[list, list[int]]:
        """One stepwise group per completion that has steps (labelled at every step end), and their indices."""
        from alignkit.data.batch import TokenizedGroup
        from alignkit.data.stepwise import prompt_ids, split_steps, step_ids

        groups, kept = [], []
        for i, (prompt, text) in enumerate(zip(prompts, completions)):
            steps = split_steps(str(text or ""), self.separator)
            if not steps:
                self.empty += 1
                continue
            ids, ends = step_ids(self.tokenizer, steps, self.separator)
            mask = [False] * len(ids)
            for end in ends:
                mask[end] = True
            groups.append(TokenizedGroup(prompt_ids=prompt_ids(self.tokenizer, prompt, self.data),
                                         completion_ids=[ids], completion_train_mask=[mask]))
            kept.append(i)
        return groups, kept

    @torch.no_grad()
    def step_probs(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[list[float]]:
        """P(correct) of every step of every completion ([] for a completion without steps)."""
        from alignkit.data.collate import collate
        from alignkit.models.step_head import step_logits

        groups, kept = self.groups(prompts, completions)
        out: list[list[float]] = [[] for _ in completions]
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(groups), self.batch_size):
            chunk = groups[start : start + self.batch_size]
            batch = collate(chunk, layout="padded", pad_token_id=pad).to(self.device)
            probs = torch.softmax(step_logits(self.scorer, batch), -1)[:, 1].cpu()
            slots = batch.target_slot.cpu()
            for g in range(len(chunk)):
                out[kept[start + g]] = probs[slots == g].tolist()
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
    chosen = separator if separator is not None else trained_separator(folder)
    return ProcessReward(scorer, tokenizer, data, separator=chosen, how=how, device=accelerator_device())
