"""The versioned JSON shape of a profile report (pipelines depend on it).

Bump :data:`SCHEMA_VERSION` on any change that removes or renames a key or changes a
meaning; adding keys keeps the version. :func:`check_profile` is the contract the
tests hold the output to.
"""

from __future__ import annotations

import math
from typing import Any

from adaptopt.profile.pipeline import ProfileReport, SubgraphProfile

SCHEMA_VERSION = 1
KIND = "adaptopt-profile"
TOP_LEVEL = ("schema_version", "kind", "model", "target", "machine", "whole_model", "session_overhead_ms",
             "granularity", "sum_leaf_latency_ms", "subgraphs", "backends")
SUBGRAPH_KEYS = ("id", "parent", "nodes", "op_types", "latency_ms", "latency_p90_ms", "flops", "bytes",
                 "intensity", "performance", "bound", "counters")
READING_KEYS = ("value", "unit", "backend", "measured")


def _finite(value: float | None) -> float | None:
    """JSON has no NaN/inf: a non-finite number is reported as missing."""
    return value if value is None or math.isfinite(value) else None


def subgraph_dict(s: SubgraphProfile) -> dict[str, Any]:
    c = s.classification
    return {
        "id": s.id, "parent": s.parent, "children": list(s.children), "depth": s.depth, "leaf": not s.children,
        "timed": s.timed, "constant": s.constant, "nodes": s.nodes, "op_types": s.op_types,
        "latency_ms": s.latency_ms, "latency_p90_ms": s.latency_p90_ms, "spread_ms": s.spread_ms,
        "iterations": s.iterations, "flops": s.cost.flops, "bytes": s.cost.bytes, "intensity": _finite(c.intensity),
        "performance": c.performance, "performance_unclipped": c.performance_unclipped, "bound": c.bound,
        "roofline_bound_ms": c.roofline_bound_ms,
        "compute_ms": c.compute_ms, "memory_ms": c.memory_ms, "overhead_ms": c.overhead_ms,
        "unknown_nodes": s.cost.unknown_nodes, "unknown_ops": sorted(s.cost.unknown_ops),
        "profiler_ms": s.profiler_ms,
        "top_nodes": [{"node": n, "op_type": op, "ms": ms} for n, op, ms in s.top_nodes],
        "boundary_inputs": s.boundary_inputs, "boundary_outputs": s.boundary_outputs,
        "content_hash": s.content_hash, "dims": s.dims,
        "counters": {name: {**r.to_dict(), "value": _finite(r.value)} for name, r in s.counters.items()},
    }


def profile_dict(report: ProfileReport) -> dict[str, Any]:
    """The report as plain JSON-ready data, ``schema_version`` first."""
    whole = subgraph_dict(report.whole_model)
    for key in ("id", "parent", "children", "depth", "leaf", "timed", "constant", "content_hash"):
        whole.pop(key)
    leaf_sum = report.sum_leaf_median_ms
    return {
        "schema_version": SCHEMA_VERSION, "kind": KIND, "model": report.model, "target": report.target,
        "machine": report.machine.to_dict(), "whole_model": whole,
        "session_overhead_ms": report.machine.session_overhead_ms, "granularity": report.granularity,
        "sum_leaf_latency_ms": leaf_sum,
        "split_cost_ratio": _finite(leaf_sum / report.whole_model.latency_ms - 1.0)
        if report.whole_model.latency_ms > 0 else None,
        "unattributed_ms": report.unattributed_ms, "wall_s": report.wall_s,
        "backends": report.backends, "subgraphs": [subgraph_dict(s) for s in report.subgraphs],
    }


def check_profile(data: dict) -> list[str]:
    """Problems with ``data`` against this schema version (empty when it conforms)."""
    problems = [f"missing top-level key '{k}'" for k in TOP_LEVEL if k not in data]
    if data.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version is {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    for key in ("peak_gflops", "bandwidth_gbs", "fingerprint"):
        if key not in data.get("machine", {}):
            problems.append(f"machine lacks '{key}'")
    if "latency_ms" not in data.get("whole_model", {}):
        problems.append("whole_model lacks 'latency_ms'")
    for sub in data.get("subgraphs", []):
        problems += [f"subgraph {sub.get('id')} lacks '{k}'" for k in SUBGRAPH_KEYS if k not in sub]
        if not 0.0 <= sub.get("performance", -1) <= 1.0:
            problems.append(f"subgraph {sub.get('id')} performance {sub.get('performance')} not in [0, 1]")
        for name, reading in sub.get("counters", {}).items():
            problems += [f"counter {name} of {sub.get('id')} lacks '{k}'" for k in READING_KEYS if k not in reading]
    return problems
