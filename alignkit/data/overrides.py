"""What a ``data.train`` override means for the rest of ``data``: the preset's eval set goes with it.

A preset's ``data.eval`` belongs to its ``data.train`` (the demo task's held-out file). A user who
replaces the training data (``data.train=...``, ``data.train.0.path=...``) and gives no ``data.eval``
must never be scored on the preset's demo set, so ``own_data_overrides`` appends ``data.eval=[]``
and, unless ``data.eval_fraction`` is given too, ``data.eval_fraction=OWN_DATA_EVAL_FRACTION``: a
seeded held-out share of the user's own prompts (``sources.split_by_key``, by prompt, so train and
eval never share one; the data summary states its size). ``data.eval_fraction=0`` trains on all of
it, and the run then says that it has no eval set. Either way the frozen config holds everything
that rebuilds the eval set (``data.train``, ``data.eval_fraction``, ``data.seed``).

It also expands the shorthand ``data.train=FILE`` (and ``data.eval=FILE``; a glob, folder or hub
name as well, a comma list in a multirun sweeps over them) to ``[{path: 'FILE'}]``.

And ``data.column_map={prompt: question}`` becomes ``++data.column_map=...``: Hydra refuses new keys
in a ``dict`` field of a structured config (struct mode) unless the override forces them, as
``config/compose.py`` does for ``loss.*``.

It works on the override strings, before Hydra composes, so that ``compose`` (train, config show,
plan, eval) and a multirun (Hydra's own argv) see the same overrides. Left out: choosing a data
group (``data=demo_sft``), which brings its own eval set.
"""

from __future__ import annotations

from typing import Iterable

from alignkit.data.config import OWN_DATA_EVAL_FRACTION

SOURCE_LISTS = ("data.train", "data.eval")
FREE_DICTS = ("data.column_map",)  # dict fields whose keys are the user's (a Hydra override must force them)


def _split(override: str) -> tuple[str, str, str | None]:
    """``(prefix, key, value)`` of ``[+|++|~]key[=value]``."""
    stripped = override.lstrip("+~")
    prefix = override[: len(override) - len(stripped)]
    key, sep, value = stripped.partition("=")
    return prefix, key.strip(), value if sep else None


def _names(key: str, name: str) -> bool:
    """``key`` sets ``name`` or something inside it (``data.train``, ``data.train.0.path``)."""
    return key == name or key.startswith((name + ".", name + "["))


def _quote(path: str) -> str:
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _shorthand_paths(value: str) -> list[str] | None:
    """The path(s) of ``data.train=FILE`` / ``FILE1,FILE2`` (a sweep), or None for Hydra's list/dict/null forms."""
    text = value.strip()
    if not text or text[0] in "[{" or text in ("null", "None") or text.startswith("${"):
        return None
    if "," not in text:
        return [text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_override(f"key={text}")
    except Exception:  # noqa: BLE001 - not Hydra's grammar: leave it for compose to report
        return None
    values = parsed.value()
    choices = getattr(values, "list", None)
    if choices is None or not all(isinstance(c, str) for c in choices):
        return None
    return list(choices)


def expand_shorthand(override: str) -> str:
    """``data.train=FILE`` -> ``data.train=[{path:'FILE'}]`` (each value of a sweep likewise)."""
    prefix, key, value = _split(override)
    if key not in SOURCE_LISTS or value is None or "~" in prefix:
        return override
    paths = _shorthand_paths(value)
    if paths is None:
        return override
    return f"{prefix}{key}=" + ",".join(f"[{{path:{_quote(p)}}}]" for p in paths)


def force_free_dicts(override: str) -> str:
    """``data.column_map={...}`` -> ``++data.column_map={...}`` (see the module docstring)."""
    prefix, key, value = _split(override)
    return "++" + override if not prefix and value is not None and key in FREE_DICTS else override


def own_data_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides with shorthands expanded and, when ``data.train`` is overridden without ``data.eval``,
    the preset's eval set dropped for a held-out fraction of the user's data (see the module docstring)."""
    out = [force_free_dicts(expand_shorthand(o)) for o in overrides]
    keys = [_split(o)[1] for o in out]
    if any(_names(k, "data.train") for k in keys) and not any(_names(k, "data.eval") for k in keys):
        out.append("data.eval=[]")
        if "data.eval_fraction" not in keys:
            out.append(f"data.eval_fraction={OWN_DATA_EVAL_FRACTION}")
    return out
