"""Fault helpers: the stop-request flag set by SIGINT/SIGTERM and the non-finite tensor check."""

import os
import signal

import pytest
import torch

from alignkit.engine.faults import StopRequest, any_rank, check_finite


def test_check_finite_names_the_first_bad_tensor():
    assert check_finite(torch.tensor(1.0), {"a": torch.ones(2)}) is None
    assert check_finite(torch.tensor(float("nan")), {"a": torch.ones(2)}) == "loss"
    named = [
        ("grad:w", torch.ones(3)),
        ("grad:b", None),
        ("grad:c", torch.tensor([1.0, float("inf")])),
        ("d", float("-inf")),
    ]
    assert check_finite(1.0, named) == "grad:c"
    assert check_finite(float("inf")) == "loss"
    assert any_rank(True) and not any_rank(False)


def test_stop_request_sets_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # after SIGTERM a SIGINT does not escalate (launcher sends both)
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_ctrl_c_escalates():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
