"""Records -> ``TokenizedGroup``s with exact prompt/response boundaries and train masks.

Chat data: the template is applied to growing prefixes of the conversation and each rendered text
must extend the previous one (checked; a template that rewrites earlier turns raises ``DataError``).
The prompt is rendered with ``add_generation_prompt=True``; every later piece (a turn's header, a
turn's body) is the difference between two renders, tokenized on its own with
``add_special_tokens=False``. So the prompt's tokens are the same alone and followed by any
response, BOS/EOS come only from the template (never doubled), and assistant bodies (all of them,
or the last one, per ``cfg.train_on``) are the only trained tokens; headers and user turns inside a
multi-turn completion are context.

Plain-string data and ``cfg.chat_template`` (one decision per run, so every record of a file is
treated alike): ``auto`` (the default) renders strings through the chat template when the tokenizer
has one, as a user turn and assistant turns (what TRL, LLaMA-Factory and OpenRLHF's
``--apply_chat_template`` do); ``always`` requires a template; ``never`` keeps plain text, and then
``cfg.input_template`` (OpenRLHF's ``--input_template``, e.g. ``"User: {}\nAssistant: "``) wraps each
string prompt; setting it under ``auto`` also keeps plain text (OpenRLHF applies it only without a
chat template). Chat-message data always needs the template (``never`` with messages is an error).
Untemplated plain text: the prompt gets BOS when the tokenizer adds one by itself, the completion
gets EOS appended; all completion tokens are trained.

Truncation: a prompt longer than ``max_prompt_length`` keeps its end or its start (a leading BOS
is kept when the tokenizer adds one by itself); a completion longer than what ``max_length``
leaves is truncated or the group dropped. Every case is counted in ``TokenizeStats``.
Stepwise records (a process reward model's steps and labels) have their own layout, TRL's
(``stepwise.py``). Deliberately left out: batching (``collate.py``) and caching (``pipeline.py``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from alignkit.data.batch import TokenizedGroup
from alignkit.data.config import DataConfig
from alignkit.data.record import Message, Record, Text
from alignkit.errors import ConfigError, DataError


@dataclass
class TokenizeStats:
    groups_in: int = 0
    groups_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    groups_truncated: int = 0  # groups kept with their prompt or a completion cut
    prompts_truncated: int = 0
    completions_truncated: int = 0
    completions_seen: int = 0
    steps_with_separator: int = 0  # stepwise data: steps holding data.step_separator (trained as one step)

    @property
    def truncation_rate(self) -> float:
        """Share of groups that were cut or dropped for length."""
        return (self.groups_truncated + self.dropped.get("response too long", 0)) / max(self.groups_in, 1)

    def merge(self, other: "TokenizeStats") -> None:
        self.groups_in += other.groups_in
        self.groups_out += other.groups_out
        self.groups_truncated += other.groups_truncated
        self.dropped.update(other.dropped)
        self.prompts_truncated += other.prompts_truncated
        self.completions_truncated += other.completions_truncated
        self.completions_seen += other.completions_seen
        self.steps_with_separator += other.steps_with_separator


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of plain text by itself."""
    bos = tokenizer.bos_token_id
    return bos is not None and list(tokenizer("x")["input_ids"][:1]) == [bos]


def _render(tokenizer: Any, messages: list[Message], generation_prompt: bool, record: Record) -> str:
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja errors: the template rejects this conversation
        raise DataError(f"expected a conversation the chat template accepts / found an error: {err}",
                        location=record.location, field="messages") from None


def _extend(previous: str, text: str, record: Record) -> str:
    if not text.startswith(previous):
        raise DataError(
            "expected the chat template to render each conversation prefix unchanged when more turns follow / "
            "found a rendering that rewrites earlier text, so prompt/response boundaries are ambiguous; use a "
            "template that appends turns (or plain-string data).",
            location=record.location, field="chat_template",
        )
    return text[len(previous):]


def chat_pieces(
    tokenizer: Any, prompt: list[Message], prompt_text: str, completion: list[Message], train_on: str, record: Record
) -> list[tuple[str, bool]]:
    """The completion as (text piece, trained?) in order, each piece extending the render before it."""
    assistant_turns = [j for j, m in enumerate(completion) if m["role"] == "assistant"]
    trained = set(assistant_turns if train_on == "all_assistant" else assistant_turns[-1:])
    pieces: list[tuple[str, bool]] = []
    previous = prompt_text
    for j, message in enumerate(completion):
        if j > 0 and message["role"] == "assistant":
            head = _render(tokenizer, prompt + completion[:j], True, record)
            pieces.append((_extend(previous, head, record), False))
            previous = head
        end = _render(tokenizer, prompt + completion[: j + 1], False, record)
        pieces.append((_extend(previous, end, record), j in trained))
        previous = end
    return pieces


