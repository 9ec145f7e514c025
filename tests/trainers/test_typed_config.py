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
# int(cfg.x), float(rl.x), str(t.x), int(run.cfg.x) ...: a coercion of a config node the schema already typed
COERCION = re.compile(r"\b(int|float|str|bool)\((run\.)?(cfg|rl|t|gen|self\.cfg)\.[a-z_]|\b(int|float|str|bool)\([\w.]*\bcfg\.")
# the functions that take the whole config: the runners' entry points and start-up, the one-process Run of
# tools and tests, and the compose-time checks
TAKES_WHOLE_CONFIG = {"train", "setup", "start", "typed_run", "check_engine"}
# the compose-time checks read the composed config (no Run exists yet); everything else reads run.<section>
READS_CONFIG_SECTIONS = {"check_engine", "check_judge", "start", "typed_run"}
CONFIG_KEYS = set(SECTIONS) | {"resume", "launcher"}


def _sources() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in folder.glob("*.py"))


def test_no_coercion_or_to_object_of_config_nodes_in_trainers_and_rl():
    found = []
    for path in _sources():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if COERCION.search(line) or "OmegaConf.to_object(" in line:
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "read the typed sections on the Run (run.rl, run.model ...) instead:\n" + "\n".join(found)


def _is_config(node: ast.AST) -> bool:
    """``cfg``, ``run.cfg``, ``self.cfg`` ..."""
    return (isinstance(node, ast.Name) and node.id == "cfg") or (isinstance(node, ast.Attribute) and node.attr == "cfg")


def _config_section_reads(tree: ast.AST) -> list[tuple[str, int, str]]:
    """(function, line, source) of each ``cfg.<section>``, ``cfg["<section>"]`` or ``cfg.get("<section>")``
    for a section the Run holds typed, outside the functions allowed to read the composed config."""
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) or function.name in READS_CONFIG_SECTIONS:
            continue
        for node in ast.walk(function):
            key = None
            if isinstance(node, ast.Attribute) and _is_config(node.value):
                key = node.attr
            elif isinstance(node, ast.Subscript) and _is_config(node.value) and isinstance(node.slice, ast.Constant):
                key = node.slice.value
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                  and _is_config(node.func.value) and node.args and isinstance(node.args[0], ast.Constant)):
                key = node.args[0].value
            if key in CONFIG_KEYS:
                found.append((function.name, node.lineno, ast.unparse(node)))
    return found


def test_no_config_section_is_read_from_the_config_past_start():
    """``d = cfg.data; int(d.max_length)`` slipped past the coercion pattern once (judges.build_judge): any read
    of a typed section from the config, aliased or not, is caught here."""
    found = [f"{path.relative_to(ROOT)}:{line}: {name}: {text}"
             for path in _sources() for name, line, text in _config_section_reads(ast.parse(path.read_text()))]
    assert not found, "read run.<section> (typed, converted once by common.start) instead:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    "def build(cfg):\n    d = cfg.data\n    return d.max_length\n",
    "def build(run):\n    return run.cfg.judge.kind\n",
    "def build(self):\n    return self.cfg['generation']\n",
    "def build(run):\n    return run.cfg.get('reward')\n",
    "def begin(run):\n    return run.cfg.resume\n",
])
def test_the_section_read_check_catches_planted_reads(source):
    assert _config_section_reads(ast.parse(source))


def test_the_coercion_pattern_catches_planted_coercions():
    for line in ["int(cfg.data.max_length)", "float(run.cfg.trainer.lr)", "str(self.cfg.model.name)", "int(rl.rounds)"]:
        assert COERCION.search(line), line
    assert not COERCION.search("int(state.get('step', 0))")


def test_only_the_entry_points_take_the_whole_config():
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in TAKES_WHOLE_CONFIG:
                for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                    if arg.annotation is not None and "DictConfig" in ast.unparse(arg.annotation):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name}({arg.arg})")
    assert not found, "pass the typed sections (run.data, run.deepspeed ...), not the config:\n" + "\n".join(found)


def _unannotated(tree: ast.AST) -> list[str]:
    """Public functions and public classes' methods (module level) missing an argument or return annotation."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            functions = [node]
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            functions = [n for n in node.body if isinstance(n, ast.FunctionDef)]
        else:
            continue
        for f in functions:
            if f.name.startswith("_") and f.name != "__init__":
                continue
            args = [a for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs if a.arg not in ("self", "cls")]
            missing = [a.arg for a in args if a.annotation is None]
            if missing or (f.returns is None and f.name != "__init__"):
                found.append(f"{f.lineno}: {f.name} ({', '.join(missing) or 'return'})")
    return found


def test_public_functions_in_trainers_and_rl_are_annotated():
    found = [f"{path.relative_to(ROOT)}:{hit}" for path in _sources() for hit in _unannotated(ast.parse(path.read_text()))]
    assert not found, "annotate the public functions of trainers/ and rl/ (issue 21, goal 2):\n" + "\n".join(found)
    assert _unannotated(ast.parse("def f(a: int):\n    pass\nclass C:\n    def m(self, x) -> None:\n        pass\n")) == [
        "1: f (return)", "4: m (x)"]


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
