"""Quantization (compute, lossy): through ``onnxruntime.quantization`` where it fits.

- ``quantize_dynamic_int8``: ``MatMul`` with constant weights (``Gemm`` first rewritten to
  ``MatMul + Add``) -> int8 weights, activations quantized at run time
  (``quantize_dynamic``; ConvInteger is slow on CPU, so Conv is left alone).
- ``quantize_static_qdq``: ``Conv``/``MatMul``/``Gemm`` -> QDQ int8 (u8 activations, s8
  per-channel weights) with activation ranges calibrated on ``ctx.feeds``. The ranges
  come from one run through :func:`adaptopt.runtime.make_session`; ORT's own calibrator
  opens sessions of its own, which the process-wide thread pool forbids.
- ``quantize_weights_int4``: ``MatMul`` with a large constant 2-D weight ->
  ``com.microsoft.MatMulNBits`` (4-bit blocks of 32 along K, with zero points).

Each keeps the first setting whose outputs stay within ``ctx.accuracy_budget`` on
``ctx.feeds`` (when feeds are given) and refuses otherwise.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx

from adaptopt.passes.base import (
    MS_DOMAIN,
    Applicability,
    Pass,
    PassContext,
    boundary_names,
    default_opset,
    no,
    ort_tool,
    yes,
)
from adaptopt.passes.edit import GraphEditor, attr, constants_to_initializers
from adaptopt.passes.measure import budget_reason

MIN_WEIGHT_ELEMENTS = 1 << 12


def _has_weight(ed: GraphEditor, node: onnx.NodeProto, ops: tuple[str, ...], min_elements: int = 1) -> bool:
    """A node of ``ops`` with a constant float weight (input 1) of >= 2 dims and a data input."""
    if node.op_type not in ops or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return False
    w = ed.const(node.input[1])
    return (w is not None and w.dtype == np.float32 and w.ndim >= 2 and w.size >= min_elements
            and not ed.is_const(node.input[0]))


def _weighted(model: onnx.ModelProto, ops: tuple[str, ...], min_elements: int = 1) -> list[onnx.NodeProto]:
    ed = GraphEditor(model, "probe")
    return [n for n in ed.nodes if _has_weight(ed, n, ops, min_elements)]


def _accept(original: onnx.ModelProto, result: onnx.ModelProto, count: int, ctx: PassContext
            ) -> tuple[onnx.ModelProto, dict]:
    """The quantizer's ``result`` when it quantized something, kept the opset, the boundary
    and the accuracy budget; else the original with the reason."""
    reason = "" if count else "the quantizer quantized nothing"
    if not reason and default_opset(result) != default_opset(original):
        reason = "the quantizer changed the opset"
    if not reason and boundary_names(original) != boundary_names(result):
        reason = "the quantizer renamed boundary tensors"
    reason = reason or budget_reason(original, result, ctx)
    if reason:
        return original, {"rewrites": 0, "reason": reason}
    return result, {"rewrites": count}


def _cpu_reason(ctx: PassContext, what: str) -> str:
    eps = ctx.target.execution_providers
    if "CPUExecutionProvider" not in eps and not ctx.target.allow_cpu_fallback:
        return f"{what} kernels are ONNX Runtime CPU kernels and the target has no CPU provider"
    return ""


class QuantizeDynamicPass(Pass):
    name = "quantize_dynamic_int8"
    category = "compute"
    guarantee = "lossy"
    description = "Dynamic int8 quantization of MatMul/Gemm weights (onnxruntime.quantization.quantize_dynamic)"

    def check(self, model: onnx.ModelProto, ctx: PassContext) -> Applicability:
        if default_opset(model) < 11:
            return no(f"dynamic quantization needs opset >= 11 (model has {default_opset(model)})")
        reason = _cpu_reason(ctx, "DynamicQuantizeMatMul")
        if reason:
            return no(reason)
        found = _weighted(model, ("MatMul", "Gemm"))
        return yes(f"{len(found)} MatMul/Gemm with constant weights") if found else \
            no("no MatMul/Gemm with constant float weights")

    def transform(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict]:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        original = onnx.ModelProto()
        original.CopyFrom(model)
        constants_to_initializers(model)  # the quantizer only sees weights stored as initializers
        _gemm_to_matmul(model)
        with tempfile.TemporaryDirectory(prefix="adaptopt-q-") as tmp, ort_tool():
            out = Path(tmp) / "quantized.onnx"
            quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             extra_options={"MatMulConstBOnly": True})
            result = onnx.load(str(out))
        count = sum(1 for n in result.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))
        return _accept(original, result, count, ctx)


def _gemm_to_matmul(model: onnx.ModelProto) -> None:
    """Gemm(A, B, C) with constant B, no transA, alpha 1 -> MatMul(A, B') + Add(C*beta)."""
    ed = GraphEditor(model, "quantize_dynamic_int8")
    for gemm in list(ed.nodes):
        b = ed.const(gemm.input[1]) if gemm.op_type == "Gemm" and len(gemm.input) > 1 else None
        if b is None or attr(gemm, "transA", 0) or attr(gemm, "alpha", 1.0) != 1.0 or ed.is_const(gemm.input[0]):
            continue
        c = ed.const(gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else None
        if len(gemm.input) > 2 and gemm.input[2] and c is None:
            continue
        weight = ed.add_const(np.ascontiguousarray(b.T if attr(gemm, "transB", 0) else b), "gemm_weight")
        ed.remove(gemm)
        if c is None:
            ed.add_node("MatMul", [gemm.input[0], weight], [gemm.output[0]], base="gemm_matmul")
        else:
            mid = ed.add_node("MatMul", [gemm.input[0], weight], base="gemm_matmul").output[0]
            bias = ed.add_const((c * attr(gemm, "beta", 1.0)).astype(c.dtype), "gemm_bias")
            ed.add_node("Add", [mid, bias], [gemm.output[0]], base="gemm_bias_add")
    ed.commit()


class QuantizeStaticPass(Pass):
    name = "quantize_static_qdq"
    category = "compute"
    guarantee = "lossy"
    description = "Static QDQ int8 (u8 activations, s8 per-channel weights) calibrated on the captured feeds"

    def check(self, model: onnx.ModelProto, ctx: PassContext) -> Applicability:
        if ctx.feeds is None:
            return no("static quantization needs the captured input values (ctx.feeds) for calibration")
        if default_opset(model) < 13:
            return no(f"per-channel QDQ needs opset >= 13 (model has {default_opset(model)})")
        found = _weighted(model, ("Conv", "MatMul", "Gemm"))
        return yes(f"{len(found)} Conv/MatMul/Gemm with constant weights") if found else \
            no("no Conv/MatMul/Gemm with constant float weights")

    def transform(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict]:
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData
        from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
        original = onnx.ModelProto()
        original.CopyFrom(model)
        constants_to_initializers(model)
        ranges = calibrate(model, ctx)
        if ranges is None:
            return original, {"rewrites": 0, "reason": "calibration run failed in ONNX Runtime"}
        inferred = onnx.shape_inference.infer_shapes(model)
        with ort_tool():
            quantizer = QDQQuantizer(inferred, True, False, QuantType.QInt8, QuantType.QUInt8,
                                     TensorsData(CalibrationMethod.MinMax, ranges), [], [],
                                     ["Conv", "MatMul", "Gemm"], {"ActivationSymmetric": False})
            quantizer.quantize_model()
        result = quantizer.model.model
        count = sum(1 for n in result.graph.node if n.op_type == "QuantizeLinear")
        return _accept(original, result, count, ctx)


def calibrate(model: onnx.ModelProto, ctx: PassContext) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Min/max of every float tensor read or written by a node, from one run on ``ctx.feeds``."""
    from adaptopt.passes.measure import outputs_of
    ed = GraphEditor(model, "calibrate")
    names = list(dict.fromkeys(t for n in ed.nodes for t in list(n.input) + list(n.output)
                               if t and not ed.is_const(t) and ed.elem_type(t) in (onnx.TensorProto.FLOAT, None)))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present
                              and n not in ed.graph_inputs)
    values = outputs_of(probe, ctx)
    if values is None:
        return None
    values.update({k: v for k, v in ctx.feeds.items()})
    ranges = {}
    for name in names:
        value = values.get(name)
        if value is not None and value.dtype == np.float32 and value.size:
            ranges[name] = (np.array(min(float(value.min()), 0.0), np.float32),
                            np.array(max(float(value.max()), 0.0), np.float32))
    return ranges


class QuantizeInt4Pass(Pass):
    name = "quantize_weights_int4"
    category = "compute"
    guarantee = "lossy"
    description = "Weight-only int4 (blocks of 32 along K) for large MatMuls -> com.microsoft MatMulNBits"
    search_space: ClassVar[dict] = {"accuracy_level": (4, 0)}
    block_size = 32

    def check(self, model: onnx.ModelProto, ctx: PassContext) -> Applicability:
        reason = _cpu_reason(ctx, "MatMulNBits")
        if reason:
            return no(reason)
        found = [n for n in _weighted(model, ("MatMul",), MIN_WEIGHT_ELEMENTS)]
        return yes(f"{len(found)} large MatMul weights") if found else \
            no(f"no MatMul with a constant 2-D float weight of >= {MIN_WEIGHT_ELEMENTS} elements")

    def transform(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict]:
        original = onnx.ModelProto()
        original.CopyFrom(model)
        reason = ""
        for level in self.search_space["accuracy_level"]:
            work = onnx.ModelProto()
            work.CopyFrom(original)
            count = self._quantize(work, level)
            reason = budget_reason(original, work, ctx) if count else "no MatMul weight could be packed"
            if not reason:
                return work, {"rewrites": count, "accuracy_level": level}
        return original, {"rewrites": 0, "reason": reason}

    def _quantize(self, model: onnx.ModelProto, accuracy_level: int) -> int:
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits
        ed = GraphEditor(model, self.name)
        count = 0
        for node in list(ed.nodes):
            if not _has_weight(ed, node, ("MatMul",), MIN_WEIGHT_ELEMENTS) or ed.const(node.input[1]).ndim != 2:
                continue
            weight = ed.const(node.input[1])
            k, n = weight.shape
            blocks = (k + self.block_size - 1) // self.block_size
            packed = np.zeros((n, blocks, self.block_size // 2), np.uint8)
            scales = np.zeros((n, blocks), np.float32)
            zero_points = np.zeros((n, (blocks + 1) // 2), np.uint8)
            padded = np.zeros((blocks * self.block_size, n), np.float32)
            padded[:k] = weight
            quantize_matmul_4bits(packed, padded, scales, zero_points, self.block_size, n, k, False)
            inputs = [node.input[0], ed.add_const(packed, "int4_weight"), ed.add_const(scales, "int4_scales"),
                      ed.add_const(zero_points, "int4_zero_points")]
            ed.remove(node)
            extra = {"accuracy_level": accuracy_level} if accuracy_level else {}
            ed.add_node("MatMulNBits", inputs, [node.output[0]], domain=MS_DOMAIN, base="matmul_int4",
                        K=k, N=n, bits=4, block_size=self.block_size, **extra)
            count += 1
        if count:
            ed.commit()
        return count

