"""Shape arithmetic on dynamic dims (memory, exact).

- ``share_input_dims``: ``Gather(Shape(t), i)`` where dim ``i`` of ``t`` is a symbolic dim
  of a graph input (ONNX Runtime's symbolic shape inference says so; equal names are equal
  sizes) -> the same ``Gather`` of that input's ``Shape``; the copies, and the
  ``Unsqueeze`` / ``Concat`` / arithmetic built on them, then merge into one (this pass
  runs ``eliminate_common_subexpressions`` after its own rewrites); a ``Gather`` of dims
  that are static there (head counts and sizes) -> a constant. Exporters
  compute the batch and sequence lengths again from every tensor they reshape, and
  ONNX Runtime keeps them all when those dims are dynamic: llama-tiny still ran 80
  ``Unsqueeze``, 50 ``Gather``, 30 ``Concat`` and 23 ``Shape`` nodes a call (about 15% of
  its time) after ORT_ENABLE_ALL and the other exact passes.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx

from adaptopt.passes.base import PassContext
from adaptopt.passes.cleanup import CommonSubexpressionPass
from adaptopt.passes.edit import GraphEditor, RulePass, attr, is_op
from adaptopt.passes.prune import remove_dead_nodes
from adaptopt.passes.symbolic import Dims, SymbolicShapes


class ShareInputDimsPass(RulePass):
    name = "share_input_dims"
    category = "memory"
    guarantee = "exact"
    description = ("Gather(Shape(t), i) of a graph input's symbolic dim -> one Gather of that input's Shape, merged; "
                   "of a static dim -> a constant")
    no_match: ClassVar[str] = "no Gather of a Shape reading a static dim, or a graph input's symbolic dim from another tensor"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        gathers = [n for n in ed.nodes if is_op(n, "Gather") and is_op(ed.producer(n.input[0]), "Shape")]
        if not gathers:
            return 0
        shapes = SymbolicShapes(ed, auto_merge=False)  # only dims the graph makes equal, none assumed
        sources = _symbol_sources(ed, shapes)
        shared: dict[str, str] = {}  # graph input -> the output of its one Shape
        count = 0
        for gather in gathers:
            static = self._static(ed, shapes, gather)
            if static is not None and not ed.is_output(gather.output[0]):
                ed.replace_uses(gather.output[0], ed.add_const(static, "static_dim"))
                ed.remove(gather)
                count += 1
                continue
            target = self._source(ed, shapes, sources, gather)
            if target is None:
                continue
            source, indices = target
            if source not in shared:
                shared[source] = _plain_shape_of(ed, source)
            if gather.input[0] == shared[source] and np.array_equal(ed.const(gather.input[1]), indices):
                continue
            gather.input[0] = shared[source]
            ed.private_const(gather, 1, indices, "input_dim")
            count += 1
        if count:
            CommonSubexpressionPass().rewrite(ed, ctx)
            remove_dead_nodes(ed)  # the Shapes whose dims are now read from the input
        return count

    @staticmethod
    def _static(ed: GraphEditor, shapes: SymbolicShapes, gather: onnx.NodeProto) -> np.ndarray | None:
        """The value of a Gather that reads only static dims, or None."""
        dims, index = _gathered(ed, shapes, gather)
        if dims is None or not all(isinstance(dims[i], int) for i in index.reshape(-1).tolist()):
            return None
        return np.array([dims[i] for i in index.reshape(-1).tolist()], np.int64).reshape(index.shape)

    @staticmethod
    def _source(ed: GraphEditor, shapes: SymbolicShapes, sources: dict[str, tuple[str, int]],
                gather: onnx.NodeProto) -> tuple[str, np.ndarray] | None:
        """(graph input, its indices) holding the dims this Gather reads, or None."""
        dims, index = _gathered(ed, shapes, gather)
        if dims is None:
            return None
        picked = []
        for i in index.reshape(-1).tolist():
            if not isinstance(dims[i], str) or dims[i] not in sources:
                return None
            picked.append(sources[dims[i]])
        if len({source for source, _ in picked}) != 1:
            return None
        return picked[0][0], np.array([axis for _, axis in picked], np.int64).reshape(index.shape)


def _symbol_sources(ed: GraphEditor, shapes: SymbolicShapes) -> dict[str, tuple[str, int]]:
    """Each symbolic dim of the graph's inputs -> the first input and axis carrying it."""
    sources: dict[str, tuple[str, int]] = {}
    for name in ed.graph_inputs:
        for axis, dim in enumerate(shapes(name) or ()):
            if isinstance(dim, str) and dim:
                sources.setdefault(dim, (name, axis))
    return sources


def _gathered(ed: GraphEditor, shapes: SymbolicShapes, gather: onnx.NodeProto) -> tuple[Dims | None, np.ndarray]:
    """(the dims of the Shape a Gather reads, its constant indices) or (None, _) when the
    Gather is not a plain lookup of known dims."""
    shape = ed.producer(gather.input[0])
    index = ed.const(gather.input[1])
    dims = _shape_dims(shape, shapes(shape.input[0]))
    if (attr(gather, "axis", 0) != 0 or index is None or index.ndim > 1 or dims is None
            or index.dtype.kind not in "iu" or not all(-len(dims) <= i < len(dims) for i in index.reshape(-1).tolist())):
        return None, np.zeros(0, np.int64)
    return dims, index


def _shape_dims(shape: onnx.NodeProto, dims: Dims | None) -> Dims | None:
    """The dims a Shape node outputs (its ``start`` / ``end`` applied)."""
    if dims is None:
        return None
    start, end = attr(shape, "start", 0), attr(shape, "end", len(dims))
    return tuple(dims[slice(start, end)])


def _plain_shape_of(ed: GraphEditor, name: str) -> str:
    """The output of a ``Shape(name)`` without start / end: an existing one, or a new one."""
    for node in ed.consumers(name):
        if is_op(node, "Shape") and not node.attribute:
            return node.output[0]
    return ed.add_node("Shape", [name], base="input_shape").output[0]
