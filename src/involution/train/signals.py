"""Stopping a run on SIGTERM / SIGINT at the end of a step, with a checkpoint.

A scheduler preempting a job sends SIGTERM (``torchrun`` forwards it to its workers); a person
presses Ctrl-C. :class:`StopSignals` turns the first such signal into a request that the
engine honours after the step in progress (every rank at the same step, see
:meth:`involution.train.engine.Trainer`), checkpointing before it exits; a second signal
exits at once, with the signal's default action.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

#: The signals that ask a run to stop.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal, after writing a checkpoint to continue from."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal (143 for SIGTERM, 130 for
        SIGINT): non-zero, so a scheduler requeues the job."""
        return 128 + self.signum


class StopSignals:
    """While entered, the first SIGTERM or SIGINT sets :attr:`received`; a second one ends the
    process at once. Handlers can only be set from the main thread: elsewhere this does
    nothing. The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.received = None
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        print(
            f"involution: {signal.Signals(signum).name} received: stopping after this step with "
            "a checkpoint (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


def ignore_stop_signals(worker_id: int = 0) -> None:
    """For data-loading workers: leave stopping to the training process, which ends them.

    A Ctrl-C reaches the whole foreground process group; a worker it killed would break the
    loader the training process still reads its last step from.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
