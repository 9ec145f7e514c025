"""Faults a trainer polls for: a stop request (SIGINT/SIGTERM) and non-finite parameters.

``StopRequest.install()`` replaces the SIGINT/SIGTERM handlers with one that only sets a flag;
the trainer checks ``stop.requested`` after each optimizer step, then saves a checkpoint and exits
resumable (``resume=auto``). Before the loop (``StopRequest(at_once=True)`` until ``defer()``:
loading, the reference pre-pass) a signal raises ``StopNow`` at once. A second SIGINT (Ctrl-C twice) raises ``KeyboardInterrupt`` for
users who do not want to wait. Under the DeepSpeed launcher every worker receives the signal;
trainers should agree across ranks (``any_rank(stop.requested)``) so all ranks save together.

``nonfinite_parameter(module)`` names the first trainable parameter holding NaN/inf (this rank's
ZeRO-3 shard included): checkpoints are saved only when it is None on every rank.

Left out: watchdogs for hung collectives, OOM recovery, automatic restarts.
"""

from __future__ import annotations

import signal
import threading

import torch


class StopNow(BaseException):
    """Raised by the handler while the run is still starting (loading, reference pre-pass): nothing
    to checkpoint yet, so a signal stops at once, also out of a blocking read (e.g. of a FIFO).
    A ``BaseException``, like ``KeyboardInterrupt``, so library ``except Exception`` blocks let it pass."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


_LAST_SIGNAL: list[int] = []


def last_stop_signal() -> int | None:
    """The number of the last signal a ``StopRequest`` received in this process (for the exit code)."""
    return _LAST_SIGNAL[-1] if _LAST_SIGNAL else None


class StopRequest:
    """A flag set by SIGINT/SIGTERM; ``install()``/``uninstall()`` or use as a context manager.

    With ``at_once=True`` (the trainers' start-up), until ``defer()`` is called
    (``trainers.loop.begin``, when the loop can checkpoint) a signal raises ``StopNow`` instead."""

    def __init__(self, *, at_once: bool = False) -> None:
        self.deferred = not at_once
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame) -> None:
        if self.requested and signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without the checkpoint
        _LAST_SIGNAL.append(signum)
        if not self.deferred:
            raise StopNow(signum)
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def defer(self) -> None:
        """From now on a signal only sets ``requested``; the loop saves and stops after the step."""
        self.deferred = True

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on any rank (a collective: every rank must call it)."""
    from alignkit.engine.collectives import any_rank as reduce_any  # on the process group's device

    return reduce_any(bool(flag))


def nonfinite_parameter(module: torch.nn.Module) -> str | None:
    """Name of the first trainable parameter of ``module`` with a NaN/inf value on this rank, else None.

    Under ZeRO-3 a parameter's local values live in ``ds_tensor`` (the parameter itself is empty
    outside a forward); that shard is what this rank checks.
    """
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        values = getattr(param, "ds_tensor", None)
        values = param if values is None else values
        if values.numel() and not bool(torch.isfinite(values.detach()).all()):
            return name
    return None
