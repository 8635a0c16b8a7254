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
import itertools
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from adaptopt.errors import ModelError


# ops whose outputs are random: never a constant, never folded
NONDETERMINISTIC = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                              "Multinomial", "Bernoulli"})
# not a leaf's constant either: Dropout (random in training mode) and the ops whose outputs
# are sequences or optionals (a leaf's initializer is a tensor)
_NOT_LEAF_CONSTANT = NONDETERMINISTIC | {"Dropout", "SequenceConstruct", "SequenceEmpty", "SequenceInsert",
                                         "SequenceErase", "SplitToSequence", "Optional"}


# the first IR version whose graph inputs may be initializers the user overrides by feeding
# them (below it every initializer had to be listed as an input, so a listed one is a constant)
OVERRIDABLE_IR_VERSION = 4


def overridable_initializers(model: onnx.ModelProto) -> frozenset[str]:
    """Main-graph initializers the user may replace at run time by feeding the graph input
    of the same name: those listed in ``graph.input`` of a model of IR version >= 4.

    The one rule every constant query and pass goes through. It is ONNX Runtime's
    (``Graph::GetConstantInitializer``: an initializer that is also a graph input is not a
    constant when ``CanOverrideInitializer()``, i.e. ``ir_version >= 4``): ORT neither folds
    nor fuses through such a weight, and a rewrite that baked its default value in would
    ignore what the user feeds. Below IR 4 the listing is mandatory and means nothing, so
    there they are constants."""
    if model.ir_version < OVERRIDABLE_IR_VERSION:
        return frozenset()
    graph = model.graph
    listed = {i.name for i in graph.input}
    if not listed:
        return frozenset()
    return frozenset(t.name for t in graph.initializer if t.name in listed) | \
        frozenset(t.values.name for t in graph.sparse_initializer if t.values.name in listed)


def listed_constants(model: onnx.ModelProto) -> frozenset[str]:
    """Initializers listed in ``graph.input`` that are constants all the same: those of a
    model below IR 4, which had to list every initializer (ONNX Runtime refuses a feed of
    one: "Invalid input name"). They are no inputs of the model."""
    if model.ir_version >= OVERRIDABLE_IR_VERSION:
        return frozenset()
    graph = model.graph
    inits = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    return frozenset(i.name for i in graph.input if i.name in inits)


def raise_to_ir_4(model: onnx.ModelProto) -> bool:
    """Give a model below IR 4 IR version 4 with the same meaning, in place: its
    :func:`listed_constants` leave ``graph.input`` (listed at IR 4 they would be
    overridable, see :func:`overridable_initializers`). A rewrite adds initializers that
    IR < 4 would require listed too; at IR 4 they need not be. True when changed."""
    if model.ir_version >= OVERRIDABLE_IR_VERSION:
        return False
    constants = listed_constants(model)
    graph = model.graph
    kept = [i for i in graph.input if i.name not in constants]
    del graph.input[:]
    graph.input.extend(kept)
    model.ir_version = OVERRIDABLE_IR_VERSION
    return True


def subgraph_outer_inputs(node: onnx.NodeProto) -> list[str]:
    """Tensors that the bodies of a control-flow node read from the enclosing scope."""
    if not node.attribute:  # most nodes: nothing to walk
        return []
    stack = [attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH]
    stack += [g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPHS for g in attr.graphs]
    return _outer_inputs(stack)


def graph_outer_inputs(graph: onnx.GraphProto) -> list[str]:
    """Tensors that ``graph`` (a body), or a body nested in it, reads from the enclosing scope."""
    return _outer_inputs([graph])


