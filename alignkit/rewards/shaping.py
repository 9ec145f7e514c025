"""Smoke-test reward shaping: ``reply_length``, a reward that varies on any text, even a random model's.

The demo judge (``alignkit.rewards.judge``) pays nothing for a wrong answer, and the tiny random
model of the ``*_tiny`` presets never answers right: with the judge alone every sample scores 0,
GRPO's group advantages are all 0 and online DPO finds no pair, so a smoke run would pass without
the policy gradient ever being exercised. The tiny RL presets (``grpo_tiny``, ``ppo_tiny``,
``online_dpo_tiny``) therefore add this reward next to the judge (both weight 1.0):

``reply_length = min(1, characters / REPLY_LENGTH_FULL_CHARS)`` -- the reply's length in characters
(leading/trailing whitespace stripped), growing linearly to 1.0 at 256 characters.

Two random samples almost never have the same number of characters, so groups do not tie, and
the signal is learnable by a random model within a few steps (prefer longer tokens, delay the end
of sequence). It never outweighs a right answer: the judge pays at least 1.0 for one and 0 for a
wrong one, so a right reply totals more than 1.0 and a wrong one at most 1.0.

It is a smoke-test reward, not a training objective: longer is not better on any real task (the
demo judge pays for brevity). Left out: token-level lengths (the reward sees only the text), any
task knowledge.
"""

from __future__ import annotations

from typing import Any

from alignkit.rewards.registry import register_reward

REPLY_LENGTH_FULL_CHARS = 256


def reply_length_score(reply: Any) -> float:
    """``min(1, len(reply.strip()) / 256)``; non-strings are stringified (``None`` -> 0.0), never raises."""
    text = "" if reply is None else (reply if isinstance(reply, str) else str(reply))
    return min(1.0, len(text.strip()) / REPLY_LENGTH_FULL_CHARS)


@register_reward("reply_length")
def reply_length_reward(prompts: list[str], completions: list[Any], **columns: list) -> list[float]:
    """Smoke-test shaping: the reply's length in characters, linearly up to 1.0 at 256 (no columns needed)."""
    return [reply_length_score(c) for c in completions]
