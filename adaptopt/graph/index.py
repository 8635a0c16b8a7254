"""A read-only index over a model's main graph: topological order, producers, consumers.

Nodes are numbered by their position in a topological order. A contiguous range of
that order is always convex (any path between two of its nodes passes only through
nodes whose positions lie between them), which is why every subgraph here is a range.
Control-flow nodes (If/Loop/Scan) are atomic; the outer-scope tensors their bodies
read count as their inputs.

Range queries (``boundary``, ``content_hash``, ``crossing_costs`` in partition.py) run
on flat arrays built once per index (``tables``): the tensors each node reads with
their producers' positions, the tensors it writes with their last readers, and one
16-byte digest per node. A query is then O(nodes in the range) in numpy, so a
partition of depth d costs O(d * N) array work instead of d passes of Python loops.
"""

from __future__ import annotations

import hashlib
import heapq
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from adaptopt.errors import InputError


def subgraph_outer_inputs(node: onnx.NodeProto) -> list[str]:
    """Tensors that the bodies of a control-flow node read from the enclosing scope."""
    outer: list[str] = []
    if not node.attribute:  # most nodes: nothing to walk
        return outer
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
    # caches derived from the fields above, built on first use
    _tables: RangeTables | None = field(default=None, repr=False, compare=False)
    _node_digests: bytes | None = field(default=None, repr=False, compare=False)
    # per write slot (see RangeTables), from value_info: (len(value_info), bytes or NaN, typed?)
    _value_facts: tuple[int, np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(cls, model: onnx.ModelProto) -> GraphIndex:
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

    # ---------------------------------------------------------------- range tables
    @property
    def tables(self) -> RangeTables:
        """Flat per-edge arrays for range queries, built on first use (the index is read-only)."""
        if self._tables is None:
            self._tables = RangeTables.build(self)
        return self._tables

    def node_names(self, start: int, stop: int) -> tuple[str, ...]:
        """Names of nodes [start, stop), in topological order."""
        return tuple(self.tables.node_names[start:stop])

    # ---------------------------------------------------------------- boundaries
    def boundary(self, start: int, stop: int) -> tuple[list[str], list[str], list[str]]:
        """(boundary inputs, boundary outputs, initializers used) of nodes [start, stop).

        Inputs and initializers in order of first read; outputs in production order:
        graph outputs and tensors read at or after ``stop``.
        """
        t = self.tables
        a, b = t.read_offsets[start], t.read_offsets[stop]
        ids = t.read_tensor[a:b][t.read_producer[a:b] < start]  # produced before the range, or never
        if ids.size > 1:
            _, first = np.unique(ids, return_index=True)
            ids = ids[np.sort(first)]
        is_init = t.is_initializer[ids]
        names = t.tensor_names
        inputs = [names[i] for i in ids[~is_init].tolist()]
        inits = [names[i] for i in ids[is_init].tolist()]
        a, b = t.write_offsets[start], t.write_offsets[stop]
        leaving = t.write_tensor[a:b][t.write_leaves_at[a:b] >= stop]
        # a graph output that is directly a graph input / initializer is no node's output
        return inputs, [names[i] for i in leaving.tolist()], inits

    def tensor_bytes(self, name: str) -> int | None:
        return tensor_nbytes(self.value_info.get(name))

    def set_value_info(self, name: str, vi: onnx.ValueInfoProto) -> None:
        """Type a tensor after the fact; cached sizes and types follow (assign through here)."""
        self.value_info[name] = vi
        self._value_facts = None

    def written_sizes(self) -> np.ndarray:
        """Bytes of each tensor in ``tables.write_tensor`` order; NaN where not statically known."""
        return self._facts()[1]

    def written_typed(self) -> np.ndarray:
        """Per ``tables.write_tensor`` slot: whether value_info gives the tensor a usable type."""
        return self._facts()[2]

    def _facts(self) -> tuple[int, np.ndarray, np.ndarray]:
        # set_value_info drops the cache; the length check also catches a tensor added directly
        # (replacing an entry directly is not noticed: that is what set_value_info is for)
        if self._value_facts is None or self._value_facts[0] != len(self.value_info):
            names = self.tables.tensor_names
            infos = [self.value_info.get(names[i]) for i in self.tables.write_tensor.tolist()]
            sizes = [tensor_nbytes(vi) for vi in infos]
            self._value_facts = (len(self.value_info),
                                 np.array([np.nan if s is None else s for s in sizes], dtype=np.float64),
                                 np.array([has_type(vi) for vi in infos], dtype=bool))
        return self._value_facts

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
        """Hash of what the subgraph computes: its nodes, boundary names and weights.

        A pure function of the range's content (op types, domains, attributes, tensor
        names, boundary types, initializer bytes), not of node names or positions, so
        equal subgraphs of two models hash equal.
        """
        return self.hash_with_boundary(start, stop, self.boundary(start, stop))

    def hash_with_boundary(self, start: int, stop: int,
                           boundary: tuple[list[str], list[str], list[str]]) -> str:
        """``content_hash`` given the range's ``boundary(start, stop)`` (saves computing it twice)."""
        inputs, outputs, inits = boundary
        if self._node_digests is None:
            self._node_digests = b"".join(map(node_digest, self.nodes))
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((inputs, outputs)).encode())
        h.update(self._node_digests[start * NODE_DIGEST_SIZE:stop * NODE_DIGEST_SIZE])
        h.update(b"".join(name.encode() + self.initializer_digest(name) for name in sorted(inits)))
        for name in inputs + outputs:
            vi = self.value_info.get(name)
            if vi is not None:
                h.update(vi.type.SerializeToString())
        return h.hexdigest()

    def missing_types(self, names: list[str]) -> list[str]:
        """Names among ``names`` whose type is not known from the model's value infos."""
        return [n for n in names if not has_type(self.value_info.get(n))]


