"""A process leaves its process group before it exits, after a normal end only.

Without ``destroy_process_group`` a 2-process gloo run could die at interpreter shutdown with SIGABRT
(return code -6, "terminate called without an active exception") after it had finished and saved;
the launcher then reported the run as failed. The abort itself is a race (about one start in ten
here), so these tests check the calls that prevent it, not the race."""

import os
import subprocess
import sys
import textwrap

import pytest

import alignkit.engine.engine as engine_mod
import alignkit.run as run_mod


def test_shutdown_leaves_the_group_and_is_idempotent():
    script = textwrap.dedent("""
        import torch
        from alignkit.engine.engine import setup_distributed, shutdown_distributed
        setup_distributed()
        assert torch.distributed.is_initialized()
        shutdown_distributed()
        assert not torch.distributed.is_initialized()
        shutdown_distributed()  # a second call (or one without a group) does nothing
        print("left")
    """)
    env = {k: v for k, v in os.environ.items()  # a world of one of its own, not this pytest process's
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("left")


def _patch(monkeypatch, outcome):
    calls = []
    monkeypatch.setattr(run_mod, "load_frozen", lambda path: {})

    def fake_run(cfg, run_dir, worker=False):
        calls.append(("run", worker))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(run_mod, "run_in_process", fake_run)
    monkeypatch.setattr(engine_mod, "shutdown_distributed", lambda: calls.append(("shutdown",)))
    return calls


@pytest.mark.parametrize("code", [0, 3])
def test_a_worker_that_returned_leaves_the_group_and_keeps_its_exit_code(monkeypatch, tmp_path, code):
    calls = _patch(monkeypatch, code)
    assert run_mod.run_worker(str(tmp_path / "config.yaml")) == code
    assert calls == [("run", True), ("shutdown",)]


def test_a_worker_that_raised_does_not_wait_at_a_barrier(monkeypatch, tmp_path):
    calls = _patch(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        run_mod.run_worker(str(tmp_path / "config.yaml"))
    assert calls == [("run", True)]
