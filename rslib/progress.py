"""Progress lines for long runs: what ``make reproduce`` streams to its terminal while a notebook works.

Inside a notebook, tqdm bars show progress in the cell's output. A notebook run by papermill shows nothing until it
ends, so the notebook runner (:mod:`rslib.notebooks`) sets ``RSLIB_PROGRESS=1`` and the long loops then also write
a short line, at most one every :data:`INTERVAL_S` seconds, to the process's original standard error, which the
kernel shares with the runner's terminal::

    stage_one: step 340/2000, loss 0.1234, 1m12s elapsed, about 5m50s left
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

ENV = "RSLIB_PROGRESS"
INTERVAL_S = 10.0


def enabled() -> bool:
    """True when progress lines are asked for (``RSLIB_PROGRESS`` set to anything but "" or "0")."""
    return os.environ.get(ENV, "") not in ("", "0")


def emit(line: str) -> None:
    """Write one line to the terminal the run was started from (the original standard error)."""
    stream = sys.__stderr__ or sys.stderr
    stream.write("      " + line + "\n")
    stream.flush()


def duration(seconds: float) -> str:
    """A short human duration: 45s, 3m05s, 1h02m."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class StepReporter:
    """Throttled progress lines of a loop over ``total`` steps that starts at step ``start`` (a resumed run).

    ``update(step, **values)`` writes a line when :data:`INTERVAL_S` seconds have passed since the last one (and
    for the first step); ``close(step)`` writes the last one. The time left is estimated from the steps this
    process has done. Silent unless :func:`enabled` (or ``force=True``).
    """

    def __init__(self, label: str, total: int, start: int = 0, *, unit: str = "step", interval: float = INTERVAL_S,
                 force: bool = False, clock: Callable[[], float] = time.monotonic,
                 write: Callable[[str], None] = emit):
        self.label, self.total, self.start, self.unit, self.interval = label, total, start, unit, interval
        self.active = force or enabled()
        self.clock, self.write = clock, write
        self.t0 = clock()
        self.last: float | None = None
        if self.active and start:
            self.write(f"{label}: resuming at {unit} {start}/{total}")

    def line(self, step: int, values: dict[str, float]) -> str:
        """The progress line after ``step`` steps."""
        elapsed = self.clock() - self.t0
        done = step - self.start
        parts = [f"{self.label}: {self.unit} {step}/{self.total}"]
        parts += [f"{k} {v:.4g}" for k, v in values.items()]
        parts.append(f"{duration(elapsed)} elapsed")
        if 0 < done and step < self.total:
            parts.append(f"about {duration(elapsed / done * (self.total - step))} left")
        return ", ".join(parts)

    def update(self, step: int, **values: float) -> None:
        """Report ``step`` if the interval has passed since the last line."""
        if not self.active:
            return
        now = self.clock()
        if self.last is None or now - self.last >= self.interval:
            self.last = now
            self.write(self.line(step, values))

    def close(self, step: int, **values: float) -> None:
        """The closing line (always written when active)."""
        if self.active:
            self.write(self.line(step, values))
