"""The runners read the config's typed sections (issue 21, goal 2): converted once at start
(``schema.typed_sections`` onto ``common.Run``) and passed down, with no coercion of config nodes
left in ``alignkit/trainers`` and ``alignkit/rl``, and one ``forward_logps``."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import alignkit
from alignkit.config.compose import compose
from alignkit.config.schema import SECTIONS, typed_sections
from alignkit.config.validate import grad_accum_steps
from alignkit.models.config import LoraConfig, ModelConfig
from alignkit.trainers.common import Run

ROOT = Path(alignkit.__file__).parent
FOLDERS = [ROOT / "trainers", ROOT / "rl"]
# int(cfg.x), float(rl.x), str(t.x) ...: a coercion of a config node the schema already typed
COERCION = re.compile(r"\b(int|float|str|bool)\((run\.)?(cfg|rl|t|gen|self\.cfg)\.[a-z_]")
# the functions that take the whole config: the runners' entry points and start-up, the reward mix (its
# free-form reward.options) and the compose-time engine check
TAKES_WHOLE_CONFIG = {"train", "setup", "start", "build_reward_mix", "check_engine"}


def _sources() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in folder.glob("*.py"))


def test_no_coercion_or_to_object_of_config_nodes_in_trainers_and_rl():
    found = []
    for path in _sources():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if COERCION.search(line) or "OmegaConf.to_object(" in line:
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "read the typed sections on the Run (run.rl, run.model ...) instead:\n" + "\n".join(found)


def test_only_the_entry_points_take_the_whole_config():
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in TAKES_WHOLE_CONFIG:
                for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                    if arg.annotation is not None and "DictConfig" in ast.unparse(arg.annotation):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name}({arg.arg})")
    assert not found, "pass the typed sections (run.data, run.deepspeed ...), not the config:\n" + "\n".join(found)


def test_one_forward_logps():
    from alignkit.models import logprobs
    from alignkit.trainers import nash_md, preference, reference, sppo

    assert reference.forward_logps is logprobs.forward_logps
    assert preference.forward_logps is logprobs.forward_logps
    assert nash_md.forward_logps is logprobs.forward_logps
    assert sppo.forward_logps is logprobs.forward_logps


@pytest.mark.parametrize("overrides", [
    ["recipe=dpo_tiny"],
    ["recipe=grpo_tiny", "trainer.batch_size=8", "trainer.micro_batch_size=2", "launcher.nproc_per_node=2"],
    ["recipe=online_dpo_tiny", "trainer.batch_size=12", "trainer.micro_batch_size=3", "launcher.nproc_per_node=2"],
])
def test_run_holds_every_section_typed_and_counts_accumulation_as_the_config(overrides):
    cfg = compose(overrides)
    typed = typed_sections(cfg)
    world = int(cfg.launcher.nproc_per_node)
    run = Run(cfg=cfg, run_dir=Path("."), rank=0, world=world, device=torch.device("cpu"), **typed)
    for name, cls in SECTIONS.items():
        assert type(getattr(run, name)) is cls, name
    assert run.data == OmegaConf.to_object(cfg.data)  # what loop.setup prepared the data from before
    assert run.grad_accum_steps == grad_accum_steps(cfg)


@pytest.mark.parametrize("overrides", [
    ["recipe=dpo_tiny"],
    ["recipe=dpo_smollm2"],
    ["recipe=dpo_tiny", "model.lora.r=4", "model.lora.target_modules=[q_proj]", "model.revision=abc"],
])
def test_precomputed_reference_cache_key_keeps_its_model_identity(overrides):
    """``precompute`` keys its cache by the model section: the typed one must give the same JSON the
    DictConfig gave, so caches written before the sections were typed are still found."""
    cfg = compose(overrides)
    before = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True, default=str)
    assert json.dumps(asdict(typed_sections(cfg)["model"]), sort_keys=True, default=str) == before


def test_frozen_reference_model_config_leaves_the_runs_own_untouched():
    from alignkit.trainers.preference import _frozen_model_cfg

    model = ModelConfig(lora=LoraConfig(r=8), gradient_checkpointing=True, logprob_chunk_size=64)
    frozen = _frozen_model_cfg(model)
    assert (frozen.lora.r, frozen.gradient_checkpointing, frozen.logprob_chunk_size) == (0, False, 64)
    assert (model.lora.r, model.gradient_checkpointing) == (8, True)  # run.model: the policy's, shared