def uses_chat_template(tokenizer: Any, cfg: DataConfig) -> bool:
    """Whether plain-string records are rendered through the chat template (see the module docstring)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat_template == "always" and not has_template:
        raise ConfigError("data.chat_template=always but the tokenizer has no chat template; use a model with one, "
                          "or data.chat_template=auto|never for plain text.")
    if cfg.chat_template == "never" or (cfg.chat_template == "auto" and cfg.input_template is not None):
        return False
    return has_template


def as_rendered(record: Record, tokenizer: Any, cfg: DataConfig) -> Record:
    """The record as it will be tokenized: strings as chat turns, or with ``input_template`` applied."""
    if isinstance(record.prompt, list):
        if cfg.chat_template == "never":
            raise ConfigError(
                f"data.chat_template=never but the data is chat messages (e.g. {record.location}); messages need "
                "the chat template: use data.chat_template=auto (or always), or plain-string data.")
        return record
    if uses_chat_template(tokenizer, cfg):
        return replace(record, prompt=[{"role": "user", "content": record.prompt}],
                       completions=[[{"role": "assistant", "content": c}] if isinstance(c, str) else c
                                    for c in record.completions])
    if cfg.input_template is not None:
        return replace(record, prompt=cfg.input_template.format(record.prompt))
    return record


def prompt_text(tokenizer: Any, record: Record) -> str:
    """The rendered prompt: chat prompts end with the assistant header (generation prompt)."""
    if isinstance(record.prompt, str):
        return record.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"the data is chat messages (e.g. {record.location}) but the tokenizer has no chat template; "
            "use a model with a chat template or plain-string data."
        )
    first = record.completions[0] if record.completions else []
    return _render(tokenizer, record.prompt, not first or first[0]["role"] == "assistant", record)


def _tokenize_completion(
    tokenizer: Any, record: Record, rendered_prompt: str, completion: Text, cfg: DataConfig
) -> tuple[list[int], list[bool]]:
    if isinstance(completion, str):
        ids = encode(tokenizer, completion)
        eos = tokenizer.eos_token_id
        if eos is not None and ids[-1:] != [eos]:
            ids.append(eos)
        return ids, [True] * len(ids)
    assert isinstance(record.prompt, list)
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in chat_pieces(tokenizer, record.prompt, rendered_prompt, completion, cfg.train_on, record):
        piece = encode(tokenizer, text)
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


def tokenize_prompt(tokenizer: Any, record: Record, rendered_prompt: str) -> list[int]:
    bos = [tokenizer.bos_token_id] if isinstance(record.prompt, str) and adds_bos(tokenizer) else []
    return bos + encode(tokenizer, rendered_prompt)


def _truncate_prompt(ids: list[int], cfg: DataConfig, bos: int | None) -> list[int]:
    limit = cfg.max_prompt_length
    if cfg.prompt_truncation == "keep_start":
        return ids[:limit]
    if bos is not None and ids[:1] == [bos]:
        return [bos] + ids[len(ids) - limit + 1:]
    return ids[len(ids) - limit:]


def _memoized(memo: dict | None, key: tuple, compute: Callable[[], Any]) -> Any:
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def tokenize_group(
    record: Record, tokenizer: Any, cfg: DataConfig, stats: TokenizeStats | None = None, memo: dict | None = None
) -> TokenizedGroup | None:
    """Tokenize one record; None when it is dropped (the reason is counted in ``stats``).

    ``memo`` (a dict shared over calls with the same tokenizer and cfg) reuses the tokens of prompts
    and completions seen before, e.g. when listwise data was expanded into many pairs.
    """
    stats = stats if stats is not None else TokenizeStats()
    if record.format == "stepwise":  # one completion labelled at each step's end (data/stepwise.py)
        from alignkit.data.stepwise import tokenize_stepwise

        return tokenize_stepwise(record, tokenizer, cfg, stats)
    stats.groups_in += 1
    read = record  # as the data has it: its id and prompt do not depend on the template
    record = as_rendered(record, tokenizer, cfg)
    prompt_key = record.prompt_key()
    rendered_prompt, prompt_ids = _memoized(memo, ("prompt", prompt_key), lambda: (
        (rendered := prompt_text(tokenizer, record)), tokenize_prompt(tokenizer, record, rendered)))
    cut_prompt = len(prompt_ids) > cfg.max_prompt_length
    if cut_prompt:
        stats.prompts_truncated += 1
        prompt_ids = _truncate_prompt(prompt_ids, cfg, tokenizer.bos_token_id if adds_bos(tokenizer) else None)
    budget = cfg.max_length - len(prompt_ids)
    completion_ids, masks = [], []
    cut = 0
    for completion in record.completions:
        stats.completions_seen += 1
        ids, mask = _memoized(memo, ("completion", prompt_key, json.dumps(completion, sort_keys=True)),
                              lambda: _tokenize_completion(tokenizer, record, rendered_prompt, completion, cfg))
        if len(ids) > budget:
            if cfg.response_truncation == "drop":
                stats.dropped["response too long"] += 1
                return None
            ids, mask, cut = ids[:budget], mask[:budget], cut + 1
        if not any(mask):
            stats.dropped["no trained tokens after truncation"] += 1
            return None
        completion_ids.append(ids)
        masks.append(mask)
    stats.completions_truncated += cut
    stats.groups_truncated += int(cut_prompt or cut > 0)
    stats.groups_out += 1
    return TokenizedGroup(
        prompt_ids=list(prompt_ids),
        completion_ids=[list(ids) for ids in completion_ids],
        completion_train_mask=[list(mask) for mask in masks],
        scores=list(record.scores) if record.scores is not None else None,
        labels=list(record.labels) if record.labels is not None else None,
        example_id=read.example_id(),
        # a prompt record keeps its prompt as the data has it (text or messages) for TRL-style reward functions
        extra={**record.extra, "prompt": read.prompt} if record.format == "prompt" else dict(record.extra),
    )
