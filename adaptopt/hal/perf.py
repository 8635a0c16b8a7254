"""Linux ``perf_event_open`` counters through ctypes, per thread of this process.

Hardware events (cycles, instructions, cache references/misses, L1D and LLC loads and
misses) need the CPU's PMU; most VMs do not expose it and the kernel answers ENOENT,
which is what ``perf stat`` prints as "<not supported>". Software events (task clock,
page faults, context switches, migrations) are counted by the kernel and work almost
everywhere. Each event is probed once per process; an event that cannot be opened is
reported as a missing reading carrying the errno, never as zero.

ONNX Runtime's worker threads already exist when a timed loop starts, so ``inherit``
would miss them: counters are opened on every thread listed in ``/proc/self/task``
and summed. Threads created during the loop are not counted (ORT's pool is made once).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import platform
import struct
from dataclasses import dataclass
from pathlib import Path

from adaptopt.hal.base import Availability, Backend, Reading, missing

NAME = "perf"
_SYSCALL = {"x86_64": 298, "aarch64": 241, "ppc64le": 319, "s390x": 331}
_ENABLE, _DISABLE, _RESET = 0x2400, 0x2401, 0x2403
_TYPE_HARDWARE, _TYPE_SOFTWARE, _TYPE_HW_CACHE = 0, 1, 3
_FLAG_DISABLED, _FLAG_EXCLUDE_KERNEL, _FLAG_EXCLUDE_HV = 1 << 0, 1 << 5, 1 << 6
_READ_TOTAL_TIMES = 1 | 2  # TOTAL_TIME_ENABLED | TOTAL_TIME_RUNNING, to undo multiplexing


def _cache(cache_id: int, result: int) -> int:
    return cache_id | (0 << 8) | (result << 16)  # op READ


@dataclass(frozen=True)
class Event:
    name: str
    type: int
    config: int
    unit: str
    hardware: bool


EVENTS = (
    Event("cycles", _TYPE_HARDWARE, 0, "count/run", True),
    Event("instructions", _TYPE_HARDWARE, 1, "count/run", True),
    Event("cache_references", _TYPE_HARDWARE, 2, "count/run", True),
    Event("cache_misses", _TYPE_HARDWARE, 3, "count/run", True),
    Event("l1d_loads", _TYPE_HW_CACHE, _cache(0, 0), "count/run", True),
    Event("l1d_load_misses", _TYPE_HW_CACHE, _cache(0, 1), "count/run", True),
    Event("llc_loads", _TYPE_HW_CACHE, _cache(2, 0), "count/run", True),
    Event("llc_load_misses", _TYPE_HW_CACHE, _cache(2, 1), "count/run", True),
    Event("task_clock", _TYPE_SOFTWARE, 1, "ms/run", False),
    Event("page_faults", _TYPE_SOFTWARE, 2, "count/run", False),
    Event("context_switches", _TYPE_SOFTWARE, 3, "count/run", False),
    Event("cpu_migrations", _TYPE_SOFTWARE, 4, "count/run", False),
)
# derived name -> (numerator, denominator, kind): ratio, or hit rate 1 - misses/accesses
DERIVED = {
    "ipc": ("instructions", "cycles", "ratio"),
    "cache_hit_rate": ("cache_misses", "cache_references", "hit"),
    "l1d_hit_rate": ("l1d_load_misses", "l1d_loads", "hit"),
    "llc_hit_rate": ("llc_load_misses", "llc_loads", "hit"),
}


class _Attr(ctypes.Structure):
    """``struct perf_event_attr`` up to ``config1`` (PERF_ATTR_SIZE_VER0, accepted by every kernel)."""

    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
                ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
                ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64),
                ("wakeup_events", ctypes.c_uint32), ("bp_type", ctypes.c_uint32), ("config1", ctypes.c_uint64)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def paranoid_level() -> int | None:
    try:
        return int(Path("/proc/sys/kernel/perf_event_paranoid").read_text().strip())
    except (OSError, ValueError):
        return None


def open_event(event: Event, tid: int = 0) -> int:
    """Open ``event`` (disabled) on thread ``tid`` (0 = the calling thread); raises OSError."""
    number = _SYSCALL.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"perf_event_open syscall number unknown on {platform.machine()}")
    attr = _Attr(type=event.type, size=ctypes.sizeof(_Attr), config=event.config, read_format=_READ_TOTAL_TIMES)
    # User space only: allowed at perf_event_paranoid <= 2 for our own threads.
    attr.flags = _FLAG_DISABLED | _FLAG_EXCLUDE_HV | (_FLAG_EXCLUDE_KERNEL if event.hardware else 0)
    fd = _libc().syscall(number, ctypes.byref(attr), tid, -1, -1, 0)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return fd


def explain(event: Event, exc: OSError) -> str:
    """Why ``event`` cannot be counted, in the words a user can act on."""
    base = f"perf_event_open({event.name}): [Errno {exc.errno}] {exc.strerror}"
    if exc.errno in (errno.ENOENT, errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL) and event.hardware:
        return base + " - hardware event not supported: the CPU's PMU is not exposed here (typical of VMs)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return base + f" - not permitted (kernel.perf_event_paranoid = {paranoid_level()})"
    if exc.errno == errno.ENOSYS:
        return base + " - this kernel has no perf_event_open"
    return base


@functools.lru_cache(maxsize=1)
def probe_events() -> dict[str, str]:
    """Each event name -> "" when it can be opened here, else the reason it cannot."""
    status = {}
    for event in EVENTS:
        try:
            os.close(open_event(event))
            status[event.name] = ""
        except OSError as exc:
            status[event.name] = explain(event, exc)
    return status


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


class PerfProbe:
    """Counters open on every thread of the process; enabled at creation."""

    def __init__(self, events: list[Event], unavailable: dict[str, str]):
        self.events = events
        self.unavailable = unavailable  # event name -> reason, from probe_events()
        self.fds: dict[str, list[int]] = {e.name: [] for e in events}
        self.failures: dict[str, str] = {}
        tids = _thread_ids()
        for event in events:
            for tid in tids:
                try:
                    self.fds[event.name].append(open_event(event, tid))
                except OSError as exc:
                    if exc.errno != errno.ESRCH:  # a thread that ended meanwhile is fine
                        self.failures[event.name] = explain(event, exc)
        for fd in self._all_fds():
            fcntl.ioctl(fd, _RESET, 0)
        for fd in self._all_fds():
            fcntl.ioctl(fd, _ENABLE, 0)

    def _all_fds(self) -> list[int]:
        return [fd for fds in self.fds.values() for fd in fds]

    def stop(self, runs: int) -> dict[str, Reading]:
        for fd in self._all_fds():
            fcntl.ioctl(fd, _DISABLE, 0)
        totals: dict[str, float | None] = {}
        for event in self.events:
            totals[event.name] = self._read_sum(self.fds[event.name])
        for fd in self._all_fds():
            os.close(fd)
        self.fds = {}
        readings = self._readings(totals, max(runs, 1))
        readings.update({n: missing(e.unit, NAME, self.unavailable[n]) for e in EVENTS
                         if (n := e.name) in self.unavailable})
        ordered = {e.name: readings[e.name] for e in EVENTS}
        ordered.update(derive(ordered))
        return ordered

    @staticmethod
    def _read_sum(fds: list[int]) -> float | None:
        if not fds:
            return None
        total = 0.0
        for fd in fds:
            value, enabled, running = struct.unpack("QQQ", os.read(fd, 24))
            if enabled and running and running < enabled:
                value = value * enabled / running  # the PMU multiplexed this event: scale
            total += value
        return total

    def _readings(self, totals: dict[str, float | None], runs: int) -> dict[str, Reading]:
        out: dict[str, Reading] = {}
        for event in self.events:
            value = totals.get(event.name)
            if value is None:
                out[event.name] = missing(event.unit, NAME, self.failures.get(event.name, "no thread could be counted"))
                continue
            scale = 1e-6 if event.name == "task_clock" else 1.0  # ns -> ms
            out[event.name] = Reading(value * scale / runs, event.unit, NAME, True)
        return out


def derive(readings: dict[str, Reading]) -> dict[str, Reading]:
    """IPC and hit rates from the raw counts (derived, so ``measured=False``)."""
    out = {}
    for name, (num, den, kind) in DERIVED.items():
        a, b = readings.get(num), readings.get(den)
        unit = "instructions/cycle" if kind == "ratio" else "fraction"
        if a is None or b is None or a.missing or b.missing:
            reason = next((r.reason for r in (a, b) if r is not None and r.missing), f"needs {num} and {den}")
            out[name] = missing(unit, NAME, reason, measured=False)
        elif not b.value:
            out[name] = missing(unit, NAME, f"{den} counted 0", measured=False)
        else:
            value = a.value / b.value if kind == "ratio" else 1.0 - a.value / b.value
            out[name] = Reading(value, unit, NAME, False)
    return out


class PerfBackend(Backend):
    name = NAME

    def availability(self) -> Availability:
        status = probe_events()
        ok = [n for n, why in status.items() if not why]
        if not ok:
            return Availability(False, status["task_clock"])
        hardware = [e.name for e in EVENTS if e.hardware and not status[e.name]]
        if hardware:
            return Availability(True, f"hardware and software events ({len(ok)} of {len(EVENTS)} events)")
        first_hw = next(status[e.name] for e in EVENTS if e.hardware)
        return Availability(True, f"software events only; hardware events unavailable: {first_hw}")

    def start(self) -> PerfProbe:
        status = probe_events()
        events = [e for e in EVENTS if not status[e.name]]
        return PerfProbe(events, {n: why for n, why in status.items() if why})

    def describe(self) -> dict:
        return {**super().describe(), "events": {n: (why or "available") for n, why in probe_events().items()},
                "perf_event_paranoid": paranoid_level()}
