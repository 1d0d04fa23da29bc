"""What a run shows while it trains: a progress bar on a terminal, plain lines in a job's log.

On a terminal, a tqdm bar with the loss, images/s and the last evaluation. When standard error is
not a terminal (a cluster job's log file), a bar's carriage-return updates would fill the log, so
the run prints one plain line per metrics line (``train.log_every``), at most one every
``min_interval`` seconds and always the last one, and one line per evaluation while training::

    train step 1200/5000 (24%) | loss 0.0321 | 412 images/s | ETA 9m12s | frechet_distance 5.12 at step 1000
    eval step 1500 | frechet_distance 4.87 (best so far) | evaluation 3.1% of the run's time
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def format_seconds(seconds: float) -> str:
    """``"1h02m"``, ``"9m12s"`` or ``"40s"``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Shows a run's progress (see the module docstring); only rank 0 makes one."""

    def __init__(self, total: int, initial: int, *, stream: TextIO | None = None, min_interval: float = 10.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.step, self.first = total, initial, initial
        self.min_interval = min_interval
        self.started = time.perf_counter()
        self._last_line = -float("inf")
        self._eval: str | None = None
        self._bar: Any = None
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                             file=self.stream)

    def advance(self, loss: float | None) -> None:
        """One step done."""
        self.step += 1
        if self._bar is not None:
            self._bar.update(1)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def report(self, metrics: dict[str, Any]) -> None:
        """A metrics line was written: show its loss and images/s (a plain line, if it is time for one)."""
        loss, speed = metrics.get("loss"), metrics.get("images_per_sec")
        if self._bar is not None:
            postfix = {"loss": f"{loss:.4f}" if loss is not None else "nan", "img_s": f"{speed:.1f}"}
            if self._eval is not None:
                postfix["eval"] = self._eval
            self._bar.set_postfix(postfix)
            return
        now = time.perf_counter()
        if now - self._last_line < self.min_interval and self.step < self.total:
            return
        self._last_line = now
        parts = [f"train step {self.step}/{self.total} ({100 * self.step / max(self.total, 1):.0f}%)"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if speed is not None:
            parts.append(f"{speed:.0f} images/s")
        done = self.step - self.first
        if 0 < done and self.step < self.total:
            parts.append(f"ETA {format_seconds((now - self.started) / done * (self.total - self.step))}")
        if self._eval is not None:
            parts.append(self._eval)
        print(" | ".join(parts), file=self.stream, flush=True)

    def evaluated(self, metric: str, value: float, step: int, *, best: bool, share: float) -> None:
        """An evaluation while training: one line now, and shown beside the progress from now on."""
        self._eval = f"{metric} {value:.4g} at step {step}"
        line = (f"eval step {step} | {metric} {value:.4g}{' (best so far)' if best else ''} | "
                f"evaluation {100 * share:.1f}% of the run's time")
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
