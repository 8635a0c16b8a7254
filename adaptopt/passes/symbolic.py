"""Tensor shapes with symbolic dims, for passes that match on batch and sequence lengths."""

from __future__ import annotations

import onnx

from adaptopt.passes.base import TWO_GIB, ort_tool
from adaptopt.passes.edit import GraphEditor
from adaptopt.passes.transformer import TOOL_ERRORS

Dims = tuple  # of int (static) or str (a symbolic dim: equal names are equal sizes)


class SymbolicShapes:
    """Tensor shapes for the matcher, symbolic dims included: heads and head sizes must be
    static, batch and sequence lengths may be names. They come from ONNX Runtime's
    symbolic shape inference (ONNX's own loses the batch and head dims exporters compute
    with Shape/Gather/Concat) on a copy, else from the graph's value infos.

    ``auto_merge``: where a broadcast needs two symbolic dims to be equal, the inference
    makes them one (a dim that is 1 at run time would be merged wrongly); without it such
    a graph gets no inferred shapes."""

    def __init__(self, ed: GraphEditor, auto_merge: bool = True):
        self.ed = ed
        self.table: dict[str, Dims] = {}
        self.types: dict[str, int] = {}
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        if ed.model.ByteSize() >= TWO_GIB:
            return
        try:
            with ort_tool():
                inferred = SymbolicShapeInference.infer_shapes(ed.model, auto_merge=auto_merge)
        except (*TOOL_ERRORS, Exception):  # noqa: BLE001 - see below
            # the value infos alone; shapes they lack simply do not match. Besides the usual
            # tool errors, SymbolicShapeInference raises a bare Exception ("Incomplete symbolic
            # shape inference") on ops it has no rule for: FusedGemm / FusedConv, which our own
            # fuse_conv_activation emits before this pass runs
            return
        if inferred is not None:
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
                dims = dims_of(vi)
                if dims is not None:
                    self.table[vi.name] = dims
                if vi.type.tensor_type.elem_type:
                    self.types[vi.name] = vi.type.tensor_type.elem_type

    def __call__(self, name: str) -> Dims | None:
        if name in self.table:
            return self.table[name]
        value = self.ed.const(name)
        if value is not None:
            return tuple(value.shape)
        vi = self.ed.value_info.get(name)
        return dims_of(vi) if vi is not None else None

    def dtype(self, name: str) -> int | None:
        value = self.ed.const(name)
        if value is not None:
            return onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        return self.types.get(name) or self.ed.elem_type(name)

    def is_float(self, name: str) -> bool:
        return self.dtype(name) == onnx.TensorProto.FLOAT


def dims_of(vi: onnx.ValueInfoProto) -> Dims | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif d.dim_param:
            dims.append(d.dim_param)
        else:
            return None
    return tuple(dims)
