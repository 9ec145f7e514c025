"""Value checks at compose time: ranges, finiteness, types of free-form keys, names that reach the disk.

``validate.py`` checks rules that span areas (the loss fits the runner, the batch divides); this
module checks one value at a time, so a wrong number fails with the key, the value and the valid
range before anything is loaded: ``trainer.lr=-1`` or ``nan``, ``trainer.keep_last=-1``,
``launcher.nproc_per_node=0``, a ``run_name`` that cannot be a folder name, ``loss.beta=abc``
(the loss node is free-form, so its types are checked against the loss function's defaults),
the RL knobs the rollout losses and the sampler would only check after the model has loaded and
generated (``loss.loss_agg``, ``importance_sampling_level``, clip ranges, ``generation.*``), and
a ``deepspeed.raw_json`` whose batch keys disagree with ``trainer.*``.

Left out: checks that need the data or the model (a dataset smaller than one batch is refused by
the trainer when the data is read).
"""

from __future__ import annotations

import inspect
import json
import math
import re
from numbers import Number
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from alignkit.errors import ConfigError

RUN_NAME_MAX = 128
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+@-]*")


def _number(value: Any) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool)


def _finite(key: str, value: Any) -> float:
    if not _number(value) or not math.isfinite(float(value)):
        raise ConfigError(f"{key}={value!r} must be a finite number.")
    return float(value)


def _at_least(key: str, value: Any, low: float, why: str = "") -> None:
    if _finite(key, value) < low:
        raise ConfigError(f"{key}={value!r} must be >= {low:g}{why}.")


def check_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    if not _finite("trainer.lr", t.lr) > 0:
        raise ConfigError(f"trainer.lr={t.lr!r} must be > 0 (a learning rate such as 1e-5).")
    _at_least("trainer.weight_decay", t.weight_decay, 0)
    for key in ("adam_beta1", "adam_beta2"):
        value = _finite(f"trainer.{key}", t[key])
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"trainer.{key}={t[key]!r} must lie in [0, 1) (AdamW's moment decay).")
    if not (t.max_steps > 0 or t.max_steps == -1):
        raise ConfigError(f"trainer.max_steps={t.max_steps} must be > 0, or -1 to train trainer.epochs epochs.")
    if t.max_steps == -1 and not _finite("trainer.epochs", t.epochs) > 0:
        raise ConfigError(f"trainer.epochs={t.epochs!r} must be > 0 (trainer.max_steps=-1 trains by epochs).")
    _at_least("trainer.warmup_steps", t.warmup_steps, 0)
    _at_least("trainer.eval_every", t.eval_every, 0, " (0 = only at the end)")
    _at_least("trainer.save_every", t.save_every, 0, " (0 = only at the end)")
    _at_least("trainer.keep_last", t.keep_last, 0, " (the number of newest checkpoints kept; 0 keeps all)")
    _at_least("trainer.log_every", t.log_every, 1)
    _at_least("trainer.eval_batch_size", t.eval_batch_size, 1)
    _at_least("trainer.max_eval_groups", t.max_eval_groups, 0)
    _at_least("trainer.seed", t.seed, 0)


def check_launcher(cfg: DictConfig) -> None:
    la = cfg.launcher
    if la.nproc_per_node < 1:
        raise ConfigError(f"launcher.nproc_per_node={la.nproc_per_node} must be >= 1 (processes per node; -g N "
                          "sets it).")
    if la.nnodes < 1:
        raise ConfigError(f"launcher.nnodes={la.nnodes} must be >= 1.")
    if la.master_port is not None and not 1 <= la.master_port <= 65535:
        raise ConfigError(f"launcher.master_port={la.master_port} is not a TCP port (1-65535).")


def check_names(cfg: DictConfig) -> None:
    """``run_name`` becomes a folder name: short, one path component, no hidden or special names."""
    if cfg.get("resume_allow") and not cfg.resume:
        raise ConfigError(f"resume_allow={list(cfg.resume_allow)} applies only to a resume: add resume=auto (or "
                          "resume=PATH), or drop resume_allow.")
    name = cfg.run_name
    if name is None:
        return
    name = str(name)
    if len(name) > RUN_NAME_MAX:
        raise ConfigError(f"run_name is {len(name)} characters long ({name[:40]!r}...); a run name becomes a folder "
                          f"name and may have at most {RUN_NAME_MAX} characters. Choose a shorter run_name.")
    if not _RUN_NAME.fullmatch(name):
        raise ConfigError(f"run_name={name!r} cannot be a run folder name: use letters, digits and . _ - = , + @ "
                          "(starting with a letter or digit, no '/'); put folders in output_dir=... instead.")


