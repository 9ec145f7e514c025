"""Judges: who decides which of two responses is better, as one small protocol the online runners take.

``Judge.compare(prompts, completions_a, completions_b, **columns) -> P(a > b)``, a float32 tensor
``[N]`` in [0, 1]; ``prompts`` are the prompts' text as reward functions see them, ``columns`` the
records' columns per comparison (``prompt`` = the record's prompt as the data has it, a string or
chat messages; ``answer`` ...). Four kinds (``judge.kind``, the typed ``judge`` section of
``config/schema.py``, checked at compose time by ``check_judge``):

* ``rule``: reward functions (``judge.fns``, each weight 1; default the run's ``reward.fns`` and
  ``reward.weights``) score each response;
  1 where a's reward is higher, 0.5 on a tie, 0 where lower. The functions see no ``completion_ids``.
* ``reward_model``: a reward-model folder (``recipe=rm_*``): ``sigmoid(r_a - r_b)``.
* ``pairwise``: a pairwise preference model folder (``recipe=pm_*``), both orders averaged:
  ``(P(a > b | a listed first) + 1 - P(b > a | b listed first)) / 2``
  (the pair input of ``alignkit.models.pair_input``).
* ``llm``: a causal LM (``judge.path``; null = the run's ``model``, loaded frozen) asked
  ``judge.prompt_template`` (``{prompt}``, ``{a}``, ``{b}``) through the generation engine's
  ``next_token_logits``; ``q = p(A) / (p(A) + p(B))`` of the next token, deterministic (no sampling);
  position bias removed by asking both orders: ``P = (q(a, b) + 1 - q(b, a)) / 2``.

The model judges tokenize the text with their own tokenizer exactly as the data pipeline tokenizes a
paired record (``data.tokenize.tokenize_group`` under the run's ``data`` settings: chat template,
truncation), so a pm / rm checkpoint sees the format it was trained on; they run on this rank's
accelerator, in ``deepspeed.dtype``, outside DeepSpeed (frozen, no ZeRO sharding).

``win_rates(judge, sampled, tokenizer)`` turns a judge into a ranking of each prompt's K samples: all
K(K-1)/2 pairs are compared and each sample's score is its mean P of beating the others (for a rule
judge this orders samples exactly as their rewards do). Online DPO (``judge.kind`` set) picks the
best and the worst by it (OAIF, Guo et al. 2024). ``pair_preference(judge, own, other, tokenizer)``
compares the j-th sample of ``own`` with the j-th of ``other`` for each prompt: XPO's policy-vs-reference
pairs (the policy's is chosen where P >= 0.5, TRL's ``model_scores >= ref_scores``) and Nash-MD's
policy-vs-mixture preference (P itself, as TRL's ``judge(..., return_scores=True)``). SPPO (``runner=sppo``)
trains on the win rates as its estimates of P(y > pi_t).
Left out: vLLM for the llm judge (it reads logits from the HF engine), API judges.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from alignkit.errors import ConfigError
from alignkit.models.config import ModelConfig

JUDGE_KINDS = ("rule", "reward_model", "pairwise", "llm")
TEMPLATE_FIELDS = ("prompt", "a", "b")
ANSWERS = ("A", "B")


class Judge(Protocol):
    def compare(self, prompts: Sequence[str], completions_a: Sequence[str], completions_b: Sequence[str],
                **columns: list) -> torch.Tensor: ...


def check_judge(cfg: Any, runner: str) -> None:
    """Compose-time checks of the ``judge`` section (before any model loads). Which runners read ``judge.kind``
    is their ``knobs`` in ``alignkit.losses.runners.RUNNERS`` (refused under any other by ``check_knobs``,
    which ``config.validate`` runs first)."""
    j = cfg.judge
    if j.kind is None:
        for key in ("path", "fns"):
            if j[key]:
                raise ConfigError(f"judge.{key} is set but judge.kind is not; set judge.kind "
                                  f"({', '.join(JUDGE_KINDS)}) or remove judge.{key}.")
        return
    if j.kind not in JUDGE_KINDS:
        raise ConfigError(f"judge.kind={j.kind!r} is not valid. Valid choices: {', '.join(JUDGE_KINDS)} "
                          "(or null: rank by the rewards).")
    from alignkit.config.schema import RLConfig

    if runner == "nash_md" and cfg.rl.preference != RLConfig().preference:  # set away from its default
        raise ConfigError(f"rl.preference={cfg.rl.preference} is not read with judge.kind={j.kind}: Nash-MD's "
                          "preference is then the judge's P(policy sample beats mixture sample). Remove one of them.")
    if j.kind in ("reward_model", "pairwise"):
        trained = "rm_*" if j.kind == "reward_model" else "pm_*"
        if not j.path:
            raise ConfigError(f"judge.kind={j.kind} needs judge.path: the final/ folder of a recipe={trained} run.")
    if j.path and not (Path(j.path) / "config.json").is_file():
        raise ConfigError(f"judge.path={j.path!r} is not a model folder (no config.json); give the final/ folder "
                          "of a training run (recipe=rm_* for reward_model, pm_* for pairwise, any causal LM for llm).")
    if j.path:
        _check_architecture(Path(j.path), j.kind)
    if j.kind != "rule" and j.fns:
        raise ConfigError(f"judge.fns is read by judge.kind=rule only (judge.kind={j.kind}). Remove it.")
    if j.kind == "rule":
        from alignkit.rewards.registry import resolve_reward

        if j.path:
            raise ConfigError("judge.path is not read by judge.kind=rule (it scores with reward functions). Remove it.")
        for name in j.fns or cfg.reward.fns:
            resolve_reward(name)
        if not (j.fns or cfg.reward.fns):
            raise ConfigError("judge.kind=rule needs reward functions: set judge.fns (or reward.fns).")
    if j.kind == "llm":
        check_template(j.prompt_template)
    if int(j.batch_size) <= 0:
        raise ConfigError(f"judge.batch_size={j.batch_size} must be positive.")


def _check_architecture(folder: Path, kind: str) -> None:
    """The folder's model class fits the kind: a one-label sequence classifier (reward_model, pairwise) or a
    causal LM (llm), read from its config.json (nothing loads)."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"judge.path={str(folder)!r}: config.json cannot be read ({err}).") from None
    architectures = [str(a) for a in config.get("architectures") or []]
    if kind == "llm":
        wanted, fits = "a causal LM (…ForCausalLM)", any(a.endswith("ForCausalLM") for a in architectures)
    else:
        labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
        wanted = "a one-label sequence classifier (…ForSequenceClassification, the export of recipe=" + (
            "rm_*)" if kind == "reward_model" else "pm_*)")
        fits = any(a.endswith("ForSequenceClassification") for a in architectures) and labels == 1
    if architectures and not fits:
        raise ConfigError(f"judge.kind={kind} needs {wanted}; judge.path={str(folder)!r} holds "
                          f"{', '.join(architectures)}" + ("" if kind == "llm" else f" with {labels} label(s)") + ".")


