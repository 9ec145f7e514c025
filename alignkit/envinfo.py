"""``alignkit env``: versions of the stack, the device and DeepSpeed's accelerator, for bug reports."""

from __future__ import annotations

import platform
from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> dict[str, str]:
    import torch

    report = {
        "alignkit": _version("alignkit"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "deepspeed": _version("deepspeed"),
        "hydra-core": _version("hydra-core"),
        "datasets": _version("datasets"),
        "peft": _version("peft"),
        "cuda available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        report["device"] = torch.cuda.get_device_name(0)
        report["bf16 supported"] = str(torch.cuda.is_bf16_supported())
    else:
        report["device"] = f"cpu ({torch.get_num_threads()} threads)"
    try:
        from deepspeed.accelerator import get_accelerator

        report["deepspeed accelerator"] = get_accelerator().device_name()
    except Exception as exc:  # noqa: BLE001 - a report must not fail
        report["deepspeed accelerator"] = f"unavailable ({exc.__class__.__name__})"
    return report
