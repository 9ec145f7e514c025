"""Step-labelled data (format and view ``stepwise``, ``runner=prm``): the tokens of a prompt and its steps.

One function builds them for both sides of a process reward model, so training and scoring see the
same tokens: ``tokenize_stepwise`` (a ``stepwise`` record -> a ``TokenizedGroup`` for the prm runner)
and ``alignkit.rewards.process`` (a sampled completion, split into steps, scored during GRPO/PPO).

The layout follows TRL's ``PRMTrainer.tokenize_row`` (TRL 0.13-1.15; 1.16 removed the trainer):

* the prompt tokenized alone (``add_special_tokens=False``) with the tokenizer's BOS in front when it
  has one; each step tokenized alone, followed by the tokens of ``data.step_separator`` (``"\\n"``);
* the step's label sits on the last token of step + separator (the separator token itself for a
  one-token separator); every other token is context (TRL's ``-100``); no EOS.

The group holds one completion (all steps and separators) whose train mask is True exactly at the
labelled tokens, and the labels in ``extra["step_labels"]`` (one per True, in order). The collator's
target for a True token is the position *before* it, so the runner reads the hidden state at
``target_index + 1`` (the labelled token itself, as the reward runner reads its last token).

Where this differs from TRL, and why:

* a prompt given as chat messages is rendered with the chat template (generation prompt, no extra BOS:
  the template has its own); a string prompt is plain text as in TRL, unless ``data.chat_template=
  always`` (rendered as a user turn) or ``data.input_template`` wraps it. TRL's stepwise data are strings.
* truncation: a prompt over ``data.max_prompt_length`` is cut by ``data.prompt_truncation`` (TRL keeps
  its end); the steps are then cut at ``data.max_length`` (TRL: ``max_completion_length``, then
  ``max_length``), and the labels past the cut are counted as dropped; ``response_truncation=drop``
  drops the whole group instead; a group left without a labelled step is dropped and counted.
* ``train_on_last_step_only`` is applied by the runner to the training loss (the held-out pass reads
  every step, as TRL's eval set is tokenized with every label), not in the tokens: one cache serves both.

A step that contains the separator is kept as one step with one label, as TRL does, and counted
(``TokenizeStats.steps_with_separator``): the ``prm`` reward splits a sampled completion at every
separator, so such a step would be scored as several there. Left out: multi-turn step data.
"""

from __future__ import annotations

from typing import Any

from alignkit.data.batch import TokenizedGroup
from alignkit.data.config import DataConfig
from alignkit.data.record import Record, Text

STEP_LABELS = "step_labels"  # TokenizedGroup.extra key: one label per trained (labelled) token, in order


def prompt_ids(tokenizer: Any, prompt: Text, cfg: DataConfig) -> list[int]:
    """The prompt's tokens: messages through the chat template; a string as plain text with BOS (TRL's rule)."""
    from alignkit.data.tokenize import encode, uses_chat_template

    if isinstance(prompt, str) and cfg.chat_template == "always":
        uses_chat_template(tokenizer, cfg)  # raises when the tokenizer has no template
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            from alignkit.errors import ConfigError

            raise ConfigError("the stepwise data's prompts are chat messages but the tokenizer has no chat template; "
                              "use a model with one, or string prompts.")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return encode(tokenizer, text)
    if cfg.input_template is not None:
        prompt = cfg.input_template.format(prompt)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + encode(tokenizer, prompt)


def step_ids(tokenizer: Any, steps: list[str], separator: str) -> tuple[list[int], list[int]]:
    """All steps' tokens, each step followed by the separator's, and the index of each step's last token."""
    from alignkit.data.tokenize import encode

    sep = encode(tokenizer, separator)
    ids: list[int] = []
    ends: list[int] = []
    for step in steps:
        ids += encode(tokenizer, step) + sep
        ends.append(len(ids) - 1)
    return ids, ends


def split_steps(text: str, separator: str) -> list[str]:
    """A sampled completion's steps: split at every separator, stripped, empty pieces left out (as data steps are)."""
    pieces = text.split(separator) if separator else [text]
    return [piece.strip() for piece in pieces if piece.strip()]


def tokenize_stepwise(record: Record, tokenizer: Any, cfg: DataConfig, stats: Any) -> TokenizedGroup | None:
    """A ``stepwise`` record -> one-completion group labelled at each step's last token (see the module docstring);
    None when dropped (counted in ``stats``, a ``tokenize.TokenizeStats``)."""
    from alignkit.data.tokenize import _truncate_prompt, adds_bos

    if cfg.chat_template == "never" and isinstance(record.prompt, list):
        from alignkit.errors import ConfigError

        raise ConfigError(f"data.chat_template=never but the data is chat messages (e.g. {record.location}); "
                          "messages need the chat template: use data.chat_template=auto, or string prompts.")
    stats.groups_in += 1
    steps = [str(step) for step in record.completions]
    labels = list(record.labels or [])
    if cfg.step_separator:
        stats.steps_with_separator += sum(cfg.step_separator in step for step in steps)
    prompt = prompt_ids(tokenizer, record.prompt, cfg)
    cut_prompt = len(prompt) > cfg.max_prompt_length
    if cut_prompt:
        stats.prompts_truncated += 1
        prompt = _truncate_prompt(prompt, cfg, tokenizer.bos_token_id if adds_bos(tokenizer) else None)
    ids, ends = step_ids(tokenizer, steps, cfg.step_separator)
    budget = cfg.max_length - len(prompt)
    stats.completions_seen += 1
    cut = len(ids) > budget
    if cut:
        if cfg.response_truncation == "drop":
            stats.dropped["response too long"] += 1
            return None
        kept = sum(end < budget for end in ends)
        if kept < len(ends):
            stats.dropped["labelled steps past data.max_length"] += len(ends) - kept
        ids, ends, labels = ids[:budget], ends[:kept], labels[:kept]
        if not ends:
            stats.dropped["no labelled step left after truncation"] += 1
            return None
        stats.completions_truncated += 1
    mask = [False] * len(ids)
    for end in ends:
        mask[end] = True
    stats.groups_truncated += int(cut_prompt or cut)
    stats.groups_out += 1
    return TokenizedGroup(prompt_ids=prompt, completion_ids=[ids], completion_train_mask=[mask],
                          example_id=record.example_id(),
                          extra={**record.extra, STEP_LABELS: [float(v) for v in labels]})
