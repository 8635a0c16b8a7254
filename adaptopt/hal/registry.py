"""The HAL backends, as an explicit list (no import side effects), and which apply where."""

from __future__ import annotations

from adaptopt.hal.analytic import AnalyticBackend
from adaptopt.hal.base import Backend
from adaptopt.hal.ncu import NcuBackend
from adaptopt.hal.nvml import NvmlBackend
from adaptopt.hal.perf import PerfBackend
from adaptopt.hal.rusage import RusageBackend

BACKENDS: tuple[Backend, ...] = (PerfBackend(), RusageBackend(), AnalyticBackend(), NvmlBackend(), NcuBackend())
GPU_ONLY = {"nvml", "ncu"}

if len({b.name for b in BACKENDS}) != len(BACKENDS):  # pragma: no cover - a programming error
    raise RuntimeError("duplicate HAL backend names")


def get(name: str) -> Backend:
    for backend in BACKENDS:
        if backend.name == name:
            return backend
    raise KeyError(f"no HAL backend named {name!r} (known: {', '.join(b.name for b in BACKENDS)})")


def is_gpu_device(device: str) -> bool:
    return device in ("cuda", "gpu")


def selected(names: tuple[str, ...] | list[str], device: str) -> list[Backend]:
    """Backends named in the config that apply to ``device`` (GPU backends only on a GPU target)."""
    return [get(n) for n in dict.fromkeys(names) if n not in GPU_ONLY or is_gpu_device(device)]


def live_available(names: tuple[str, ...] | list[str], device: str) -> list[Backend]:
    """The selected live backends that can count on this machine."""
    return [b for b in selected(names, device) if b.live and b.availability().available]


def describe_all() -> list[dict]:
    """Every backend with its availability and reason (for ``adaptopt hal``)."""
    return [b.describe() for b in BACKENDS]
