"""A small mutable view of one model's main graph, for passes that rewrite protos.

The editor owns a private copy of the model (the pass framework copies first). It
answers the questions every rewrite rule asks (who produces / consumes a tensor, is it
a constant, what is its static shape) and does the edits every rule needs (new nodes
stamped with the pass name, new initializers, rewiring uses, removing nodes), then
:meth:`commit` writes the nodes back in topological order.
"""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections import defaultdict, deque
from collections.abc import Iterable
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from adaptopt.graph.external import raw_bytes
from adaptopt.graph.index import overridable_initializers, subgraph_outer_inputs
from adaptopt.passes.base import Applicability, Pass, PassContext, no, yes

GRAPH_ATTRS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in GRAPH_ATTRS for a in node.attribute)


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def is_op(node: onnx.NodeProto | None, op: str | tuple[str, ...]) -> bool:
    """``node`` exists and is the default-domain operator ``op`` (or one of them)."""
    ops = (op,) if isinstance(op, str) else op
    return node is not None and node.op_type in ops and node.domain in ("", "ai.onnx")


def split_const(ed: "GraphEditor", node: onnx.NodeProto) -> tuple[str, np.ndarray] | None:
    """(data input, constant) of a binary Mul/Add/Sub/Div with one constant operand, the
    constant as the affine term: ``-c`` for ``x - c``, ``1/c`` for ``x / c`` (so every
    match is ``x * v`` or ``x + v``); None for ``c - x``, ``c / x`` or a division by zero."""
    if not is_op(node, ("Mul", "Add", "Sub", "Div")) or len(node.input) != 2:
        return None
    a, b = ed.const(node.input[0]), ed.const(node.input[1])
    if (a is None) == (b is None):
        return None
    if a is not None and node.op_type in ("Sub", "Div"):
        return None  # c - x and c / x are not affine in x
    value = b if b is not None else a
    if node.op_type == "Div" and not np.all(value):
        return None
    value = -value if node.op_type == "Sub" else (1.0 / value if node.op_type == "Div" else value)
    return (node.input[0] if b is not None else node.input[1]), value.astype(np.float32)


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node (any of its attribute forms)."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), np.float32)
        if a.name == "value_int":
            return np.array(a.i, np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), np.int64)
    return None  # sparse / string constants are left alone