def check_loss_weights(loss_node: dict[str, Any]) -> None:
    """``loss.weights`` is a list of finite numbers."""
    weights = loss_node.get("weights")
    if weights:
        if not isinstance(weights, (list, tuple)):
            raise ConfigError(f"loss.weights={weights!r} must be a list of numbers, one per loss (e.g. [1.0,0.2]).")
        for i, weight in enumerate(weights):
            if not _number(weight) or not math.isfinite(float(weight)):
                raise ConfigError(f"loss.weights[{i}]={weight!r} is not a finite number; loss.weights takes one "
                                  "number per loss, e.g. loss.weights=[1.0,0.2].")


def check_hparam_types(terms: list) -> None:
    """Every loss hyper-parameter has the type of its default (the ``loss`` node is free-form)."""
    for spec, _, hparams in terms:
        defaults = spec.hparams()
        for key, value in hparams.items():
            _check_hparam_type(spec.name, key, value, defaults.get(key, inspect.Parameter.empty),
                               inspect.signature(spec.fn).parameters[key].annotation)


def _check_hparam_type(loss: str, key: str, value: Any, default: Any, annotation: Any) -> None:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if value is None:
        if default is None or "None" in str(text):
            return
        raise ConfigError(f"loss.{key}=null is not allowed for loss {loss!r}; give a value like the default {default!r}.")
    wants_number = _number(default) or re.search(r"\b(float|int)\b", str(text))
    wants_text = isinstance(default, str) or (re.search(r"\bstr\b", str(text)) and not wants_number)
    wants_bool = isinstance(default, bool) or str(text) == "bool"
    if wants_bool:
        if not isinstance(value, bool):
            raise ConfigError(f"loss.{key}={value!r} must be true or false (loss {loss!r}).")
        return
    if wants_number and not isinstance(default, str):
        if not _number(value):
            raise ConfigError(f"loss.{key}={value!r} must be a number for loss {loss!r} (default: {default!r}).")
        if not math.isfinite(float(value)):
            raise ConfigError(f"loss.{key}={value!r} must be a finite number (loss {loss!r}).")
        integer = isinstance(default, int) or re.fullmatch(r"(int|int \| None|Optional\[int\])", str(text))
        if integer and not float(value).is_integer():
            raise ConfigError(f"loss.{key}={value!r} must be an integer (loss {loss!r}).")
        return
    if wants_text and not isinstance(value, str):
        raise ConfigError(f"loss.{key}={value!r} must be a string for loss {loss!r} (default: {default!r}).")


def check_rollout_knobs(terms: list, cfg: DictConfig) -> None:
    """The rollout losses' knobs, which they would check only inside the first update."""
    from alignkit.losses.rollout import IMPORTANCE_SAMPLING_LEVELS, LOSS_AGGREGATIONS

    for spec, _, hp in terms:
        if spec.view != "rollout":
            continue
        merged = {**{k: v for k, v in spec.hparams().items() if v is not inspect.Parameter.empty}, **hp}
        if "loss_agg" in merged and merged["loss_agg"] not in LOSS_AGGREGATIONS:
            raise ConfigError(f"loss.loss_agg={merged['loss_agg']!r} is not valid. Valid choices: "
                              f"{', '.join(LOSS_AGGREGATIONS)}.")
        if merged.get("loss_agg") == "seq_mean_token_sum_norm" and not merged.get("max_completion_length"):
            raise ConfigError("loss.loss_agg=seq_mean_token_sum_norm (Dr. GRPO) divides by a constant: set "
                              f"loss.max_completion_length (e.g. {cfg.generation.max_new_tokens}, the "
                              "generation.max_new_tokens).")
        if merged.get("max_completion_length") is not None and merged["max_completion_length"] < 1:
            raise ConfigError(f"loss.max_completion_length={merged['max_completion_length']} must be >= 1.")
        level = merged.get("importance_sampling_level")
        if level is not None and level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ConfigError(f"loss.importance_sampling_level={level!r} is not valid. Valid choices: "
                              f"{', '.join(IMPORTANCE_SAMPLING_LEVELS)}.")
        if "epsilon_low" in merged and not 0.0 <= merged["epsilon_low"] < 1.0:
            raise ConfigError(f"loss.epsilon_low={merged['epsilon_low']} must lie in [0, 1): the ratio is clipped "
                              "below at 1 - epsilon_low.")
        if "epsilon_high" in merged and not merged["epsilon_high"] >= 0.0:
            raise ConfigError(f"loss.epsilon_high={merged['epsilon_high']} must be >= 0.")
        if merged.get("value_clip") is not None and not merged["value_clip"] > 0:
            raise ConfigError(f"loss.value_clip={merged['value_clip']} must be > 0 (or null to disable clipping).")
        if "beta" in merged and not merged["beta"] >= 0:
            raise ConfigError(f"loss.beta={merged['beta']} must be >= 0 (0 = no KL term).")


