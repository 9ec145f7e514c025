"""Online-RL building blocks: advantage estimators, KL estimators and reward shaping, generation.

Pure functions over tensors (``advantages``, ``kl``) and a generation engine (``generation``);
the trainer loops (PPO, GRPO, online DPO) live in ``alignkit.trainers`` and call these. The policy
losses are in ``alignkit.losses.rollout`` (registered as ``grpo``, ``ppo``, ``ppo_value``).
"""

from alignkit.rl.advantages import (  # noqa: F401
    available_advantages,
    compute_advantages,
    compute_gae,
    frac_zero_std_groups,
    register_advantage,
    resolve_advantage,
    whiten,
    zero_std_groups_mask,
)
from alignkit.rl.generation import (  # noqa: F401
    GenerationEngine,
    HFGenerationEngine,
    Rollout,
    engine_for_run,
)
from alignkit.rl.kl import kl_per_token, shape_token_rewards  # noqa: F401