def check_template(template: str) -> None:
    import string

    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise ConfigError(f"judge.prompt_template is not a format string ({err}).") from None
    if fields != set(TEMPLATE_FIELDS):
        raise ConfigError(f"judge.prompt_template must hold exactly the fields {{prompt}}, {{a}} and {{b}}; it holds "
                          f"{', '.join('{' + f + '}' for f in sorted(fields)) or 'none'}.")


def build_judge(run: Any, tokenizer: Any = None) -> Judge | None:
    """The run's judge (``run.judge``, a ``trainers.common.Run``), or None when ``judge.kind`` is null.

    Model judges load here, with the run's data section (``run.data``: how a (prompt, a, b) is tokenized) and
    precision (``run.deepspeed.dtype``); the rule judge's reward functions read the free-form
    ``reward.options`` from ``run.cfg`` (no dataclass holds them)."""
    j = run.judge
    if j.kind is None:
        return None
    if j.kind == "rule":
        from alignkit.rewards.registry import RewardMix

        mix = RewardMix.from_config(run.cfg, names=list(j.fns)) if j.fns else RewardMix.from_config(run.cfg)
        return RuleJudge(mix)
    dtype, batch = run.deepspeed.dtype, j.batch_size
    if j.kind == "reward_model":
        return RewardModelJudge(_model_cfg(run.model, j.path), run.data, dtype=dtype, batch_size=batch)
    if j.kind == "pairwise":
        return PairwiseJudge(_model_cfg(run.model, j.path), run.data, dtype=dtype, batch_size=batch)
    return LLMJudge(_model_cfg(run.model, j.path), j.prompt_template, dtype=dtype, batch_size=batch)


