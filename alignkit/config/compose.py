"""Compose, validate and freeze configs.

``compose(overrides)`` runs Hydra's compose API over ``conf/`` (presets are the ``recipe`` group,
``conf/recipe`` pointing at the top-level ``recipes/`` folder) and turns every Hydra/OmegaConf
error into a ``ConfigError`` whose message names the key and the valid choices, so a typo fails
before any model is loaded: an unknown key (also one added with ``+key=``, which Hydra would
keep) names the closest valid keys (difflib) and the keys of its section, a wrong type names the
expected type and the default as an example, an override with a control character (a newline
from a shell quoting slip) is refused by name instead of a lexer exception, a removed knob
(``REMOVED_KEYS``) names its replacement. ``freeze``/``load_frozen`` write and read the resolved
config of a run directory: workers of a multi-process run load that file and never re-compose.

Left out: the multirun path, which goes through ``@hydra.main`` in ``alignkit.sweep`` so that
sweeper and launcher plugins work unchanged.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf

from alignkit.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# knobs that were removed -> what replaces them. Setting one fails at compose time with a message
# naming the replacement (``unknown_key_message``); a run frozen before the removal loads without
# it (``load_frozen``): none of them changes what is trained once the replacement is read.
REMOVED_KEYS = {
    "model.dtype": "deepspeed.dtype, the one precision knob (auto, fp32, bf16, fp16, bf16_autocast): the model "
                   "loads in the precision it trains in",
    "model.lora.merge_on_export": "trainer.merge_lora, the one LoRA-merge knob (true: export the merged model, "
                                  "false: the adapter alone)",
}


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
    if not OmegaConf.has_resolver("ak.required"):
        OmegaConf.register_new_resolver("ak.required", _required)


def _required(key: str, what: str = "a value") -> str:
    """``${ak.required:KEY,WHAT}`` in a group file: the option needs ``KEY`` set (a merge cannot
    express that with ``???``: merging a missing value keeps the earlier one)."""
    raise ConfigError(f"{key} is required here: set {key}=... ({what}).")


def _group_options(group: str) -> list[str]:
    if group.startswith("hydra/"):  # Hydra's own groups live in its ConfigStore (plugins register there)
        try:
            from hydra.core.config_store import ConfigStore
            from hydra.core.plugins import Plugins
            from hydra.plugins.launcher import Launcher
            from hydra.plugins.sweeper import Sweeper

            Plugins.instance().discover(Launcher)
            Plugins.instance().discover(Sweeper)
            return sorted(n.removesuffix(".yaml") for n in ConfigStore.instance().list(group) if n.endswith(".yaml"))
        except Exception:  # noqa: BLE001 - a hint only
            return []
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _explain(exc: Exception, overrides: list[str]) -> str:
    """Turn a Hydra/OmegaConf exception into one readable paragraph with the valid choices.

    Hydra wraps the useful OmegaConf error ("Key 'lrr' not in 'TrainerConfig'", "Value 'fast' ...
    could not be converted to Float") as the ``__cause__`` of a generic "Could not override" /
    "Error merging override", so both texts are read.
    """
    text = str(exc).strip()
    cause = str(exc.__cause__).strip() if exc.__cause__ is not None else ""
    both = text + "\n" + cause
    missing = re.search(r"Could not (?:find|load) '([\w/]+)/(\S+?)'", both)
    if missing:
        group, option = missing.group(1), missing.group(2)
        valid = _group_options(group)
        what = "preset" if group == "recipe" else f"option for '{group}'"
        close = difflib.get_close_matches(option, valid, n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        listed = f" Valid choices: {', '.join(valid)}." if valid else (
            f" No options for '{group}' are installed here" + (" (Hydra launcher plugins: pip install "
                                                              "hydra-joblib-launcher / hydra-submitit-launcher)."
                                                              if group.startswith("hydra/") else "."))
        return f"unknown {what} {option!r}.{hint}{listed}"
    full_key = re.search(r"full_key: (\S+)", both)
    key = re.search(r"[Kk]ey '([^']+)' (?:is )?not in (?:struct|'(\w+)')", both)
    if key:
        path = full_key.group(1) if full_key else key.group(1)
        return unknown_key_message(path)
    converted = re.search(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", both, re.S)
    if converted or "Error merging override" in text or "Invalid value assigned" in both or "Cannot convert" in both:
        where = full_key.group(1) if full_key else _override_key(text)
        given = _given_value(where, overrides)
        expected = _expected_type(where) or (converted.group(3) if converted else "another type")
        example = _example_value(where)
        return (f"{where}={given!r} has the wrong type: expected {expected}"
                + (f", e.g. {where}={example}" if example is not None else "") + ". Fix the value on the command "
                "line or in the preset (quote strings that contain spaces, commas or brackets).")
    if type(exc).__name__ == "OverrideParseException":
        bare = next((o for o in overrides if "=" not in o and not o.startswith(("~", "-"))), None)
        if bare is not None:
            return (f"the override {bare[:80]!r} has no '=': write {bare[:80]}=VALUE (e.g. trainer.lr=1e-5), "
                    f"or ~{bare[:80]} to delete a key.")
        bad = text.splitlines()[0].split(": ", 1)[-1] if text else ""
        return (f"cannot parse the override {bad!r}: it is not key=value in Hydra's grammar. Quote values with "
                "special characters (key='a b'), write lists as key=[a,b]; see "
                "https://hydra.cc/docs/advanced/override_grammar/basic/.")
    if "Exceeds the limit" in both:  # a many-thousand-digit number: Python refuses to convert it
        longest = max(overrides, key=len, default="?")
        return (f"the value of {longest.split('=', 1)[0][:80]!r} is a number with {len(longest)} characters, too long "
                "to read; give a number of ordinary size.")
    return text.splitlines()[0] if text else type(exc).__name__


def _own_error(exc: BaseException | None) -> ConfigError | None:
    """A ``ConfigError`` raised by alignkit code (a resolver) somewhere in Hydra's exception chain."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ConfigError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _override_key(text: str) -> str:
    found = re.search(r"override (\+{0,2}[\w.]+)=", text)
    return found.group(1).lstrip("+") if found else "?"


def _given_value(key: str, overrides: list[str]) -> str:
    for override in reversed(overrides):
        name, _, value = override.partition("=")
        if name.lstrip("+~") == key:
            return value
    return "?"


def _schema_node(path: str):
    from alignkit.config.schema import AlignkitConfig

    node = OmegaConf.structured(AlignkitConfig)
    try:
        return OmegaConf.select(node, path, throw_on_missing=False) if path else node
    except Exception:  # noqa: BLE001 - best effort hint only
        return None


def _expected_type(path: str) -> str | None:
    import dataclasses
    import typing

    from alignkit.config.schema import AlignkitConfig

    cls = AlignkitConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return None
        hints = typing.get_type_hints(cls)
        kind = hints.get(part)
        if i == len(parts) - 1:
            return _type_name(kind)
        cls = kind
    return None


def _type_name(kind) -> str:
    import typing

    args = [a for a in typing.get_args(kind) if a is not type(None)]
    origin = typing.get_origin(kind)
    if origin is typing.Union and len(args) == 1:
        return _type_name(args[0]) + " (or null)"
    if origin in (list, tuple):
        plural = {float: "numbers", int: "integers", str: "strings", bool: "booleans"}
        return f"a list of {plural.get(args[0], 'values') if args else 'values'}"
    names = {float: "a number", int: "an integer", str: "a string", bool: "true or false", dict: "a mapping"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def _example_value(path: str) -> str | None:
    node = _schema_node(path)
    if node is None or isinstance(node, DictConfig):
        return None
    if isinstance(node, (list, tuple)) or OmegaConf.is_list(node):
        return "[" + ",".join(str(v) for v in node) + "]"
    return str(node).lower() if isinstance(node, bool) else str(node)


def schema_keys() -> list[str]:
    """Every dotted key of the typed schema (the free-form ``loss`` node as one key)."""
    from alignkit.config.schema import AlignkitConfig

    out: list[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node.keys():
            path = f"{prefix}{key}"
            child = node._get_node(key)
            if isinstance(child, DictConfig) and _is_typed(child):
                walk(child, path + ".")
            else:
                out.append(path)

    walk(OmegaConf.structured(AlignkitConfig), "")
    return out


def _is_typed(node: DictConfig) -> bool:
    """A node backed by a schema dataclass (its keys are fixed), not a free-form ``dict`` field."""
    import dataclasses

    kind = OmegaConf.get_type(node)
    return kind is not None and dataclasses.is_dataclass(kind)


def unknown_key_message(path: str) -> str:
    """'unknown config key X. Did you mean: closest keys? Keys under PARENT: ...' (difflib)."""
    import difflib

    if path in REMOVED_KEYS:
        return f"config key {path!r} was removed; use {REMOVED_KEYS[path]}."
    parent, _, leaf = path.rpartition(".")
    keys = schema_keys()
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
    close = [f"{parent}.{k}" if parent else k for k in difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.6)]
    if not close:  # the key may belong to another section (trainer.beta -> loss.beta is free-form, not listed)
        leaves = {k.rpartition(".")[2]: k for k in keys}
        close = [leaves[k] for k in difflib.get_close_matches(leaf, list(leaves), n=3, cutoff=0.75)]
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    under = f" Valid keys under {parent or 'the top level'}: {', '.join(siblings)}." if siblings else ""
    if not siblings and parent:
        under = f" {parent!r} is not a config section; sections: {', '.join(sorted({k.split('.')[0] for k in keys}))}."
    return f"unknown config key {path!r}.{hint}{under}"


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse keys the schema does not have, also those added with ``+key=value`` (Hydra lets a
    ``+`` append to a typed node, so ``+trainer.lrr=0.1`` would otherwise be kept and ignored)."""

    def walk(node: DictConfig, prefix: str) -> None:
        if not _is_typed(node):
            return
        kind = OmegaConf.get_type(node)
        import dataclasses

        known = {f.name for f in dataclasses.fields(kind)}
        for key in node.keys():
            if key not in known:
                raise ConfigError(unknown_key_message(f"{prefix}{key}"))
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                walk(child, f"{prefix}{key}.")

    walk(cfg, "")


def check_override_text(overrides: list[str]) -> None:
    """Overrides are single-line ``key=value`` strings: control characters are refused by name."""
    for override in overrides:
        bad = next((c for c in override if ord(c) < 32 or ord(c) == 127), None)
        if bad is not None:
            key = override.split("=", 1)[0]
            raise ConfigError(
                f"the override for {key[:80]!r} contains a control character ({bad!r}); config values are one "
                "line of text. Remove the newline/tab (check the shell quoting), or put long text in a file."
            )


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
    check_override_text(overrides)
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
        own = _own_error(exc)
        if own is not None:
            raise ConfigError(str(own)) from None
        raise ConfigError(_explain(exc, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    return finalize(cfg)


def finalize(cfg: DictConfig) -> DictConfig:
    """Resolve interpolations and run the cross-field checks (shared by compose and multirun)."""
    from alignkit.config.validate import validate

    check_known_keys(cfg)
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:  # noqa: BLE001
        own = _own_error(exc)
        if own is not None:
            raise ConfigError(str(own)) from None
        raise ConfigError(f"cannot resolve the config: {str(exc).splitlines()[0]}") from None
    validate(cfg)
    return cfg


def freeze(cfg: DictConfig, path: Path) -> None:
    """Write the resolved config atomically, never through a symlink (``alignkit.runfiles``)."""
    from alignkit import runfiles

    path.parent.mkdir(parents=True, exist_ok=True)
    runfiles.write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def load_frozen(path: Path) -> DictConfig:
    """Load a frozen run config, typed against the schema again (so workers see the same types)."""
    from alignkit.config.schema import AlignkitConfig

    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such run config file.")
    schema = OmegaConf.structured(AlignkitConfig)
    frozen = OmegaConf.load(path)
    for key in REMOVED_KEYS:  # frozen before the knob was removed
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(frozen, parent) if parent else frozen
        if isinstance(node, DictConfig) and leaf in node:
            del node[leaf]
    return OmegaConf.merge(schema, frozen)


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