def _outer_inputs(graphs: list[onnx.GraphProto]) -> list[str]:
    outer: list[str] = []
    # Iterative walk with explicit scopes: (graph, names defined in enclosing bodies).
    work = [(g, frozenset()) for g in graphs]
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
    """The graph as flat arrays (``tables``) plus the model's own protos, looked up by name.

    ``node_inputs`` is derived from the tables on first use: the range queries of a split
    never need per-node Python objects (for 100,000 nodes, name -> producer / consumers
    dicts held ~32 MB).
    """

    model: onnx.ModelProto
    nodes: Sequence[onnx.NodeProto]  # in topological order (a NodeOrder: wrappers made on access)
    graph_inputs: list[str]  # real inputs (not initializers)
    graph_outputs: list[str]
    initializers: Mapping[str, TensorProto]  # a ByName: protos made on access
    value_info: MutableMapping[str, onnx.ValueInfoProto]  # a ByName; later entries win (outputs last)
    _tables: RangeTables = field(repr=False, compare=False)
    _init_digest: dict[str, bytes] = field(default_factory=dict)
    # caches derived from the fields above, built on first use
    _node_digests: bytes | None = field(default=None, repr=False, compare=False)
    # per write slot (see RangeTables), from value_info: (len(value_info), bytes or NaN, typed?)
    _value_facts: tuple[int, np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, model: onnx.ModelProto) -> GraphIndex:
        graph = model.graph
        initializer_names = {t.name for t in graph.initializer}
        graph_inputs = [i.name for i in graph.input if i.name not in initializer_names]
        graph_outputs = [o.name for o in graph.output]
        _name_unnamed_nodes(graph)
        nodes = NodeOrder(graph.node)
        tables = RangeTables.build(nodes, graph_outputs, initializer_names)
        available = set(graph_inputs) | initializer_names
        if not tables.sorted_and_defined(available):  # or a tensor written twice: let Kahn's algorithm say
            node_inputs = tables.node_inputs()
            order = _topological_order(graph.node, node_inputs, available)
            nodes = NodeOrder(graph.node, order)
            tables = RangeTables.build(nodes, graph_outputs, initializer_names)
        del initializer_names, available
        initializers = ByName((graph.initializer,), tables)
        value_info = ByName((graph.input, graph.value_info, graph.output), tables)
        return cls(model, nodes, graph_inputs, graph_outputs, initializers, value_info, tables)

    def __len__(self) -> int:
        return len(self.nodes)

    def constant_tensors(self) -> frozenset[str]:
        """Node outputs whose value the model fixes: those of deterministic nodes that read
        only initializers that are not overridable (:func:`overridable_initializers`: one
        the user may feed is not folded by ONNX Runtime) or such outputs (``Constant``, an
        ``Identity`` tying one weight to another). ONNX Runtime folds and fuses through
        them at load, so a leaf that gets one as an input must not be timed as if it varied."""
        if "constants" not in self._derived:
            overridable = overridable_initializers(self.model)
            derived: set[str] = set()

            def fixed(name: str) -> bool:
                return not name or name in derived or (name in self.initializers and name not in overridable)

            for node in self.nodes:
                if node.op_type in _NOT_LEAF_CONSTANT or node.domain not in ("", "ai.onnx") \
                        or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                               for a in node.attribute):
                    continue
                if all(fixed(name) for name in node.input):
                    derived.update(o for o in node.output if o)
            self._derived["constants"] = frozenset(derived)
        return self._derived["constants"]

    # ---------------------------------------------------------------- range tables
    @property
    def tables(self) -> RangeTables:
        """Flat per-edge arrays for range queries (the index is read-only)."""
        return self._tables

    @property
    def node_inputs(self) -> list[tuple[str, ...]]:
        """Per node (topological order): explicit and outer-scope inputs, empties dropped."""
        if "node_inputs" not in self._derived:
            self._derived["node_inputs"] = self.tables.node_inputs()
        return self._derived["node_inputs"]

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
            names, slots = self.tables.tensor_names, len(self.tables.write_tensor)
            sizes, typed = np.empty(slots, dtype=np.float64), np.empty(slots, dtype=bool)
            for k, i in enumerate(self.tables.write_tensor.tolist()):  # one proto view at a time
                vi = self.value_info.get(names[i])
                size = tensor_nbytes(vi)
                sizes[k], typed[k] = np.nan if size is None else size, has_type(vi)
            self._value_facts = (len(self.value_info), sizes, typed)
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

    Reads: every (node, tensor) of the node's explicit and outer-scope inputs with the
    tensor's producer position (-1 for graph inputs and initializers). Writes: every
    non-empty node output with its last reader's position (-1 for none) and
    ``leaves_at``: that position, or ``len(index)`` for graph outputs, which leave any
    range that writes them. ``reader_offsets``/``reader_pos``: per tensor id, the
    positions reading it, ascending.
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
    reader_offsets: np.ndarray
    reader_pos: np.ndarray
    sorted_names: list[str]  # tensor names in sorted order (the same str objects)
    ids_by_rank: np.ndarray  # tensor id of each of them

    @classmethod
    def build(cls, nodes: Sequence[onnx.NodeProto], graph_outputs: list[str],
              initializers: Collection[str]) -> RangeTables:
        ids: dict[str, int] = {}  # its keys are the one str object of each name the tables keep
        read_tensor: list[int] = []
        read_offsets = [0]
        write_tensor: list[int] = []
        write_offsets = [0]
        node_names = []
        for node in nodes:
            read_tensor.extend(ids.setdefault(name, len(ids)) for name in node.input if name)
            read_tensor.extend(ids.setdefault(name, len(ids)) for name in subgraph_outer_inputs(node) if name)
            read_offsets.append(len(read_tensor))
            write_tensor.extend(ids.setdefault(name, len(ids)) for name in node.output if name)
            write_offsets.append(len(write_tensor))
            node_names.append(node.name)
        names = list(ids)
        del ids
        n_nodes = len(node_names)
        int_type = np.int32 if max(len(names), len(read_tensor), len(write_tensor), n_nodes) < 2**31 - 1 else np.int64
        read = np.asarray(read_tensor, dtype=int_type)
        write = np.asarray(write_tensor, dtype=int_type)
        del read_tensor, write_tensor
        read_offsets, write_offsets = np.asarray(read_offsets, dtype=int_type), np.asarray(write_offsets, dtype=int_type)
        read_pos = np.repeat(np.arange(n_nodes, dtype=int_type), np.diff(read_offsets))
        write_pos = np.repeat(np.arange(n_nodes, dtype=int_type), np.diff(write_offsets))
        producer = np.full(len(names), -1, dtype=int_type)
        producer[write] = write_pos  # a tensor written twice is refused before the tables are used
        reader_pos = read_pos[np.argsort(read, kind="stable")]  # read slots are in ascending position
        reader_offsets = np.zeros(len(names) + 1, dtype=int_type)
        np.cumsum(np.bincount(read, minlength=len(names)), out=reader_offsets[1:])
        last_reader = np.full(len(names), -1, dtype=int_type)
        has_readers = reader_offsets[1:] > reader_offsets[:-1]
        last_reader[has_readers] = reader_pos[reader_offsets[1:][has_readers] - 1]
        write_last = last_reader[write]
        leaves_at = write_last.copy()
        wanted = set(graph_outputs)
        leaves_at[np.isin(write, [i for i, name in enumerate(names) if name in wanted])] = n_nodes
        by_rank = np.array(sorted(range(len(names)), key=names.__getitem__), dtype=int_type)
        rank = np.empty(len(names), dtype=int_type)
        rank[by_rank] = np.arange(len(names), dtype=int_type)
        return cls(names, rank, node_names,
                   np.array([producer[i] < 0 and n in initializers for i, n in enumerate(names)], dtype=bool),
                   read_offsets, read, producer[read], write_offsets, write, producer[write], write_last, leaves_at,
                   reader_offsets, reader_pos, [names[i] for i in by_rank.tolist()], by_rank)

    def id_of(self, name: str) -> int:
        """The tensor id of ``name``, -1 when no node reads or writes it."""
        k = bisect_left(self.sorted_names, name)
        return int(self.ids_by_rank[k]) if k < len(self.sorted_names) and self.sorted_names[k] == name else -1

    def ids_of(self, names: list[str]) -> np.ndarray:
        """:meth:`id_of` of each of ``names``, as one array."""
        if not names or not self.sorted_names:
            return np.full(len(names), -1, dtype=np.int64)
        ordered = np.empty(len(self.sorted_names), dtype=object)
        ordered[:] = self.sorted_names
        query = np.empty(len(names), dtype=object)
        query[:] = names
        k = np.minimum(np.searchsorted(ordered, query), len(ordered) - 1)
        return np.where(ordered[k] == query, self.ids_by_rank[k], -1).astype(np.int64)

    def sorted_and_defined(self, available: set[str]) -> bool:
        """Every tensor written once, by a node only, and every read of an earlier node's
        output or of ``available`` (graph inputs, initializers): the stored order is topological."""
        write = self.write_tensor
        if len(np.unique(write)) != len(write):
            return False
        names = self.tensor_names
        if any(names[i] in available for i in write.tolist()):
            return False
        read_pos = np.repeat(np.arange(len(self.node_names), dtype=self.read_offsets.dtype), np.diff(self.read_offsets))
        if np.any(self.read_producer >= read_pos):
            return False
        unproduced = np.unique(self.read_tensor[self.read_producer < 0]).tolist()
        return all(names[i] in available for i in unproduced)

    def node_inputs(self) -> list[tuple[str, ...]]:
        names, read, offsets = self.tensor_names, self.read_tensor.tolist(), self.read_offsets.tolist()
        return [tuple(names[i] for i in read[a:b]) for a, b in itertools.pairwise(offsets)]

    def readers(self, tensor: int) -> np.ndarray:
        """Positions reading tensor id ``tensor``, ascending."""
        return self.reader_pos[self.reader_offsets[tensor]:self.reader_offsets[tensor + 1]]

    def last_reader_before(self, slots: np.ndarray, stop: int) -> np.ndarray:
        """Per write slot: the last position < ``stop`` that reads its tensor, or -1."""
        last = self.write_last_reader[slots].copy()
        for k in np.flatnonzero(last >= stop).tolist():  # only tensors still read after ``stop``
            readers = self.readers(int(self.write_tensor[slots[k]]))
            j = int(np.searchsorted(readers, stop))
            last[k] = readers[j - 1] if j else -1
        return last