def initializer_value(tensor: onnx.TensorProto) -> np.ndarray | None:
    """An initializer's value, read from its file when its weights are kept on disk (models
    of 2 GiB or more); None when its bytes are not at hand."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    data = raw_bytes(tensor)
    if data is None or tensor.data_type in (onnx.TensorProto.BFLOAT16, onnx.TensorProto.STRING):
        return None
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.dims))


class GraphEditor:
    """Edits one graph in place; ``pass_name`` prefixes every node it creates."""

    def __init__(self, model: onnx.ModelProto, pass_name: str):
        self.model = model
        self.graph = model.graph
        self.pass_name = pass_name
        self.nodes: list[onnx.NodeProto] = list(self.graph.node)
        self.inits: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self.graph_inputs = [i.name for i in self.graph.input if i.name not in self.inits]
        # weights the user may feed (see overridable_initializers): never constants here, and
        # kept with their graph input by commit, so no rewrite can bake their value in
        self.overridable = overridable_initializers(model)
        self.graph_outputs = [o.name for o in self.graph.output]
        self._output_set = set(self.graph_outputs)
        self.value_info = {vi.name: vi for vi in list(self.graph.input) + list(self.graph.value_info)
                           + list(self.graph.output)}
        self._taken = set(self.inits) | set(self.value_info) | {n.name for n in self.nodes}
        self._taken.update(t for n in self.nodes for t in itertools.chain(n.input, n.output))
        self._counter = itertools.count()
        self._index: tuple[dict, dict] | None = None
        self._alive: set[int] | None = None
        self._const_cache: dict[str, np.ndarray | None] = {}

    # ---------------------------------------------------------------- queries
    def _build_index(self) -> tuple[dict, dict]:
        if self._index is None:
            producer: dict[str, onnx.NodeProto] = {}
            consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
            for node in self.nodes:
                for out in node.output:
                    if out:
                        producer[out] = node
                names = list(node.input) + (subgraph_outer_inputs(node) if has_subgraph(node) else [])
                for name in dict.fromkeys(n for n in names if n):
                    consumers[name].append(node)
            self._index = (producer, consumers)
        return self._index

    def touch(self) -> None:
        """Forget the producer/consumer index after direct edits of node inputs/outputs."""
        self._index = None
        self._alive = None
        self._const_cache.clear()

    def alive(self, node: onnx.NodeProto | None) -> bool:
        """Is this very node object (not an equal one) still in the graph?"""
        if self._alive is None:
            self._alive = {id(n) for n in self.nodes}
        return node is not None and id(node) in self._alive

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._build_index()[0].get(name)

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return list(self._build_index()[1].get(name, ()))

    def is_output(self, name: str) -> bool:
        return name in self._output_set

    def is_boundary(self, name: str) -> bool:
        """A graph output, a graph input, or an overridable initializer (an input with a default)."""
        return name in self._output_set or name in self.graph_inputs or name in self.overridable

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        """The only reader of ``name`` when it is not also a graph output."""
        users = self.consumers(name)
        return users[0] if len(users) == 1 and not self.is_output(name) else None

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or ``Constant`` output; None when not constant,
        including for an overridable initializer (its value is only a default the user
        may replace by feeding it, so no rule may fold, fuse or compare it)."""
        if not name:
            return None
        if name not in self._const_cache:
            value = None
            if name in self.inits:
                if name not in self.overridable:
                    value = initializer_value(self.inits[name])
            else:
                node = self.producer(name)
                if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                    value = constant_node_value(node)
            self._const_cache[name] = value
        return self._const_cache[name]

    def is_const(self, name: str) -> bool:
        return self.const(name) is not None

    def _dims(self, name: str) -> tuple[int | None, ...] | None:
        """Each dim from constants or value infos (None: symbolic or unknown); None when the rank is unknown."""
        value = self.const(name)
        if value is not None:
            return tuple(value.shape)
        vi = self.value_info.get(name)
        if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            return None
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Static shape from value infos or constants; None when any dim is unknown."""
        dims = self._dims(name)
        return None if dims is None or None in dims else dims

    def rank(self, name: str) -> int | None:
        """Rank from value infos or constants (dims may be symbolic); None when unknown."""
        dims = self._dims(name)
        return None if dims is None else len(dims)

    def elem_type(self, name: str) -> int | None:
        value = self.const(name)
        if value is not None:
            return helper.np_dtype_to_tensor_dtype(value.dtype)
        vi = self.value_info.get(name)
        if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.elem_type:
            return None
        return vi.type.tensor_type.elem_type

    def forget_type(self, name: str) -> None:
        """Drop a stale value info after a rewrite changed the tensor's shape or type."""
        if name not in self._output_set and name not in self.graph_inputs:
            self.value_info.pop(name, None)

    # ---------------------------------------------------------------- edits
    def fresh(self, base: str) -> str:
        """A tensor or node name not used anywhere in the graph."""
        base = f"{self.pass_name}/{base.split('/')[-1]}"
        while True:
            candidate = f"{base}_{next(self._counter)}"
            if candidate not in self._taken:
                self._taken.add(candidate)
                return candidate

    def add_const(self, array: np.ndarray, base: str = "const") -> str:
        name = self.fresh(base)
        self.inits[name] = numpy_helper.from_array(np.asarray(array), name)
        self._const_cache[name] = np.asarray(array)
        return name

    def private_const(self, node: onnx.NodeProto, slot: int, array: np.ndarray, base: str) -> None:
        """Give ``node`` input ``slot`` a new constant value (a fresh initializer, so other
        readers of the old one are unaffected)."""
        node.input[slot] = self.add_const(array, base)
        self.touch()

    def add_node(self, op_type: str, inputs: Iterable[str], outputs: Iterable[str] | int = 1,
                 domain: str = "", base: str | None = None, **attrs) -> onnx.NodeProto:
        outs = [self.fresh(f"{(base or op_type)}_out") for _ in range(outputs)] if isinstance(outputs, int) \
            else list(outputs)
        node = helper.make_node(op_type, list(inputs), outs, name=self.fresh(base or op_type), domain=domain or None,
                                **attrs)
        if not domain:
            node.ClearField("domain")
        self.nodes.append(node)
        self.touch()
        return node

    def remove(self, *nodes: onnx.NodeProto) -> None:
        ids = {id(n) for n in nodes}
        self.nodes = [n for n in self.nodes if id(n) not in ids]
        for node in nodes:
            for out in node.output:
                self.forget_type(out)
        self.touch()

    def replace_uses(self, old: str, new: str) -> None:
        """Make every reader of ``old`` read ``new`` (graph outputs are not readers)."""
        for node in self.consumers(old):
            _rename_inputs(node, {old: new})
        self.touch()

    def bypass(self, node: onnx.NodeProto, keep: str, drop: str) -> bool:
        """Remove ``node`` whose output ``drop`` equals its input ``keep``.

        When ``drop`` is a graph output its name must survive: the producer of ``keep``
        is renamed to output ``drop`` instead, if ``keep`` is nobody else's concern
        (not a boundary tensor or constant). Returns False when that is impossible.
        """
        if not self.is_output(drop):
            self.remove(node)
            self.replace_uses(drop, keep)
            return True
        source = self.producer(keep)
        if (source is None or self.is_boundary(keep) or keep in self.inits
                or source.op_type == "Constant"):
            return False
        self.remove(node)
        for i, out in enumerate(source.output):
            if out == keep:
                source.output[i] = drop
        self.touch()
        self.replace_uses(keep, drop)
        self.forget_type(keep)
        return True

    # ---------------------------------------------------------------- commit
    def used_names(self) -> set[str]:
        used = set(self.graph_outputs)
        for node in self.nodes:
            used.update(node.input)
            if has_subgraph(node):
                used.update(subgraph_outer_inputs(node))
        for info in self.model.training_info:
            for g in (info.algorithm, info.initialization):
                used.update(t for n in g.node for t in n.input)
            used.update(b.key for b in list(info.update_binding) + list(info.initialization_binding))
        return used

    def commit(self) -> onnx.ModelProto:
        """Write nodes (topologically sorted), used initializers and live value infos back."""
        ordered = toposort(self.nodes, set(self.graph_inputs) | set(self.inits))
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        used = self.used_names()
        keep = [t for name, t in self.inits.items() if name in used or name in {i.name for i in self.graph.input}]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        produced = {o for n in ordered for o in n.output}
        infos = [vi for name, vi in self.value_info.items() if name in produced and not self.is_output(name)
                 and name not in self.graph_inputs]
        del self.graph.value_info[:]
        self.graph.value_info.extend(infos)
        return self.model


