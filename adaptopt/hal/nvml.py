"""NVIDIA GPU counters through NVML (``nvidia-ml-py``), sampled during the timed loop.

A background thread samples SM and memory clocks, GPU and memory-controller
utilization and board power every few milliseconds; :meth:`NvmlProbe.stop` reports
the mean of the samples. NVML's utilization figures are averages over the driver's own
window (1/6 s to 1 s), so loops shorter than that read coarse values. Without the
package, the driver or a GPU the backend is unavailable and says which.
"""

from __future__ import annotations

import threading
import time

from adaptopt.hal.base import Availability, Backend, Reading, missing

NAME = "nvml"
SAMPLE_PERIOD_S = 0.005
COUNTERS = {"sm_clock": "MHz", "mem_clock": "MHz", "gpu_utilization": "%", "mem_utilization": "%", "power": "W"}


def _pynvml():
    import pynvml  # noqa: PLC0415 - optional, heavy: imported only when a GPU is profiled
    return pynvml


def _init():
    """(pynvml module, None) once NVML is initialised, or (None, reason)."""
    try:
        nv = _pynvml()
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        nv.nvmlInit()
        count = nv.nvmlDeviceGetCount()
    except nv.NVMLError as exc:
        return None, f"NVML cannot start: {exc} (no NVIDIA driver or GPU)"
    if count == 0:
        return None, "NVML found no GPU"
    return nv, None


def sample(nv, handle) -> dict[str, float]:
    """One reading of every counter NVML answers for ``handle``."""
    values: dict[str, float] = {}
    queries = {
        "sm_clock": lambda: nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM),
        "mem_clock": lambda: nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_MEM),
        "gpu_utilization": lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu,
        "mem_utilization": lambda: nv.nvmlDeviceGetUtilizationRates(handle).memory,
        "power": lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # mW -> W
    }
    for name, query in queries.items():
        try:
            values[name] = float(query())
        except nv.NVMLError:
            continue  # not supported on this board: reported missing at stop()
    return values


class NvmlProbe:
    def __init__(self, nv, device_index: int = 0):
        self.nv = nv
        self.handle = nv.nvmlDeviceGetHandleByIndex(device_index)
        self.samples: list[dict[str, float]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="adaptopt-nvml", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            self.samples.append(sample(self.nv, self.handle))
            time.sleep(SAMPLE_PERIOD_S)

    def stop(self, runs: int) -> dict[str, Reading]:
        self.done.set()
        self.thread.join()
        if not self.samples:
            self.samples.append(sample(self.nv, self.handle))
        out = {}
        for name, unit in COUNTERS.items():
            values = [s[name] for s in self.samples if name in s]
            out[name] = (Reading(sum(values) / len(values), unit, NAME, True) if values
                         else missing(unit, NAME, f"NVML does not report {name} on this GPU"))
        out["samples"] = Reading(float(len(self.samples)), "count", NAME, True)
        return out


class NvmlBackend(Backend):
    name = NAME

    def __init__(self, device_index: int = 0):
        self.device_index = device_index

    def availability(self) -> Availability:
        nv, reason = _init()
        if nv is None:
            return Availability(False, reason)
        name = nv.nvmlDeviceGetName(nv.nvmlDeviceGetHandleByIndex(self.device_index))
        name = name.decode() if isinstance(name, bytes) else name
        return Availability(True, f"NVML on {name}")

    def start(self) -> NvmlProbe:
        nv, reason = _init()
        if nv is None:
            raise RuntimeError(f"nvml backend started while unavailable: {reason}")
        return NvmlProbe(nv, self.device_index)
