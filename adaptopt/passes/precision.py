"""Mixed precision (hybrid, lossy): fp16 compute with fp32 islands.

``mixed_precision_fp16`` converts float32 weights and ops to float16 with
``onnxruntime.transformers.float16`` and keeps numerically sensitive ops in float32
(softmax, normalizations, reductions, exp/log/pow/sqrt...), with Casts at the island
edges. Boundary tensors keep their float32 type: Casts sit just inside the graph inputs
and outputs, so a subgraph stays mergeable with its float32 neighbours. It applies where
the target has a GPU provider; on ONNX Runtime's CPU provider float16 measured slower
than float32 even on an AVX512-FP16 CPU, so there it reports itself not applicable.
"""

from __future__ import annotations

import onnx

from adaptopt.graph.index import overridable_initializers
from adaptopt.passes.base import (
    Applicability,
    Pass,
    PassContext,
    detach_overridable,
    no,
    ort_tool,
    reattach_overridable,
    yes,
)
from adaptopt.passes.measure import budget_reason

SENSITIVE_OPS = ("Softmax", "LogSoftmax", "LayerNormalization", "SkipLayerNormalization",
                 "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization",
                 "BatchNormalization", "InstanceNormalization", "GroupNormalization", "ReduceMean", "ReduceSum",
                 "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceProd", "Exp", "Log", "Pow", "Sqrt",
                 "Reciprocal")
FP16_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider",
                  "DmlExecutionProvider", "CoreMLExecutionProvider")


class MixedPrecisionPass(Pass):
    name = "mixed_precision_fp16"
    category = "hybrid"
    guarantee = "lossy"
    description = "float16 compute with float32 islands for sensitive ops; boundary dtypes unchanged"

    def check(self, model: onnx.ModelProto, ctx: PassContext) -> Applicability:
        eps = ctx.target.execution_providers
        if not any(p in FP16_PROVIDERS for p in eps):
            return no("no GPU provider in the target: ONNX Runtime's CPU float16 kernels were measured slower "
                      "than float32 (BERT-style and ResNet examples, AVX512-FP16 CPU)")
        overridable = overridable_initializers(model)  # those stay float32 inputs (see transform)
        floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                  and t.name not in overridable]
        compute = [n for n in model.graph.node if n.op_type not in SENSITIVE_OPS]
        if not floats or not compute:
            return no("no float32 weights feeding ops that are safe in float16")
        return yes(f"{len(floats)} float32 weights")

    def transform(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict]:
        from onnxruntime.transformers.float16 import (
            DEFAULT_OP_BLOCK_LIST,
            convert_float_to_float16,
        )
        before = sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
        source = onnx.ModelProto()
        source.CopyFrom(model)
        overridable = detach_overridable(source)  # a weight the user may feed stays a float32 input
        with ort_tool():
            result = convert_float_to_float16(source, keep_io_types=True,
                                              op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(SENSITIVE_OPS))
        result = reattach_overridable(result, overridable)
        after = sum(1 for t in result.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
        casts = sum(1 for n in result.graph.node if n.op_type == "Cast") - \
            sum(1 for n in model.graph.node if n.op_type == "Cast")
        reason = budget_reason(model, result, ctx) if before > after else "no float32 weight was converted"
        if reason:
            return model, {"rewrites": 0, "reason": reason}
        return result, {"rewrites": before - after, "casts_added": casts}
