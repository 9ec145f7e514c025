"""Rule-based reward functions by name or dotted path, the demo task's judge, and the correctness reward.

Importing this package registers the built-in rewards (``accuracy``, ``format``, ``concise``,
``judge``; see ``alignkit.rewards.judge``; ``correctness``, see ``alignkit.rewards.math``; DAPO's
overlong reward shaping ``overlong``, see ``alignkit.rewards.overlong``). User
functions in TRL's or verl's convention are called as those toolkits call them (see
``alignkit.rewards.registry``). Reward models are not here: the online trainers load them.
"""

from alignkit.rewards.registry import (MixedRewards, RewardFunctionError, RewardMix, register_reward, resolve_reward,
                                       reward_names, reward_style)
from alignkit.rewards import judge  # noqa: F401  (registers the demo task's rewards)
from alignkit.rewards import math as correctness  # noqa: F401  (registers the correctness reward)
from alignkit.rewards import shaping  # noqa: F401  (registers the smoke-test reward reply_length)
from alignkit.rewards import overlong  # noqa: F401  (registers DAPO's overlong reward shaping)

__all__ = ["MixedRewards", "RewardFunctionError", "RewardMix", "register_reward", "resolve_reward", "reward_names",
           "reward_style", "judge", "correctness"]