class ByName(MutableMapping):
    """Name -> proto over repeated fields of a graph, as a dict built from them would map
    (a later entry wins; iteration in order of first appearance), but with views made on
    access like :class:`NodeOrder`, and positions kept per tensor id of the tables (a few
    bytes each, where a dict entry with a held protobuf wrapper costs ~150); names the
    tables do not know are kept in a small dict. Protos set later are held."""

    __slots__ = ("_added", "_count", "_fields", "_first", "_last", "_other", "_tables")

    def __init__(self, fields: tuple, tables: RangeTables) -> None:
        self._fields, self._tables = fields, tables
        code_type = np.int32 if max(map(len, fields), default=0) < 2**29 else np.int64
        self._last = np.full(len(tables.tensor_names), -1, dtype=code_type)  # position << 2 | field
        self._first = np.full(len(tables.tensor_names), -1, dtype=code_type)
        self._other: dict[str, list[int]] = {}  # name -> [first, last] code
        self._added: dict[str, object] = {}
        for f, entries in enumerate(fields):
            names = [entry.name for entry in entries]
            for position, (name, i) in enumerate(zip(names, tables.ids_of(names).tolist())):
                code = position << 2 | f
                if i < 0:
                    self._other.setdefault(name, [code, code])[1] = code
                    continue
                if self._first[i] < 0:
                    self._first[i] = code
                self._last[i] = code
        self._count = int(np.count_nonzero(self._last >= 0)) + len(self._other)

    def _code(self, name: str) -> int:
        i = self._tables.id_of(name)
        if i >= 0:
            return int(self._last[i])
        return self._other[name][1] if name in self._other else -1

    def __getitem__(self, name: str):
        added = self._added.get(name)
        if added is not None:
            return added
        code = self._code(name)
        if code < 0:
            raise KeyError(name)
        return self._fields[code & 3][code >> 2]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._added or self._code(name) >= 0)

    def __setitem__(self, name: str, value) -> None:
        if name not in self:
            self._count += 1
        self._added[name] = value

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._added.pop(name, None)
        i = self._tables.id_of(name)
        if i >= 0:
            self._first[i] = self._last[i] = -1
        else:
            self._other.pop(name, None)
        self._count -= 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        known = np.flatnonzero(self._first >= 0)
        names = self._tables.tensor_names
        firsts = [(code & 3, code >> 2, names[i]) for i, code in zip(known.tolist(), self._first[known].tolist())]
        firsts += [(code & 3, code >> 2, name) for name, (code, _) in self._other.items()]
        firsts.sort()
        for *_, name in firsts:
            yield name
        yield from (name for name in list(self._added) if self._code(name) < 0)  # set, not in the fields

    def by_ids(self, ids) -> Iterator:
        """``self[tensor_names[i]]`` for each tensor id of ``ids``."""
        names, added, fields = self._tables.tensor_names, self._added, self._fields
        ids = list(ids)
        for i, code in zip(ids, self._last[ids].tolist() if ids else ()):
            value = added.get(names[i]) if added else None
            if value is None:
                if code < 0:
                    raise KeyError(names[i])
                value = fields[code & 3][code >> 2]
            yield value


