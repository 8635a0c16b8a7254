"""Timing one model (a subgraph or the whole network) in its own ONNX Runtime session.

The session is built outside the timed region; inputs are bound once as ORT values on
the execution provider's device (I/O binding), so the loop times ORT's run and not
numpy conversions. Warm-up runs first, then timed runs until both
``profiling.iterations`` and ``profiling.min_time_s`` are met, or ``max_time_s`` is
reached. The median is the figure of merit; p90 and the inter-quartile range say how
noisy it was. HAL probes count around the timed loop only.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx

from adaptopt.config import Config, ProfilingConfig, TargetConfig
from adaptopt.errors import InputError, ModelError
from adaptopt.hal import analytic, ncu, registry
from adaptopt.hal.base import Reading
from adaptopt.profile import node_times
from adaptopt.profile.cost_model import ModelCost, estimate
from adaptopt.runtime import make_session, ort_error_line, ort_errors, resolve_providers

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
PER_NODE_RUNS = 10


@dataclass(frozen=True)
class Timing:
    """Robust statistics of the timed runs, in milliseconds."""

    median_ms: float
    p90_ms: float
    spread_ms: float  # inter-quartile range (p75 - p25)
    iterations: int
    samples_ms: tuple[float, ...]

    @classmethod
    def of(cls, samples_ms: list[float]) -> "Timing":
        values = np.asarray(samples_ms, dtype=np.float64)
        p25, p50, p75, p90 = np.percentile(values, [25, 50, 75, 90])
        return cls(float(p50), float(p90), float(p75 - p25), len(samples_ms), tuple(float(v) for v in values))

    def to_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "spread_ms": self.spread_ms,
                "iterations": self.iterations}


@dataclass(frozen=True)
class Measurement:
    """A timing, the HAL readings taken around it, and (optionally) per-node times (ms per run)."""

    timing: Timing
    counters: dict[str, Reading]
    node_times_ms: dict[str, float] | None = None


def device_of(target: TargetConfig) -> str:
    """ORT device name for I/O binding: where the first usable provider keeps tensors."""
    return "cuda" if resolve_providers(target)[0] in GPU_PROVIDERS else "cpu"


def _session(model: onnx.ModelProto, target: TargetConfig, level: str, profile_prefix: str | None = None):
    try:
        return make_session(model, target, level=level, profile_prefix=profile_prefix)
    except ort_errors() as exc:
        raise ModelError(f"onnxruntime cannot build a session for {model.graph.name or 'the model'}: "
                         f"{ort_error_line(exc)}") from None


def bind(session, feeds: Mapping[str, np.ndarray], device: str, outputs: Mapping[str, np.ndarray] | None = None):
    """An I/O binding with every input placed on ``device`` once; outputs allocated there by ORT
    on every run (as a user's run does), or written into the preallocated ``outputs``."""
    import onnxruntime as ort
    binding = session.io_binding()
    for meta in session.get_inputs():
        if meta.name not in feeds:
            raise ModelError(f"no value for input '{meta.name}' of {session.get_modelmeta().graph_name}")
        value = np.asarray(feeds[meta.name])
        if not value.flags.c_contiguous:  # (np.ascontiguousarray would turn a scalar into shape [1])
            value = value.copy(order="C")
        binding.bind_ortvalue_input(meta.name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
    for meta in session.get_outputs():
        if outputs and meta.name in outputs:
            binding.bind_ortvalue_output(meta.name, ort.OrtValue.ortvalue_from_numpy(outputs[meta.name], device, 0))
        else:
            binding.bind_output(meta.name, device)
    return binding


def _run(session, binding) -> None:
    try:
        session.run_with_iobinding(binding)
    except ort_errors() as exc:
        raise InputError(f"onnxruntime failed to run {session.get_modelmeta().graph_name}: "
                         f"{ort_error_line(exc)}") from None


def timed_loop(session, binding, profiling: ProfilingConfig, probes: list | None = None
               ) -> tuple[Timing, dict[str, Reading]]:
    """Warm up, then time runs; ``probes`` (HAL backends) count around the timed runs only."""
    for _ in range(profiling.warmup):
        _run(session, binding)
    started = [backend.start() for backend in probes or []]
    samples: list[float] = []
    readings: dict[str, Reading] = {}
    begin = time.perf_counter()
    try:
        while True:
            t0 = time.perf_counter_ns()
            _run(session, binding)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
            elapsed = time.perf_counter() - begin
            enough = len(samples) >= profiling.iterations and elapsed >= profiling.min_time_s
            if enough or elapsed >= profiling.max_time_s:
                break
    finally:  # probes hold file descriptors and threads: always stopped, even when a run fails
        for probe in started:
            readings.update(probe.stop(max(len(samples), 1)))
    return Timing.of(samples), readings


def time_model(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], target: TargetConfig,
               profiling: ProfilingConfig, level: str = "all", outputs: Mapping[str, np.ndarray] | None = None
               ) -> Timing:
    """Median/p90/IQR of ``model`` on ``feeds``: session built first (untimed), warm-up, timed loop.

    ``outputs`` optionally preallocates output buffers (calibration uses it to time the
    kernel without the allocator)."""
    session = _session(model, target, level)
    return timed_loop(session, bind(session, feeds, device_of(target), outputs), profiling)[0]


def measure(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], config: Config, counters: bool = True,
            per_node: bool = False, cost: ModelCost | None = None, level: str = "all") -> Measurement:
    """Time ``model`` with the HAL counters of ``config.profiling.counters`` around the loop.

    ``analytic`` readings use ``cost`` (estimated from ``model`` and the feed shapes when
    not given). ``per_node`` adds per-node ms per run from ORT's profiler, taken in a
    separate profiled session so profiling never slows the timed loop.
    """
    target, profiling = config.target, config.profiling
    session = _session(model, target, level)
    device = device_of(target)
    names = profiling.counters if counters else ()
    probes = registry.live_available(names, target.device)
    timing, readings = timed_loop(session, bind(session, feeds, device), profiling, probes)
    del session
    if "analytic" in names:
        cost = cost or estimate(model, dict(feeds))
        readings.update(analytic.readings(cost.flops, cost.bytes, timing.median_ms, cost.unknown_nodes))
    if "ncu" in names and registry.is_gpu_device(target.device) and registry.get("ncu").availability().available:
        readings.update({f"ncu_{k}" if k == "kernels" else k: v
                         for k, v in ncu.profile(model, feeds, resolve_providers(target)).items()})
    times = profile_nodes(model, feeds, target, profiling.warmup, level) if per_node else None
    return Measurement(timing, readings, times)