NODE_DIGEST_SIZE = 16


def node_digest(node: onnx.NodeProto) -> bytes:
    """What a node computes: op type, domain, tensor names, attributes (not its name)."""
    h = hashlib.blake2b(repr((node.op_type, node.domain, list(node.input), list(node.output))).encode(),
                        digest_size=NODE_DIGEST_SIZE)
    for attr in node.attribute:
        data = attr.SerializeToString()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.digest()


@dataclass(frozen=True, eq=False)
class RangeTables:
    """The index as flat arrays; node ``pos``'s entries are ``[offsets[pos], offsets[pos + 1])``.

    Reads: every (node, tensor) of ``node_inputs`` with the tensor's producer position
    (-1 for graph inputs and initializers). Writes: every non-empty node output with
    its last reader's position (-1 for none) and ``leaves_at``: that position, or
    ``len(index)`` for graph outputs, which leave any range that writes them.
    """

    tensor_names: list[str]  # tensor id -> name
    name_rank: np.ndarray  # tensor id -> position of its name in sorted order
    node_names: list[str]
    is_initializer: np.ndarray  # per tensor id: an initializer no node overwrites
    read_offsets: np.ndarray
    read_tensor: np.ndarray
    read_producer: np.ndarray
    write_offsets: np.ndarray
    write_tensor: np.ndarray
    write_producer: np.ndarray
    write_last_reader: np.ndarray
    write_leaves_at: np.ndarray

    @classmethod
    def build(cls, index: GraphIndex) -> RangeTables:
        ids: dict[str, int] = {}
        read_tensor: list[int] = []
        read_offsets = [0]
        write_tensor: list[int] = []
        write_offsets = [0]
        for node, inputs in zip(index.nodes, index.node_inputs):
            read_tensor.extend(ids.setdefault(name, len(ids)) for name in inputs)
            read_offsets.append(len(read_tensor))
            write_tensor.extend(ids.setdefault(name, len(ids)) for name in node.output if name)
            write_offsets.append(len(write_tensor))
        names = list(ids)
        producer = np.full(len(names), -1, dtype=np.int64)
        for name, pos in index.producer.items():
            producer[ids[name]] = pos
        last_reader = np.full(len(names), -1, dtype=np.int64)
        for name, readers in index.consumers.items():
            last_reader[ids[name]] = readers[-1]  # readers are appended in topological order
        write = np.asarray(write_tensor, dtype=np.int64)
        write_last = last_reader[write]
        leaves_at = write_last.copy()
        outputs = [ids[o] for o in index.graph_outputs if o in ids]
        leaves_at[np.isin(write, outputs)] = len(index)
        read = np.asarray(read_tensor, dtype=np.int64)
        rank = np.empty(len(names), dtype=np.int64)
        rank[sorted(range(len(names)), key=names.__getitem__)] = np.arange(len(names))
        return cls(names, rank, [node.name for node in index.nodes],
                   np.array([producer[i] < 0 and n in index.initializers for i, n in enumerate(names)], dtype=bool),
                   np.asarray(read_offsets, dtype=np.int64), read, producer[read],
                   np.asarray(write_offsets, dtype=np.int64), write, producer[write], write_last, leaves_at)

    def last_reader_before(self, index: GraphIndex, slots: np.ndarray, stop: int) -> np.ndarray:
        """Per write slot: the last position < ``stop`` that reads its tensor, or -1."""
        last = self.write_last_reader[slots].copy()
        for k in np.flatnonzero(last >= stop).tolist():  # only tensors still read after ``stop``
            readers = index.consumers[self.tensor_names[self.write_tensor[slots[k]]]]
            j = bisect_left(readers, stop)
            last[k] = readers[j - 1] if j else -1
        return last


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
    if _already_sorted(inputs, producer, available):
        return list(range(len(nodes)))  # what Kahn's smallest-index-first order gives, without the heap
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


def _already_sorted(inputs: list[tuple[str, ...]], producer: dict[str, int], available: set[str]) -> bool:
    """Every read is of an earlier node's output or of a defined input (anything else: let Kahn decide)."""
    for i, names in enumerate(inputs):
        for name in names:
            p = producer.get(name)
            if p is None:
                if name not in available:
                    return False
            elif p >= i:
                return False
    return True
