"""The canonical record every data format is parsed into.

A ``Record`` is one prompt with K candidate completions:

* ``sft``: K=1 (for a multi-turn conversation the prompt is everything before the first assistant
  turn and the completion is the rest, user turns included; the tokenizer masks them out);
* ``paired``: K=2, completion 0 chosen, completion 1 rejected, optional ``scores`` [s_c, s_r];
* ``unpaired``: K=1 with ``labels`` [1.0 desirable / 0.0 undesirable] (and the raw score if any);
* ``listwise``: K>=2 with ``scores`` (higher = better; ranks were turned into scores already);
* ``prompt``: K=0, for online RL; ``extra`` carries columns reward functions need;
* ``stepwise``: one solution as K steps (each completion is one step, a plain string, in order) with
  ``labels`` [1.0 correct / 0.0 incorrect] per step (a process reward model's data, ``data/stepwise.py``).

Prompt and completions are either all plain strings or all chat messages (``[{"role", "content"}]``,
a completion being the list of messages after the prompt); the parser normalizes mixed rows (the
steps of a ``stepwise`` record stay strings whatever its prompt is).
``notes`` say what parsing did to the row (a repeated prompt cut out, a field dropped ...); they are
not content (not part of ``example_id``) and are counted by ``summary.py``.

Deliberately left out: tokens (see ``tokenize.py``) and any knowledge of column names (``formats.py``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Union

Message = dict[str, Any]
Text = Union[str, list[Message]]  # a plain string or a list of chat messages

RECORD_FORMATS = ("sft", "paired", "unpaired", "listwise", "prompt", "stepwise")


@dataclass
class Record:
    """One prompt with K completions; see the module docstring."""

    format: str  # one of RECORD_FORMATS
    prompt: Text
    completions: list[Text] = field(default_factory=list)
    scores: list[float] | None = None
    labels: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    location: str = ""  # "file:line" for error messages
    notes: list[str] = field(default_factory=list)  # what parsing did to the row (counted in the data summary)

    @property
    def group_size(self) -> int:
        return len(self.completions)

    def content(self) -> dict[str, Any]:
        """The record's content without its location (what identifies it)."""
        return {
            "format": self.format,
            "prompt": self.prompt,
            "completions": self.completions,
            "scores": self.scores,
            "labels": self.labels,
            "extra": self.extra,
        }

    def example_id(self) -> str:
        """A stable hash of the content: the same record gets the same id in every run."""
        blob = json.dumps(self.content(), sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]

    def prompt_key(self) -> str:
        """The prompt as a hashable string (for grouping, duplicates and train/eval overlap)."""
        return json.dumps(self.prompt, sort_keys=True, ensure_ascii=False)


def text_of(value: Text) -> str:
    """Plain text of a string or of a message list (contents joined), for statistics."""
    if isinstance(value, str):
        return value
    return "\n".join(str(message.get("content", "")) for message in value)
