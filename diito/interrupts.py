"""Stopping a job from outside: SIGTERM (``kill``, ``docker stop``, a scheduler's cancel) stops it as
Ctrl-C does, with a ``KeyboardInterrupt``, so its MLflow run is marked KILLED, its files are left
whole, and the console says how to continue.
"""

from __future__ import annotations

import signal

_received = signal.SIGINT  # the signal that stopped this process (SIGINT: Ctrl-C, Python's own handler)


class Interrupted(KeyboardInterrupt):
    """Training stopped at ``step``; the next run continues from the checkpoint at ``checkpoint``
    (None: it starts afresh)."""

    def __init__(self, name: str, step: int, checkpoint: int | None):
        super().__init__(name, step, checkpoint)
        self.name, self.step, self.checkpoint = name, step, checkpoint


def handle_sigterm() -> None:
    """Make SIGTERM raise ``KeyboardInterrupt`` in this process, unless a handler is installed
    already: submitit installs its own, which requeues a preempted job, and that one is kept."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        try:
            signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread: signals are not this code's to handle
            pass


def _terminate(signum: int, frame) -> None:
    global _received
    _received = signal.SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a repeated SIGTERM must not cut the run's ending short
    raise KeyboardInterrupt


def signal_name() -> str:
    return _received.name


def exit_code() -> int:
    """The shell's code for a process ended by the signal that stopped this one: 130 after Ctrl-C,
    143 after SIGTERM."""
    return 128 + _received


def how_to_continue(stop: KeyboardInterrupt) -> str:
    """One line: what was stopped, and how to continue it."""
    if not isinstance(stop, Interrupted):
        return f"stopped by {signal_name()}; run the same command again to continue from the last checkpoint"
    where = f"stopped by {signal_name()} at {stop.name} step {stop.step}"
    if stop.checkpoint is None:
        return f"{where}; no checkpoint to continue from: the same command starts it afresh"
    return f"{where}; run the same command again to continue from its checkpoint at step {stop.checkpoint}"
