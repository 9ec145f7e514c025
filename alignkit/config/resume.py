"""A resume never changes a run silently: the new config is compared with the run's frozen one.

``resume=auto|PATH`` into an existing run directory composes the config again (the user repeats
the original command plus ``resume=auto``) and compares it, key by key, with the run's effective
config (``config.yaml``, or the ``config.resume-N.yaml`` of the latest allowed change):

* a key that changes **what is trained** (``trainer.lr``, ``data.*``, ``loss.*``, ``model.*``,
  ``trainer.max_steps``, the world size ...) is refused, with every differing key and its old
  and new value, unless ``resume_allow=[key, ...]`` names it (a key, or a section such as
  ``loss`` for all its keys);
* keys in ``RESUME_SAFE`` change only how the run is observed, saved or placed (logging,
  checkpoint cadence, evaluation cadence, export, cache folders, rendezvous address) and may
  change freely.

Whenever something changed, the new config is frozen as ``config.resume-N.yaml`` (the workers of a
multi-process run load it) and one JSON line is appended to ``resume_history.jsonl``: time,
overrides, and ``{key: [old, new]}`` for the allowed and the safe changes. ``config.yaml`` and
``overrides.txt`` are never rewritten, so what the first steps were trained with stays on disk.
An allowed optimizer setting really applies: the trainer re-applies ``trainer.lr`` (and weight
decay, Adam betas) after loading the checkpoint, whose optimizer state would otherwise restore
the old ones (``alignkit.trainers.loop.begin``).

The data files themselves are stamped too: a fresh run writes ``data_stamp.json`` (size and
modification time of every local file of ``data.train`` / ``data.eval``); a resume whose files
differ (the same path, other content) is refused like a changed key, unless ``resume_allow``
names ``data`` (or ``data.train`` / ``data.eval``); an allowed change is recorded and re-stamped.

Left out: content hashes of the data (size + mtime catch an edited or replaced file, not an
attacker who restores both; such a person could edit the data before the first start anyway);
``resume=PATH`` pointing into another run's folder from a fresh ``run_name`` (a
fine-tune from that checkpoint: there is no frozen config here to compare with).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from alignkit.errors import ConfigError

HISTORY = "resume_history.jsonl"
DATA_STAMP = "data_stamp.json"
MAX_STAMPED_FILES = 10_000
RESUME_SAFE = (
    "resume", "resume_allow", "run_name", "output_dir", "description", "objective", "logger",
    "trainer.save_every", "trainer.keep_last", "trainer.log_every", "trainer.eval_every",
    "trainer.eval_batch_size", "trainer.max_eval_groups", "trainer.export", "trainer.merge_lora",
    "trainer.reference_cache_dir", "trainer.cpu_release_freed_memory", "data.cache_dir",
    "launcher.master_addr", "launcher.master_port", "launcher.hostfile", "launcher.include", "launcher.exclude",
)


def _covered(key: str, prefixes: Any) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"trainer.lr": 1e-5, "data.train": [...], ...}``: mappings become dotted keys, lists stay values."""
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        if not node and prefix:
            out[prefix[:-1]] = {}
        return out
    out[prefix[:-1]] = node
    return out


def config_diff(old: DictConfig, new: DictConfig) -> dict[str, tuple[Any, Any]]:
    a = flatten(OmegaConf.to_container(old, resolve=True))
    b = flatten(OmegaConf.to_container(new, resolve=True))
    missing = object()
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)}


