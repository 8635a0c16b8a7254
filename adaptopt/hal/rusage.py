"""``getrusage`` around the timed loop, plus the CPU clock from sysfs or ``/proc/cpuinfo``.

Everywhere available (POSIX). CPU time, faults and context switches are deltas over the
loop divided by the number of runs; ``max_rss_mb`` is the process's peak resident set
(the kernel keeps no per-interval peak). ``cpu_mhz`` is the current clock averaged
over cores: ``scaling_cur_freq`` when cpufreq is exposed, else ``/proc/cpuinfo``'s
"cpu MHz" (on most VMs a fixed nominal figure).
"""

from __future__ import annotations

import glob
import resource
import sys
import time

from adaptopt.hal.base import Availability, Backend, Reading, missing

NAME = "rusage"


def cpu_mhz() -> tuple[float | None, str]:
    """Average current core clock in MHz and where it came from (or why it is missing)."""
    freqs = []
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"):
        try:
            with open(path) as fh:
                freqs.append(int(fh.read().strip()) / 1000.0)  # kHz -> MHz
        except (OSError, ValueError):
            continue
    if freqs:
        return sum(freqs) / len(freqs), "sysfs scaling_cur_freq"
    try:
        with open("/proc/cpuinfo") as fh:
            mhz = [float(line.split(":", 1)[1]) for line in fh if line.lower().startswith("cpu mhz")]
    except (OSError, ValueError):
        mhz = []
    if mhz:
        return sum(mhz) / len(mhz), "/proc/cpuinfo"
    return None, "no cpufreq in sysfs and no 'cpu MHz' in /proc/cpuinfo"


class RusageProbe:
    def __init__(self) -> None:
        self.wall0 = time.perf_counter()
        self.usage0 = resource.getrusage(resource.RUSAGE_SELF)

    def stop(self, runs: int) -> dict[str, Reading]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.perf_counter() - self.wall0
        runs = max(runs, 1)
        before = self.usage0
        user = (usage.ru_utime - before.ru_utime) * 1e3
        system = (usage.ru_stime - before.ru_stime) * 1e3
        # ru_maxrss is KiB on Linux, bytes on macOS
        rss_mb = usage.ru_maxrss / (1024.0 if sys.platform != "darwin" else 1024.0 * 1024.0)
        out = {
            "cpu_time": Reading((user + system) / runs, "ms/run", NAME, True),
            "user_time": Reading(user / runs, "ms/run", NAME, True),
            "system_time": Reading(system / runs, "ms/run", NAME, True),
            "minor_faults": Reading((usage.ru_minflt - before.ru_minflt) / runs, "count/run", NAME, True),
            "major_faults": Reading((usage.ru_majflt - before.ru_majflt) / runs, "count/run", NAME, True),
            "voluntary_ctx_switches": Reading((usage.ru_nvcsw - before.ru_nvcsw) / runs, "count/run", NAME, True),
            "involuntary_ctx_switches": Reading((usage.ru_nivcsw - before.ru_nivcsw) / runs, "count/run", NAME, True),
            "max_rss": Reading(rss_mb, "MiB", NAME, True),
        }
        # cores kept busy on average: CPU time over wall time (derived)
        out["cpu_utilization"] = (Reading((user + system) / 1e3 / wall, "cores", NAME, False) if wall > 0
                                  else missing("cores", NAME, "zero wall time", measured=False))
        mhz, source = cpu_mhz()
        out["cpu_mhz"] = Reading(mhz, "MHz", NAME, True) if mhz is not None else missing("MHz", NAME, source)
        return out


class RusageBackend(Backend):
    name = NAME

    def availability(self) -> Availability:
        mhz, source = cpu_mhz()
        clock = f"clock from {source}" if mhz is not None else f"no clock: {source}"
        return Availability(True, f"getrusage(RUSAGE_SELF); {clock}")

    def start(self) -> RusageProbe:
        return RusageProbe()
