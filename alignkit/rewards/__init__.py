"""Rule-based reward functions by name or dotted path, and the demo task's judge.

Importing this package registers the built-in rewards (``accuracy``, ``format``, ``concise``,
``judge``; see ``alignkit.rewards.judge``). Reward models are not here: the online trainers load them.
"""

from alignkit.rewards.registry import MixedRewards, RewardMix, register_reward, resolve_reward, reward_names
from alignkit.rewards import judge  # noqa: F401  (registers the demo task's rewards)

__all__ = ["MixedRewards", "RewardMix", "register_reward", "resolve_reward", "reward_names", "judge"]