def history(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / HISTORY
    if not path.is_file() or path.is_symlink():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def effective_config_path(run_dir: Path) -> Path:
    """The config the run trains with now: the latest ``config.resume-N.yaml``, else ``config.yaml``."""
    for entry in reversed(history(run_dir)):
        name = entry.get("config")
        if isinstance(name, str) and "/" not in name and (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return Path(run_dir) / "config.yaml"


MAX_LISTED = 12


def _original_overrides(run_dir: Path) -> str:
    path = Path(run_dir) / "overrides.txt"
    if path.is_symlink() or not path.is_file():
        return ""
    text = " ".join(line for line in path.read_text(errors="replace").splitlines() if line.strip())
    if not text:
        return f" ({path})"
    return f" ({path}: {text if len(text) <= 300 else text[:297] + '...'})"


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def data_stamp(cfg: DictConfig) -> dict[str, list[list[Any]]]:
    """``{"data.train[0] PATH": [[file, size, mtime_ns], ...]}`` for the local sources (hub names are skipped)."""
    import glob
    import os

    stamp: dict[str, list[list[Any]]] = {}
    for section in ("train", "eval"):
        for i, source in enumerate(cfg.data.get(section) or []):
            path = str(source.get("path") if hasattr(source, "get") else source)
            local = Path(os.path.expanduser(path))
            if local.is_dir():
                files = sorted(p for p in local.rglob("*") if p.is_file())
            elif local.is_file():
                files = [local]
            else:
                files = sorted(Path(p) for p in glob.glob(str(local), recursive=True) if Path(p).is_file())
            if files:
                stamp[f"data.{section}[{i}] {path}"] = [[str(f), f.stat().st_size, f.stat().st_mtime_ns]
                                                        for f in files[:MAX_STAMPED_FILES]]
    return stamp


def write_data_stamp(cfg: DictConfig, run_dir: Path) -> None:
    from alignkit import runfiles

    runfiles.write_text(Path(run_dir) / DATA_STAMP, json.dumps(data_stamp(cfg)))


def _data_changes(cfg: DictConfig, run_dir: Path) -> dict[str, str]:
    """``{source: what changed}`` between the run's ``data_stamp.json`` and the files now."""
    path = Path(run_dir) / DATA_STAMP
    if not path.is_file() or path.is_symlink():
        return {}
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    new = data_stamp(cfg)
    changes = {}
    for source in sorted(set(old) & set(new)):  # a source added or removed is a changed data.* key already
        before = {f: (size, mtime) for f, size, mtime in old[source]}
        after = {f: (size, mtime) for f, size, mtime in new[source]}
        if before != after:
            edited = [f for f in after if f in before and before[f] != after[f]]
            what = [f"{len(edited)} file(s) modified"] if edited else []
            what += [f"{n} file(s) {w}" for n, w in ((len(set(after) - set(before)), "added"),
                                                      (len(set(before) - set(after)), "removed")) if n]
            changes[source] = ", ".join(what) + (f" (e.g. {edited[0]}: {before[edited[0]][0]} -> "
                                                 f"{after[edited[0]][0]} bytes)" if edited else "")
    return changes


def check_resume(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Path:
    """Refuse a resume that changes what is trained (unless allowed); record allowed and safe changes.

    Returns the config file the workers of this resume load.
    """
    from alignkit import runfiles
    from alignkit.config.compose import freeze, load_frozen, schema_keys, unknown_key_message

    run_dir = Path(run_dir)
    current = effective_config_path(run_dir)
    runfiles.refuse_symlink(current, "frozen config")
    frozen = load_frozen(current)
    allow = [str(a) for a in (cfg.get("resume_allow") or [])]
    keys = schema_keys()
    for entry in allow:
        if not (entry == "loss" or entry.startswith("loss.") or any(_covered(k, [entry]) for k in keys)):
            raise ConfigError(f"resume_allow names {entry!r}, which is no config key: {unknown_key_message(entry)}")
    diff = config_diff(frozen, cfg)
    data_changed = _data_changes(cfg, run_dir)
    if data_changed:
        sections = sorted({k.split("[", 1)[0] for k in data_changed})
        if not all(_covered(section, allow) for section in sections):
            listed = "; ".join(f"{k}: {v}" for k, v in data_changed.items())
            raise ConfigError(
                f"resume={cfg.resume} would train the run in {run_dir} on other data, changed since the run started "
                f"({run_dir / DATA_STAMP}): {listed}. Restore the original files, start a new run, or allow it "
                f"explicitly with resume_allow=[{','.join(sections)}] (it is then recorded in {run_dir / HISTORY})."
            )
        diff.update({f"{k.split('[', 1)[0]}.files[{k}]": ("as stamped", v) for k, v in data_changed.items()})
    safe = {k: v for k, v in diff.items() if _covered(k, RESUME_SAFE)}
    allowed = {k: v for k, v in diff.items() if k not in safe and _covered(k, allow)}
    refused = {k: v for k, v in diff.items() if k not in safe and k not in allowed}
    if refused:
        shown = list(refused.items())[:MAX_LISTED]
        lines = "; ".join(f"{k}: {_show(old)} -> {_show(new)}" for k, (old, new) in shown)
        if len(refused) > MAX_LISTED:
            lines += f"; and {len(refused) - MAX_LISTED} more ({', '.join(list(refused)[MAX_LISTED:])})"
        raise ConfigError(
            f"resume={cfg.resume} would change what the run in {run_dir} is trained with: {lines}. The run's config is "
            f"{current}; repeat its original overrides{_original_overrides(run_dir)}, or allow the change explicitly "
            f"with resume_allow=[{','.join(refused)}] (it is then used and recorded in {run_dir / HISTORY})."
        )
    if not diff:
        return current
    past = history(run_dir)
    name = f"config.resume-{len(past) + 1}.yaml"
    freeze(cfg, run_dir / name)
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resume": cfg.resume,
        "overrides": list(overrides),
        "config": name,
        "previous_config": current.name,
        "allowed": {k: list(v) for k, v in allowed.items()},
        "safe": {k: list(v) for k, v in safe.items()},
    }
    runfiles.append_line(run_dir / HISTORY, json.dumps(entry, default=str))
    if data_changed:
        write_data_stamp(cfg, run_dir)
    return run_dir / name