def profile_nodes(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], target: TargetConfig,
                  warmup: int = 1, level: str = "all", runs: int = PER_NODE_RUNS) -> dict[str, float]:
    """Milliseconds per run of each of ``model``'s nodes, from ORT's profiler (file parsed, then deleted)."""
    with tempfile.TemporaryDirectory(prefix="adaptopt-prof-") as tmp:
        session = _session(model, target, level, profile_prefix=os.path.join(tmp, "ort"))
        binding = bind(session, feeds, device_of(target))
        for _ in range(max(warmup, 1) + runs):
            _run(session, binding)
        path = session.end_profiling()
        kernels, kept = node_times.read_trace(path, skip_runs=max(warmup, 1))
    return node_times.attribute(kernels, kept, model)


def runtime_tensors(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                    target: TargetConfig) -> dict[str, np.ndarray]:
    """The feeds plus every node output whose shape or type shape inference left unknown,
    from one unoptimized run (for :func:`estimate`, e.g. after contrib-op fusions)."""
    from adaptopt.graph.capture import capture
    from adaptopt.profile.cost_model import tensor_table
    dims, sizes = tensor_table(model)
    unknown = [o for n in model.graph.node for o in n.output if o and (o not in dims or o not in sizes)]
    if not unknown:
        return dict(feeds)
    values = capture(model, feeds, unknown, target)
    return {n: values[n] for n in list(feeds) + unknown if n in values}
