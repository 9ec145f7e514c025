"""Fault helpers: the stop-request flag set by SIGINT/SIGTERM and the any-rank vote."""

import os
import signal

import pytest

from alignkit.engine.faults import StopRequest, any_rank


def test_any_rank_on_one_process():
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
