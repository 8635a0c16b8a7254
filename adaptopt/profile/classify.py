"""Roofline classification of a measured subgraph.

Three lower bounds on a subgraph's time, all from the machine calibration:
``compute_ms = flops / peak``; ``memory_ms`` = each node's bytes over the bandwidth of
where they live (the cache bandwidth for a node moving at most ``cache_bytes``, else
the memory bandwidth: a two-level roofline); and the fixed ``overhead_ms = session
overhead + kernels * per-kernel overhead``. ``roofline_bound_ms`` is the larger of the
first two. The class is the largest of the three: *overhead* when the fixed cost of
running a session and dispatching its kernels exceeds the roofline time of the work
itself, else *compute* when the arithmetic intensity (flops/bytes) is at or above the
effective machine balance (peak over the bandwidth the subgraph's bytes get), else
*memory*. A subgraph whose every node has
no cost model is *unknown*. ``performance`` is the achieved fraction of the roofline
bound, ``roofline_bound_ms / median_ms`` clipped to [0, 1]; ``performance_unclipped`` above
1 means the subgraph ran faster than the calibrated roofline allows (a calibration
taken on a busy machine, or data that stayed in a cache level the model does not know).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from adaptopt.profile.calibrate import MachineProfile
from adaptopt.profile.cost_model import ModelCost

BOUNDS = ("compute", "memory", "overhead", "unknown")
_NOT_KERNELS = {"Constant"}  # folded into initializers before the session runs


@dataclass(frozen=True)
class Classification:
    intensity: float | None  # FLOP/byte over the known nodes
    performance: float  # achieved fraction of the roofline bound, in [0, 1]
    bound: str  # one of BOUNDS
    roofline_bound_ms: float
    compute_ms: float
    memory_ms: float
    overhead_ms: float
    balance: float  # peak over the effective bandwidth of this subgraph's bytes, FLOP/byte
    performance_unclipped: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def kernel_count(cost: ModelCost) -> int:
    return sum(1 for n in cost.per_node if n.op_type not in _NOT_KERNELS)


def memory_time_ms(cost: ModelCost, machine: MachineProfile) -> float:
    """Bytes over bandwidth, node by node: cache bandwidth for nodes that fit in ``cache_bytes``."""
    seconds = 0.0
    for node in cost.per_node:
        if node.known and node.bytes > 0:
            # a Loop's or Scan's body runs ``runs`` times over its own working set
            in_cache = node.bytes / max(node.runs, 1) <= machine.cache_bytes
            seconds += node.bytes / ((machine.cache_bandwidth_gbs if in_cache else machine.bandwidth_gbs) * 1e9)
    return seconds * 1e3


def classify(cost: ModelCost, median_ms: float, machine: MachineProfile, kernels: int | None = None) -> Classification:
    """Intensity, performance and bound class of work ``cost`` measured at ``median_ms``.

    ``kernels`` (default: the nodes of ``cost`` other than Constant) sets the fixed
    per-kernel overhead part of ``overhead_ms``.
    """
    compute_ms = cost.flops / (machine.peak_gflops * 1e9) * 1e3
    memory_ms = memory_time_ms(cost, machine)
    roofline_ms = max(compute_ms, memory_ms)
    count = kernel_count(cost) if kernels is None else kernels
    overhead_ms = machine.session_overhead_ms + count * machine.node_overhead_ms
    raw = roofline_ms / median_ms if median_ms > 0 else 0.0
    performance = min(max(raw, 0.0), 1.0)
    intensity = cost.intensity
    if cost.flops == 0 and cost.bytes == 0 and cost.unknown_nodes:
        bound = "unknown"
    elif overhead_ms >= roofline_ms:  # a partial cost (a body not fully costed) is a lower bound only
        bound = "unknown" if cost.partial_nodes else "overhead"
    elif compute_ms >= memory_ms:
        bound = "compute"
    else:
        bound = "memory"
    effective_gbs = cost.bytes / memory_ms / 1e6 if memory_ms > 0 else machine.bandwidth_gbs
    return Classification(intensity, performance, bound, roofline_ms, compute_ms, memory_ms, overhead_ms,
                          machine.peak_gflops / effective_gbs, raw)
