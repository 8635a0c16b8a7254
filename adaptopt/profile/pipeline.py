"""A whole-model profile: partition, capture, time every leaf on real activations, classify.

1. Inputs from the config (shapes, dtypes, ranges, or a ``.npz``); a dynamic dim with
   no shape stops here with the input's name.
2. One reference run of the whole model captures every leaf boundary tensor, and every
   tensor whose shape inference left unknown (for the cost model).
3. The whole model is timed (level "all", as users run it), and profiled once with
   ORT's profiler; its per-node times are attributed to the leaves (``profiler_ms``).
4. Each leaf is extracted and timed in its own session on its captured inputs, with
   the HAL counters around the loop, and classified against the machine calibration.
   A boundary input that is a constant of the whole model (a ``Constant`` node's output,
   or computed from constants only) becomes an initializer of the leaf, as it is for
   ORT in the whole model: fed as a run-time input it would block ORT's constant
   folding and weight prepacking and make the leaf look slower than it is. A leaf whose
   every output is such a constant (e.g. a run of ``Constant`` nodes) does no work per
   run in the whole model: it is not timed (``constant: true``, 0 ms, overhead-bound).
   On a model with dynamic input dims (``signature`` given), the leaf boundary is captured
   once more with those dims at another size (the feeds ``optimize`` checks rewrites at),
   and each leaf is timed with the boundary dims that differ between the two sizes left
   symbolic, as ORT sees that part of the written model: pinned to static shapes, ORT
   fuses differently at load (MatMul+Add became Gemm with Reshapes instead of
   MatMul+BiasGelu on a ConvNeXt leaf: 5.0 ms pinned against 4.4 ms open). A leaf that
   does not run at the other size with its dims open, and every leaf when the model
   itself does not run there, is timed pinned (``dims: "pinned"``).
5. Internal tree nodes are *not* timed: their figures aggregate their leaves (sums of
   medians, of p90s, of FLOPs and bytes; ``timed: false``). The sum of the leaf
   medians beside the whole-model median says what the split itself costs.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from adaptopt.config import Config
from adaptopt.errors import InputError
from adaptopt.graph.capture import capture, make_inputs
from adaptopt.graph.index import GraphIndex
from adaptopt.graph.partition import PartitionTree, Subgraph, partition
from adaptopt.graph.subgraph import embed_constants, extract, fill_missing_types
from adaptopt.hal import registry
from adaptopt.hal.base import Reading
from adaptopt.profile import node_times
from adaptopt.profile.calibrate import MachineProfile, machine_profile
from adaptopt.profile.classify import Classification, classify
from adaptopt.profile.cost_model import ModelCost, combine, estimate, tensor_table
from adaptopt.profile.runner import Measurement, Timing, measure
from adaptopt.runtime import make_session, ort_errors, resolve_providers, run

TOP_NODES = 3


@dataclass(frozen=True)
class SubgraphProfile:
    """One tree node: what it contains, how long it took, what bounds it."""

    id: str
    parent: str | None
    children: tuple[str, ...]
    depth: int
    nodes: int
    op_types: dict[str, int]
    timed: bool  # False: figures aggregated from the leaves below, or a constant leaf
    latency_ms: float
    latency_p90_ms: float
    spread_ms: float
    iterations: int
    cost: ModelCost
    classification: Classification
    counters: dict[str, Reading] = field(default_factory=dict)
    profiler_ms: float | None = None  # this node's share of the whole-model ORT profile
    top_nodes: tuple[tuple[str, str, float], ...] = ()  # (node, op type, ms) from the ORT profile
    boundary_inputs: int = 0
    boundary_outputs: int = 0
    content_hash: str = ""
    constant: bool = False  # a leaf computing only constants: no work per run, not timed
    # how a timed leaf (and the whole model) was timed: "open" with the boundary dims that vary
    # with the model's dynamic dims symbolic, "pinned" at the profiled shapes; None: not timed
    dims: str | None = None


@dataclass(frozen=True)
class ProfileReport:
    model: str
    target: dict
    machine: MachineProfile
    whole_model: SubgraphProfile
    granularity: int
    subgraphs: list[SubgraphProfile]
    backends: list[dict]
    unattributed_ms: float | None
    wall_s: float

    @property
    def leaves(self) -> list[SubgraphProfile]:
        return [s for s in self.subgraphs if not s.children]

    @property
    def sum_leaf_median_ms(self) -> float:
        return float(sum(s.latency_ms for s in self.leaves))


def _capture_all(model: onnx.ModelProto, feeds: dict, boundary: list[str], config: Config
                 ) -> tuple[dict[str, np.ndarray], ModelCost]:
    """Boundary tensors from one reference run, and the model's cost with run-time shapes."""
    dims, sizes = tensor_table(model)
    unknown = [o for n in model.graph.node for o in n.output if o and (o not in dims or o not in sizes)]
    values = capture(model, feeds, boundary + unknown, config.target)
    cost = estimate(model, values)
    keep = set(boundary) | set(feeds)
    return {k: v for k, v in values.items() if k in keep}, cost


