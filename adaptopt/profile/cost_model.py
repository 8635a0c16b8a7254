"""Analytic cost model: FLOPs and bytes moved for every node of a model.

Shapes come, in order of preference, from the tensors actually seen at run time (the
``shapes`` argument: captured arrays or their shapes), from ONNX shape inference
(the model's value infos), from initializers and from ``Constant`` nodes. A node whose
op has no formula, or whose shapes are not known, is reported *unknown* with the
reason; it is left out of the totals, never counted as zero. The formulas and their
conventions are in :mod:`adaptopt.profile.cost_ops` and :mod:`adaptopt.profile.cost_contrib`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from adaptopt.profile.cost_contrib import CONTRIB, gelu
from adaptopt.profile.cost_ops import STANDARD, NodeView, Rule, UnknownShape

CONTRIB_DOMAIN = "com.microsoft"
_STANDARD = {**STANDARD, "Gelu": gelu}
_PACKED_HALF_BYTE = {TensorProto.INT4, TensorProto.UINT4} | (
    {TensorProto.FLOAT4E2M1} if hasattr(TensorProto, "FLOAT4E2M1") else set())


@dataclass(frozen=True)
class NodeCost:
    """One node's cost; ``known`` is False when the op or its shapes are not covered (see ``reason``)."""

    name: str
    op_type: str
    flops: float
    bytes: float
    known: bool
    reason: str = ""


@dataclass(frozen=True)
class ModelCost:
    """Totals over the *known* nodes, every node's cost, and the op types that could not be costed."""

    flops: float
    bytes: float
    per_node: list[NodeCost] = field(default_factory=list)
    unknown_ops: set[str] = field(default_factory=set)

    @property
    def unknown_nodes(self) -> int:
        return sum(1 for n in self.per_node if not n.known)

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
    return ModelCost(flops=float(sum(n.flops for n in known)), bytes=float(sum(n.bytes for n in known)),
                     per_node=list(nodes), unknown_ops={n.op_type for n in nodes if not n.known})


def rule_for(domain: str, op_type: str) -> Rule | None:
    """The formula for an op, or None when the cost model does not know it."""
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


def _constant_tensor(node: onnx.NodeProto) -> tuple[tuple[int, ...], float | None] | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return tuple(attr.t.dims), _itemsize(attr.t.data_type)
        if attr.name in ("value_float", "value_int"):
            return (), 4.0 if attr.name == "value_float" else 8.0
        if attr.name in ("value_floats", "value_ints"):
            values = attr.floats if attr.name == "value_floats" else attr.ints
            return (len(values),), 4.0 if attr.name == "value_floats" else 8.0
    return None


def tensor_table(model: onnx.ModelProto, shapes: Mapping[str, object] | None = None
                 ) -> tuple[dict[str, tuple[int, ...]], dict[str, float]]:
    """(shape, element size) of every tensor whose shape is known; run-time shapes win."""
    dims: dict[str, tuple[int, ...]] = {}
    sizes: dict[str, float] = {}
    graph = model.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if not vi.type.HasField("tensor_type"):
            continue
        size = _itemsize(vi.type.tensor_type.elem_type)
        if size is not None:
            sizes[vi.name] = size
        static = _static_dims(vi)
        if static is not None:
            dims[vi.name] = static
    for init in graph.initializer:
        dims[init.name] = tuple(init.dims)
        size = _itemsize(init.data_type)
        if size is not None:
            sizes[init.name] = size
    for node in graph.node:
        if node.op_type == "Constant" and node.output and (found := _constant_tensor(node)) is not None:
            dims[node.output[0]] = found[0]
            if found[1] is not None:
                sizes[node.output[0]] = found[1]
    for name, value in (shapes or {}).items():
        if isinstance(value, np.ndarray):
            dims[name] = tuple(int(d) for d in value.shape)
            sizes[name] = float(value.dtype.itemsize)
        elif isinstance(value, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in value):
            dims[name] = tuple(int(d) for d in value)
        # else a captured sequence or optional value (a list of arrays): no tensor shape to record
    return dims, sizes


def node_cost(node: onnx.NodeProto, dims: dict[str, tuple[int, ...]], sizes: dict[str, float]) -> NodeCost:
    name = node.name or (node.output[0] if node.output else node.op_type)
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


def estimate(model: onnx.ModelProto, shapes: Mapping[str, object] | None = None) -> ModelCost:
    """FLOPs and bytes of every node of ``model``'s main graph.

    ``shapes`` maps tensor names to shapes (tuples) or to the arrays seen at run time
    (their dtype then also gives the element size); they override shape inference.
    Unknown nodes are listed in ``per_node`` with ``known=False`` and excluded from the
    totals; their op types are in ``unknown_ops``.
    """
    dims, sizes = tensor_table(model, shapes)
    return combine([node_cost(node, dims, sizes) for node in model.graph.node])
