"""A read-only index over a model's main graph: topological order, producers, consumers.

Nodes are numbered by their position in a topological order. A contiguous range of
that order is always convex (any path between two of its nodes passes only through
nodes whose positions lie between them), which is why every subgraph here is a range.
Control-flow nodes (If/Loop/Scan) are atomic; the outer-scope tensors their bodies
read count as their inputs.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from adaptopt.errors import InputError


def subgraph_outer_inputs(node: onnx.NodeProto) -> list[str]:
    """Tensors that the bodies of a control-flow node read from the enclosing scope."""
    outer: list[str] = []
    stack = [attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH]
    stack += [g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPHS for g in attr.graphs]
    # Iterative walk with explicit scopes: (graph, names defined in enclosing bodies).
    work = [(g, frozenset()) for g in stack]
    seen: set[str] = set()
    while work:
        graph, defined_above = work.pop()
        defined = set(defined_above)
        defined.update(i.name for i in graph.input)
        defined.update(i.name for i in graph.initializer)
        defined.update(i.name for i in graph.sparse_initializer)
        for inner in graph.node:
            for name in inner.input:
                if name and name not in defined and name not in seen:
                    seen.add(name)
                    outer.append(name)
            for attr in inner.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    work.append((attr.g, frozenset(defined)))
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    work.extend((g, frozenset(defined)) for g in attr.graphs)
            defined.update(o for o in inner.output if o)
    return outer


def tensor_nbytes(vi: onnx.ValueInfoProto | None) -> int | None:
    """Bytes of a tensor from its static type/shape, or None when not fully known."""
    if vi is None or not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    count = 1
    for d in tt.shape.dim:
        if not d.HasField("dim_value"):
            return None
        count *= d.dim_value
    return count * itemsize


@dataclass
class GraphIndex:
    model: onnx.ModelProto
    nodes: list[onnx.NodeProto]  # in topological order
    node_inputs: list[tuple[str, ...]]  # explicit + outer-scope inputs, empties dropped
    producer: dict[str, int]
    consumers: dict[str, list[int]]
    graph_inputs: list[str]  # real inputs (not initializers)
    graph_outputs: list[str]
    initializers: dict[str, TensorProto]
    value_info: dict[str, onnx.ValueInfoProto]
    _init_digest: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def build(cls, model: onnx.ModelProto) -> "GraphIndex":
        graph = model.graph
        initializers = {t.name: t for t in graph.initializer}
        graph_inputs = [i.name for i in graph.input if i.name not in initializers]
        _name_unnamed_nodes(graph)
        raw_nodes = list(graph.node)
        raw_inputs = [tuple(n for n in list(node.input) + subgraph_outer_inputs(node) if n) for node in raw_nodes]
        order = _topological_order(raw_nodes, raw_inputs, set(graph_inputs) | set(initializers))
        nodes = [raw_nodes[i] for i in order]
        node_inputs = [raw_inputs[i] for i in order]
        producer: dict[str, int] = {}
        consumers: dict[str, list[int]] = defaultdict(list)
        for pos, (node, inputs) in enumerate(zip(nodes, node_inputs)):
            for out in node.output:
                if out:
                    producer[out] = pos
            for name in inputs:
                consumers[name].append(pos)
        value_info = {vi.name: vi for vi in list(graph.input) + list(graph.value_info) + list(graph.output)}
        return cls(model, nodes, node_inputs, producer, dict(consumers), graph_inputs,
                   [o.name for o in graph.output], initializers, value_info)

    def __len__(self) -> int:
        return len(self.nodes)

    # ---------------------------------------------------------------- boundaries
    def boundary(self, start: int, stop: int) -> tuple[list[str], list[str], list[str]]:
        """(boundary inputs, boundary outputs, initializers used) of nodes [start, stop)."""
        inputs: list[str] = []
        inits: list[str] = []
        seen: set[str] = set()
        for pos in range(start, stop):
            for name in self.node_inputs[pos]:
                if name in seen:
                    continue
                seen.add(name)
                p = self.producer.get(name)
                if p is not None and start <= p < stop:
                    continue
                (inits if (p is None and name in self.initializers) else inputs).append(name)
        outputs_set = set(self.graph_outputs)
        outputs: list[str] = []
        for pos in range(start, stop):
            for out in self.nodes[pos].output:
                if not out:
                    continue
                if out in outputs_set or any(c >= stop for c in self.consumers.get(out, ())):
                    outputs.append(out)
        # a graph output that is directly a graph input / initializer is no node's output
        return inputs, outputs, inits

    def tensor_bytes(self, name: str) -> int | None:
        return tensor_nbytes(self.value_info.get(name))

    def initializer_digest(self, name: str) -> bytes:
        digest = self._init_digest.get(name)
        if digest is None:
            t = self.initializers[name]
            h = hashlib.blake2b(digest_size=16)
            h.update(str((t.data_type, tuple(t.dims))).encode())
            h.update(t.raw_data if t.HasField("raw_data") else t.SerializeToString())
            digest = self._init_digest[name] = h.digest()
        return digest

    def content_hash(self, start: int, stop: int) -> str:
        """Hash of what the subgraph computes: its nodes, boundary names and weights."""
        h = hashlib.blake2b(digest_size=16)
        inputs, outputs, inits = self.boundary(start, stop)
        h.update(repr((inputs, outputs)).encode())
        for pos in range(start, stop):
            node = self.nodes[pos]
            h.update(node.op_type.encode() + node.domain.encode())
            h.update(repr((list(node.input), list(node.output))).encode())
            for attr in node.attribute:
                h.update(attr.SerializeToString())
        for name in sorted(inits):
            h.update(name.encode() + self.initializer_digest(name))
        for name in inputs + outputs:
            vi = self.value_info.get(name)
            if vi is not None:
                h.update(vi.type.SerializeToString())
        return h.hexdigest()

    def missing_types(self, names: list[str]) -> list[str]:
        """Names among ``names`` whose type is not known from the model's value infos."""
        return [n for n in names if not has_type(self.value_info.get(n))]


