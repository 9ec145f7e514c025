"""Compose, validate and freeze configs.

``compose(overrides)`` runs Hydra's compose API over ``conf/`` (presets are the ``recipe`` group,
``conf/recipe`` pointing at the top-level ``recipes/`` folder) and turns every Hydra/OmegaConf
error into a ``ConfigError`` whose message names the key and the valid choices, so a typo fails
before any model is loaded. ``freeze``/``load_frozen`` write and read the resolved config of a
run directory: workers of a multi-process run load that file and never re-compose.

Left out: the multirun path, which goes through ``@hydra.main`` in ``alignkit.sweep`` so that
sweeper and launcher plugins work unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf

from alignkit.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def conf_dir() -> Path:
    """The config tree: ``<repo>/conf`` in a checkout, ``alignkit/_conf`` in an installed wheel."""
    for candidate in (PACKAGE_DIR.parent / "conf", PACKAGE_DIR / "_conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ConfigError("alignkit's config tree (conf/config.yaml) is missing from this installation.")


def recipes_dir() -> Path:
    return conf_dir() / "recipe"


def demo_data_dir() -> Path:
    """The shipped demo datasets (``data/demo`` in a checkout, ``alignkit/_data/demo`` in a wheel)."""
    for candidate in (PACKAGE_DIR.parent / "data" / "demo", PACKAGE_DIR / "_data" / "demo"):
        if candidate.is_dir():
            return candidate
    return PACKAGE_DIR.parent / "data" / "demo"


def register_schema() -> None:
    """Register the structured schema and the ``${ak.demo:FILE}`` resolver (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from alignkit.config.schema import AlignkitConfig

    ConfigStore.instance().store(name="schema", node=AlignkitConfig)
    if not OmegaConf.has_resolver("ak.demo"):
        OmegaConf.register_new_resolver("ak.demo", lambda name: str(demo_data_dir() / name))


def _group_options(group: str) -> list[str]:
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _explain(exc: Exception, overrides: list[str]) -> str:
    """Turn a Hydra/OmegaConf exception into one readable paragraph with the valid choices."""
    text = str(exc).strip()
    missing = re.search(r"Could not find '([\w/]+)/(\S+)'", text)
    if missing:
        group, option = missing.group(1), missing.group(2)
        valid = _group_options(group)
        what = "preset" if group == "recipe" else f"option for '{group}'"
        return f"unknown {what} {option!r}. Valid choices: {', '.join(valid)}."
    key = re.search(r"[Kk]ey '([^']+)' (?:is )?not in (?:struct|'(\w+)')", text)
    if key:
        full_key = re.search(r"full_key: (\S+)", text)
        path = full_key.group(1) if full_key else key.group(1)
        return f"unknown config key {path!r}. {_valid_keys_hint(path)}"
    if "could not be converted" in text or "Value '" in text and "is not a" in text:
        first = text.splitlines()[0]
        full_key = re.search(r"full_key: (\S+)", text)
        where = f" (key {full_key.group(1)!r})" if full_key else ""
        return f"wrong value type{where}: {first}"
    return text.splitlines()[0] if text else type(exc).__name__


def _valid_keys_hint(path: str) -> str:
    from alignkit.config.schema import AlignkitConfig

    node = OmegaConf.structured(AlignkitConfig)
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    try:
        sub = OmegaConf.select(node, parent) if parent else node
    except Exception:  # noqa: BLE001 - best effort hint only
        sub = None
    if isinstance(sub, DictConfig):
        return f"Valid keys under {parent or 'the top level'}: {', '.join(sub.keys())}."
    return ""


def loss_overrides_forced(overrides: Iterable[str]) -> list[str]:
    """``loss.X=V`` -> ``++loss.X=V``: a loss's hyper-parameters default in its signature, so a preset's
    YAML need not list them; unknown ones are then rejected by the loss registry with the valid names."""
    return ["++" + o if o.startswith("loss.") else o for o in overrides]


def compose(overrides: Iterable[str] = ()) -> DictConfig:
    """Compose the config for ``overrides`` (Hydra syntax), validate it, and return it resolved."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf.errors import OmegaConfBaseException

    from alignkit.data.overrides import own_data_overrides  # data.train without data.eval drops the preset's eval

    overrides = list(overrides)
    stray = [o for o in overrides if o.startswith("-")]
    if stray:
        raise ConfigError(
            f"unknown option {stray[0]!r}. Config overrides are written key=value "
            "(e.g. trainer.lr=1e-5); see `alignkit train --help` for the flags."
        )
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=loss_overrides_forced(own_data_overrides(overrides)))
    except (OmegaConfBaseException, Exception) as exc:  # noqa: BLE001 - Hydra raises many kinds
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(_explain(exc, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    return finalize(cfg)


def finalize(cfg: DictConfig) -> DictConfig:
    """Resolve interpolations and run the cross-field checks (shared by compose and multirun)."""
    from alignkit.config.validate import validate

    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"cannot resolve the config: {exc}") from None
    validate(cfg)
    return cfg


def freeze(cfg: DictConfig, path: Path) -> None:
    """Write the resolved config atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tmp.replace(path)


def load_frozen(path: Path) -> DictConfig:
    """Load a frozen run config, typed against the schema again (so workers see the same types)."""
    from alignkit.config.schema import AlignkitConfig

    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such run config file.")
    schema = OmegaConf.structured(AlignkitConfig)
    return OmegaConf.merge(schema, OmegaConf.load(path))


def list_recipes() -> list[tuple[str, str]]:
    """Every preset with its one-line description, read without composing."""
    out = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        desc = ""
        for line in path.read_text().splitlines():
            if line.startswith("description:"):
                desc = line.split(":", 1)[1].strip().strip("\"'")
                break
        out.append((path.stem, desc))
    return out