def _rename_inputs(node: onnx.NodeProto, mapping: dict[str, str]) -> None:
    for i, name in enumerate(node.input):
        if name in mapping:
            node.input[i] = mapping[name]
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) \
            if a.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            defined = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
            inner = {k: v for k, v in mapping.items() if k not in defined}
            if inner:
                for n in g.node:
                    _rename_inputs(n, inner)
                for o in g.output:
                    if o.name in inner:
                        o.name = inner[o.name]


def toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's algorithm, stable with respect to the given order (outer-scope reads count)."""
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    deps: list[set[int]] = []
    dependents: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        names = list(node.input) + (subgraph_outer_inputs(node) if has_subgraph(node) else [])
        mine = {producer[n] for n in names if n and n in producer and producer[n] != i}
        deps.append(mine)
        for p in mine:
            dependents[p].append(i)
    indegree = [len(d) for d in deps]
    ready = deque(i for i, d in enumerate(indegree) if d == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for j in sorted(dependents[i]):
            indegree[j] -= 1
            if indegree[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):
        raise RuntimeError("rewritten graph has a cycle")
    return [nodes[i] for i in order]


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn ``Constant`` nodes (not graph outputs) into initializers of the same name, for
    tools that only recognise weights stored as initializers; returns how many."""
    ed = GraphEditor(model, "constants")
    count = 0
    for node in list(ed.nodes):
        value = ed.const(node.output[0]) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if value is not None and not ed.is_output(node.output[0]):
            ed.remove(node)
            ed.inits[node.output[0]] = numpy_helper.from_array(value, node.output[0])
            count += 1
    if count:
        ed.commit()
    return count


def rewrite_until_stable(ed: "GraphEditor", rule) -> int:
    """Apply ``rule(node) -> bool`` (True: it rewrote) to every live node, sweep after sweep,
    until a sweep rewrites nothing; return the number of rewrites."""
    count, changed = 0, True
    while changed:
        changed = False
        for node in list(ed.nodes):
            if ed.alive(node) and rule(node):
                count += 1
                changed = True
    return count


class RulePass(Pass):
    """A pass written as rewrite rules over a :class:`GraphEditor`.

    Subclasses implement :meth:`rewrite`, returning the number of rewrites made;
    :meth:`check` runs the same rules on a throwaway copy, so "applies" and "apply"
    can never disagree. ``no_match`` is the reason given when nothing matched.
    """

    no_match: ClassVar[str] = "no matching pattern"

    @abstractmethod
    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        """Apply the rules to ``ed`` and return how many rewrites were made."""

    def target_reason(self, model: onnx.ModelProto, ctx: PassContext) -> str:
        """Why the target cannot use this pass's output ("" when it can)."""
        return ""

    def check(self, model: onnx.ModelProto, ctx: PassContext) -> Applicability:
        reason = self.target_reason(model, ctx)
        if reason:
            return no(reason)
        work = onnx.ModelProto()
        work.CopyFrom(model)
        count = self.rewrite(GraphEditor(work, self.name), ctx)
        return yes(f"{count} rewrite(s)") if count else no(self.no_match)

    def transform(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict]:
        ed = GraphEditor(model, self.name)
        count = self.rewrite(ed, ctx)
        if not count:
            return model, {"rewrites": 0, "reason": self.no_match}
        return ed.commit(), {"rewrites": count}
