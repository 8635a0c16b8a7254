"""The timing harness: every variant of a model in one process, interleaved.

Method, for a noisy shared machine:
1. each variant gets its own session, made with :func:`adaptopt.runtime.make_session`
   (ORT_ENABLE_ALL, the config's threads, one process-wide thread pool); session
   creation is timed (median of ``session_repeats``);
2. one run per variant gives its outputs, compared with the first variant's (the
   reference) on the same seeded inputs through :func:`adaptopt.validate.compare`;
3. warm-up runs, which also estimate each variant's latency;
4. ``rounds`` rounds; each round runs every variant ``reps`` times, one run per
   variant at a time (a burst of load from elsewhere hits all variants alike), in an
   order rotated round by round; every run is one sample;
5. per variant: median, p10, p90 of all samples. Ratios are left to the caller.

A variant listed twice (an A/A pair) shows the noise band of the method itself.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from adaptopt.config import TargetConfig
from adaptopt.runtime import make_session, ort_error_line, ort_errors, run
from adaptopt.validate import compare

SAMPLE_TARGET_S = 0.02  # aim for each round's visit to a variant to last about this long
MAX_REPS = 20


@dataclass(frozen=True)
class TimingPlan:
    rounds: int = 20
    warmup: int = 3
    session_repeats: int = 3
    max_seconds: float = 120.0  # timing budget per model; rounds shrink to fit (never below 3)
    exact_tolerance: float = 1e-4


@dataclass
class _Live:
    label: str
    session: object
    samples: list


def model_facts(path: Path) -> dict:
    """Node count and on-disk size (side files of external data included)."""
    model = onnx.load(str(path), load_external_data=False)
    size = path.stat().st_size
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    size += sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())
    return {"nodes": len(model.graph.node), "file_bytes": size}


def time_variants(variants: Sequence[tuple[str, Path]], feeds: Mapping[str, np.ndarray],
                  target: TargetConfig | None = None, plan: TimingPlan = TimingPlan()) -> dict:
    """Time ``variants`` (label, model path) against each other; the first is the reference.

    Returns ``{"rounds", "reps", "variants": {label: row}}`` where a row has
    ``ok`` and either ``error`` or the measurements.
    """
    target = target or TargetConfig()
    rows: dict[str, dict] = {}
    live: list[_Live] = []
    reference = None
    if variants:  # one untimed session first: one-time process costs (thread pool, kernels) stay out of rows
        _open(variants[0][1], feeds, target, 1)
    for label, path in variants:
        row, session, outputs = _open(path, feeds, target, plan.session_repeats)
        rows[label] = row
        if session is None:
            continue
        if reference is None:
            reference = outputs
        check = compare(reference, outputs, exact_tolerance=plan.exact_tolerance)
        row.update(exact=check.ok, max_abs_diff=_finite(check.max_abs_diff), min_cosine=check.min_cosine,
                   accuracy_note=check.reason)
        live.append(_Live(label, session, []))
    reps, rounds = _calibrate(live, feeds, plan)
    for r in range(rounds):
        shift = r % max(len(live), 1)
        order = live[shift:] + live[:shift]
        for _ in range(reps):  # one run per variant per pass: a burst of load hits them all alike
            for item in order:
                start = time.perf_counter_ns()
                item.session.run(None, feeds)
                item.samples.append((time.perf_counter_ns() - start) / 1e6)
    for item in live:
        rows[item.label].update(_stats(item.samples), reps=reps)
    return {"rounds": rounds, "reps": reps, "variants": rows}


def _open(path: Path, feeds: Mapping[str, np.ndarray], target: TargetConfig, repeats: int):
    """Load, time session creation, run once. Returns (row, session or None, outputs)."""
    row: dict = {"ok": False, **model_facts(path)}
    model = onnx.load(str(path))
    times, session = [], None
    try:
        for _ in range(max(repeats, 1)):
            start = time.perf_counter()
            session = make_session(model, target, level="all")
            times.append(time.perf_counter() - start)
        outputs = run(session, feeds)
    except ort_errors() as exc:
        row["error"] = f"onnxruntime: {ort_error_line(exc)}"
        return row, None, None
    row.update(ok=True, session_ms=float(np.median(times)) * 1e3)
    return row, session, outputs


def _calibrate(live: list[_Live], feeds, plan: TimingPlan) -> tuple[int, int]:
    """Warm up; pick the runs per variant per round and a round count that fits the budget."""
    estimate = []
    for item in live:
        times = []
        for _ in range(max(plan.warmup, 1)):
            start = time.perf_counter()
            item.session.run(None, feeds)
            times.append(time.perf_counter() - start)
        estimate.append(float(np.median(times)))
    typical = float(np.median(estimate)) if estimate else 0.0
    reps = max(1, min(MAX_REPS, math.ceil(SAMPLE_TARGET_S / max(typical, 1e-6))))
    per_round = reps * sum(estimate)
    rounds = plan.rounds
    if per_round > 0 and per_round * rounds > plan.max_seconds:
        rounds = max(min(3, plan.rounds), int(plan.max_seconds / per_round))
    return reps, rounds


def _stats(samples: list[float]) -> dict:
    data = np.asarray(samples)
    return {"median_ms": float(np.median(data)), "p10_ms": float(np.percentile(data, 10)),
            "p90_ms": float(np.percentile(data, 90)), "samples": int(data.size)}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def machine() -> dict:
    """CPU model, cores, library versions: what a reader needs to compare runs."""
    import platform
    from importlib import metadata

    import onnxruntime

    cpu = "unknown"
    if os.path.isfile("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("onnx", "onnxruntime", "onnxsim", "onnxslim", "onnxoptimizer", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
            "ort": onnxruntime.__version__, "versions": versions}