def _capture_other_sizes(model: onnx.ModelProto, signature: onnx.ModelProto | None, feeds: dict,
                         boundary: list[str], config: Config) -> dict[str, np.ndarray] | None:
    """The boundary tensors with the model's dynamic dims at another size: the feeds
    ``optimize`` checks rewrites at (the first of :func:`adaptopt.adapt.assemble.other_shape_candidates`
    the model runs at) run through ``model`` with ``signature``'s dynamic inputs and outputs.
    None when the model has no dynamic input dim, or runs at no other size tried (every
    leaf is then timed pinned, as ``optimize`` then keeps its leaves pinned too)."""
    from adaptopt.adapt.assemble import other_shape_candidates
    from adaptopt.adapt.prepass import with_signature
    if signature is None:
        return None
    for other_feeds in other_shape_candidates(signature, feeds):
        try:
            return capture(with_signature(model, signature), other_feeds, boundary, config.target)
        except InputError:  # the model itself fails at this size: try the next
            continue
    return None


def leaf_model(index: GraphIndex, leaf: Subgraph, values: dict, constants: frozenset[str]
               ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The leaf as a standalone model, the boundary inputs the model fixes
    (:meth:`GraphIndex.constant_tensors`) folded in as initializers; its feeds."""
    feeds = {n: values[n] for n in leaf.boundary_inputs}
    return embed_constants(extract(index, leaf), feeds, {n: values[n] for n in feeds if n in constants})


def _boundary_pairs(leaf: Subgraph, values: dict, other: dict) -> list[tuple[dict, dict]]:
    """(profiled, other size) values of the leaf's boundary inputs, then of its outputs."""
    def pair(names: tuple[str, ...]) -> tuple[dict, dict]:
        both = [n for n in names if isinstance(values.get(n), np.ndarray) and isinstance(other.get(n), np.ndarray)]
        return {n: values[n] for n in both}, {n: other[n] for n in both}
    return [pair(leaf.boundary_inputs), pair(leaf.boundary_outputs)]


def _varies(pairs: list[tuple[dict, dict]]) -> bool:
    """Whether a boundary tensor has another shape at the other size (a dim to open)."""
    return any(a[n].shape != b[n].shape for a, b in pairs for n in a)


def open_leaf_model(index: GraphIndex, leaf: Subgraph, values: dict, constants: frozenset[str], other: dict,
                    config: Config) -> tuple[onnx.ModelProto, dict[str, np.ndarray]] | None:
    """The leaf as :func:`leaf_model` makes it, but with its boundary dims that vary with the
    model's dynamic dims (``values`` against ``other``) symbolic, as in the written model;
    its feeds. None when nothing varies, or when ONNX Runtime does not run the open leaf at
    the other size (it is then timed pinned).

    Only that it runs is checked, not its values (``SubgraphEnv`` compares them, as it
    validates rewrites): at the profiled size the open leaf computes what the pinned one
    does. Comparing here also cost accuracy: numpy's cosine runs on OpenBLAS, whose threads
    spin for ~0.1 s after the call, and on a 2-core machine the timed loop that followed
    took 4-5 ms stalls in 6-7 of its runs (leaf 0.0.1.1 of convnext: 1.5-1.7 ms median
    instead of 0.9)."""
    from adaptopt.adapt.environment import open_varying_dims
    pairs = _boundary_pairs(leaf, values, other)
    if any(n not in pairs[0][1] for n in leaf.boundary_inputs) or not _varies(pairs):
        return None
    opened = open_varying_dims(extract(index, leaf), pairs)
    fixed = {n: values[n] for n in leaf.boundary_inputs if n in constants}
    at_other, other_feeds = embed_constants(opened, pairs[0][1], fixed)
    try:
        run(make_session(at_other, config.target, level="all"), other_feeds)
    except ort_errors():
        return None
    return embed_constants(opened, pairs[0][0], fixed)


NOT_TIMED = Timing(0.0, 0.0, 0.0, 0, ())
# a leaf fed by a tensor numpy cannot hold (capture.NO_NUMPY_TYPES, e.g. bfloat16) or by a
# sequence or optional value: it cannot be run alone, so it is not timed either (it is not a
# constant leaf)
NOT_RUNNABLE = Timing(0.0, 0.0, 0.0, 0, ())


def timed_leaf_model(index: GraphIndex, leaf: Subgraph, values: dict, constants: frozenset[str],
                     other: dict | None, config: Config) -> tuple[onnx.ModelProto, dict[str, np.ndarray], str]:
    """The leaf model and feeds to time, and how: "open" (:func:`open_leaf_model`) when the
    other-size boundary ``other`` is known and the leaf runs there, else "pinned"
    (:func:`leaf_model`, what a static model's leaves always get)."""
    opened = open_leaf_model(index, leaf, values, constants, other, config) if other is not None else None
    if opened is not None:
        return *opened, "open"
    return *leaf_model(index, leaf, values, constants), "pinned"


def _profile_leaf(index: GraphIndex, leaf: Subgraph, values: dict, constants: frozenset[str], cost: ModelCost,
                  config: Config, machine: MachineProfile, other: dict | None = None
                  ) -> tuple[Measurement, ModelCost, Classification, str | None]:
    """The leaf's measurement, cost, class, and how its dims were timed (None: not timed)."""
    sub_cost = cost.subset(leaf.node_names)
    if all(n in constants for n in leaf.boundary_outputs):
        return Measurement(NOT_TIMED, {}), sub_cost, classify(sub_cost, 0.0, machine), None
    if any(not isinstance(values.get(n), np.ndarray) for n in leaf.boundary_inputs):
        return Measurement(NOT_RUNNABLE, {}), sub_cost, classify(sub_cost, 0.0, machine), None
    model, feeds, dims = timed_leaf_model(index, leaf, values, constants, other, config)
    m = measure(model, feeds, config, counters=True, per_node=False, cost=sub_cost)
    return m, sub_cost, classify(sub_cost, m.timing.median_ms, machine), dims


def _top_nodes(names: tuple[str, ...], node_ms: dict[str, float] | None, ops: dict[str, str]):
    if not node_ms:
        return (), None
    times = [(n, ops.get(n, "?"), node_ms[n]) for n in names if n in node_ms]
    times.sort(key=lambda t: -t[2])
    return tuple(times[:TOP_NODES]), float(sum(t[2] for t in times))


def _leaf_profile(sub: Subgraph, index: GraphIndex, m: Measurement, cost: ModelCost, cls: Classification,
                  node_ms: dict[str, float] | None, dims: str | None) -> SubgraphProfile:
    nodes = [index.nodes[i] for i in range(sub.start, sub.stop)]
    ops = {n.name: n.op_type for n in nodes}
    top, profiler_ms = _top_nodes(sub.node_names, node_ms, ops)
    t = m.timing
    return SubgraphProfile(
        id=sub.id, parent=sub.parent, children=sub.children, depth=sub.depth, nodes=sub.node_count,
        op_types=dict(Counter(n.op_type for n in nodes).most_common()), timed=t.iterations > 0,
        constant=t is NOT_TIMED, latency_ms=t.median_ms,
        latency_p90_ms=t.p90_ms, spread_ms=t.spread_ms, iterations=t.iterations, cost=cost, classification=cls,
        counters=m.counters, profiler_ms=profiler_ms, top_nodes=top, boundary_inputs=len(sub.boundary_inputs),
        boundary_outputs=len(sub.boundary_outputs), content_hash=sub.content_hash, dims=dims)


def _aggregate(sub: Subgraph, parts: list[SubgraphProfile], machine: MachineProfile) -> SubgraphProfile:
    """An internal tree node from its children (not timed itself)."""
    cost = combine([n for p in parts for n in p.cost.per_node])
    latency = sum(p.latency_ms for p in parts)
    ops: Counter = Counter()
    for p in parts:
        ops.update(p.op_types)
    profiled = [p.profiler_ms for p in parts if p.profiler_ms is not None]
    top = tuple(sorted((t for p in parts for t in p.top_nodes), key=lambda t: -t[2])[:TOP_NODES])
    return SubgraphProfile(
        id=sub.id, parent=sub.parent, children=sub.children, depth=sub.depth, nodes=sub.node_count,
        op_types=dict(ops.most_common()), timed=False, latency_ms=latency,
        latency_p90_ms=sum(p.latency_p90_ms for p in parts), spread_ms=sum(p.spread_ms for p in parts),
        iterations=min((p.iterations for p in parts if p.timed), default=0), cost=cost,
        classification=classify(cost, latency, machine, kernels=None), profiler_ms=sum(profiled) if profiled else None,
        top_nodes=top, boundary_inputs=len(sub.boundary_inputs), boundary_outputs=len(sub.boundary_outputs),
        content_hash=sub.content_hash)


def _tree_profiles(tree: PartitionTree, leaves: dict[str, SubgraphProfile], machine: MachineProfile
                   ) -> list[SubgraphProfile]:
    """Every tree node, leaves as measured and internal nodes aggregated bottom-up."""
    done = dict(leaves)
    for sub in sorted(tree.nodes.values(), key=lambda s: -s.depth):
        if sub.id not in done:
            done[sub.id] = _aggregate(sub, [done[c] for c in sub.children], machine)
    return sorted(done.values(), key=lambda s: (s.depth, tree.nodes[s.id].start))


def profile_model(model: onnx.ModelProto, config: Config, granularity: int | None = None,
                  name: str = "<model>", signature: onnx.ModelProto | None = None) -> ProfileReport:
    """Profile ``model`` (loaded with :func:`adaptopt.graph.io.load_model`) subgraph by subgraph.

    ``signature`` is the model's own signature, taken before the config pinned its dims
    (:func:`adaptopt.graph.io.load_model_and_signature`): with dynamic input dims there,
    leaves are timed with the dims that follow them open. Without it every leaf is timed
    pinned to the profiled shapes."""
    began = time.perf_counter()
    depth = config.granularity.initial_granularity if granularity is None else granularity
    feeds = make_inputs(model, config)  # a dynamic dim without a shape fails here, naming the input
    index = GraphIndex.build(model)  # names unnamed nodes in place, before any session sees the model
    tree = partition(index, depth, config.granularity.min_nodes)
    leaves = tree.leaves()
    boundary = list(dict.fromkeys(n for s in leaves for n in s.boundary_inputs + s.boundary_outputs))
    values, cost = _capture_all(model, feeds, boundary, config)
    fill_missing_types(index, boundary, feeds)
    other = _capture_other_sizes(model, signature, feeds, boundary, config)
    machine = machine_profile(config.target, config.policy.cache_dir)
    whole_m = measure(model, feeds, config, counters=True, per_node=config.profiling.per_node, cost=cost)
    whole_cls = classify(cost, whole_m.timing.median_ms, machine)
    root = tree.nodes[tree.root]
    whole = _leaf_profile(root, index, whole_m, cost, whole_cls, whole_m.node_times_ms, "pinned")
    measured = {}
    constants = index.constant_tensors()
    for leaf in leaves:
        m, sub_cost, cls, dims = (whole_m, cost, whole_cls, "pinned") if leaf.id == tree.root else \
            _profile_leaf(index, leaf, values, constants, cost, config, machine, other)
        measured[leaf.id] = _leaf_profile(leaf, index, m, sub_cost, cls, whole_m.node_times_ms, dims)
    node_ms = whole_m.node_times_ms
    unattributed = None if node_ms is None else node_ms.get(node_times.UNATTRIBUTED, 0.0)
    target = {"execution_providers": list(config.target.execution_providers),
              "resolved_providers": resolve_providers(config.target), "device": config.target.device,
              "threads": config.target.threads, "pool_threads": machine.fingerprint.get("threads")}
    backends = [{**b.describe(), "selected": b.name in config.profiling.counters}
                for b in registry.BACKENDS]
    return ProfileReport(model=name, target=target, machine=machine, whole_model=whole, granularity=depth,
                         subgraphs=_tree_profiles(tree, measured, machine), backends=backends,
                         unattributed_ms=unattributed, wall_s=time.perf_counter() - began)
