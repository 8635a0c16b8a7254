"""Achieved GFLOP/s and GB/s: the cost model's FLOPs and bytes over the measured time.

Derived numbers (``measured=False``). When some nodes have no cost model the figures
cover the known nodes only and say so in ``reason`` (a lower bound, not a guess).
"""

from __future__ import annotations

from adaptopt.hal.base import Availability, Backend, Reading, missing

NAME = "analytic"


def readings(flops: float, bytes_moved: float, median_ms: float, unknown_nodes: int = 0) -> dict[str, Reading]:
    """``achieved_gflops`` and ``achieved_gbs`` for a run of ``median_ms``."""
    if median_ms <= 0:
        why = "no positive measured time"
        return {"achieved_gflops": missing("GFLOP/s", NAME, why, False),
                "achieved_gbs": missing("GB/s", NAME, why, False)}
    note = f"lower bound: {unknown_nodes} node(s) without a cost model" if unknown_nodes else ""
    seconds = median_ms / 1e3
    return {"achieved_gflops": Reading(flops / seconds / 1e9, "GFLOP/s", NAME, False, note),
            "achieved_gbs": Reading(bytes_moved / seconds / 1e9, "GB/s", NAME, False, note)}


class AnalyticBackend(Backend):
    name = NAME
    live = False

    def availability(self) -> Availability:
        return Availability(True, "derived from the cost model and the measured median")
