"""Quantization (compute, lossy): through ``onnxruntime.quantization`` where it fits.

- ``quantize_dynamic_int8``: ``MatMul`` with constant weights (``Gemm`` first rewritten to
  ``MatMul + Add``) -> int8 weights, activations quantized at run time
  (``quantize_dynamic``; ConvInteger is slow on CPU, so Conv is left alone).
- ``quantize_static_qdq``: ``Conv``/``MatMul``/``Gemm`` (and the ``Relu``/``Clip`` after
  them) -> QDQ int8 (u8 activations, s8 per-channel weights) with activation ranges
  calibrated on ``ctx.feeds`` and 7 seeded draws like them (:func:`calibration_feeds`),
  min/max over all 8 as ORT's MinMax calibrator does. The runs go through
  :func:`adaptopt.runtime.make_session`; ORT's own calibrator opens sessions of its own,
  which the process-wide thread pool forbids. A ``FusedConv`` is split back into ``Conv``
  + activation first, so that the quantizer sees the convolution.
- ``quantize_weights_int4``: ``MatMul`` with a large constant 2-D weight ->
  ``com.microsoft.MatMulNBits`` (4-bit blocks of 32 along K, with zero points).

Each keeps the first setting whose outputs stay within ``ctx.accuracy_budget`` on
``ctx.feeds`` (when feeds are given) and refuses otherwise.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator, Mapping
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
    detach_overridable,
    no,
    ort_tool,
    reattach_overridable,
    yes,
)
from adaptopt.passes.edit import GraphEditor, attr, constants_to_initializers
from adaptopt.passes.measure import budget_reason

MIN_WEIGHT_ELEMENTS = 1 << 12
# static QDQ: the weighted ops, and Relu/Clip, which ORT then folds into the range of the
# quantized Conv before them (resnet_small whole model: 0.50x -> 0.46x of the original's latency)
STATIC_OP_TYPES = ("Conv", "MatMul", "Gemm", "Relu", "Clip")


def _has_weight(ed: GraphEditor, node: onnx.NodeProto, ops: tuple[str, ...], min_elements: int = 1) -> bool:
    """A node of ``ops`` with a constant float weight (input 1) of >= 2 dims and a data input."""
    if node.op_type not in ops or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return False
    w = ed.const(node.input[1])
    return (w is not None and w.dtype == np.float32 and w.ndim >= 2 and w.size >= min_elements
            and not ed.is_const(node.input[0]))


def _has_float16(model: onnx.ModelProto) -> bool:
    """A float16 graph input or initializer (a half-precision model or leaf)."""
    fp16 = onnx.TensorProto.FLOAT16
    return (any(i.type.tensor_type.elem_type == fp16 for i in model.graph.input)
            or any(t.data_type == fp16 for t in model.graph.initializer))


def _weighted(model: onnx.ModelProto, ops: tuple[str, ...], min_elements: int = 1) -> list[onnx.NodeProto]:
    ed = GraphEditor(model, "probe")
    return [n for n in ed.nodes if _has_weight(ed, n, ops, min_elements)]


def _fused_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """``com.microsoft.FusedConv`` with a constant weight (split back into Conv + activation)."""
    ed = GraphEditor(model, "probe")
    return [n for n in ed.nodes if n.op_type == "FusedConv" and n.domain == MS_DOMAIN and len(n.input) > 1
            and ed.is_const(n.input[1]) and not ed.is_const(n.input[0])]


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
        model = type_contrib_outputs(model)
        overridable = detach_overridable(model)  # a weight the user may feed is an input to the quantizer
        with tempfile.TemporaryDirectory(prefix="adaptopt-q-") as tmp, ort_tool():
            out = Path(tmp) / "quantized.onnx"
            quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             extra_options={"MatMulConstBOnly": True})
            result = reattach_overridable(onnx.load(str(out)), overridable)
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
    calibrated = True
    description = ("Static QDQ int8 (u8 activations, s8 per-channel weights) calibrated on the captured feeds "
                   "and seeded draws like them")

    def check(self, model: onnx.ModelProto, ctx: PassContext) -> Applicability:
        if ctx.feeds is None:
            return no("static quantization needs the captured input values (ctx.feeds) for calibration")
        if default_opset(model) < 13:
            return no(f"per-channel QDQ needs opset >= 13 (model has {default_opset(model)})")
        if _has_float16(model):  # ORT's quantizer raised "Quantization parameters are not specified"
            return no("ORT's static quantizer calibrates float32 activations; this graph holds float16 ones")
        found = _weighted(model, ("Conv", "MatMul", "Gemm")) + _fused_convs(model)
        return yes(f"{len(found)} Conv/MatMul/Gemm with constant weights") if found else \
            no("no Conv/MatMul/Gemm with constant float weights")

    def transform(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict]:
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData
        from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
        original = onnx.ModelProto()
        original.CopyFrom(model)
        constants_to_initializers(model)
        _unfuse_conv_activation(model)
        calibration = calibrate(model, ctx)
        if calibration is None:
            return original, {"rewrites": 0, "reason": "calibration run failed in ONNX Runtime"}
        ranges, samples = calibration
        inferred = _typed(onnx.shape_inference.infer_shapes(model), ranges)
        overridable = detach_overridable(inferred)
        with ort_tool():
            quantizer = QDQQuantizer(inferred, True, False, QuantType.QInt8, QuantType.QUInt8,
                                     TensorsData(CalibrationMethod.MinMax, ranges), [],
                                     _readers(inferred, {t.name for t in overridable}),
                                     list(STATIC_OP_TYPES), {"ActivationSymmetric": False})
            quantizer.quantize_model()
        result = reattach_overridable(quantizer.model.model, overridable)
        count = sum(1 for n in result.graph.node if n.op_type == "QuantizeLinear")
        result, changes = _accept(original, result, count, ctx)
        return result, {**changes, "calibration_samples": samples}


def _readers(model: onnx.ModelProto, names: set[str]) -> list[str]:
    """Names of the nodes reading any of ``names`` (an unnamed one is named first), for the
    static quantizer's ``nodes_to_exclude``: ``names`` are weights the user may feed
    (:func:`detach_overridable`), whose calibrated range would be that of the default value
    only, so a fed value outside it would be clipped; their readers stay float."""
    if not names:
        return []
    readers = [n for n in model.graph.node if any(i in names for i in n.input)]
    taken = {n.name for n in model.graph.node}
    counter = itertools.count()
    for node in readers:
        while not node.name:
            candidate = f"overridable_reader_{next(counter)}"
            if candidate not in taken:
                node.name = candidate
                taken.add(candidate)
    return [n.name for n in readers]


_ACTIVATION_PARAMS = {"Relu": (), "Tanh": (), "Sigmoid": (), "LeakyRelu": ("alpha",),
                      "HardSigmoid": ("alpha", "beta"), "Clip": ()}


def _unfuse_conv_activation(model: onnx.ModelProto) -> int:
    """``com.microsoft.FusedConv`` (from ``fuse_conv_activation``) -> ``Conv`` + its activation,
    so that the quantizer, which knows only ``Conv``, quantizes those convolutions too (ORT
    folds a Relu/Clip after a quantized Conv into the output range itself). A FusedConv
    with a summand input (Z) or an activation without an ONNX op is left as it is."""
    ed = GraphEditor(model, "quantize_static_qdq")
    count = 0
    for fused in list(ed.nodes):
        if fused.op_type != "FusedConv" or fused.domain != MS_DOMAIN or len(fused.input) > 3:
            continue
        act = attr(fused, "activation", b"")
        act = act.decode() if isinstance(act, bytes) else act
        if act not in _ACTIVATION_PARAMS:
            continue
        params = [float(v) for v in attr(fused, "activation_params", [])]
        inputs: list[str] = []
        if act == "Clip":
            if len(params) != 2:
                continue
            inputs = [ed.add_const(np.array(params[0], np.float32), "clip_min"),
                      ed.add_const(np.array(params[1], np.float32), "clip_max")]
        elif len(params) != len(_ACTIVATION_PARAMS[act]):
            continue
        conv_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in fused.attribute
                      if a.name not in ("activation", "activation_params")}
        ed.remove(fused)
        mid = ed.add_node("Conv", list(fused.input), base="conv", **conv_attrs).output[0]
        ed.add_node(act, [mid, *inputs], [fused.output[0]], base=act.lower(),
                    **dict(zip(_ACTIVATION_PARAMS[act], params)))
        count += 1
    if count:
        ed.commit()
    return count


def type_contrib_outputs(model: onnx.ModelProto, rounds: int = 4) -> onnx.ModelProto:
    """``model`` shape-inferred, with the element type of each ``com.microsoft`` node's
    first output that ONNX inference cannot type taken from its first input (true of the
    fused ops passes emit: MultiHeadAttention, Gelu, QuickGelu, FusedConv, ...). The
    quantizers need every MatMul input typed; without this a fused attention leaves the
    rest of the graph untyped and ``quantize_dynamic`` stops ("Unable to find data type")."""
    for _ in range(rounds):
        model = onnx.shape_inference.infer_shapes(model)
        types = {vi.name: vi.type.tensor_type.elem_type
                 for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
                 if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
        types.update((t.name, t.data_type) for t in model.graph.initializer)
        added = [onnx.helper.make_tensor_value_info(n.output[0], types[n.input[0]], None) for n in model.graph.node
                 if n.domain == MS_DOMAIN and n.input and n.output and n.input[0] in types
                 and n.output[0] and n.output[0] not in types]
        if not added:
            break
        model.graph.value_info.extend(added)
    return model


def _typed(model: onnx.ModelProto, ranges: dict) -> onnx.ModelProto:
    """``model`` with a float value info for each calibrated tensor that shape inference
    left untyped (the output of a contrib op such as ``com.microsoft.FusedConv``): the
    quantizer skips a tensor of unknown type, then fails on the bias of the Conv that
    reads it ("Unable to get valid quantization scale for input ...")."""
    known = {vi.name for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
    known.update(t.name for t in model.graph.initializer)
    kept = [vi for vi in model.graph.value_info if vi.name in known or vi.name not in ranges]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    model.graph.value_info.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                                  for name in ranges if name not in known)
    return model


CALIBRATION_SAMPLES = 8
CALIBRATION_SEED = 20240917  # fixed: the ranges (hence the bytes) depend on the model and feeds only
NOISE_SCALE = 0.5  # of a float input's standard deviation, for the extra calibration samples


def calibration_feeds(feeds: Mapping[str, np.ndarray], samples: int = CALIBRATION_SAMPLES,
                      seed: int = CALIBRATION_SEED) -> Iterator[dict[str, np.ndarray]]:
    """The captured ``feeds`` and ``samples - 1`` seeded draws like them (same shapes and dtypes).

    A float input is the capture plus Gaussian noise of half its standard deviation,
    clipped to its [min, max]: the tensor keeps its structure and range (the activation
    statistics of the subgraph stay those of the capture) while the extremes move.
    Uniform draws over [min, max] were worse than one sample on Relu outputs (held-out
    cosine 0.9987 vs 0.9997 on a ResNet tail): most of such a tensor is near 0.
    An integer input of 2+ dims (token ids) is drawn uniformly from its observed
    [min, max]; scalars, 1-D integers (shapes, axes, indices) and booleans are kept.
    One draw at a time: a large input is not held ``samples`` times.
    """
    rng = np.random.default_rng(seed)
    yield dict(feeds)
    for _ in range(samples - 1):
        yield {name: draw_like(rng, np.asarray(feeds[name])) for name in sorted(feeds)}


def draw_like(rng: np.random.Generator, value: np.ndarray) -> np.ndarray:
    """One seeded redraw of ``value`` (see :func:`calibration_feeds`)."""
    if value.size < 2:
        return value
    if np.issubdtype(value.dtype, np.floating):
        if not np.isfinite(value).all():
            return value  # a mask of -inf: noise would make it NaN
        spread = float(value.std(dtype=np.float64)) * NOISE_SCALE
        with np.errstate(over="ignore"):  # a mask fill of -3.4e38 plus noise: -inf, clipped back below
            noisy = value + (rng.standard_normal(value.shape) * spread).astype(value.dtype)
        return np.clip(noisy, value.min(), value.max()).astype(value.dtype)
    if np.issubdtype(value.dtype, np.integer) and value.ndim >= 2:
        return rng.integers(int(value.min()), int(value.max()) + 1, value.shape).astype(value.dtype)
    return value


def calibrate(model: onnx.ModelProto, ctx: PassContext, samples: int = CALIBRATION_SAMPLES
              ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int] | None:
    """Min/max (widened to include 0) of every float tensor read or written by a node, over
    the captured ``ctx.feeds`` and the seeded draws of :func:`calibration_feeds` (ORT's
    MinMax calibrator semantics), and the number of samples that ran. None when the
    captured feeds do not run; a draw that does not run (an integer input that must keep
    its exact values) is left out."""
    from adaptopt.runtime import make_session, ort_errors, run
    ed = GraphEditor(model, "calibrate")
    names = list(dict.fromkeys(t for n in ed.nodes for t in list(n.input) + list(n.output)
                               if t and not ed.is_const(t) and ed.elem_type(t) in (onnx.TensorProto.FLOAT, None)))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present
                              and n not in ed.graph_inputs)
    try:
        session = make_session(probe, ctx.target, level="disable")
    except ort_errors():
        return None
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}
    used = 0
    for i, feeds in enumerate(calibration_feeds(ctx.feeds, samples)):
        try:
            values = run(session, feeds)
        except ort_errors():
            if i == 0:
                return None
            continue
        used += 1
        values.update(feeds)
        for name in names:
            value = values.get(name)
            if value is not None and value.dtype == np.float32 and value.size:
                lows[name] = min(lows.get(name, 0.0), float(value.min()))
                highs[name] = max(highs.get(name, 0.0), float(value.max()))
    return {name: (np.array(lows[name], np.float32), np.array(highs[name], np.float32)) for name in lows}, used


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

