"""What ``alignkit eval`` evaluates, against what, on which data: ``resolve_target`` -> ``EvalTarget``.

A run directory's frozen ``config.yaml`` (with the command line's overrides applied, Hydra syntax), or
a model folder / hub name composed with the given overrides; ``data=FILE`` swaps in every record of
FILE. A frozen config naming reward code outside alignkit is refused unless ``reward.fns`` is named
again on the command line (nothing read from disk executes code). Left out: loading models or data
(``alignkit.evaluate.command``) and scoring (``scoring``, ``measures``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from alignkit.config.compose import compose, conf_dir, load_frozen
from alignkit.errors import ConfigError, UserError


@dataclass
class EvalTarget:
    cfg: DictConfig
    model: str
    baseline: str | None
    run_dir: Path | None
    data_source: str  # where the eval records come from, in words
    use_train_split: bool  # evaluate every record of data.train (a data=FILE / a model with its own data)
    reward_explicit: bool  # the user named reward.fns, or the run trained on them
    notes: list[str] = field(default_factory=list)

def _is_data_group(name: str) -> bool:
    return (conf_dir() / "data" / f"{name}.yaml").is_file()

def _split_overrides(overrides: list[str]) -> tuple[str | None, list[str]]:
    """(``data=FILE`` shorthand's FILE or None, the other overrides)."""
    data, rest = None, []
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and key.strip() == "data" and not _is_data_group(value.strip()):
            data = value.strip().strip("'\"")
        else:
            rest.append(o)
    return data, rest

def _own_data(cfg: DictConfig, path: str, where: Path | str = "the config") -> DictConfig:
    """Every record of ``data=PATH`` (a path, or Hydra's list/entry form ``[{path: F, column_map: {..}}]``)."""
    from alignkit.data.config import SourceConfig

    if path.startswith(("[", "{")):
        value = path if path.startswith("[") else f"[{path}]"
        cfg = _apply_overrides(cfg, [f"data.train={value}"], Path(str(where)))
    else:
        cfg.data.train = [SourceConfig(path=path)]
    cfg.data.eval = []
    cfg.data.eval_fraction = 0.0
    return cfg

def _names_key(overrides: list[str], prefix: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0].strip().startswith(prefix) for o in overrides)

