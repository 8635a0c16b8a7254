"""The HAL contract: backends that say whether they can measure, and readings that say who measured.

A *backend* answers :meth:`Backend.availability` (available or not, and why) and,
when it is a live backend, opens a :class:`Probe` around a timed loop. A probe's
:meth:`Probe.stop` returns :class:`Reading` values keyed by counter name. A counter a
backend cannot read on this machine is a reading with ``value=None`` and a reason,
never a zero.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Reading:
    """One number: its unit, which backend produced it, measured (True) or derived (False).

    ``value`` is ``None`` when the counter is missing on this machine; ``reason`` then
    says why (e.g. ``perf_event_open: [Errno 2] ... (PMU not exposed)``).
    """

    value: float | None
    unit: str
    backend: str
    measured: bool
    reason: str = ""

    @property
    def missing(self) -> bool:
        return self.value is None

    def to_dict(self) -> dict:
        out = {"value": self.value, "unit": self.unit, "backend": self.backend, "measured": self.measured}
        if self.reason:
            out["reason"] = self.reason
        return out


def missing(unit: str, backend: str, reason: str, measured: bool = True) -> Reading:
    """A counter this machine cannot give, with the reason."""
    return Reading(None, unit, backend, measured, reason)


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here; ``reason`` says why not (or what it reads when it can)."""

    available: bool
    reason: str = ""

    def to_dict(self) -> dict:
        return {"available": self.available, "reason": self.reason}


class Probe(Protocol):
    """Counting in progress around a timed loop (started by :meth:`Backend.start`)."""

    def stop(self, runs: int) -> dict[str, Reading]:
        """Stop counting; return readings normalised per run where the unit says ``/run``."""


class Backend(ABC):
    """A source of counters. ``live`` backends count around the timed loop."""

    name: str = ""
    live: bool = True

    @abstractmethod
    def availability(self) -> Availability:
        """Available here? If not, why (one line)."""

    def start(self) -> Probe:
        """Begin counting (only called when available and ``live``)."""
        raise NotImplementedError(f"backend {self.name} does not count around a timed loop")

    def describe(self) -> dict:
        """Availability plus per-counter detail, for ``adaptopt hal``."""
        return {"name": self.name, **self.availability().to_dict()}

