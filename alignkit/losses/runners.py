"""Runners: which training loop trains an objective, in one table.

``RUNNERS`` maps a runner name (the ``runner`` config key) to its trainer module (whose
``train(cfg, run_dir)`` runs it) and whether it samples its own completions (``online``: PPO,
GRPO, online DPO, RAFT, XPO, Nash-MD, SPPO; they need rewards and generation settings, and build their
own KL reference).
Everything that names runners reads this table: the registry (``register_loss(runner=...)``
refuses an unknown one), ``config.validate`` (the ``runner`` choices, ``runner_for``, the online
rules), ``run.run_in_process`` (the module to import), ``plan`` and ``evaluate``.

Which runner a loss needs is the loss's own declaration (``LossSpec.runner``): a rollout loss
names it (``register_loss(view="rollout", runner="grpo")``); an offline loss gets its view's
default (``VIEW_RUNNERS``) unless it names another (``bradley_terry``: ``reward``). ``runner_of``
derives the runner of a weighted sum of losses; an explicit ``runner=`` in the config (e.g.
``online_dpo`` for a pairwise loss) overrides it.

Adding a runner is one line here (plus its trainer module); see CONTRIBUTING.md "a runner".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from alignkit.errors import ConfigError


@dataclass(frozen=True)
class Runner:
    module: str  # its train(cfg, run_dir) -> dict trains the run
    online: bool = False  # samples completions from the policy (rewards, generation, its own KL reference)


RUNNERS: dict[str, Runner] = {
    "sft": Runner("alignkit.trainers.preference"),
    "preference": Runner("alignkit.trainers.preference"),
    "reward": Runner("alignkit.trainers.reward"),
    "pm": Runner("alignkit.trainers.pm"),  # pairwise preference model: both responses in, P(a > b) out
    "ppo": Runner("alignkit.trainers.ppo", online=True),
    "grpo": Runner("alignkit.trainers.grpo", online=True),
    "online_dpo": Runner("alignkit.trainers.online_dpo", online=True),
    "raft": Runner("alignkit.trainers.raft", online=True),  # best-of-K sampling, SFT on the winners
    "xpo": Runner("alignkit.trainers.xpo", online=True),  # policy vs reference samples, DPO + exploration
    "nash_md": Runner("alignkit.trainers.nash_md", online=True),  # policy vs geometric-mixture samples
    "sppo": Runner("alignkit.trainers.sppo", online=True),  # self-play: K samples, win rates, reference = last iterate
    "dro": Runner("alignkit.trainers.dro"),  # offline scalar rewards: policy + a value network (DRO-V)
    "gkd": Runner("alignkit.trainers.gkd"),  # distillation from a frozen teacher; samples, but needs no reward
    "prm": Runner("alignkit.trainers.prm"),  # process reward model: a correct/incorrect head at each step's end
}
# the runner an offline loss needs unless it names one; a rollout loss always names its runner
VIEW_RUNNERS = {"sft": "sft", "pairwise": "preference", "unpaired": "preference", "listwise": "preference",
                "scalar": "dro", "stepwise": "prm"}
# a runner that joins any other: sft (slot 0 = the demonstration) rides along with pairwise losses
JOINS_ANY = "sft"


def offline_runners() -> tuple[str, ...]:
    return tuple(name for name, runner in RUNNERS.items() if not runner.online)


def is_online(runner: str) -> bool:
    return RUNNERS[runner].online


def runner_of(specs: Iterable) -> str:
    """The runner a weighted sum of ``LossSpec`` s needs: the one they all declare (``sft`` joins any
    other). Two losses that need different runners cannot be trained together (``ConfigError``)."""
    specs = list(specs)
    needed = {spec.runner for spec in specs}
    others = needed - {JOINS_ANY}
    if len(others) > 1:
        described = ", ".join(f"{spec.name} ({spec.runner})" for spec in specs)
        raise ConfigError(f"losses {described} need different runners and cannot be trained together; "
                          "combine losses of one runner (sft joins any).")
    return others.pop() if others else JOINS_ANY
