"""A built wheel carries the config tree, the presets and the demo data, and composes from them."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_composes_presets_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                    "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("alignkit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"alignkit/_conf/config.yaml", "alignkit/_conf/recipe/dpo_smollm2.yaml",
            "alignkit/_data/demo/paired_train.jsonl"} <= names
    assert not any(name.endswith(".png") for name in names)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    code = ("import alignkit; from alignkit.config.compose import compose; cfg = compose(['recipe=dpo_smollm2']); "
            "print(alignkit.__file__); print(cfg.data.train[0].path)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}).stdout.split()
    assert out[0].startswith(str(tmp_path / "site"))
    assert out[1] == str(tmp_path / "site" / "alignkit" / "_data" / "demo" / "paired_train.jsonl")
