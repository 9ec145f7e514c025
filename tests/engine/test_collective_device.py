"""Every collective alignkit issues runs on the process group's device.

An NCCL process group reduces only CUDA tensors; a CPU tensor handed to it fails at the first step
of a multi-GPU run, and a CPU-only CI cannot see it. Three checks make that class of bug impossible
to reintroduce here:

1. the source: no alignkit module hands a tensor to a ``torch.distributed`` collective itself; they
   all go through ``alignkit.engine.collectives`` (the one exception is listed with its reason;
   object collectives such as ``broadcast_object_list`` place their buffers themselves);
2. the helpers, under a faked NCCL group whose accelerator device is ``meta``: every tensor they
   hand to ``torch.distributed`` is on that device, also when the caller's tensor is on the CPU;
3. every runner for 2 steps: each collective that alignkit code issues comes from the helpers
   and carries a tensor on ``collectives.device()`` (the helpers run their collectives also in a
   world of one, so these in-process runs take the same path as a multi-GPU run).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from alignkit.engine import collectives

ROOT = Path(collectives.__file__).resolve().parents[1]  # the alignkit package
# collectives that take tensors from the caller (the object collectives -- all_gather_object,
# broadcast_object_list, ... -- pick the process group's device themselves, so any caller is safe)
COLLECTIVE_NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
                    "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter")
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")
# file -> why it may call torch.distributed itself
ALLOWED = {
    "engine/collectives.py": "the helpers",
    # rl/generation.py's _any_rank builds its flag on the generating model's device (the GPU under NCCL)
    "rl/generation.py": "tensor built on the model's device",
}


def _raw_collective_calls(path: Path) -> list[str]:
    """``file:line name`` of every call ``dist.X(...)``/``torch.distributed.X(...)`` of a collective X."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):  # import torch.distributed as dist / from torch import distributed as d
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.Assign) and ast.unparse(node.value) in aliases:
            aliases |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch.distributed", "torch.distributed.distributed_c10d"):
            hits = [a.name for a in node.names if a.name in COLLECTIVE_NAMES]
            if hits:
                return [f"{path}:{node.lineno} from {node.module} import {', '.join(hits)}"]
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVE_NAMES
                and ast.unparse(node.func.value) in aliases):
            name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            found.append(f"{name}:{node.lineno} {ast.unparse(node.func)}")
    return found


def test_no_module_calls_a_collective_directly():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if str(path.relative_to(ROOT)) not in ALLOWED:
            offenders += _raw_collective_calls(path)
    assert not offenders, ("call alignkit.engine.collectives instead (it places tensors on the process group's "
                           "device):\n" + "\n".join(offenders))


def test_the_source_scan_finds_raw_collectives(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nimport torch.distributed as d\nfrom torch import distributed\n\n"
                   "def f(x):\n    d.all_reduce(torch.tensor([x]))\n    distributed.all_gather([x], x)\n"
                   "    torch.distributed.broadcast(x, 0)\n    d.barrier()\n    d.broadcast_object_list([x], 0)\n")
    assert [hit.split()[-1] for hit in _raw_collective_calls(bad)] == [
        "d.all_reduce", "distributed.all_gather", "torch.distributed.broadcast"]


class _Sent(Exception):
    pass


@pytest.fixture
def fake_nccl(monkeypatch):
    """A process group that reports the NCCL backend, with ``meta`` as its accelerator device; every
    collective records the device of what it receives, then stops the caller."""
    seen: list[torch.device] = []

    def record(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise _Sent

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "all_reduce", record)
    monkeypatch.setattr(collectives, "accelerator_device", lambda: torch.device("meta"))
    return seen


def test_helpers_put_tensors_on_the_accelerator_under_nccl(fake_nccl):
    from alignkit.engine.faults import any_rank
    from alignkit.trainers import common

    run = common.Run(cfg=None, run_dir=Path("."), rank=0, world=2, device=torch.device("cpu"))
    calls = [
        lambda: collectives.all_reduce([1.0, 2.0]),
        lambda: collectives.any_rank(True),
        lambda: any_rank(False),
        lambda: common.all_reduce_sum(3.0, run),
        lambda: common.all_reduce_values([1.0, 2.0], run),
    ]
    for call in calls:
        with pytest.raises(_Sent):
            call()
    assert fake_nccl == [torch.device("meta")] * len(calls)


def test_helpers_stay_on_the_cpu_under_gloo(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "gloo")
    monkeypatch.setattr(collectives, "accelerator_device", lambda: torch.device("meta"))
    assert collectives.device() == torch.device("cpu")


def test_all_reduce_returns_the_result_on_the_callers_device(monkeypatch):
    def double(tensor, op=None):
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "gloo")
    monkeypatch.setattr(dist, "all_reduce", double)
    assert collectives.all_reduce([1.5]) == [3.0]


RUNNERS = {
    "sft": ["recipe=sft_tiny"],
    "dpo": ["recipe=dpo_tiny"],
    "kto": ["recipe=kto_tiny"],
    "reward": ["recipe=rm_tiny"],
    "grpo": ["recipe=grpo_tiny", "generation.max_new_tokens=6"],
    "ppo": ["recipe=ppo_tiny", "generation.max_new_tokens=6"],
    "online_dpo": ["recipe=online_dpo_tiny", "generation.max_new_tokens=6"],
}


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_every_runner_issues_its_collectives_through_the_helpers(runner, tmp_path, monkeypatch):
    from alignkit.run import train_from_overrides

    calls: list[tuple[str, str, torch.device | None]] = []

    def wrap(name, real):
        def recorded(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "torch/distributed" not in caller:  # torch's own nested calls are part of the outer one
                tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
                calls.append((name, caller, None if tensor is None else tensor.device))
            return real(*args, **kwargs)

        return recorded

    for name in COLLECTIVE_NAMES + OBJECT_COLLECTIVES:
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, wrap(name, getattr(dist, name)))
    overrides = [*RUNNERS[runner], "trainer.max_steps=2", "trainer.eval_every=1", "trainer.export=false",
                 f"trainer.reference_cache_dir={tmp_path / 'ref'}", f"output_dir={tmp_path}", "run_name=run"]
    assert train_from_overrides(overrides) == 0
    ours = [(name, caller, device) for name, caller, device in calls if str(ROOT) in caller]
    assert len(ours) >= 2 * 3, calls  # per step at least: metrics, stop flag, eval
    expected = collectives.device()
    for name, caller, device in ours:
        if name in COLLECTIVE_NAMES:
            assert caller == collectives.__file__, f"{name} called from {caller}, not through alignkit.engine.collectives"
        assert device is None or device == expected, (name, caller, device)
    for name, caller, device in calls:  # DeepSpeed's own collectives too
        assert device is None or device == expected, (name, caller, device)
