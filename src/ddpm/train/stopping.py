"""Stopping a run early without losing work: on a signal, or before a wall-clock limit.

Clusters end a job with a signal and, after a grace period, SIGKILL: Slurm sends SIGTERM at
preemption and at the time limit (and SIGUSR1 or another signal ``--signal`` asks for, some
time before), torchrun forwards SIGTERM to its workers and kills them 30 s later, and a terminal
sends SIGINT on Ctrl-C. While a run trains, :class:`StopRequest` turns each of SIGTERM, SIGUSR1
and SIGINT into a request: the trainer finishes the step it is in, writes a verified checkpoint
of that step and returns, and ``ddpm train`` exits with :data:`EXIT_STOPPED`.

- **Grace period.** From the first signal the run has ``grace_period`` seconds. If the step and
  the checkpoint have not finished by then (a very large model), the process exits at once with
  the status the signal would have given (128 + its number): the last checkpoint written before
  stays, and an unfinished write is cleaned up when the folder is next opened.
- **A second signal** while stopping changes nothing (it is logged): the checkpoint being written
  is the work worth keeping, and the grace period bounds the wait.
- **Time limit.** With ``time_limit`` seconds, the run stops the same way at the first step after
  which one more step and a checkpoint would no longer fit before the limit (from the measured
  step time and checkpoint time, with a margin).
- **Several processes.** Each process's request is summed into the all-reduce that every step does
  anyway, so all processes stop after the same step, whichever of them was signalled, and none
  waits in a collective that the others have left.

Handlers can only be installed in the main thread; elsewhere (a run started from a thread) the
run trains without them, as before.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

logger = logging.getLogger("ddpm.train")

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name)
)
EXIT_STOPPED = 75  # EX_TEMPFAIL of sysexits.h: not finished, try again (rerun with --resume auto)
TIME_LIMIT = "time limit"  # the reason recorded when the wall-clock limit stopped the run
SAFETY_FACTOR = 1.5  # the time kept for one more step and a checkpoint is this many times their measured cost
SAFETY_SECONDS = 2.0  # ... plus this


def parse_duration(text: str) -> float:
    """Seconds from ``"90"``, ``"90s"``, ``"45m"``, ``"3h"``, ``"1h30m"``, ``"2d"`` or Slurm's ``"[D-]HH:MM:SS"``.

    Raises ``ValueError`` naming the text for anything else or a duration that is not positive.
    """
    raw = text.strip().lower()
    seconds = 0.0
    try:
        if ":" in raw:  # [D-]HH:MM:SS or MM:SS
            days, _, clock = raw.rpartition("-")
            parts = [float(p) for p in clock.split(":")]
            if len(parts) > 3:
                raise ValueError
            for p in parts:
                seconds = seconds * 60 + p
            seconds += float(days or 0) * 86400
        else:
            units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
            number = ""
            for ch in raw:
                if ch.isdigit() or ch == ".":
                    number += ch
                elif ch in units and number:
                    seconds += float(number) * units[ch]
                    number = ""
                else:
                    raise ValueError
            seconds += float(number) if number else 0.0
    except ValueError:
        raise ValueError(
            f"{text!r} is not a duration: use seconds (5400), units (1h30m, 90m, 2d) or [D-]HH:MM:SS") from None
    if not seconds > 0:
        raise ValueError(f"a duration must be positive, got {text!r}")
    return seconds


class StopRequest:
    """Whether this process has been asked to stop, and why (see the module docstring).

    Args:
        grace_period: seconds from the first signal to a forced exit.
        time_limit: seconds after ``started`` by which the run must have stopped (None: no limit).
        started: ``time.monotonic()`` when the run's clock started (what the time limit counts from).
    """

    def __init__(self, *, grace_period: float, time_limit: float | None = None,
                 started: float | None = None) -> None:
        self.grace_period = float(grace_period)
        self.time_limit = time_limit
        self.started = time.monotonic() if started is None else started
        self.reason: str | None = None  # the first signal's name, or TIME_LIMIT
        self.signalled_at: float | None = None  # time.monotonic() of the first signal
        self._signum: int | None = None
        self._previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}
        self._watchdog: threading.Timer | None = None

    # ------------------------------------------------------------------ signals
    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle the stop signals while the block runs (main thread only), then restore the old handlers."""
        if threading.current_thread() is not threading.main_thread():
            logger.info("not in the main thread: signals will not stop the run gracefully")
            yield self
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()
            if self._watchdog is not None:
                self._watchdog.cancel()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None:
            logger.warning("%s received while stopping (%s): still finishing the step and its checkpoint", name,
                           self.reason)
            return
        self.reason, self.signalled_at, self._signum = name, time.monotonic(), int(signum)
        logger.warning("%s received: finishing this step, then writing a checkpoint (grace period %gs)", name,
                       self.grace_period)
        self._watchdog = threading.Timer(self.grace_period, self._grace_expired)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _grace_expired(self) -> None:
        logger.error("the grace period of %gs after %s ran out before the checkpoint was written; exiting now "
                     "(the last checkpoint written before stays)", self.grace_period, self.reason)
        logging.shutdown()
        os._exit(128 + (self._signum or int(signal.SIGTERM)))

    def request(self, reason: str) -> None:
        """Ask for a stop without a signal (what the time limit does; tests use it too)."""
        if self.reason is None:
            self.reason, self.signalled_at = reason, time.monotonic()

    # ------------------------------------------------------------------ the clock
    def time_is_up(self, step_seconds: float, checkpoint_seconds: float) -> bool:
        """Whether one more step and a checkpoint, with the safety margin, would end past the time limit."""
        if self.time_limit is None:
            return False
        needed = SAFETY_FACTOR * (step_seconds + checkpoint_seconds) + SAFETY_SECONDS
        return time.monotonic() - self.started + needed >= self.time_limit

    def seconds_since_signal(self) -> float | None:
        return None if self.signalled_at is None else time.monotonic() - self.signalled_at
