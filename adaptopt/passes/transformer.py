"""Transformer fusions through ONNX Runtime's own fusion code (compute, exact).

``fuse_attention`` runs ``onnxruntime.transformers.optimizer.optimize_model`` (BERT
fusions, heads and hidden size detected from the graph, no ORT session) on a copy:
Attention / MultiHeadAttention, SkipLayerNormalization, EmbedLayerNormalization,
BiasGelu, FastGelu and the LayerNorm/GELU patterns it knows. The result is kept only if
the boundary is untouched and some fused operator was created.
"""

from __future__ import annotations

import onnx

from adaptopt.passes.base import (
    Applicability,
    Pass,
    PassContext,
    boundary_names,
    default_opset,
    detach_overridable,
    ensure_domain,
    no,
    ort_tool,
    reattach_overridable,
    yes,
)

_FUSED = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu",
          "FastGelu", "Gelu", "LayerNormalization", "SkipSimplifiedLayerNormalization", "GroupQueryAttention")


# what ORT's fusion code raises on graphs it does not expect (its own sort, shape lookups)
TOOL_ERRORS = (RuntimeError, AssertionError, KeyError, IndexError, ValueError)


class FuseTransformerPass(Pass):
    name = "fuse_attention"
    category = "compute"
    guarantee = "exact"
    description = "Attention, SkipLayerNorm, EmbedLayerNorm, BiasGelu fusion via onnxruntime.transformers"

    def check(self, model: onnx.ModelProto, ctx: PassContext) -> Applicability:
        ops = {n.op_type for n in model.graph.node}
        if default_opset(model) < 11:
            return no(f"onnxruntime.transformers fusions need opset >= 11 (model has {default_opset(model)})")
        if "MatMul" not in ops or not ops & {"Softmax", "ReduceMean", "LayerNormalization", "Erf", "Add"}:
            return no("no transformer pattern (needs MatMul with Softmax / LayerNorm / GELU parts)")
        return yes("transformer building blocks present")

    def transform(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict]:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        before = {op: sum(1 for n in model.graph.node if n.op_type == op) for op in _FUSED}
        boundary = boundary_names(model)
        original = onnx.ModelProto()
        original.CopyFrom(model)
        overridable = detach_overridable(model)  # a weight the user may feed is an input to its fusions
        try:
            with ort_tool():
                # the optimizer edits the proto it is given in place: ``model`` is our private copy
                optimizer = optimize_model(model, model_type="bert", num_heads=0, hidden_size=0, opt_level=0,
                                           optimization_options=FusionOptions("bert"), use_gpu=False)
        except TOOL_ERRORS as exc:  # its fusions assume exporter-shaped graphs; elsewhere they can trip
            return original, {"rewrites": 0, "reason": f"onnxruntime.transformers failed: {type(exc).__name__}: "
                                                       f"{str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        result = reattach_overridable(optimizer.model, overridable)
        if boundary_names(result) != boundary:
            return original, {"rewrites": 0, "reason": "onnxruntime.transformers changed the graph boundary"}
        for domain in {n.domain for n in result.graph.node} - {"", "ai.onnx"}:
            ensure_domain(result, domain)
        try:  # it can emit ORT-only ops in the ONNX domain (LayerNormalization below opset 17, ...)
            onnx.checker.check_model(result)
        except onnx.checker.ValidationError as exc:
            line = next((ln for ln in str(exc).splitlines() if ln.strip()), "invalid model")
            return original, {"rewrites": 0, "reason": f"onnxruntime.transformers produced an invalid model: {line}"}
        fused = {op: sum(1 for n in result.graph.node if n.op_type == op) - before[op] for op in _FUSED}
        fused = {op: n for op, n in fused.items() if n > 0}
        if not fused:
            return original, {"rewrites": 0, "reason": "onnxruntime.transformers found no pattern to fuse"}
        return result, {"rewrites": sum(fused.values()), "fused": fused}
