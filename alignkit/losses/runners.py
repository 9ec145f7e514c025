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

Which losses a runner takes is the runner's declaration: ``needs`` (what its own losses need of it,
e.g. ``gkd``: "a teacher"; ``only_here`` says it in the runner's own words) makes the losses that
declare it ``exclusive`` to it, and ``alone`` names the one loss it trains with no other term
(``trains``: what it trains, cited in that refusal). ``check_exclusive`` is the one rule that reads
both, in both directions, at compose time (``config.validate``); a runner that only restricts its
losses' kind (``xpo``: any pairwise loss; ``raft``: an SFT loss) keeps that rule in ``config/validate.py``.

Which config keys a runner alone reads is its declaration too: ``knobs`` (dotted keys, ``"rl.lmbda"``);
a key that several runners list is read by those (``judge.kind``: online_dpo, xpo, nash_md, sppo).
``check_knobs`` refuses such a key set away from its default in ``config.schema`` under any other
runner ("rl.lmbda=0.2 is read by runner=gkd only; ... Remove it."), at compose time
(``config.validate``); the rules on a knob's value under its own runner (a range, a choice) stay in
``config/validate.py``. Left out: a key no runner declares is not checked (``rl.critic_lr``, read by
ppo and dro, is ignored by the others).

Adding a runner is one line here (plus its trainer module); see CONTRIBUTING.md "a runner".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from alignkit.errors import ConfigError


@dataclass(frozen=True)
class Runner:
    module: str  # its train(cfg, run_dir) -> dict trains the run
    online: bool = False  # samples completions from the policy (rewards, generation, its own KL reference)
    alone: str = ""  # the one loss it trains, with no other term (sft does not join); "" = any loss that fits
    trains: str = ""  # what it trains, cited when it is given another loss ("a process reward model")
    needs: str = ""  # what its own losses (LossSpec.runner) need of it, so that no other runner trains them
    only_here: str = ""  # that refusal in its own words, instead of "is trained by runner=R only (it needs ...)"
    # dotted config keys that it reads and no runner leaving them out does (a key several runners list: those);
    # set away from the schema's default under another runner, refused (check_knobs)
    knobs: tuple[str, ...] = ()

    @property
    def exclusive(self) -> bool:
        """Its own losses are trained by this runner only."""
        return bool(self.needs or self.only_here)


RUNNERS: dict[str, Runner] = {
    "sft": Runner("alignkit.trainers.preference"),
    "preference": Runner("alignkit.trainers.preference"),
    "reward": Runner("alignkit.trainers.reward"),
    "pm": Runner("alignkit.trainers.pm",  # pairwise preference model: both responses in, P(a > b) out
                 alone="pairwise_bce", trains="a pairwise preference model",
                 only_here="scores (prompt, a, b) sequences, which only runner=pm builds"),
    "ppo": Runner("alignkit.trainers.ppo", online=True),
    "grpo": Runner("alignkit.trainers.grpo", online=True),
    "online_dpo": Runner("alignkit.trainers.online_dpo", online=True, knobs=("judge.kind",)),
    "raft": Runner("alignkit.trainers.raft", online=True,  # best-of-K sampling, SFT on the winners
                   knobs=("rl.raft_min_reward",)),
    "xpo": Runner("alignkit.trainers.xpo", online=True,  # policy vs reference samples, DPO + exploration
                  needs="that runner's samples",  # not alone: any pairwise loss (config/validate.py)
                  knobs=("judge.kind",)),
    "nash_md": Runner("alignkit.trainers.nash_md", online=True,  # policy vs geometric-mixture samples
                      alone="nash_md", needs="that runner's samples",
                      knobs=("rl.mixture_coef", "rl.preference", "judge.kind")),
    "sppo": Runner("alignkit.trainers.sppo", online=True,  # self-play: K samples, win rates, reference = last iterate
                   alone="sppo", needs="that runner's self-play samples and win rates",
                   knobs=("rl.sppo_samples", "judge.kind")),
    "dro": Runner("alignkit.trainers.dro"),  # offline scalar rewards: policy + a value network (DRO-V)
    "gkd": Runner("alignkit.trainers.gkd",  # distillation from a frozen teacher; samples, but needs no reward
                  alone="gkd", needs="a teacher", knobs=("rl.teacher", "rl.teacher_seed", "rl.lmbda", "rl.seq_kd")),
    "prm": Runner("alignkit.trainers.prm",  # process reward model: a correct/incorrect head at each step's end
                  alone="prm", trains="a process reward model",
                  only_here="reads a process reward model's step logits, which only runner=prm computes",
                  knobs=("data.train_on_last_step_only",)),
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


def check_exclusive(runner: str, specs: Iterable, loss_name: Any) -> None:
    """The loss-runner pairs the table declares, both ways: a loss whose runner is ``exclusive`` under no
    other runner, and a runner with ``alone`` given that loss and nothing else (``ConfigError``).
    ``loss_name`` is the config's ``loss.name``, cited as given."""
    specs = list(specs)
    for spec in specs:
        owner = RUNNERS[spec.runner]
        if owner.exclusive and spec.runner != runner:
            why = owner.only_here or f"is trained by runner={spec.runner} only (it needs {owner.needs})"
            raise ConfigError(f"loss {spec.name} {why}; this run's runner is {runner}. Use runner=auto "
                              f"(recipe={spec.runner}_tiny).")
    alone = RUNNERS[runner].alone
    if alone and [spec.name for spec in specs] != [alone]:
        trains = f"{RUNNERS[runner].trains} with " if RUNNERS[runner].trains else ""
        raise ConfigError(f"runner={runner} trains {trains}loss={alone} alone; loss.name={loss_name}. Use "
                          f"loss={alone} (recipe={runner}_tiny).")


def knob_readers() -> dict[str, tuple[str, ...]]:
    """Each key some runner declares in ``knobs``, with the runners that read it (in table order)."""
    readers: dict[str, list[str]] = {}
    for name, declared in RUNNERS.items():
        for key in declared.knobs:
            readers.setdefault(key, []).append(name)
    return {key: tuple(names) for key, names in readers.items()}


def as_override(value: Any) -> str:
    """A config value as a command-line override writes it: ``true``, ``null``, ``0.2``, ``tiny``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def check_knobs(runner: str, cfg: Any) -> None:
    """The knobs the table declares: a key set in ``cfg`` (the composed config) away from its default in
    ``alignkit.config.schema`` under a runner that does not read it is refused (``ConfigError``)."""
    from alignkit.config.schema import AlignkitConfig

    defaults = AlignkitConfig()
    for key, readers in knob_readers().items():
        if runner in readers:
            continue
        value, default = cfg, defaults
        for part in key.split("."):
            value, default = value[part], getattr(default, part)
        if value != default:
            raise ConfigError(f"{key}={as_override(value)} is read by runner={' / '.join(readers)} only; this run's "
                              f"runner is {runner}. Remove it.")
