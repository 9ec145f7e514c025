"""Anthropic-style ``\\n\\nHuman: ... \\n\\nAssistant: ...`` transcripts -> chat messages.

Used by the ``hh_rlhf`` layout (``chosen``/``rejected`` are whole transcripts and there is no prompt
column) and the ``nectar`` layout (the prompt is a transcript ending in ``\\n\\nAssistant:``).

* ``to_messages(text)``: a transcript -> alternating user/assistant messages (one space after the
  ``Human:``/``Assistant:`` tag is dropped, the rest of each turn is kept as written). A final empty
  ``Assistant:`` turn is the generation prompt: ``open_end`` tells whether there was one.
* ``split_pair(chosen, rejected)``: the implicit prompt of a pair, as TRL's hh-rlhf script cuts it:
  the shared prefix of the two transcripts, cut back to its last ``\\n\\nAssistant:`` tag (the shared
  text may end inside the final answers, e.g. both start with "I"), parsed into messages; each
  completion is the rest of its transcript as one assistant message. A later ``Human:`` tag inside
  a completion is the model's own text (hh-rlhf has such rows) and stays in it, as in TRL.

Raises ``ValueError`` (the caller locates it) for text that does not start with a ``Human:`` turn
or a pair that shares no ``Assistant:`` tag. Deliberately left out: other speaker tags.
"""

from __future__ import annotations

import re

HUMAN, ASSISTANT = "Human:", "Assistant:"
_TAG = re.compile(r"\n\n(Human|Assistant):")
_LEADING = re.compile(r"\s*(Human|Assistant):")


def looks_like_transcript(text: object) -> bool:
    return isinstance(text, str) and bool(_LEADING.match(text)) and "\n\nAssistant:" in text


def _turn_text(text: str) -> str:
    return text[1:] if text.startswith(" ") else text


def to_messages(text: str) -> tuple[list[dict[str, str]], bool]:
    """(messages, open_end): see the module docstring."""
    lead = _LEADING.match(text)
    if lead is None or lead.group(1) != "Human":
        raise ValueError(f"a transcript starting with '{HUMAN}' (after optional blank lines)")
    body = "\n\n" + text[lead.start(1):]
    parts = _TAG.split(body)[1:]  # [speaker, text, speaker, text, ...]
    messages = [{"role": "user" if speaker == "Human" else "assistant", "content": _turn_text(part)}
                for speaker, part in zip(parts[::2], parts[1::2])]
    open_end = bool(messages) and messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip()
    if open_end:
        messages.pop()
    return messages, open_end


def split_pair(chosen: str, rejected: str) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen answer, rejected answer) of two transcripts of the same conversation."""
    shared = 0
    limit = min(len(chosen), len(rejected))
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    cut = chosen.rfind("\n\n" + ASSISTANT, 0, shared)
    if cut < 0:
        raise ValueError("two transcripts sharing the conversation up to a final '\\n\\nAssistant:' turn")
    head = cut + len("\n\n" + ASSISTANT)
    prompt, _ = to_messages(chosen[:cut])
    return prompt, _turn_text(chosen[head:]), _turn_text(rejected[head:])