def has_type(vi: onnx.ValueInfoProto | None) -> bool:
    """A usable boundary type: known element type and (for tensors) a known rank."""
    if vi is None or vi.type.WhichOneof("value") is None:
        return False
    if vi.type.HasField("tensor_type"):
        return vi.type.tensor_type.elem_type != 0 and vi.type.tensor_type.HasField("shape")
    return True


def sort_topologically(graph: onnx.GraphProto) -> bool:
    """Reorder ``graph.node`` topologically (stable); True when the order changed.

    Raises InputError naming the node for cycles and reads of undefined tensors.
    """
    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | \
        {i.name for i in graph.sparse_initializer}
    inputs = [tuple(n for n in list(node.input) + subgraph_outer_inputs(node) if n) for node in nodes]
    order = _topological_order(nodes, inputs, available)
    if order == list(range(len(nodes))):
        return False
    sorted_nodes = [nodes[i] for i in order]
    copies = []
    for node in sorted_nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copies.append(copy)
    del graph.node[:]
    graph.node.extend(copies)
    return True


def _name_unnamed_nodes(graph: onnx.GraphProto) -> None:
    """Give every node a unique name (boundary tensors are untouched)."""
    taken = {n.name for n in graph.node if n.name}
    counts: dict[str, int] = defaultdict(int)
    seen: set[str] = set()
    for node in graph.node:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or node.op_type
        while True:
            counts[base] += 1
            candidate = f"{base}_{counts[base]}"
            if candidate not in taken and candidate not in seen:
                break
        node.name = candidate
        seen.add(candidate)


def _topological_order(nodes: list[onnx.NodeProto], inputs: list[tuple[str, ...]], available: set[str]) -> list[int]:
    """Kahn's algorithm keeping the file order where it is already valid; errors on cycles."""
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if not out:
                continue
            if out in producer:
                raise InputError(f"tensor '{out}' is produced by two nodes "
                                 f"('{nodes[producer[out]].name}' and '{node.name}')")
            if out in available:
                raise InputError(f"tensor '{out}' is both a graph input/initializer and the output of node "
                                 f"'{node.name}'")
            producer[out] = i
    indegree = [0] * len(nodes)
    dependents: list[list[int]] = [[] for _ in nodes]
    for i, names in enumerate(inputs):
        for name in set(names):
            p = producer.get(name)
            if p is None:
                if name not in available:
                    raise InputError(f"node '{nodes[i].name}' ({nodes[i].op_type}) reads tensor '{name}', "
                                     "which no node, input or initializer defines")
                continue
            if p == i:
                raise InputError(f"node '{nodes[i].name}' reads its own output '{name}' (a cycle)")
            indegree[i] += 1
            dependents[p].append(i)
    ready = [i for i, d in enumerate(indegree) if d == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in dependents[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        stuck = next(nodes[i].name for i, d in enumerate(indegree) if d > 0)
        raise InputError(f"the graph has a cycle (node '{stuck}' can never run)")
    return order

