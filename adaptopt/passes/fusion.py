"""Kernel fusion into Conv / Gemm (compute, exact).

- ``fuse_conv_bn``: ``BatchNormalization(Conv(X, W, B))`` -> ``Conv(X, W', B')``
  (also ``ConvTranspose``, grouped or not).
- ``fuse_conv_affine``: ``Mul(Conv(X), c)`` / ``Add(Conv(X), c)`` with ``c`` constant per
  output channel -> ``Conv`` with scaled weights / shifted bias; and ``Conv(Mul(X, a))`` /
  ``Conv(Add(X, b))`` with per-input-channel constants -> ``Conv`` (the Add only for an
  unpadded Conv). Exporters leave these behind (PaddlePaddle's learnable affine after
  every conv, written ``Mul(w, x)`` with the constant first, which ORT's own ConvMul /
  ConvAdd fusions do not match).
- ``fuse_matmul_add``: ``Add(MatMul(A, W), b)`` with constant ``W`` (2-D) and ``b`` ->
  ``Gemm``; a rank > 2 ``A`` with a static shape goes through ``Reshape``.
- ``fuse_matmul_scale``: ``Mul(MatMul(A, W) [+ b], c)`` (or ``/ c``) with constant 2-D ``W``
  and ``c`` constant per output column -> ``MatMul(A, W * c) [+ b * c]``: the layer scale
  of ConvNeXt / CaiT-style blocks, one elementwise pass over the activations less.
- ``fuse_pad_conv``: ``Conv(Pad(X, pads))`` with a zero constant pad on the spatial axes
  only -> ``Conv(X)`` with those pads added to its own (TF-style "same" padding that
  exporters write as a separate, asymmetric ``Pad``; ONNX Runtime does not fold it).
- ``fuse_conv_activation``: ``Relu/Tanh/Sigmoid/LeakyRelu/Clip/HardSigmoid(Conv)`` ->
  ``com.microsoft.FusedConv``; the same after ``Gemm`` -> ``com.microsoft.FusedGemm``
  (ONNX Runtime CPU kernels).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx

from adaptopt.passes.base import MS_DOMAIN, PassContext
from adaptopt.passes.edit import GraphEditor, RulePass, attr, is_op, rewrite_until_stable, set_attr, split_const


def _default(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _conv_params(ed: GraphEditor, conv: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    """Constant float weight and bias (zeros when absent) of a Conv, or None."""
    if conv.op_type not in ("Conv", "ConvTranspose") or not _default(conv) or len(conv.input) < 2:
        return None
    w = ed.const(conv.input[1])
    if w is None or w.dtype != np.float32 or ed.is_const(conv.input[0]):
        return None
    # a ConvTranspose weight is [C_in, C_out / group, k...]
    outputs = w.shape[0] if conv.op_type == "Conv" else w.shape[1] * attr(conv, "group", 1)
    if len(conv.input) > 2 and conv.input[2]:
        b = ed.const(conv.input[2])
        if b is None:
            return None
    else:
        b = np.zeros(outputs, np.float32)
    return w, b


def _set_conv_params(ed: GraphEditor, conv: onnx.NodeProto, w: np.ndarray, b: np.ndarray) -> None:
    ed.private_const(conv, 1, w.astype(np.float32), "fused_weight")
    if len(conv.input) < 3:
        conv.input.append("")
    ed.private_const(conv, 2, b.astype(np.float32), "fused_bias")


def _scale_out(conv: onnx.NodeProto, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``w`` with each output channel scaled by ``scale``'s entry (a grouped ConvTranspose's
    output channel g * C_out / group + j is column j of the rows of group g)."""
    if conv.op_type == "Conv":
        return w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    group, per_group = attr(conv, "group", 1), w.shape[1]
    grouped = w.reshape((group, w.shape[0] // group, per_group) + w.shape[2:])
    return (grouped * scale.reshape((group, 1, per_group) + (1,) * (w.ndim - 2))).reshape(w.shape)


def _take_output(ed: GraphEditor, conv: onnx.NodeProto, follower: onnx.NodeProto) -> None:
    """Drop ``follower`` (fused into ``conv``); ``conv`` now writes the follower's output."""
    old = conv.output[0]
    ed.remove(follower)
    conv.output[0] = follower.output[0]
    ed.forget_type(old)
    ed.touch()


class FuseConvBnPass(RulePass):
    name = "fuse_conv_bn"
    category = "compute"
    guarantee = "exact"
    description = "Fold inference BatchNormalization into the preceding Conv/ConvTranspose weights"
    no_match: ClassVar[str] = "no Conv -> BatchNormalization pair with constant parameters"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        count = 0
        for conv in list(ed.nodes):
            params = _conv_params(ed, conv)
            bn = ed.sole_consumer(conv.output[0]) if params else None
            if bn is None or bn.op_type != "BatchNormalization" or not _default(bn) or bn.input[0] != conv.output[0]:
                continue
            stats = [ed.const(n) for n in bn.input[1:5]]
            if any(s is None for s in stats) or attr(bn, "training_mode", 0) or len([o for o in bn.output if o]) > 1:
                continue
            w, b = params
            scale, shift, mean, var = (s.astype(np.float64) for s in stats)
            factor = scale / np.sqrt(var + attr(bn, "epsilon", 1e-5))
            _set_conv_params(ed, conv, _scale_out(conv, w.astype(np.float64), factor), (b - mean) * factor + shift)
            _take_output(ed, conv, bn)
            count += 1
        return count


def _zero_spatial_pads(ed: GraphEditor, pad: onnx.NodeProto) -> np.ndarray | None:
    """The Pad's pads (begin..., end...) when it adds only zeros, only on axes >= 2."""
    if not is_op(pad, "Pad") or str(attr(pad, "mode", b"constant"), "utf-8") != "constant":
        return None
    if len(pad.input) > 3 and pad.input[3]:  # explicit axes (opset 18): keep the simple case only
        return None
    pads = ed.const(pad.input[1]) if len(pad.input) > 1 and pad.input[1] else attr(pad, "pads")
    value = ed.const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
    if pads is None or value is None or np.any(np.asarray(value) != 0):
        return None
    pads = np.asarray(pads, dtype=np.int64).ravel()
    rank = len(pads) // 2
    if rank < 3 or np.any(pads < 0) or pads[:2].any() or pads[rank:rank + 2].any():
        return None
    return pads


class FusePadConvPass(RulePass):
    name = "fuse_pad_conv"
    category = "compute"
    guarantee = "exact"
    description = "Zero constant Pad on spatial axes feeding only a Conv -> the Conv's own pads"
    no_match: ClassVar[str] = "no zero spatial Pad feeding only a Conv"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        count = 0
        for pad in list(ed.nodes):
            pads = _zero_spatial_pads(ed, pad)
            conv = ed.sole_consumer(pad.output[0]) if pads is not None else None
            if not is_op(conv, "Conv") or conv.input[0] != pad.output[0]:
                continue
            auto_pad = str(attr(conv, "auto_pad", b"NOTSET"), "utf-8")
            if auto_pad not in ("NOTSET", "VALID"):  # VALID: no padding of its own (SAME_* depend on size)
                continue
            spatial = len(pads) // 2 - 2
            own = list(attr(conv, "pads", [0] * (2 * spatial))) if auto_pad == "NOTSET" else [0] * (2 * spatial)
            set_attr(conv, "auto_pad", "NOTSET")
            begin = [own[i] + int(pads[2 + i]) for i in range(spatial)]
            end = [own[spatial + i] + int(pads[spatial + 4 + i]) for i in range(spatial)]
            set_attr(conv, "pads", begin + end)
            conv.input[0] = pad.input[0]
            ed.remove(pad)
            ed.touch()
            count += 1
        return count


def _per_channel(value: np.ndarray, channels: int, rank: int, axis: int = 1) -> np.ndarray | None:
    """``value`` as a vector over ``channels`` when it broadcasts only along ``axis`` of a
    rank-``rank`` tensor without changing its shape; else None."""
    if value.dtype != np.float32 or value.ndim > rank:
        return None
    full = value.reshape((1,) * (rank - value.ndim) + value.shape)
    if any(d != 1 for i, d in enumerate(full.shape) if i != axis) or full.shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(full.reshape(-1), (channels,)).astype(np.float64)


class FuseConvAffinePass(RulePass):
    name = "fuse_conv_affine"
    category = "compute"
    guarantee = "exact"
    description = "Fold per-channel constant Mul/Add/Sub/Div around a Conv into its weights and bias"
    no_match: ClassVar[str] = "no per-channel constant Mul/Add next to a Conv"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        return rewrite_until_stable(ed, lambda node: self._fold_after(ed, node) or self._fold_before(ed, node))

    @staticmethod
    def _fold_after(ed: GraphEditor, conv: onnx.NodeProto) -> bool:
        params = _conv_params(ed, conv)
        follower = ed.sole_consumer(conv.output[0]) if params and conv.op_type == "Conv" else None
        split = split_const(ed, follower) if follower is not None else None
        rank = len(ed.shape(conv.output[0]) or ()) or (params[0].ndim if params else 0)
        if split is None or split[0] != conv.output[0]:
            return False
        w, b = params
        vec = _per_channel(split[1], w.shape[0], rank)
        if vec is None:
            return False
        if follower.op_type in ("Mul", "Div"):
            w, b = _scale_out(conv, w.astype(np.float64), vec), b * vec
        else:
            b = b + vec
        _set_conv_params(ed, conv, w, b)
        _take_output(ed, conv, follower)
        return True

    @staticmethod
    def _fold_before(ed: GraphEditor, node: onnx.NodeProto) -> bool:
        split = split_const(ed, node)
        conv = ed.sole_consumer(node.output[0]) if split else None
        params = _conv_params(ed, conv) if conv is not None and conv.op_type == "Conv" else None
        if params is None or conv.input[0] != node.output[0] or node.output[0] in conv.input[1:]:
            return False
        w, b = params
        group = attr(conv, "group", 1)
        cin = w.shape[1] * group
        vec = _per_channel(split[1], cin, w.ndim)
        shape = ed.shape(split[0])
        if vec is None or (shape is not None and ed.shape(node.output[0]) not in (None, shape)):
            return False
        # input channel read by weight [o, j]: group(o) * (cin / group) + j
        per_group_out = w.shape[0] // group
        in_idx = (np.arange(w.shape[0])[:, None] // per_group_out) * w.shape[1] + np.arange(w.shape[1])[None, :]
        taps = vec[in_idx].reshape(in_idx.shape + (1,) * (w.ndim - 2))
        if node.op_type in ("Mul", "Div"):
            w = w.astype(np.float64) * taps
        else:
            if not _unpadded(conv):
                return False
            b = b + (w.astype(np.float64) * taps).reshape(w.shape[0], -1).sum(axis=1)
        _set_conv_params(ed, conv, w, b)
        conv.input[0] = split[0]
        ed.remove(node)
        return True


def _unpadded(conv: onnx.NodeProto) -> bool:
    auto = attr(conv, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return auto in ("NOTSET", "VALID") and not any(attr(conv, "pads", None) or [])


class FuseMatMulAddPass(RulePass):
    name = "fuse_matmul_add"
    category = "compute"
    guarantee = "exact"
    description = "Add(MatMul(A, W), b) with constant 2-D W and bias -> Gemm (Reshape around rank > 2 A)"
    no_match: ClassVar[str] = "no MatMul with constant 2-D weight followed by a constant bias Add"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        count = 0
        for mm in list(ed.nodes):
            if mm.op_type != "MatMul" or not _default(mm):
                continue
            w = ed.const(mm.input[1])
            add = ed.sole_consumer(mm.output[0])
            split = split_const(ed, add) if add is not None and add.op_type == "Add" else None
            a_shape, out_shape = ed.shape(mm.input[0]), ed.shape(add.output[0]) if add is not None else None
            # a 2-D A with a dynamic dim (a batch), and an output of rank 2: Gemm takes it as it is
            dynamic_2d = (split is not None and a_shape is None and ed.rank(mm.input[0]) == 2
                          and ed.rank(add.output[0]) == 2)
            if (w is None or w.ndim != 2 or split is None or split[0] != mm.output[0]
                    or (a_shape is None and not dynamic_2d) or (a_shape is not None and len(a_shape) < 2)
                    or ed.is_const(mm.input[0]) or w.dtype != split[1].dtype):
                continue
            bias = split[1]
            if bias.ndim > 1 and any(d != 1 for d in bias.shape[:-1]) or bias.shape[-1:] not in ((w.shape[1],), (1,), ()):
                continue
            if not dynamic_2d and out_shape != tuple(a_shape[:-1]) + (w.shape[1],):
                continue
            self._replace(ed, mm, add, w, bias.reshape(-1), a_shape or (None, None), out_shape)
            count += 1
        return count

    @staticmethod
    def _replace(ed, mm, add, w, bias, a_shape, out_shape) -> None:
        a = mm.input[0]
        if len(a_shape) > 2:
            shape = ed.add_const(np.array([-1, a_shape[-1]], np.int64), "gemm_in_shape")
            a = ed.add_node("Reshape", [a, shape], base="gemm_reshape").output[0]
        bias_name = ed.add_const(bias, "gemm_bias")
        out = add.output[0] if len(a_shape) == 2 else ed.fresh("gemm_out")
        ed.remove(mm, add)
        ed.add_node("Gemm", [a, mm.input[1], bias_name], [out], base="gemm")
        if len(a_shape) > 2:
            shape = ed.add_const(np.array(out_shape, np.int64), "gemm_out_shape")
            ed.add_node("Reshape", [out, shape], [add.output[0]], base="gemm_reshape")


def _column_vector(value: np.ndarray, columns: int, rank: int | None) -> np.ndarray | None:
    """:func:`_per_channel` along the last axis (a 1-D or scalar constant needs no rank)."""
    if rank is None:
        if value.ndim > 1:
            return None
        rank = 1
    return _per_channel(value, columns, rank, axis=rank - 1)


class FuseMatMulScalePass(RulePass):
    name = "fuse_matmul_scale"
    category = "compute"
    guarantee = "exact"
    description = "Fold a per-column constant Mul/Div after MatMul (+ bias Add) into the weight and bias (layer scale)"
    no_match: ClassVar[str] = "no per-column constant Mul/Div after a MatMul with a constant 2-D weight"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        return rewrite_until_stable(ed, lambda node: self._fold(ed, node))

    @staticmethod
    def _fold(ed: GraphEditor, mm: onnx.NodeProto) -> bool:
        if not is_op(mm, "MatMul") or ed.is_const(mm.input[0]):
            return False
        w = ed.const(mm.input[1])
        if w is None or w.dtype != np.float32 or w.ndim != 2:
            return False
        columns, last = w.shape[1], mm
        rank = len(ed.shape(mm.output[0]) or ()) or None
        add = ed.sole_consumer(mm.output[0])
        split = split_const(ed, add) if is_op(add, "Add") else None
        bias = _column_vector(split[1], columns, rank) if split is not None and split[0] == mm.output[0] else None
        if bias is not None:
            last = add
        scale = ed.sole_consumer(last.output[0])
        split = split_const(ed, scale) if is_op(scale, ("Mul", "Div")) else None
        vec = _column_vector(split[1], columns, rank) if split is not None and split[0] == last.output[0] else None
        if vec is None:
            return False
        ed.private_const(mm, 1, (w.astype(np.float64) * vec[None, :]).astype(np.float32), "scaled_weight")
        if bias is not None:
            slot = 0 if ed.is_const(add.input[0]) else 1
            ed.private_const(add, slot, (bias * vec).astype(np.float32), "scaled_bias")
        _take_output(ed, last, scale)
        return True


_FUSABLE_ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "LeakyRelu", "Clip", "HardSigmoid")


class FuseActivationPass(RulePass):
    name = "fuse_conv_activation"
    category = "compute"
    guarantee = "exact"
    description = "Conv/Gemm + Relu/Tanh/Sigmoid/LeakyRelu/Clip/HardSigmoid -> com.microsoft FusedConv/FusedGemm"
    no_match: ClassVar[str] = "no Conv/Gemm followed by a fusable activation"

    def target_reason(self, model: onnx.ModelProto, ctx: PassContext) -> str:
        if "CPUExecutionProvider" not in ctx.target.execution_providers and not ctx.target.allow_cpu_fallback:
            return "FusedConv/FusedGemm are ONNX Runtime CPU kernels and the target has no CPU provider"
        return ""

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        count = 0
        for node in list(ed.nodes):
            if node.op_type not in ("Conv", "Gemm") or not _default(node):
                continue
            act = ed.sole_consumer(node.output[0])
            if act is None or act.op_type not in _FUSABLE_ACTIVATIONS or not _default(act):
                continue
            params = self._params(ed, act)
            if params is None or (node.op_type == "Gemm" and ed.elem_type(node.output[0]) not in (None, 1)):
                continue
            fused = onnx.NodeProto()
            fused.CopyFrom(node)
            fused.op_type, fused.domain = "Fused" + node.op_type, MS_DOMAIN
            fused.name = ed.fresh(fused.op_type)
            fused.output[0] = act.output[0]
            set_attr(fused, "activation", act.op_type)
            if params:
                set_attr(fused, "activation_params", params)
            ed.remove(node, act)
            ed.nodes.append(fused)
            ed.forget_type(node.output[0])
            count += 1
        return count

    @staticmethod
    def _params(ed: GraphEditor, act: onnx.NodeProto) -> list[float] | None:
        if act.op_type == "LeakyRelu":
            return [float(attr(act, "alpha", 0.01))]
        if act.op_type == "HardSigmoid":
            return [float(attr(act, "alpha", 0.2)), float(attr(act, "beta", 0.5))]
        if act.op_type == "Clip":
            if len(act.input) == 1:
                return [float(attr(act, "min", -3.4028234663852886e38)), float(attr(act, "max", 3.4028234663852886e38))]
            lo = ed.const(act.input[1]) if len(act.input) > 1 and act.input[1] else np.array(-np.inf)
            hi = ed.const(act.input[2]) if len(act.input) > 2 and act.input[2] else np.array(np.inf)
            if lo is None or hi is None:
                return None
            big = float(np.finfo(np.float32).max)
            return [float(np.clip(lo, -big, big)), float(np.clip(hi, -big, big))]
        return []
