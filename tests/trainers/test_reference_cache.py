"""The precomputed reference log-prob cache: safe format, checksum and key, damage rebuilt, $ALIGNKIT_CACHE.

Unit cases drive ``precompute`` with the tiny model; each damaged file (changed values, truncated,
a missing entry, another key, a planted pickle) must be reported, moved aside and recomputed to
the same values, and nothing in it may run. The run case changes the values on disk between two
DPO runs: the second must say so and start at loss ln 2 again (policy == reference at step 1).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit.data.config import DataConfig, SourceConfig
from alignkit.data.collate import collate
from alignkit.data.pipeline import prepare_data
from alignkit.models.load import load_causal_lm
from alignkit.models.logprobs import TargetLogProbs
from alignkit.trainers import reference as ref

MODEL_CFG = {"name_or_path": "tiny"}


class Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("refdata")
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No idea."} for i in range(6)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tokenizer = load_causal_lm(MODEL_CFG)
    data = prepare_data(DataConfig(train=[SourceConfig(path=str(folder / "pairs.jsonl"))]), "pairwise", tokenizer)
    return TargetLogProbs(model).eval(), data.train, tokenizer.pad_token_id


def run(setup, cache_dir, said=None):
    module, groups, pad = setup
    return ref.precompute(module, groups, lambda g: collate(g, layout="padded", pad_token_id=pad),
                          model_cfg=MODEL_CFG, layout="padded", cache_dir=cache_dir, batch_groups=4, rank=0, world=1,
                          device=torch.device("cpu"), log=(said.append if said is not None else lambda _: None))


def test_cache_round_trip_is_exact_and_not_pickle(setup, tmp_path):
    fresh = run(setup, tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("ref-") and files[0].suffix == ".safetensors"
    said: list[str] = []
    again = run(setup, tmp_path, said)
    assert said == [f"reference log-probs: reusing cache {files[0]}"] and again.table == fresh.table
    header = json.loads(files[0].read_bytes()[8 : 8 + int.from_bytes(files[0].read_bytes()[:8], "little")])
    assert header["__metadata__"]["format"] == ref.CACHE_FORMAT and len(header["__metadata__"]["sha256"]) == 64


def _forge(path, key, table):
    ref.write_table(path, key, {}, table)


@pytest.mark.parametrize("damage", ["values", "truncated", "missing_entry", "other_key", "pickle"])
def test_damaged_cache_is_reported_moved_aside_and_rebuilt(setup, tmp_path, damage):
    fresh = run(setup, tmp_path)
    path = next(tmp_path.glob("ref-*.safetensors"))
    key = path.stem[len("ref-"):]
    marker = tmp_path / "CODE_RAN"
    if damage == "values":  # same header (checksum), other numbers
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata()
        tensors = load_file(str(path))
        tensors["values"] = tensors["values"] * 3.0
        save_file(tensors, str(path), metadata=header)
        reason = "checksum mismatch"
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-17])
        reason = "unreadable"
    elif damage == "missing_entry":  # a well-formed file of the right key that lacks one example
        table = dict(fresh.table)
        gone = sorted(table)[2]
        del table[gone]
        _forge(path, key, table)
        reason = f"example {gone!r} is missing"
    elif damage == "other_key":
        _forge(path, "f" * 24, fresh.table)
        reason = "it holds key 'ffffffffffffffffffffffff'"
    else:
        path.write_bytes(pickle.dumps({"x": Payload(marker)}))
        reason = "unreadable"
    said: list[str] = []
    rebuilt = run(setup, tmp_path, said)
    assert not marker.exists()
    assert said[0].startswith(f"reference log-probs: cache {path} is damaged ({reason}")
    assert "moved aside to" in said[0] and said[0].endswith("recomputing")
    assert len(list(tmp_path.glob(f"{path.name}.bad-*"))) == 1
    assert rebuilt.table == fresh.table
    assert run(setup, tmp_path).table == fresh.table  # the rebuilt file is intact


def test_default_folder_follows_alignkit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "c"))
    assert ref.default_cache_dir() == tmp_path / "c" / "ref_logps"
    monkeypatch.delenv("ALIGNKIT_CACHE")
    assert ref.default_cache_dir() == Path.home() / ".cache" / "alignkit" / "ref_logps"


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _dpo(tmp_path, name):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", ALIGNKIT_CACHE=str(tmp_path / "cache"), COLUMNS="1000")
    proc = subprocess.run([sys.executable, "-m", "alignkit", "train", "recipe=dpo_tiny", "trainer.reference=precomputed",
                           "trainer.max_steps=1", "trainer.eval_every=0", "trainer.export=false",
                           "trainer.cpu_release_freed_memory=false", f"output_dir={tmp_path / 'runs'}",
                           f"run_name={name}"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    loss = next(r["loss"] for r in rows if r["split"] == "train" and r["step"] == 1)
    return " ".join(proc.stderr.split()), loss


def test_values_changed_on_disk_are_caught_and_step_one_is_ln2_again(tmp_path):
    text, loss = _dpo(tmp_path, "first")
    assert math.isclose(loss, math.log(2), abs_tol=1e-4)
    files = list((tmp_path / "cache" / "ref_logps").glob("ref-*.safetensors"))  # $ALIGNKIT_CACHE honoured
    assert len(files) == 1
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(files[0]), framework="pt") as handle:
        header = handle.metadata()
    tensors = load_file(str(files[0]))
    tensors["values"][: tensors["values"].numel() // 2] -= 5.0  # the chosen side of some pairs looks worse
    save_file(tensors, str(files[0]), metadata=header)
    text, loss = _dpo(tmp_path, "second")
    assert "is damaged (checksum mismatch" in text and "recomputing" in text and "Traceback" not in text
    assert math.isclose(loss, math.log(2), abs_tol=1e-4)


def test_a_planted_temp_link_in_a_shared_cache_folder_is_not_written_through(tmp_path):
    """The temp name is predictable (.ref-KEY.safetensors.tmpPID): a link planted there is replaced."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    path = tmp_path / "cache" / "ref-abc.safetensors"
    path.parent.mkdir()
    path.with_name(f".{path.name}.tmp{os.getpid()}").symlink_to(victim)
    ref.write_table(path, "abc", {"x": 1}, {"e1": [[-1.0, -2.0]]})
    assert victim.read_text() == "precious\n" and path.is_file() and not path.is_symlink()