class NodeOrder(Sequence):
    """A graph's nodes in topological order, as read-only views made on access.

    Not a list of the nodes: a protobuf wrapper held for each of 100,000 nodes costs
    ~100 bytes, and ~350 more once an empty repeated field (``attribute``) is read.
    """

    __slots__ = ("_nodes", "_order")

    def __init__(self, nodes, order: list[int] | None = None) -> None:
        self._nodes = nodes  # the graph's repeated node field
        self._order = None if order is None else np.asarray(order, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._nodes)

    def __getitem__(self, item):
        if isinstance(item, slice):
            if self._order is None:
                return [self._nodes[i] for i in range(*item.indices(len(self._nodes)))]
            return [self._nodes[i] for i in self._order[item].tolist()]
        return self._nodes[item] if self._order is None else self._nodes[int(self._order[item])]

    def __iter__(self):
        if self._order is None:
            return iter(self._nodes)
        return (self._nodes[i] for i in self._order.tolist())

    def span(self, start: int, stop: int) -> Iterator[onnx.NodeProto]:
        """The nodes at positions [start, stop), one at a time."""
        nodes = self._nodes
        positions = range(start, stop) if self._order is None else self._order[start:stop].tolist()
        return (nodes[i] for i in positions)


def has_type(vi: onnx.ValueInfoProto | None) -> bool:
    """A usable boundary type: known element type and (for tensors) a known rank."""
    if vi is None or vi.type.WhichOneof("value") is None:
        return False
    if vi.type.HasField("tensor_type"):
        return vi.type.tensor_type.elem_type != 0 and vi.type.tensor_type.HasField("shape")
    return True


def sort_topologically(graph: onnx.GraphProto) -> bool:
    """Reorder ``graph.node`` topologically (stable); True when the order changed.

    Raises ModelError naming the node for cycles and reads of undefined tensors.
    """
    nodes = graph.node  # not list(): held wrappers cost memory (see NodeOrder)
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
                raise ModelError(f"tensor '{out}' is produced by two nodes "
                                 f"('{nodes[producer[out]].name}' and '{node.name}')")
            if out in available:
                raise ModelError(f"tensor '{out}' is both a graph input/initializer and the output of node "
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
                    raise ModelError(f"node '{nodes[i].name}' ({nodes[i].op_type}) reads tensor '{name}', "
                                     "which no node, input or initializer defines")
                continue
            if p == i:
                raise ModelError(f"node '{nodes[i].name}' reads its own output '{name}' (a cycle)")
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
        raise ModelError(f"the graph has a cycle (node '{stuck}' can never run)")
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
