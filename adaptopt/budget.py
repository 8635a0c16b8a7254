"""A deadline for the whole run (``--budget SECONDS``), read on a monotonic clock.

    deadline = Deadline(600)          # Deadline(None): no limit
    while work and not deadline.expired():
        worker.call(measure, job, timeout=deadline.cap(30.0))
    deadline.remaining()              # seconds left (inf without a limit), never negative
"""

from __future__ import annotations

import math
import time
from typing import Callable


class Deadline:
    """A point in time ``seconds`` from now; ``None`` means no deadline."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic):
        if seconds is not None and (math.isnan(seconds) or seconds < 0):
            raise ValueError(f"a budget must be a number of seconds >= 0, got {seconds!r}")
        self._clock = clock
        self.seconds = seconds
        self._end = None if seconds is None else clock() + seconds

    def remaining(self) -> float:
        """Seconds left, ``inf`` without a deadline, 0.0 once it has passed."""
        if self._end is None:
            return math.inf
        return max(0.0, self._end - self._clock())

    def expired(self) -> bool:
        return self._end is not None and self._clock() >= self._end

    def elapsed(self) -> float:
        return 0.0 if self._end is None else self.seconds - (self._end - self._clock())

    def cap(self, timeout: float | None) -> float | None:
        """``timeout`` shortened to what is left; None only when neither bounds anything."""
        left = self.remaining()
        if timeout is None:
            return None if math.isinf(left) else left
        return min(timeout, left)

    def __repr__(self) -> str:
        return "Deadline(None)" if self._end is None else f"Deadline({self.seconds}, remaining={self.remaining():.1f})"