def check_generation(cfg: DictConfig, runner: str) -> None:
    """The sampler's settings (``alignkit.rl.generation.check_sampling_args``), before the model loads."""
    from alignkit.rl.generation import check_sampling_args

    g = cfg.generation
    for key in ("temperature", "top_p"):
        _finite(f"generation.{key}", g[key])
    check_sampling_args(int(cfg.rl.num_generations), int(g.max_new_tokens), float(g.temperature),
                        float(g.top_p), int(g.top_k))
    if runner in ("grpo", "online_dpo", "xpo", "nash_md", "sppo") and float(g.temperature) == 0:
        raise ConfigError(f"generation.temperature=0 samples greedily: the rl.num_generations={cfg.rl.num_generations} "
                          f"completions of a prompt would be identical and {runner} would learn nothing from them. "
                          "Use a temperature > 0 (e.g. 1.0).")


def check_data_paths(cfg: DictConfig) -> None:
    """A data path that exists must be a regular file or a folder: a FIFO, socket or device would
    block the reader (forever, for a FIFO nobody writes) or read without end."""
    import stat

    for section in ("train", "eval"):
        for i, source in enumerate(cfg.data.get(section) or []):
            path = str(source.get("path") or "")
            try:
                mode = Path(path).stat().st_mode if path else None
            except OSError:
                continue  # a glob, a hub name or a missing file: the data pipeline reports those
            if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                        else "a device")
                raise ConfigError(f"data.{section}[{i}].path={path!r} is {kind}, not a data file: alignkit reads "
                                  "regular files (or folders of them). Write the data to a file and give its path.")


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def check_raw_json_batch(cfg: DictConfig, micro: int, accum: int, world: int) -> None:
    """A ``deepspeed.raw_json`` may not change the batch accounting ``trainer.*`` defines: the trainers
    cut micro-batches from ``trainer.batch_size``/``micro_batch_size``, and DeepSpeed would refuse
    (or silently follow) a different one."""
    path = cfg.deepspeed.get("raw_json")
    if not path or not Path(path).is_file():
        return
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"deepspeed.raw_json={path!r} cannot be read as JSON ({err}); fix the file or drop the "
                          "option.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"deepspeed.raw_json={path!r} must hold a JSON object, not {type(raw).__name__}.")
    ours = dict(zip(BATCH_KEYS, (micro * accum * world, micro, accum)))
    wrong = {k: raw[k] for k in BATCH_KEYS if k in raw and raw[k] != "auto" and raw[k] != ours[k]}
    if wrong:
        said = ", ".join(f"{k}={v}" for k, v in wrong.items())
        want = ", ".join(f"{k}={ours[k]}" for k in wrong)
        raise ConfigError(
            f"deepspeed.raw_json={path!r} sets {said}, but trainer.batch_size={cfg.trainer.batch_size}, "
            f"trainer.micro_batch_size={micro} on {world} process(es) give {want}. The batch comes from trainer.*: "
            "remove these keys from the JSON (or write \"auto\"), and set trainer.batch_size / micro_batch_size.")
