"""Prefetching (memory, exact): weights stored the way the kernels read them.

``prefetch_weights``: ``Transpose/Reshape/Cast/Squeeze/Unsqueeze/Flatten/Identity`` of
constant weights are computed now (numpy) and stored as new initializers; ``Constant``
nodes become initializers; ``Gemm`` with ``transB = 1`` and a constant ``B`` gets ``B``
stored pre-transposed (``transB = 0``). Nothing of this is left for session creation
(constant folding at load) or for the run.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from adaptopt.passes.base import PassContext
from adaptopt.passes.edit import GraphEditor, RulePass, attr, set_attr

_FLOATS = (np.float16, np.float32, np.float64)


def _axes(ed: GraphEditor, node: onnx.NodeProto) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        value = ed.const(node.input[1])
        return None if value is None else value.reshape(-1).tolist()
    return attr(node, "axes", None)


def weight_transform(ed: GraphEditor, node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a layout/dtype op applied to a constant, or None when not one."""
    x = ed.const(node.input[0]) if node.input and node.domain in ("", "ai.onnx") else None
    if x is None or x.dtype == object:
        return None
    op = node.op_type
    if op == "Identity":
        return x
    if op == "Transpose":
        return np.transpose(x, attr(node, "perm", None))
    if op == "Cast":
        to = helper.tensor_dtype_to_np_dtype(attr(node, "to"))
        return x.astype(to) if x.dtype in _FLOATS and to in _FLOATS else None
    if op == "Flatten":
        axis = attr(node, "axis", 1) % max(x.ndim, 1) if x.ndim else 0
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op == "Reshape":
        shape = ed.const(node.input[1])
        if shape is None:
            return None
        dims = [x.shape[i] if d == 0 and not attr(node, "allowzero", 0) else d for i, d in enumerate(shape.tolist())]
        return x.reshape(dims)
    if op in ("Squeeze", "Unsqueeze"):
        axes = _axes(ed, node)
        if op == "Squeeze":
            return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(axes))
        if axes is None:
            return None
        rank = x.ndim + len(axes)
        return np.expand_dims(x, tuple(sorted(a % rank for a in axes)))
    return None


class PrefetchWeightsPass(RulePass):
    name = "prefetch_weights"
    category = "memory"
    guarantee = "exact"
    description = "Store weights pre-transformed (Transpose/Reshape/Cast of constants, Gemm transB) and Constant->initializer"
    no_match: ClassVar[str] = "no weight transform, Constant node or transposed Gemm weight to precompute"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        count = 0
        for node in list(ed.nodes):
            if node.op_type == "Gemm" and attr(node, "transB", 0) and ed.is_const(node.input[1]):
                ed.private_const(node, 1, np.ascontiguousarray(ed.const(node.input[1]).T), "gemm_weight_t")
                set_attr(node, "transB", 0)
                count += 1
                continue
            if any(ed.is_output(o) for o in node.output):
                continue  # a graph output must stay a node's output
            value = ed.const(node.output[0]) if node.op_type == "Constant" else weight_transform(ed, node)
            if value is not None:
                ed.remove(node)
                # np.ascontiguousarray would turn a 0-d scalar into shape (1,)
                ed.inits[node.output[0]] = numpy_helper.from_array(np.asarray(value, order="C"), node.output[0])
                ed.touch()
                count += 1
        return count
