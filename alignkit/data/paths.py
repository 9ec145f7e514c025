"""Nested field paths in a column map: reaching into lists and objects of a raw row.

Syntax (a path is a column name followed by steps; ``.`` and ``[...]`` are the only special characters):

* ``column``: a top-level column (a row key that literally equals the whole path always wins);
* ``a.b``: key ``b`` of the object in ``a`` (``completions[].fine-grained_score``: keys may hold ``-``);
* ``a[]``: every item of the list in ``a``, the rest of the path applied to each
  (``completions[].response`` -> one response per completion, in list order);
* ``a[N]``: item N of a list (``rating[0]``, negative N counts from the end).

``get_path`` never raises for a missing key inside a list item: the item's value is ``None`` (the
caller decides whether that drops the item or is an error, and counts it). A missing top-level
column raises ``KeyError``. ``unused_fields`` names the fields of a list's items that no path read,
so that what a column map leaves behind is reported instead of silently dropped.

Deliberately left out: wildcards over object keys, filters and any evaluation (nothing in a path
executes code).
"""

from __future__ import annotations

import re
from typing import Any, Union

Step = Union[str, int, None]  # key, list index, or None = every item
_STEP = re.compile(r"\.([^.\[\]]+)|\[(-?\d*)\]")


def is_path(text: str) -> bool:
    return "." in text or "[" in text


def parse_path(text: str) -> tuple[str, list[Step]]:
    """``"completions[].response"`` -> ``("completions", [None, "response"])``; ``ValueError`` if malformed."""
    match = re.match(r"[^.\[\]]+", text)
    if match is None:
        raise ValueError(f"path {text!r} must start with a column name")
    root, position, steps = match.group(0), match.end(), []
    while position < len(text):
        step = _STEP.match(text, position)
        if step is None:
            raise ValueError(f"path {text!r}: cannot read {text[position:]!r} (expected .key, [] or [N])")
        key, index = step.groups()
        steps.append(key if key is not None else (int(index) if index not in ("", None) else None))
        position = step.end()
    return root, steps


def _walk(value: Any, steps: list[Step]) -> Any:
    if not steps:
        return value
    step, rest = steps[0], steps[1:]
    if step is None:
        if not isinstance(value, list):
            return None
        return [_walk(item, rest) for item in value]
    if isinstance(step, int):
        if not isinstance(value, list) or not -len(value) <= step < len(value):
            return None
        return _walk(value[step], rest)
    if not isinstance(value, dict):
        return None
    return _walk(value.get(step), rest)


def get_path(row: dict[str, Any], path: str) -> Any:
    """The value at ``path`` in ``row`` (see the module docstring); ``KeyError`` if the column is absent."""
    if path in row:
        return row[path]
    root, steps = parse_path(path)
    if root not in row:
        raise KeyError(root)
    return _walk(row[root], steps)


def unused_fields(row: dict[str, Any], paths: list[str]) -> list[str]:
    """Fields of list items / objects under the paths' columns that none of ``paths`` reads.

    ``completions[].response`` and ``completions[].overall_score`` over items with keys ``model``,
    ``response``, ``overall_score``, ``annotations`` -> ``["completions[].annotations", "completions[].model"]``.
    """
    read: dict[tuple[str, ...], set[str]] = {}
    for path in paths:
        if path in row or not is_path(path):
            continue
        root, steps = parse_path(path)
        prefix: tuple[str, ...] = (root,)
        for step in steps:
            label = "[]" if step is None else f"[{step}]" if isinstance(step, int) else step
            if isinstance(step, str):
                read.setdefault(prefix, set()).add(step)
            prefix = prefix + (label,)
    unused = []
    for prefix, keys in read.items():
        root, steps = prefix[0], [None if p == "[]" else int(p[1:-1]) if p.startswith("[") else p for p in prefix[1:]]
        value = _walk(row.get(root), steps)
        items = value if isinstance(value, list) else [value]
        present = {k for item in items if isinstance(item, dict) for k in item}
        name = root + "".join(p if p.startswith("[") else f".{p}" for p in prefix[1:])
        unused += [f"{name}.{key}" for key in sorted(present - keys)]
    return unused
