"""Elementwise pattern fusions into single operators (compute, exact).

- ``fuse_hardswish``: ``x * Clip(x + 3, 0, 6) / 6`` (any of the three placements of the
  ``/ 6``, or ``* (1/6)``) -> ``HardSwish(x)`` at opset >= 14, else
  ``Mul(x, HardSigmoid(x, 1/6, 0.5))``; ``Mul(x, HardSigmoid(x, 1/6, 0.5))`` -> ``HardSwish``
  at opset >= 14. PaddlePaddle exports write the four-op form after every conv.
- ``fuse_silu``: ``Mul(x, Sigmoid(x))`` -> ``com.microsoft.QuickGelu(x, alpha=1)``.
- ``fuse_gelu``: ``Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5)`` and its reorderings ->
  ``com.microsoft.Gelu`` (``Gelu`` at opset >= 20).
- ``fuse_layernorm``: ``ReduceMean / Sub / Pow|Mul / ReduceMean / Add eps / Sqrt / Div
  [/ Mul gamma] [/ Add beta]`` over the last axis -> ``LayerNormalization`` (opset >= 17).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx

from adaptopt.passes.base import MS_DOMAIN, PassContext, default_opset
from adaptopt.passes.edit import GraphEditor, RulePass, attr, is_op


def _scalar(ed: GraphEditor, name: str) -> float | None:
    value = ed.const(name)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(-1)[0])


def _other(ed: GraphEditor, node: onnx.NodeProto, name: str) -> str | None:
    """The operand of binary ``node`` that is not ``name`` (None when both or neither)."""
    a, b = node.input[0], node.input[1]
    if a == name and b != name:
        return b
    if b == name and a != name:
        return a
    return None


def _private(ed: GraphEditor, *names: str) -> bool:
    """Intermediate tensors that only the pattern reads."""
    return all(len(ed.consumers(n)) == 1 and not ed.is_output(n) for n in names)


def _close(value: float | None, target: float) -> bool:
    return value is not None and abs(value - target) <= 1e-6 * max(1.0, abs(target))


# ---------------------------------------------------------------- HardSwish
def _relu6_of_x_plus_3(ed: GraphEditor, clip: onnx.NodeProto) -> str | None:
    """x when ``clip`` computes Clip(x + 3, 0, 6)."""
    if len(clip.input) >= 3:
        lo, hi = _scalar(ed, clip.input[1]), _scalar(ed, clip.input[2])
    else:
        lo, hi = attr(clip, "min", None), attr(clip, "max", None)
    add = ed.producer(clip.input[0])
    if not (_close(lo, 0.0) and _close(hi, 6.0) and is_op(add, "Add")) or not _private(ed, clip.input[0]):
        return None
    for x, c in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        if _close(_scalar(ed, c), 3.0) and not ed.is_const(x):
            return x
    return None


def _div6(ed: GraphEditor, node: onnx.NodeProto | None, name: str) -> bool:
    """Does ``node`` compute ``name / 6`` (or ``name * (1/6)``)?"""
    if is_op(node, "Div") and node.input[0] == name:
        return _close(_scalar(ed, node.input[1]), 6.0)
    if is_op(node, "Mul"):
        other = _other(ed, node, name)
        return other is not None and _close(_scalar(ed, other), 1.0 / 6.0)
    return False


class FuseHardSwishPass(RulePass):
    name = "fuse_hardswish"
    category = "compute"
    guarantee = "exact"
    description = "x*Clip(x+3,0,6)/6 -> HardSwish (opset>=14) or HardSigmoid+Mul"
    no_match: ClassVar[str] = "no decomposed hard-swish"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        native = default_opset(ed.model) >= 14
        count = 0
        for node in list(ed.nodes):
            if not ed.alive(node):
                continue
            match = self._match_clip(ed, node) if is_op(node, "Clip") else \
                self._match_hardsigmoid(ed, node) if native and is_op(node, "HardSigmoid") else None
            if match is None:
                continue
            x, out, dead = match
            ed.remove(*dead)
            if native:
                ed.add_node("HardSwish", [x], [out], base="hardswish")
            else:
                gate = ed.add_node("HardSigmoid", [x], base="hardsigmoid", alpha=1.0 / 6.0, beta=0.5).output[0]
                ed.add_node("Mul", [x, gate], [out], base="hardswish_mul")
            count += 1
        return count

    @staticmethod
    def _match_clip(ed: GraphEditor, clip: onnx.NodeProto):
        x = _relu6_of_x_plus_3(ed, clip)
        if x is None or not _private(ed, clip.output[0]):
            return None
        add = ed.producer(clip.input[0])
        user = ed.consumers(clip.output[0])[0]
        if _div6(ed, user, clip.output[0]):  # x * (relu6(x + 3) / 6)
            mul = ed.sole_consumer(user.output[0])
            if is_op(mul, "Mul") and _other(ed, mul, user.output[0]) == x:
                return x, mul.output[0], [add, clip, user, mul]
            return None
        if is_op(user, "Mul") and _other(ed, user, clip.output[0]) == x and _private(ed, user.output[0]):
            last = ed.consumers(user.output[0])[0]  # (x * relu6(x + 3)) / 6
            if _div6(ed, last, user.output[0]):
                return x, last.output[0], [add, clip, user, last]
        return None

    @staticmethod
    def _match_hardsigmoid(ed: GraphEditor, hs: onnx.NodeProto):
        if not (_close(attr(hs, "alpha", 0.2), 1 / 6) and _close(attr(hs, "beta", 0.5), 0.5)):
            return None
        mul = ed.sole_consumer(hs.output[0])
        x = hs.input[0]
        if is_op(mul, "Mul") and _other(ed, mul, hs.output[0]) == x:
            return x, mul.output[0], [hs, mul]
        return None


class FuseSiluPass(RulePass):
    name = "fuse_silu"
    category = "compute"
    guarantee = "exact"
    description = "x*Sigmoid(x) -> com.microsoft QuickGelu(alpha=1)"
    no_match: ClassVar[str] = "no x*Sigmoid(x)"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        count = 0
        for sig in list(ed.nodes):
            if not is_op(sig, "Sigmoid") or ed.elem_type(sig.input[0]) not in (None, 1):
                continue
            mul = ed.sole_consumer(sig.output[0])
            if not is_op(mul, "Mul") or _other(ed, mul, sig.output[0]) != sig.input[0]:
                continue
            ed.remove(sig, mul)
            ed.add_node("QuickGelu", [sig.input[0]], [mul.output[0]], domain=MS_DOMAIN, base="silu", alpha=1.0)
            count += 1
        return count


# ---------------------------------------------------------------- GELU
class FuseGeluPass(RulePass):
    name = "fuse_gelu"
    category = "compute"
    guarantee = "exact"
    description = "0.5*x*(1+Erf(x/sqrt2)) -> com.microsoft Gelu (Gelu at opset>=20)"
    no_match: ClassVar[str] = "no decomposed erf GELU"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        count = 0
        for erf in list(ed.nodes):
            if ed.alive(erf) and is_op(erf, "Erf"):
                match = self._match(ed, erf)
                if match is not None:
                    x, out, dead = match
                    ed.remove(*dead)
                    native = default_opset(ed.model) >= 20
                    ed.add_node("Gelu", [x], [out], domain="" if native else MS_DOMAIN, base="gelu")
                    count += 1
        return count

    @staticmethod
    def _match(ed: GraphEditor, erf: onnx.NodeProto):
        scale = ed.producer(erf.input[0])
        if is_op(scale, "Div") and _close(_scalar(ed, scale.input[1]), float(np.sqrt(2.0))):
            x = scale.input[0]
        elif is_op(scale, "Mul"):
            x = next((i for i in scale.input if _close(_scalar(ed, _other(ed, scale, i) or ""), 1 / np.sqrt(2.0))), None)
        else:
            return None
        add = ed.sole_consumer(erf.output[0])
        if x is None or not is_op(add, "Add") or not _close(_scalar(ed, _other(ed, add, erf.output[0]) or ""), 1.0):
            return None
        if not _private(ed, erf.input[0], erf.output[0]):
            return None
        dead, factors, current = [scale, erf, add], [], add.output[0]
        for _ in range(2):  # the two products with x and 0.5, in either order
            mul = ed.sole_consumer(current)
            if not is_op(mul, "Mul") or _other(ed, mul, current) is None:
                break
            factors.append(_other(ed, mul, current))
            dead.append(mul)
            current = mul.output[0]
        kinds = sorted(_factor_kind(ed, f, x) for f in factors)
        if kinds not in (["half", "x"], ["x*half"]):
            return None
        dead += [ed.producer(f) for f in factors if _factor_kind(ed, f, x) == "x*half"]
        return x, current, dead


def _factor_kind(ed: GraphEditor, name: str, x: str) -> str:
    if name == x:
        return "x"
    if _close(_scalar(ed, name), 0.5):
        return "half"
    node = ed.producer(name)
    if is_op(node, "Mul") and _private(ed, name) and _close(_scalar(ed, _other(ed, node, x) or ""), 0.5):
        return "x*half"
    return "other"


# ---------------------------------------------------------------- LayerNorm
def _last_axis_mean(ed: GraphEditor, node: onnx.NodeProto | None, rank: int | None) -> bool:
    if not is_op(node, "ReduceMean") or attr(node, "keepdims", 1) != 1:
        return False
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > 1:
        value = ed.const(node.input[1])
        axes = None if value is None else value.reshape(-1).tolist()
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


class FuseLayerNormPass(RulePass):
    name = "fuse_layernorm"
    category = "compute"
    guarantee = "exact"
    description = "Decomposed layer normalization over the last axis -> LayerNormalization (opset>=17)"
    no_match: ClassVar[str] = "no decomposed layer normalization over the last axis"

    def target_reason(self, model: onnx.ModelProto, ctx: PassContext) -> str:
        if default_opset(model) < 17:
            return f"LayerNormalization needs opset >= 17 (model has {default_opset(model)})"
        return ""

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        count = 0
        if default_opset(ed.model) < 17:
            return 0
        for mean in list(ed.nodes):
            shape = ed.shape(mean.input[0]) if is_op(mean, "ReduceMean") else None
            if not ed.alive(mean) or shape is None or not _last_axis_mean(ed, mean, len(shape)):
                continue
            match = self._match(ed, mean, shape)
            if match is None or ed.elem_type(mean.input[0]) != 1:
                continue
            x, eps, gamma, beta, out, dead = match
            hidden = shape[-1]
            gamma = ed.add_const(np.ones(hidden, np.float32) if gamma is None else gamma, "ln_scale")
            beta = ed.add_const(np.zeros(hidden, np.float32) if beta is None else beta, "ln_bias")
            ed.remove(*dead)
            ed.add_node("LayerNormalization", [x, gamma, beta], [out], base="layernorm", axis=-1, epsilon=eps)
            count += 1
        return count

    @staticmethod
    def _match(ed: GraphEditor, mean: onnx.NodeProto, shape: tuple[int, ...]):
        x, rank = mean.input[0], len(shape)
        sub = ed.sole_consumer(mean.output[0])
        if not is_op(sub, "Sub") or list(sub.input) != [x, mean.output[0]]:
            return None
        d = sub.output[0]
        users = ed.consumers(d)
        square = next((u for u in users if is_op(u, "Pow") and u.input[0] == d and _close(_scalar(ed, u.input[1]), 2.0)
                       or is_op(u, "Mul") and list(u.input) == [d, d]), None)
        div = next((u for u in users if is_op(u, "Div") and u.input[0] == d), None)
        if square is None or div is None or len(users) != 2 or ed.is_output(d):
            return None
        var = ed.sole_consumer(square.output[0])
        add = ed.sole_consumer(var.output[0]) if _last_axis_mean(ed, var, rank) else None
        eps = _scalar(ed, _other(ed, add, var.output[0]) or "") if is_op(add, "Add") else None
        sqrt = ed.sole_consumer(add.output[0]) if eps is not None else None
        if not is_op(sqrt, "Sqrt") or div.input[1] != sqrt.output[0] or not _private(ed, sqrt.output[0]):
            return None
        dead, out, gamma, beta = [mean, sub, square, var, add, sqrt, div], div.output[0], None, None
        for op in ("Mul", "Add"):
            nxt = ed.sole_consumer(out)
            other = _other(ed, nxt, out) if is_op(nxt, op) else None
            value = ed.const(other) if other else None
            if value is None or value.shape != shape[-1:] or value.dtype != np.float32:
                break
            if op == "Mul":
                gamma = value
            else:
                beta = value
            dead.append(nxt)
            out = nxt.output[0]
        return x, eps, gamma, beta, out, dead