def _model_cfg(model: ModelConfig, path: str | None) -> ModelConfig:
    """The judge's model section: the run's (tokenizer options, dtype knobs) without LoRA, at ``path``."""
    model = replace(model, lora=replace(model.lora, r=0))
    return replace(model, name_or_path=path) if path else model


class RuleJudge:
    """1 / 0.5 / 0 from the rewards of a and b (``scorer(prompts, completions, **columns) -> (total, parts)``)."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer

    def compare(self, prompts: Sequence[str], completions_a: Sequence[str], completions_b: Sequence[str],
                **columns: list) -> torch.Tensor:
        ra = torch.as_tensor(list(self.scorer(list(prompts), list(completions_a), **columns)[0]), dtype=torch.float32)
        rb = torch.as_tensor(list(self.scorer(list(prompts), list(completions_b), **columns)[0]), dtype=torch.float32)
        return (ra > rb).float() + 0.5 * (ra == rb).float()


class _ModelJudge:
    """Shared by the reward-model and pairwise judges: a frozen sequence-classification model and the
    data pipeline's tokenization of (prompt, a, b) as one paired record."""

    def __init__(self, model_cfg: Any, data_cfg: Any, *, dtype: str, batch_size: int) -> None:
        from alignkit.engine.collectives import accelerator_device
        from alignkit.models.load import load_reward_model
        from alignkit.trainers.reward import RewardScorer

        model, self.tokenizer = load_reward_model(model_cfg, dtype=dtype)
        self.device = accelerator_device()
        self.scorer = RewardScorer(model.eval().requires_grad_(False)).to(self.device)
        self.data_cfg, self.batch_size = data_cfg, batch_size

    def groups(self, prompts, completions_a, completions_b, columns) -> list:
        from alignkit.data.record import Record
        from alignkit.data.tokenize import tokenize_group

        raw = columns.get("prompt") or [None] * len(prompts)
        out = []
        for i, (prompt, a, b) in enumerate(zip(prompts, completions_a, completions_b)):
            prompt = raw[i] if raw[i] else prompt
            both = [[{"role": "assistant", "content": c}] for c in (a, b)] if isinstance(prompt, list) else [a, b]
            record = Record(format="paired", prompt=prompt, completions=both, location=f"judge comparison {i}")
            group = tokenize_group(record, self.tokenizer, self.data_cfg)
            if group is None:
                raise ValueError(f"judge comparison {i} could not be tokenized (prompt {str(prompt)[:80]!r})")
            out.append(group)
        return out

    @torch.no_grad()
    def scores(self, groups: list) -> torch.Tensor:
        """``[N, 2]`` head scores of the N groups' two slots."""
        from alignkit.data.collate import collate
        from alignkit.trainers.reward import score_batch

        rows = []
        pad = self.tokenizer.pad_token_id
        for i in range(0, len(groups), self.batch_size):
            batch = collate(groups[i : i + self.batch_size], layout="padded", pad_token_id=pad).to(self.device)
            rows.append(score_batch(self.scorer, batch).float().cpu())
        return torch.cat(rows) if rows else torch.zeros(0, 2)


