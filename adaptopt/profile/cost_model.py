"""Analytic cost model: FLOPs and bytes moved for every node of a model.

Shapes come, in order of preference, from the tensors actually seen at run time (the
``shapes`` argument: captured arrays or their shapes), from ONNX shape inference
(the model's value infos), from initializers and from ``Constant`` nodes. A node whose
op has no formula, or whose shapes are not known, is reported *unknown* with the
reason; it is left out of the totals, never counted as zero. The formulas and their
conventions are in :mod:`adaptopt.profile.cost_ops` and :mod:`adaptopt.profile.cost_contrib`.

Nodes that hold a graph are costed by their bodies (:func:`estimate` says how): ``If``,
``Loop``, ``Scan`` and calls of the model's local functions. A body's shapes come from
ONNX shape inference run on it with the shapes of the tensors it gets from outside. Work
inside a body that cannot be costed keeps the node *partial* (its figures are then a
lower bound) and its op types in ``unknown_ops``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from adaptopt.graph.checks import MAX_GRAPH_DEPTH
from adaptopt.graph.index import graph_outer_inputs
from adaptopt.profile.cost_contrib import CONTRIB, gelu
from adaptopt.profile.cost_ops import STANDARD, NodeView, Rule, UnknownShape

CONTRIB_DOMAIN = "com.microsoft"
_STANDARD = {**STANDARD, "Gelu": gelu}
_PACKED_HALF_BYTE = {TensorProto.INT4, TensorProto.UINT4} | (
    {TensorProto.FLOAT4E2M1} if hasattr(TensorProto, "FLOAT4E2M1") else set())
_SMALL = 64  # integer / bool tensors up to this many elements keep their values (trip counts, conditions, shapes)
_MAX_BODIES = 2000  # bodies costed per estimate at most (each runs shape inference; calls nest exponentially)


@dataclass(frozen=True)
class NodeCost:
    """One node's cost; ``known`` is False when the op or its shapes are not covered (see ``reason``).

    A node with bodies (If, Loop, Scan, a local function call) is ``partial`` when part of
    its work could not be costed (a body node, or a Loop's trip count): ``flops`` and
    ``bytes`` then cover what could be, a lower bound, and ``reason`` says what is missing.
    ``unknown_inner`` holds the op types inside its bodies that could not be costed, and
    ``runs`` how many runs of its body the figures stand for (a Loop's trips, a Scan's
    steps; 1 for other nodes: ``bytes / runs`` is what one run moves). A known node's
    ``reason`` may also carry a note on how it was costed (an If's branch).
    """

    name: str
    op_type: str
    flops: float
    bytes: float
    known: bool
    reason: str = ""
    partial: bool = False
    unknown_inner: frozenset[str] = frozenset()
    runs: int = 1


@dataclass(frozen=True)
class ModelCost:
    """Totals over the *known* nodes, every node's cost, and the op types that could not be
    costed (nodes of the graph, and nodes inside the bodies of its If/Loop/Scan/function calls)."""

    flops: float
    bytes: float
    per_node: list[NodeCost] = field(default_factory=list)
    unknown_ops: set[str] = field(default_factory=set)

    @property
    def unknown_nodes(self) -> int:
        return sum(1 for n in self.per_node if not n.known)

    @property
    def partial_nodes(self) -> int:
        """Known nodes whose figures cover only part of their work (see :class:`NodeCost`)."""
        return sum(1 for n in self.per_node if n.known and n.partial)

    @property
    def is_partial(self) -> bool:
        """Whether some work is not in the totals (unknown or partial nodes): they are then a lower bound."""
        return any(not n.known or n.partial for n in self.per_node)

    @property
    def intensity(self) -> float | None:
        """FLOPs per byte over the known nodes (None when no byte is moved)."""
        return self.flops / self.bytes if self.bytes > 0 else None

    def subset(self, names: Iterable[str]) -> "ModelCost":
        """The cost of the named nodes only (e.g. one subgraph of a costed model)."""
        wanted = set(names)
        return combine([n for n in self.per_node if n.name in wanted])


def combine(nodes: list[NodeCost]) -> ModelCost:
    known = [n for n in nodes if n.known]
    unknown = {n.op_type for n in nodes if not n.known}.union(*(n.unknown_inner for n in nodes))
    return ModelCost(flops=float(sum(n.flops for n in known)), bytes=float(sum(n.bytes for n in known)),
                     per_node=list(nodes), unknown_ops=unknown)


def rule_for(domain: str, op_type: str) -> Rule | None:
    """The formula for an op, or None when the cost model does not know it (see also
    :func:`estimate` for If, Loop, Scan and local functions, costed by their bodies)."""
    if domain in ("", "ai.onnx"):
        return _STANDARD.get(op_type)
    if domain == CONTRIB_DOMAIN:
        # contrib ops first; ORT re-registers some standard ops (QuantizeLinear, ...) in its domain
        return CONTRIB.get(op_type) or _STANDARD.get(op_type)
    return None


def _itemsize(elem_type: int) -> float | None:
    if elem_type in _PACKED_HALF_BYTE:
        return 0.5
    if elem_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        return None
    try:
        return float(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


def _static_dims(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    dims = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value") or d.dim_value < 0:
            return None
        dims.append(d.dim_value)
    return tuple(dims)


_VALUE_TYPES = {TensorProto.BOOL, TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
                TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64}


def _small_value(tensor: onnx.TensorProto) -> np.ndarray | None:
    """The values of a small integer or bool tensor (None for others, or external data)."""
    if (np.prod(tensor.dims, dtype=np.int64) > _SMALL or tensor.data_type not in _VALUE_TYPES
            or tensor.data_location == TensorProto.EXTERNAL):
        return None
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError):  # a malformed tensor (data that does not fit its dims): no value
        return None


def _constant_tensor(node: onnx.NodeProto) -> tuple[tuple[int, ...], int, np.ndarray | None] | None:
    """(dims, element type, small integer value or None) of a Constant node's output."""
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return tuple(attr.t.dims), attr.t.data_type, _small_value(attr.t)
        if attr.name == "value_float":
            return (), TensorProto.FLOAT, None
        if attr.name == "value_int":
            return (), TensorProto.INT64, np.array(attr.i, np.int64)
        if attr.name == "value_floats":
            return (len(attr.floats),), TensorProto.FLOAT, None
        if attr.name == "value_ints":
            return (len(attr.ints),), TensorProto.INT64, (np.array(attr.ints, np.int64)
                                                          if len(attr.ints) <= _SMALL else None)
    return None


@dataclass
class _Scope:
    """What is known of the tensors of one graph: shapes, element sizes and types, small values."""

    dims: dict[str, tuple[int, ...]] = field(default_factory=dict)
    sizes: dict[str, float] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)  # the tensors of ``values`` that hold a value seen at run time

    def where(self, name: str) -> str:
        return "the value seen at run time" if name in self.seen else "a constant"

    def set_type(self, name: str, elem_type: int) -> None:
        size = _itemsize(elem_type)
        if size is not None:
            self.sizes[name] = size
        if elem_type != TensorProto.UNDEFINED:
            self.types[name] = elem_type

    def adopt(self, outer: "_Scope", names: Iterable[str]) -> None:
        """Take what ``outer`` knows of ``names`` (tensors a body reads from its enclosing graph)."""
        for name in names:
            for mine, theirs in ((self.dims, outer.dims), (self.sizes, outer.sizes), (self.types, outer.types),
                                 (self.values, outer.values)):
                if name not in mine and name in theirs:
                    mine[name] = theirs[name]
            if name in outer.seen:
                self.seen.add(name)


def _scope(graph: onnx.GraphProto, shapes: Mapping[str, object] | None = None) -> _Scope:
    """Everything :func:`tensor_table` gives, plus element types and small integer values."""
    scope = _Scope()
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if not vi.type.HasField("tensor_type"):
            continue
        scope.set_type(vi.name, vi.type.tensor_type.elem_type)
        static = _static_dims(vi)
        if static is not None:
            scope.dims[vi.name] = static
    for init in graph.initializer:
        scope.dims[init.name] = tuple(init.dims)
        scope.set_type(init.name, init.data_type)
        if (value := _small_value(init)) is not None:
            scope.values[init.name] = value
            scope.seen.discard(init.name)
    for node in graph.node:
        if node.op_type == "Constant" and node.output and (found := _constant_tensor(node)) is not None:
            out = node.output[0]
            scope.dims[out] = found[0]
            scope.set_type(out, found[1])
            if found[2] is not None:
                scope.values[out] = found[2]
                scope.seen.discard(out)
    for name, value in (shapes or {}).items():
        if isinstance(value, np.ndarray):
            scope.dims[name] = tuple(int(d) for d in value.shape)
            scope.sizes[name] = float(value.dtype.itemsize)
            try:
                scope.types[name] = helper.np_dtype_to_tensor_dtype(value.dtype)
            except (KeyError, TypeError, ValueError):
                pass
            if value.size <= _SMALL and value.dtype.kind in "biu":
                scope.values[name] = value
                scope.seen.add(name)
            else:
                scope.values.pop(name, None)
                scope.seen.discard(name)
        elif isinstance(value, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in value):
            scope.dims[name] = tuple(int(d) for d in value)
        # else a captured sequence or optional value (a list of arrays): no tensor shape to record
    return scope


def tensor_table(model: onnx.ModelProto, shapes: Mapping[str, object] | None = None
                 ) -> tuple[dict[str, tuple[int, ...]], dict[str, float]]:
    """(shape, element size) of every tensor whose shape is known; run-time shapes win."""
    scope = _scope(model.graph, shapes)
    return scope.dims, scope.sizes


def node_cost(node: onnx.NodeProto, dims: dict[str, tuple[int, ...]], sizes: dict[str, float]) -> NodeCost:
    """The cost of one node by its op's formula (nodes with bodies: see :func:`estimate`)."""
    name = _name(node)
    rule = rule_for(node.domain, node.op_type)
    if rule is None:
        where = f"{node.domain}:" if node.domain else ""
        return NodeCost(name, node.op_type, 0.0, 0.0, False, f"no cost model for op {where}{node.op_type}")
    view = NodeView(node, dims, sizes)
    try:
        flops, moved = rule(view)
        if moved is None:
            moved = view.io_bytes()
    except UnknownShape as exc:
        return NodeCost(name, node.op_type, 0.0, 0.0, False, str(exc))
    except (IndexError, ValueError, TypeError) as exc:  # a node whose shapes do not fit its op
        return NodeCost(name, node.op_type, 0.0, 0.0, False, f"cannot cost {node.op_type}: {exc}")
    return NodeCost(name, node.op_type, float(flops), float(moved), True)


def _name(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


# ------------------------------------------------------------------ nodes with bodies
@dataclass(frozen=True)
class _Context:
    """What a body needs from its model: the opsets, the local functions, the nesting depth."""

    opsets: tuple[onnx.OperatorSetIdProto, ...]
    functions: Mapping[tuple[str, str, str], onnx.FunctionProto]
    depth: int = 0
    bodies: list[int] = field(default_factory=lambda: [0])  # bodies costed so far in this estimate (shared)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "_Context":
        return cls(tuple(model.opset_import), {(f.domain, f.name, f.overload): f for f in model.functions})

    def opset(self, domain: str = "") -> int:
        domains = ("", "ai.onnx") if domain in ("", "ai.onnx") else (domain,)
        return max((o.version for o in self.opsets if o.domain in domains), default=0)

    def function(self, node: onnx.NodeProto) -> onnx.FunctionProto | None:
        return self.functions.get((node.domain, node.op_type, node.overload))

    def deeper(self, opsets: Iterable[onnx.OperatorSetIdProto] | None = None) -> "_Context":
        if opsets is None:
            return _Context(self.opsets, self.functions, self.depth + 1, self.bodies)
        mine = {o.domain for o in opsets}
        merged = tuple(opsets) + tuple(o for o in self.opsets if o.domain not in mine)
        return _Context(merged, self.functions, self.depth + 1, self.bodies)


def _cost(node: onnx.NodeProto, scope: _Scope, ctx: _Context) -> NodeCost:
    """One node's cost: by its body for If/Loop/Scan and local function calls, else by its op's formula."""
    standard = node.domain in ("", "ai.onnx")
    with_body = _WITH_BODIES.get(node.op_type) if standard else None
    fn = ctx.function(node)
    if fn is not None and standard and rule_for(node.domain, node.op_type) is not None:
        fn = None  # a standard op keeps its formula
    if with_body is None and fn is None:
        return node_cost(node, scope.dims, scope.sizes)
    if ctx.depth >= MAX_GRAPH_DEPTH:  # (a local function calling itself, too)
        return NodeCost(_name(node), node.op_type, 0.0, 0.0, False,
                        f"bodies nested more than {MAX_GRAPH_DEPTH} deep are not costed")
    if ctx.bodies[0] >= _MAX_BODIES:
        return NodeCost(_name(node), node.op_type, 0.0, 0.0, False,
                        f"more than {_MAX_BODIES} bodies in the model: the rest are not costed")
    try:
        return with_body(node, scope, ctx.deeper()) if with_body is not None else _call(node, fn, scope, ctx)
    except (IndexError, ValueError, TypeError) as exc:  # attributes or bodies that do not fit the op
        return NodeCost(_name(node), node.op_type, 0.0, 0.0, False, f"cannot cost {node.op_type}: {exc}")


def _elem_type(vi: onnx.ValueInfoProto) -> int:
    return vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else TensorProto.UNDEFINED


Given = Mapping[str, tuple[tuple[int, ...] | None, int | None, np.ndarray | None]]  # input -> dims, type, value


def _body_cost(body: onnx.GraphProto, given: Given, outer: _Scope, ctx: _Context) -> ModelCost:
    """The cost of one run of ``body``: its inputs have the shapes (types, small values) of
    ``given``, the tensors it reads from outside those ``outer`` knows; the shapes of the
    rest come from ONNX shape inference run on it (the body's own value infos when that fails)."""
    ctx.bodies[0] += 1
    free = set(graph_outer_inputs(body))
    graph = helper.make_graph([], body.name or "body", [], [])
    graph.node.extend(body.node)
    for vi in body.input:
        dims, elem, value = given.get(vi.name, (None, None, None))
        elem = elem or _elem_type(vi)
        if value is not None:
            graph.initializer.append(numpy_helper.from_array(value, vi.name))
        elif dims is not None and elem:
            graph.input.append(helper.make_tensor_value_info(vi.name, elem, dims))
        elif elem:
            graph.input.append(vi)
    for init in body.initializer:  # weights stay out of the copy: their shape is enough
        if _small_value(init) is not None:
            graph.initializer.append(init)
        else:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    for name in sorted(free):
        if name in outer.values:
            graph.initializer.append(numpy_helper.from_array(outer.values[name], name))
        elif name in outer.types:
            graph.input.append(helper.make_tensor_value_info(name, outer.types[name], outer.dims.get(name)))
    for vi in body.output:
        elem = _elem_type(vi)
        graph.output.append(helper.make_tensor_value_info(vi.name, elem, None) if elem
                            else helper.make_empty_tensor_value_info(vi.name))
    model = helper.make_model(graph, opset_imports=list(ctx.opsets), functions=list(ctx.functions.values()))
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError, ValueError):  # the shapes the model declares
        model.graph.value_info.extend(body.value_info)
    scope = _scope(model.graph)
    scope.adopt(outer, free)
    for name, (dims, _, _) in given.items():
        if dims is not None:
            scope.dims.setdefault(name, tuple(dims))
    return combine([_cost(node, scope, ctx) for node in model.graph.node])


def _from_body(node: onnx.NodeProto, body: ModelCost, times: int, note: str, partial: bool = False,
               also_unknown: Iterable[str] = ()) -> NodeCost:
    """A node worth ``times`` runs of ``body``: partial when its own count is (``partial``)
    or when part of the body could not be costed; unknown when nothing of the body could."""
    name, unknown = _name(node), frozenset(body.unknown_ops) | frozenset(also_unknown)
    if body.is_partial and body.flops == 0 and body.bytes == 0:
        why = next(n.reason for n in body.per_node if not n.known or n.partial)
        why = why if why.startswith("body not costed: ") else f"body not costed: {why}"
        return NodeCost(name, node.op_type, 0.0, 0.0, False, why, unknown_inner=unknown)
    notes = [note]
    if body.unknown_nodes:
        ops = sorted({n.op_type for n in body.per_node if not n.known})
        notes.append(f"{body.unknown_nodes} body node(s) not costed ({', '.join(ops)}): a lower bound")
    if body.partial_nodes:
        notes.append(f"{body.partial_nodes} body node(s) costed in part: a lower bound")
    return NodeCost(name, node.op_type, float(times * body.flops), float(times * body.bytes), True,
                    "; ".join(notes), partial or body.is_partial or bool(unknown), unknown, max(times, 1))


def _graph_attr(node: onnx.NodeProto, name: str) -> onnx.GraphProto | None:
    return next((a.g for a in node.attribute if a.name == name and a.type == onnx.AttributeProto.GRAPH), None)


def _attr(node: onnx.NodeProto, name: str, default=None):
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else helper.get_attribute_value(a)


def _scalar(value: np.ndarray | None) -> int | None:
    return int(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if i < len(node.input) else ""


def _no_body(node: onnx.NodeProto, what: str) -> NodeCost:
    return NodeCost(_name(node), node.op_type, 0.0, 0.0, False, f"{node.op_type} without {what}")


def _if(node: onnx.NodeProto, scope: _Scope, ctx: _Context) -> NodeCost:
    """The costlier branch (by FLOPs, then bytes): an *upper bound*, since which branch runs is
    not known statically. When the condition's value is known (a constant, or the value
    seen at run time: the branch that ran when the model was measured), that branch. Partial
    when either branch is: the other one might be the costlier."""
    branches = {n: g for n in ("then_branch", "else_branch") if (g := _graph_attr(node, n)) is not None}
    if len(branches) != 2:
        return _no_body(node, "a then_branch or an else_branch graph")
    condition = _scalar(scope.values.get(_input(node, 0)))
    if condition is not None:
        taken = "then_branch" if condition else "else_branch"
        return _from_body(node, _body_cost(branches[taken], {}, scope, ctx), 1,
                          f"the branch taken ({taken}): the condition is {scope.where(_input(node, 0))}")
    costs = {n: _body_cost(g, {}, scope, ctx) for n, g in branches.items()}
    taken = max(costs, key=lambda n: (costs[n].flops, costs[n].bytes, not costs[n].is_partial))
    other = costs["else_branch" if taken == "then_branch" else "then_branch"]
    return _from_body(node, costs[taken], 1, f"the costlier branch ({taken}): an upper bound, which branch "
                      "runs is not known statically", other.is_partial, other.unknown_ops)


def _condition_kept(body: onnx.GraphProto) -> bool:
    """Whether a Loop body hands its condition on unchanged (or as a constant true): the loop
    then runs exactly M times."""
    if len(body.input) < 2 or not body.output:
        return False
    producers = {o: n for n in body.node for o in n.output}
    name = body.output[0].name
    for _ in range(len(body.node) + 1):
        if name == body.input[1].name:
            return True
        node = producers.get(name)
        if node is None:
            return False
        if node.op_type == "Constant":
            found = _constant_tensor(node)
            return found is not None and _scalar(found[2]) not in (None, 0)
        if node.op_type != "Identity" or not node.input:
            return False
        name = node.input[0]
    return False


def _loop(node: onnx.NodeProto, scope: _Scope, ctx: _Context) -> NodeCost:
    """One body run times the trip count M, when M's value is known (an initializer, a Constant
    node, or the value seen at run time) and the body hands its condition on unchanged.
    Otherwise (M unknown, or a condition the body computes, which may end the loop early)
    the body is counted once: a *lower bound*, the node is partial. The shapes are those of
    the first iteration (loop-carried tensors that grow are counted at their first size)."""
    body = _graph_attr(node, "body")
    if body is None:
        return _no_body(node, "body")
    given: dict = {}
    if len(body.input) >= 2:
        given[body.input[0].name] = ((), TensorProto.INT64, None)
        given[body.input[1].name] = ((), TensorProto.BOOL, None)
    for formal, actual in zip(body.input[2:], node.input[2:]):
        given[formal.name] = (scope.dims.get(actual), scope.types.get(actual), None)
    trip_name, cond_name = _input(node, 0), _input(node, 1)
    trips = _scalar(scope.values.get(trip_name)) if trip_name else None
    start = _scalar(scope.values.get(cond_name)) if cond_name else 1
    if start == 0:
        return NodeCost(_name(node), node.op_type, 0.0, 0.0, True,
                        f"the condition is false ({scope.where(cond_name)}): no iteration")
    if trips is not None and start is not None and _condition_kept(body):
        times, partial = max(trips, 0), False
        note = f"body x {times} iterations (M is {scope.where(trip_name)})"
    else:
        if trips is None:
            why = "no trip count M" if not trip_name else "the trip count M is not a constant"
        elif start is None:
            why = "the initial condition is not a constant"
        else:
            why = f"the body computes the condition (it may stop before M = {trips})"
        times, partial, note = 1, True, f"{why}: body counted once, a lower bound"
    return _from_body(node, _body_cost(body, given, scope, ctx), times, note, partial)


def _scan(node: onnx.NodeProto, scope: _Scope, ctx: _Context) -> NodeCost:
    """One body run times the scan length (the first scan input's size along its scan axis);
    the body once, a *lower bound*, when no scan input's shape is known. Opset 8's Scan
    (batched, with sequence lengths) is not costed."""
    if ctx.opset() < 9:
        return NodeCost(_name(node), node.op_type, 0.0, 0.0, False,
                        "Scan before opset 9 (batched, with sequence_lens) is not costed")
    body = _graph_attr(node, "body")
    if body is None:
        return _no_body(node, "body")
    scans = int(_attr(node, "num_scan_inputs", 0))
    states = len(node.input) - scans
    axes = list(_attr(node, "scan_input_axes", None) or [0] * scans)
    given: dict = {}
    for formal, actual in zip(body.input[:states], node.input[:states]):
        given[formal.name] = (scope.dims.get(actual), scope.types.get(actual), None)
    length = None
    for j, (formal, actual) in enumerate(zip(body.input[states:], node.input[states:])):
        dims, axis = scope.dims.get(actual), (axes[j] if j < len(axes) else 0)
        if dims is not None and -len(dims) <= axis < len(dims):
            axis %= len(dims)
            length = dims[axis] if length is None else length
            dims = dims[:axis] + dims[axis + 1:]
        else:
            dims = None
        given[formal.name] = (dims, scope.types.get(actual), None)
    cost = _body_cost(body, given, scope, ctx)
    if length is None:
        return _from_body(node, cost, 1, "the scan length is not known: body counted once, a lower bound", True)
    return _from_body(node, cost, length, f"body x {length} steps")


def _bind(graph: onnx.GraphProto, attrs: Mapping[str, onnx.AttributeProto], absent: set[str]) -> onnx.GraphProto:
    """A copy of a function body's ``graph`` with its attribute references resolved from
    ``attrs`` (dropped when not given: the op's default) and the inputs in ``absent`` omitted."""
    bound = onnx.GraphProto()
    bound.CopyFrom(graph)
    for node in bound.node:
        for i, name in enumerate(node.input):
            if name in absent:
                node.input[i] = ""
        kept = []
        for attr in node.attribute:
            if attr.ref_attr_name:
                if attr.ref_attr_name not in attrs:
                    continue
                value = onnx.AttributeProto()
                value.CopyFrom(attrs[attr.ref_attr_name])
                value.name = attr.name
                attr = value
            elif attr.type == onnx.AttributeProto.GRAPH:
                attr.g.CopyFrom(_bind(attr.g, attrs, absent))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    g.CopyFrom(_bind(g, attrs, absent))
            kept.append(attr)
        del node.attribute[:]
        node.attribute.extend(kept)
    return bound


def _call(node: onnx.NodeProto, fn: onnx.FunctionProto, scope: _Scope, ctx: _Context) -> NodeCost:
    """A call of a model-local function: its body with the call's input shapes and attributes."""
    actual = {f: _input(node, i) for i, f in enumerate(fn.input)}
    attrs = {a.name: a for a in fn.attribute_proto} | {a.name: a for a in node.attribute}
    present = [f for f in fn.input if actual[f]]
    body = _bind(helper.make_graph(fn.node, fn.name, [helper.make_empty_tensor_value_info(f) for f in present],
                                   [helper.make_empty_tensor_value_info(o) for o in fn.output]),
                 attrs, {f for f in fn.input if not actual[f]})
    given = {f: (scope.dims.get(actual[f]), scope.types.get(actual[f]), scope.values.get(actual[f])) for f in present}
    cost = _body_cost(body, given, _Scope(), ctx.deeper(fn.opset_import))
    return _from_body(node, cost, 1, f"local function {fn.domain}:{fn.name}")


_WITH_BODIES = {"If": _if, "Loop": _loop, "Scan": _scan}


def estimate(model: onnx.ModelProto, shapes: Mapping[str, object] | None = None) -> ModelCost:
    """FLOPs and bytes of every node of ``model``'s main graph.

    ``shapes`` maps tensor names to shapes (tuples) or to the arrays seen at run time
    (their dtype then also gives the element size); they override shape inference.
    Unknown nodes are listed in ``per_node`` with ``known=False`` and excluded from the
    totals; their op types are in ``unknown_ops``.

    Nodes with bodies are costed by them (the bodies' shapes from shape inference with
    the shapes of what they read from outside): ``If`` by its costlier branch, an upper
    bound (the branch taken is not known statically), or by the branch taken when the
    condition's value is known (a constant, or the array in ``shapes``: what ran when
    the model was measured); ``Loop`` by its body times the trip count M when M's value
    is known and the body keeps the condition, else by one run of the body, a lower
    bound; ``Scan`` by its body times the scan length; a call of one of
    ``model.functions`` by the function's body. Body nodes that cannot be costed leave
    the node *partial* (``NodeCost.partial``, ``ModelCost.is_partial``: the totals are
    then a lower bound), their op types in ``unknown_ops``.
    """
    scope = _scope(model.graph, shapes)
    ctx = _Context.of(model)
    return combine([_cost(node, scope, ctx) for node in model.graph.node])
