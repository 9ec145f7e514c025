"""Loss defaults live once, in the loss functions' keyword defaults (``alignkit/losses/*.py``).

A ``conf/loss/*.yaml`` group file holds the loss name only. A preset (``recipes/*.yaml``, or any
other ``@package _global_`` config file) may set a loss hyper-parameter only where it deliberately
differs from the function's default: such a key must be listed in ``DELIBERATE`` below and carry a
comment on its line saying why. Today no preset deviates, so the list is empty.

Files are read as YAML (no Hydra compose), so the test stays fast; the composed presets are
checked by tests/cli/test_config_compose.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from alignkit.losses import available_losses

ROOT = Path(__file__).resolve().parents[2]
LOSS_YAMLS = sorted((ROOT / "conf" / "loss").glob("*.yaml"))
GLOBAL_YAMLS = sorted(
    {p.resolve() for p in [*(ROOT / "recipes").glob("*.yaml"), *(ROOT / "conf").rglob("*.yaml")]}
    - {p.resolve() for p in LOSS_YAMLS}
)
# preset file stem -> loss keys it sets on purpose to a value other than the function default
DELIBERATE: dict[str, set[str]] = {}
RESERVED = {"name", "weights"}  # the objective's shape, not a hyper-parameter


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _names(node: dict) -> list[str]:
    name = node["name"]
    return list(name) if isinstance(name, list) else [name]


def _loss_group_of(node: dict) -> str | None:
    for entry in node.get("defaults") or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.lstrip("+").removeprefix("override ").strip().lstrip("/") == "loss":
                    return value
    return None


def test_there_are_loss_groups_and_presets():
    assert len(LOSS_YAMLS) >= 20 and len([p for p in GLOBAL_YAMLS if p.parent.name == "recipes"]) >= 20


@pytest.mark.parametrize("path", LOSS_YAMLS, ids=lambda p: p.stem)
def test_loss_group_holds_the_name_only(path):
    node = _load(path)
    assert set(node) == {"name"}, (
        f"{path.relative_to(ROOT)} sets {sorted(set(node) - {'name'})}: a loss group holds its name only; "
        "defaults are the loss function's keyword defaults (a preset that differs sets the key in its recipe)"
    )
    registered = available_losses()
    unknown = [n for n in _names(node) if n not in registered]
    assert not unknown, f"{path.relative_to(ROOT)} names unregistered loss(es) {unknown}"


def test_presets_set_loss_keys_only_where_they_differ_from_the_default():
    registered = available_losses()
    found: dict[str, set[str]] = {}
    for path in GLOBAL_YAMLS:
        node = _load(path)
        loss = node.get("loss")
        if not isinstance(loss, dict):
            continue
        keys = set(loss) - RESERVED
        if not keys:
            continue
        found[path.stem] = keys
        if "name" in loss:
            names = _names(loss)
        else:
            group = _loss_group_of(node) or _loss_group_of(_load(ROOT / "conf" / "config.yaml"))
            names = _names(_load(ROOT / "conf" / "loss" / f"{group}.yaml"))
        defaults: dict = {}
        for name in names:
            defaults.update(registered[name].hparams())
        text = path.read_text()
        for key in keys:
            assert key in defaults, f"{path.name}: loss.{key} is taken by none of {names}"
            assert loss[key] != defaults[key], (
                f"{path.name}: loss.{key}={loss[key]!r} restates the function default; delete it"
            )
            assert re.search(rf"^\s+{re.escape(key)}:.*#", text, re.M), (
                f"{path.name}: loss.{key} differs from the default {defaults[key]!r}: say why in a comment on its line"
            )
    assert found == DELIBERATE, (
        f"loss keys set by presets {found} != the deliberate deviations listed in this test {DELIBERATE}"
    )