class RewardModelJudge(_ModelJudge):
    """``sigmoid(r_a - r_b)`` of a reward model."""

    def compare(self, prompts: Sequence[str], completions_a: Sequence[str], completions_b: Sequence[str],
                **columns: list) -> torch.Tensor:
        scores = self.scores(self.groups(prompts, completions_a, completions_b, columns))
        return torch.sigmoid(scores[:, 0] - scores[:, 1])


class PairwiseJudge(_ModelJudge):
    """A pairwise preference model (``recipe=pm_*``), both orders averaged."""

    def compare(self, prompts: Sequence[str], completions_a: Sequence[str], completions_b: Sequence[str],
                **columns: list) -> torch.Tensor:
        from alignkit.models.pair_input import marker_ids, pair_group

        markers = marker_ids(self.tokenizer)
        groups = [pair_group(g, 0, 1, markers) for g in self.groups(prompts, completions_a, completions_b, columns)]
        logits = self.scores(groups)  # [N, 2]: logit P(a > b) with a first, logit P(b > a) with b first
        return (torch.sigmoid(logits[:, 0]) + 1.0 - torch.sigmoid(logits[:, 1])) / 2.0


class LLMJudge:
    """A causal LM asked "A or B?" in both orders; see the module docstring."""

    def __init__(self, model_cfg: Any, template: str, *, dtype: str, batch_size: int) -> None:
        from alignkit.engine.collectives import accelerator_device
        from alignkit.models.load import load_causal_lm
        from alignkit.rl.generation import HFGenerationEngine

        check_template(template)
        model, self.tokenizer = load_causal_lm(model_cfg, dtype=dtype)
        model = model.eval().requires_grad_(False).to(accelerator_device())
        self.engine = HFGenerationEngine(model, self.tokenizer)
        self.template, self.batch_size = template, batch_size
        self.answer_ids = [self._single_token(letter) for letter in ANSWERS]

    def _single_token(self, letter: str) -> int:
        ids = list(self.tokenizer(letter, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            raise ConfigError(f"judge.kind=llm reads the next-token probability of {letter!r}, which this tokenizer "
                              f"splits into {len(ids)} tokens {ids}; use a model whose tokenizer has it as one token.")
        return ids[0]

    def prompt_ids(self, question: str) -> list[int]:
        """The judge question as the model's user turn (chat template when it has one), ready for its answer."""
        if getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                          add_generation_prompt=True)
            return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(question)["input_ids"])

    def first_wins(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> torch.Tensor:
        """``q = p(A) / (p(A) + p(B))`` for each question listing ``firsts`` as A."""
        questions = [self.prompt_ids(self.template.format(prompt=p, a=a, b=b))
                     for p, a, b in zip(prompts, firsts, seconds)]
        out = []
        for i in range(0, len(questions), self.batch_size):
            logits = self.engine.next_token_logits(questions[i : i + self.batch_size]).float().cpu()
            pair = logits[:, self.answer_ids].log_softmax(dim=-1)  # renormalised over {A, B}
            out.append(pair[:, 0].exp())
        return torch.cat(out) if out else torch.zeros(0)

    def compare(self, prompts: Sequence[str], completions_a: Sequence[str], completions_b: Sequence[str],
                **columns: list) -> torch.Tensor:
        texts = [_prompt_text(p, raw) for p, raw in zip(prompts, columns.get("prompt") or [None] * len(prompts))]
        ab = self.first_wins(texts, completions_a, completions_b)
        ba = self.first_wins(texts, completions_b, completions_a)
        return (ab + 1.0 - ba) / 2.0


def _prompt_text(prompt: str, raw: Any) -> str:
    """The question for the llm judge: a string prompt, or the last user turn of chat messages."""
    if isinstance(raw, str) and raw:
        return raw
    if isinstance(raw, list):
        users = [m.get("content", "") for m in raw if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return str(users[-1])
    return prompt


def pair_preference(judge: Judge, own: Any, other: Any, tokenizer: Any) -> torch.Tensor:
    """``[S]`` (group-major, as ``own.rewards``): P(the j-th sample of ``own`` beats the j-th of ``other``) for
    each prompt; ``own`` and ``other`` are ``SampledBatch``es of the same prompts with the same group size."""
    from alignkit.data.batch import decode_prompt

    if len(own.groups) != len(other.groups) or any(a.group_size != b.group_size
                                                   for a, b in zip(own.groups, other.groups)):
        raise ValueError("pair_preference needs two samplings of the same prompts with the same group size")
    decode = lambda batch: [tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
                            for g in batch.groups for ids in g.completion_ids]
    a_texts, b_texts = decode(own), decode(other)
    prompts = [decode_prompt(g, tokenizer) for g in own.groups for _ in range(g.group_size)]
    keys = sorted({k for g in own.groups for k in g.extra})
    columns = {k: [g.extra.get(k) for g in own.groups for _ in range(g.group_size)] for k in keys}
    if not prompts:
        return torch.zeros(0)
    return _checked(judge.compare(prompts, a_texts, b_texts, **columns), len(prompts))


def _checked(probability: torch.Tensor, n: int) -> torch.Tensor:
    """The judge's answer as ``[n]`` float32 on the CPU, else a ValueError naming what came back."""
    probability = torch.as_tensor(probability).float().cpu()
    if probability.shape != (n,) or not bool(torch.isfinite(probability).all()):
        raise ValueError(f"judge returned {tuple(probability.shape)} values (finite: "
                         f"{bool(torch.isfinite(probability).all())}) for {n} comparisons")
    return probability


def win_rates(judge: Judge, sampled: Any, tokenizer: Any) -> torch.Tensor:
    """``[S]`` (group-major, as ``sampled.rewards``): each sample's mean P of beating its group's others."""
    from alignkit.data.batch import decode_prompt

    texts = [tokenizer.decode(ids, skip_special_tokens=True) for g in sampled.groups for ids in g.completion_ids]
    replies, offset = [], 0
    for group in sampled.groups:
        replies.append(texts[offset : offset + group.group_size])
        offset += group.group_size
    return text_win_rates(judge, [decode_prompt(g, tokenizer) for g in sampled.groups], replies,
                          [g.extra for g in sampled.groups])


def text_win_rates(judge: Judge, prompts: Sequence[str], replies: Sequence[Sequence[str]],
                   extras: Sequence[dict]) -> torch.Tensor:
    """``win_rates`` on text: ``replies[r]`` are prompt ``r``'s replies and ``extras[r]`` its record's columns;
    every pair of a prompt's replies is compared once and each reply's score is its mean P of beating the others
    (flat ``[S]``, prompt-major; 0 for a prompt's only reply)."""
    pair_prompts, a_texts, b_texts, index = [], [], [], []
    columns: dict[str, list] = {key: [] for key in sorted({k for extra in extras for k in extra})}
    offset = 0
    for prompt, texts, extra in zip(prompts, replies, extras):
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                pair_prompts.append(prompt)
                a_texts.append(texts[i])
                b_texts.append(texts[j])
                index.append((offset + i, offset + j))
                for key in columns:
                    columns[key].append(extra.get(key))
        offset += len(texts)
    wins = torch.zeros(offset)
    counts = torch.zeros(offset)
    if index:
        probability = _checked(judge.compare(pair_prompts, a_texts, b_texts, **columns), len(index))
        for (i, j), p in zip(index, probability.tolist()):
            wins[i] += p
            wins[j] += 1.0 - p
            counts[i] += 1
            counts[j] += 1
    return wins / counts.clamp(min=1.0)