def _apply_overrides(cfg: DictConfig, dotlist: list[str], where: Path) -> DictConfig:
    """Hydra-syntax ``key=value`` overrides (``data.eval=[{path: F}]``, ``reward.fns=[a,b]``) onto a frozen config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not dotlist:
        return cfg
    try:
        parsed = OverridesParser.create().parse_overrides([o.lstrip("+") for o in dotlist])
        nested: dict = {}
        for override in parsed:
            node = nested
            *parents, leaf = override.key_or_group.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = override.value()
        return OmegaConf.merge(cfg, OmegaConf.create(nested))
    except Exception as exc:  # noqa: BLE001 - Hydra's parser and OmegaConf raise many kinds
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot apply the overrides {dotlist} to {where}: {first}") from None

def resolve_target(target: str, overrides: list[str], baseline: str | None = None) -> EvalTarget:
    """What to evaluate, against what, on which data (see the module docstring)."""
    from alignkit.config.validate import runner_for
    from alignkit.losses.runners import is_online
    from alignkit.data.overrides import expand_shorthand

    data_file, rest = _split_overrides(list(overrides))
    path = Path(target)
    run_dir = path if (path / "config.yaml").is_file() else (
        path.parent if path.is_dir() and (path.parent / "config.yaml").is_file() else None)
    reward_named = _names_key(rest, "reward.fns")
    if run_dir is not None:
        cfg = load_frozen(run_dir / "config.yaml")
        dotlist = [expand_shorthand(o) for o in rest if "=" in o]
        if any(o.lstrip("+~").split("=", 1)[0].strip() == "recipe" for o in dotlist):
            raise ConfigError("recipe=... does not apply to a run directory (its config is frozen); give data=FILE "
                              "or data.eval=[{path: FILE}] to evaluate on other data.")
        cfg = _apply_overrides(cfg, dotlist, run_dir / "config.yaml")
        if not reward_named:
            _refuse_code_named_by(cfg, run_dir / "config.yaml")
        model = str(run_dir / "final") if path == run_dir else str(path)
        if not Path(model).is_dir():
            raise UserError(f"{run_dir} has no final/ model yet (the run did not finish); evaluate a checkpoint's "
                            "export folder instead (alignkit eval RUN_DIR/checkpoints/...).")
        base = baseline or str(cfg.model.name_or_path)
        explicit = reward_named or is_online(runner_for(cfg))
        if data_file is not None:
            cfg = _own_data(cfg, data_file, run_dir / "config.yaml")
            return EvalTarget(cfg, model, base, run_dir, f"every record of {data_file} (data=...)", True, explicit)
        if not cfg.data.eval and not cfg.data.eval_fraction > 0:
            raise UserError(
                f"{run_dir} has no held-out data: its data.eval is empty and data.eval_fraction=0, so every record "
                "was trained on. Evaluate on other data: alignkit eval RUN_DIR data=FILE "
                "(or data.eval=[{path: FILE}]).")
        where = (f"the run's data.eval ({', '.join(str(s.path) for s in cfg.data.eval)})" if cfg.data.eval else
                 f"the run's held-out {cfg.data.eval_fraction:g} of data.train (data.seed={cfg.data.seed})")
        return EvalTarget(cfg, model, base, run_dir, where, False, explicit)
    # a model folder / hub name: it brings no data and no reward functions of its own
    data_given = data_file is not None or _names_key(rest, "data.train") or _names_key(rest, "data.eval") or any(
        o.split("=", 1)[0].strip() in ("recipe", "data") for o in rest)
    if not data_given:
        raise UserError(
            f"{target} is a model, not a run directory, so there is no run data to evaluate it on. Give the data: "
            f"alignkit eval {target} data=FILE (prompt records with a reference 'answer' column score answer "
            "accuracy; paired records score preference accuracy), or data.eval=[{path: FILE}], or recipe=NAME "
            "for a preset's data.")
    cfg = compose([*rest, f"model.name_or_path={target}"])
    if data_file is not None:
        cfg = _own_data(cfg, data_file)
        where = f"every record of {data_file} (data=...)"
    else:
        where = ("data.eval (" + ", ".join(str(s.path) for s in cfg.data.eval) + ")" if cfg.data.eval else
                 "data.train (no eval set given: every record)")
    use_train = data_file is not None or not (cfg.data.eval or cfg.data.eval_fraction > 0)
    notes = []
    recipe_named = any(o.lstrip("+~").split("=", 1)[0].strip() == "recipe" for o in rest)
    if data_file is not None and not reward_named and not recipe_named and list(cfg.reward.fns):
        # the default config's reward.fns are the demo task's judge: a model on the user's data is not scored on it
        notes.append(f"no reward.fns given: the default {list(cfg.reward.fns)} (the demo task's) not scored; "
                     "answer accuracy only (reward.fns=[correctness,my_rewards:fn] to add rewards)")
        cfg.reward.fns = []
    return EvalTarget(cfg, target, baseline, None, where, use_train, reward_named or is_online(runner_for(cfg)),
                      notes)

def _refuse_code_named_by(cfg, config_file: Path) -> None:
    """A run's frozen config naming reward code outside alignkit (a module path or a .py file) is not imported.

    ``config.yaml`` is a file read from disk (a run directory copied from a shared disk may have been
    edited): importing what it names would run code the user never typed. Registered rewards are
    alignkit's own; anything else must be named again on the command line.
    """
    from alignkit.rewards.registry import reward_names

    foreign = [str(n) for n in cfg.reward.fns if str(n) not in reward_names()]
    if foreign:
        listed = ",".join(str(n) for n in cfg.reward.fns)
        raise UserError(
            f"{config_file} names reward code outside alignkit ({', '.join(foreign)}); alignkit eval does not import "
            "code named by a file it reads (nothing read from disk executes code). If you trust that code, name it "
            f"on the command line: alignkit eval ... 'reward.fns=[{listed}]' (or reward.fns=[] for answer accuracy "
            "alone).")
