"""Data layout (memory, exact) and redundant chains of layout/shape/type ops.

- ``simplify_chains``: ``Cast(Cast(x))`` through a lossless intermediate type ->
  one Cast (or none); a chain of ``Reshape/Flatten/Squeeze/Unsqueeze`` with a static
  final shape -> one ``Reshape``; ``Transpose(Transpose(x))`` -> one Transpose (or none).
- ``cancel_transposes``: a Transpose sunk through single-consumer elementwise ops
  (constants permuted to match) until it meets another Transpose -> merged or removed;
  ``op(Transpose(a, p), Transpose(b, p))`` -> ``Transpose(op(a, b), p)``.
- ``transpose_residuals``: a residual stream ``x_k = x_{k-1} + Transpose(y_k, p)``
  (ConvNeXt-style blocks that compute channels-last and add back channels-first) kept in
  ``y``'s layout: ``x'_k = x'_{k-1} + y_k``, with ``x_k = Transpose(x'_k, p)`` only for
  the stream's other readers. Chains of two or more such ops only; a Transpose back
  followed by its inverse cancels. On ONNX Runtime CPU the Transpose left before a Conv
  folds into the Conv's NCHWc reorder: convnext ran its 10 block Transposes (2.4% of its
  time) no more.
- ``convert_nhwc``: 2-D ``Conv`` -> ``com.microsoft.NhwcFusedConv`` between Transposes
  (adjacent Transposes then cancel), only where the target runs that kernel for the
  model's dtype (probed); ONNX Runtime CPU has none for fp32 and already runs Conv in
  its blocked NCHWc layout at ORT_ENABLE_ALL.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto as T

from adaptopt.passes.base import MS_DOMAIN, PassContext
from adaptopt.passes.edit import GraphEditor, RulePass, attr, rewrite_until_stable, set_attr

_LOSSLESS = {
    T.FLOAT16: {T.FLOAT, T.DOUBLE}, T.BFLOAT16: {T.FLOAT, T.DOUBLE}, T.FLOAT: {T.DOUBLE},
    T.INT8: {T.INT16, T.INT32, T.INT64, T.FLOAT16, T.FLOAT, T.DOUBLE},
    T.UINT8: {T.INT16, T.UINT16, T.INT32, T.UINT32, T.INT64, T.UINT64, T.FLOAT16, T.FLOAT, T.DOUBLE},
    T.INT16: {T.INT32, T.INT64, T.FLOAT, T.DOUBLE}, T.UINT16: {T.INT32, T.UINT32, T.INT64, T.UINT64, T.FLOAT, T.DOUBLE},
    T.INT32: {T.INT64, T.DOUBLE}, T.UINT32: {T.INT64, T.UINT64, T.DOUBLE},
    T.BOOL: {T.INT8, T.UINT8, T.INT16, T.UINT16, T.INT32, T.UINT32, T.INT64, T.UINT64, T.FLOAT16, T.FLOAT, T.DOUBLE},
}
_SHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
UNARY = frozenset({"Relu", "Sigmoid", "Tanh", "Abs", "Neg", "Exp", "Log", "Sqrt", "Erf", "Clip", "LeakyRelu",
                   "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus", "Softsign", "Cast", "Identity",
                   "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Not", "Sin", "Cos", "Gelu", "Mish"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu", "Equal", "Less", "Greater",
                    "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Where"})


def _default(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.domain in ("", "ai.onnx")


def compose(first: list[int], second: list[int]) -> list[int]:
    """Perm of Transpose(Transpose(x, first), second)."""
    return [first[i] for i in second]


def _remove_if_dead(ed: GraphEditor, node: onnx.NodeProto | None) -> None:
    if node is not None and ed.alive(node) and not any(ed.consumers(o) or ed.is_output(o) for o in node.output):
        ed.remove(node)


class SimplifyChainsPass(RulePass):
    name = "simplify_chains"
    category = "compute"
    guarantee = "exact"
    description = "Collapse Cast->Cast, Reshape/Flatten/Squeeze/Unsqueeze chains and Transpose->Transpose"
    no_match: ClassVar[str] = "no redundant Cast/Reshape/Squeeze/Unsqueeze/Transpose chain"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        count = 0
        for node in list(ed.nodes):
            if not ed.alive(node) or not _default(node) or not node.input:
                continue
            prev = ed.producer(node.input[0])
            if not _default(prev) or prev.op_type != node.op_type and not (
                    node.op_type in _SHAPE_OPS and prev.op_type in _SHAPE_OPS):
                continue
            rule = {"Cast": self._cast, "Transpose": self._transpose}.get(node.op_type, self._reshape)
            if (node.op_type in _SHAPE_OPS or node.op_type in ("Cast", "Transpose")) and rule(ed, prev, node):
                _remove_if_dead(ed, prev)
                count += 1
        return count

    @staticmethod
    def _cast(ed: GraphEditor, first: onnx.NodeProto, second: onnx.NodeProto) -> bool:
        source = ed.elem_type(first.input[0])
        if source is None or attr(first, "to") not in _LOSSLESS.get(source, ()):
            return False
        if attr(second, "to") == source:
            return ed.bypass(second, first.input[0], second.output[0])
        second.input[0] = first.input[0]
        ed.touch()
        return True

    @staticmethod
    def _transpose(ed: GraphEditor, first: onnx.NodeProto, second: onnx.NodeProto) -> bool:
        p1, p2 = attr(first, "perm"), attr(second, "perm")
        if p1 is None or p2 is None:
            return False
        perm = compose(list(p1), list(p2))
        if perm == list(range(len(perm))):
            return ed.bypass(second, first.input[0], second.output[0])
        second.input[0] = first.input[0]
        set_attr(second, "perm", perm)
        ed.touch()
        return True

    @staticmethod
    def _reshape(ed: GraphEditor, first: onnx.NodeProto, second: onnx.NodeProto) -> bool:
        shape = ed.shape(second.output[0])
        if shape is None or 0 in shape or ed.shape(first.input[0]) is None:
            return False
        target = ed.add_const(np.array(shape, np.int64), "chain_shape")
        ed.remove(second)
        ed.add_node("Reshape", [first.input[0], target], [second.output[0]], base="chain_reshape")
        return True


class CancelTransposesPass(RulePass):
    name = "cancel_transposes"
    category = "memory"
    guarantee = "exact"
    description = "Sink Transposes through elementwise ops until they cancel or merge with another Transpose"
    no_match: ClassVar[str] = "no Transpose pair that can meet through elementwise ops"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        return rewrite_until_stable(ed, lambda node: node.op_type == "Transpose" and _default(node) and (
            self._sink_to_transpose(ed, node) or self._hoist_binary(ed, node)))

    @staticmethod
    def _const_operand(ed: GraphEditor, node: onnx.NodeProto, data: str) -> list[int] | None:
        """Slots of the constant operands of an elementwise node whose data input is ``data``."""
        if not _default(node) or node.op_type not in UNARY | BINARY:
            return None
        if node.op_type in UNARY:
            return [] if node.input[0] == data and all(ed.is_const(i) for i in node.input[1:] if i) else None
        slots = [i for i, name in enumerate(node.input) if name != data]
        if list(node.input).count(data) != 1 or not all(ed.is_const(node.input[i]) for i in slots):
            return None
        return slots

    def _sink_to_transpose(self, ed: GraphEditor, first: onnx.NodeProto) -> bool:
        perm = attr(first, "perm")
        if perm is None:
            return False
        chain, current = [], first.output[0]
        while True:
            nxt = ed.sole_consumer(current)
            if nxt is None:
                return False
            if nxt.op_type == "Transpose" and _default(nxt) and chain:
                break
            slots = self._const_operand(ed, nxt, current)
            if slots is None or len(chain) >= 16 or any(ed.const(nxt.input[i]).ndim > len(perm) for i in slots):
                return False
            chain.append((nxt, slots))
            current = nxt.output[0]
        inverse = list(np.argsort(perm))
        for node, slots in chain:
            for slot in slots:
                value = ed.const(node.input[slot])
                if value.ndim > 0:
                    full = value.reshape((1,) * (len(perm) - value.ndim) + value.shape)
                    ed.private_const(node, slot, np.transpose(full, inverse), "sunk_const")
            for o in node.output:
                ed.forget_type(o)
        chain = [node for node, _ in chain]
        chain[0].input[list(chain[0].input).index(first.output[0])] = first.input[0]
        ed.touch()
        _remove_if_dead(ed, first)
        last = ed.sole_consumer(current)
        merged = compose(list(perm), list(attr(last, "perm")))
        if merged == list(range(len(merged))):
            if not ed.bypass(last, current, last.output[0]):
                set_attr(last, "perm", merged)
        else:
            set_attr(last, "perm", merged)
        return True

    @staticmethod
    def _hoist_binary(ed: GraphEditor, first: onnx.NodeProto) -> bool:
        op = ed.sole_consumer(first.output[0])
        if op is None or not _default(op) or op.op_type not in BINARY - {"Where", "PRelu"} or len(op.input) != 2:
            return False
        other = ed.producer(op.input[1] if op.input[0] == first.output[0] else op.input[0])
        if (other is None or other is first or other.op_type != "Transpose" or not _default(other)
                or attr(other, "perm") != attr(first, "perm") or ed.sole_consumer(other.output[0]) is not op):
            return False
        a, b = ed.shape(first.input[0]), ed.shape(other.input[0])
        if a is None or a != b:
            return False
        inputs = [first.input[0] if name == first.output[0] else other.input[0] for name in op.input]
        ed.remove(first, other, op)
        mid = ed.add_node(op.op_type, inputs, base=op.op_type.lower(), **{
            x.name: onnx.helper.get_attribute_value(x) for x in op.attribute}).output[0]
        ed.add_node("Transpose", [mid], [op.output[0]], base="hoisted_transpose", perm=list(attr(first, "perm")))
        return True


_STREAM_OPS = frozenset({"Add", "Sub", "Mul", "Div"})


class TransposeResidualsPass(RulePass):
    name = "transpose_residuals"
    category = "memory"
    guarantee = "exact"
    description = "Keep a residual stream fed by Transposed branches in the branches' layout (x + T(y) -> T(x' + y))"
    no_match: ClassVar[str] = "no chain of two or more residual ops fed by a Transposed branch"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        steps = {}  # residual op -> (slot of the Transposed branch, perm)
        for node in ed.nodes:
            step = self._step(ed, node)
            if step is not None:
                steps[node.output[0]] = (node, *step)
        # a step on the stream continues one before it; only chains of two or more pay
        chained = {out for out, (node, slot, perm) in steps.items()
                   if self._stream_input(node, slot) in steps and steps[self._stream_input(node, slot)][2] == perm}
        chained |= {self._stream_input(node, slot) for out, (node, slot, _) in steps.items() if out in chained}
        count = 0
        for out in [n.output[0] for n in ed.nodes if n.output and n.output[0] in chained]:  # in graph order
            node, slot, perm = steps[out]
            count += self._keep_in_branch_layout(ed, node, slot, perm)
        return count

    @staticmethod
    def _stream_input(node: onnx.NodeProto, slot: int) -> str:
        return node.input[1 - slot]

    @staticmethod
    def _step(ed: GraphEditor, node: onnx.NodeProto) -> tuple[int, list[int]] | None:
        """(slot of the Transposed branch, its perm) of a residual op, or None."""
        if not _default(node) or node.op_type not in _STREAM_OPS or len(node.input) != 2:
            return None
        for slot in (0, 1):
            t = ed.producer(node.input[slot])
            stream = node.input[1 - slot]
            if not _default(t) or t.op_type != "Transpose" or ed.sole_consumer(t.output[0]) is not node:
                continue
            perm = attr(t, "perm")
            if (perm is None or node.input[0] == node.input[1] or ed.is_const(stream)
                    or ed.rank(stream) != len(perm) or ed.rank(t.input[0]) != len(perm)):
                continue
            return slot, list(perm)
        return None

    @staticmethod
    def _keep_in_branch_layout(ed: GraphEditor, node: onnx.NodeProto, slot: int, perm: list[int]) -> int:
        branch = ed.producer(node.input[slot])
        stream = node.input[1 - slot]
        source = ed.producer(stream)
        if _default(source) and source.op_type == "Transpose" and attr(source, "perm") == perm:
            twin = source.input[0]  # the stream in the branch's layout already exists
        else:
            inverse = [int(i) for i in np.argsort(perm)]
            twin = ed.add_node("Transpose", [stream], base="stream_twin", perm=inverse).output[0]
        inputs = [branch.input[0], twin] if slot == 0 else [twin, branch.input[0]]
        out = node.output[0]
        ed.remove(node, branch)
        inner = ed.add_node(node.op_type, inputs, base="stream_" + node.op_type.lower()).output[0]
        back = ed.add_node("Transpose", [inner], [out], base="stream_back", perm=perm)
        for reader in ed.consumers(out):  # a reader turning the stream back: reads it as it is
            if _default(reader) and reader.op_type == "Transpose" and ed.alive(back) and \
                    compose(perm, list(attr(reader, "perm") or [])) == list(range(len(perm))):
                if ed.bypass(reader, inner, reader.output[0]):
                    _remove_if_dead(ed, back)
        return 1


class NhwcPass(RulePass):
    name = "convert_nhwc"
    category = "memory"
    guarantee = "exact"
    description = "2-D Conv -> com.microsoft NhwcFusedConv between Transposes, where the target has that kernel"
    no_match: ClassVar[str] = "no 2-D Conv with constant weights"

    def target_reason(self, model: onnx.ModelProto, ctx: PassContext) -> str:
        dtypes = {t.data_type for t in model.graph.initializer} & {T.FLOAT, T.FLOAT16}
        dtype = T.FLOAT16 if dtypes == {T.FLOAT16} else T.FLOAT
        return nhwc_kernel_missing(ctx, dtype)

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        count = 0
        for conv in list(ed.nodes):
            w = ed.const(conv.input[1]) if conv.op_type == "Conv" and _default(conv) and len(conv.input) > 1 else None
            if w is None or w.ndim != 4 or ed.is_const(conv.input[0]):
                continue
            to_nhwc = ed.add_node("Transpose", [conv.input[0]], base="to_nhwc", perm=[0, 2, 3, 1]).output[0]
            fused = onnx.NodeProto()
            fused.CopyFrom(conv)
            fused.op_type, fused.domain, fused.name = "NhwcFusedConv", MS_DOMAIN, ed.fresh("NhwcFusedConv")
            fused.input[0], fused.output[0] = to_nhwc, ed.fresh("nhwc_out")
            ed.remove(conv)
            ed.nodes.append(fused)
            ed.add_node("Transpose", [fused.output[0]], [conv.output[0]], base="to_nchw", perm=[0, 3, 1, 2])
            count += 1
        if count:  # back-to-back Transposes between consecutive convs cancel
            CancelTransposesPass().rewrite(ed, ctx)
            SimplifyChainsPass().rewrite(ed, ctx)
        return count


def nhwc_kernel_missing(ctx: PassContext, dtype: int) -> str:
    """Probe the target for an NhwcFusedConv kernel of ``dtype``; '' when it has one."""
    from onnx import helper

    from adaptopt.runtime import BUILT_MODEL_IR, make_session, ort_error_line, ort_errors
    x = helper.make_tensor_value_info("x", dtype, [1, 4, 4, 2])
    y = helper.make_tensor_value_info("y", dtype, None)
    w = helper.make_tensor("w", dtype, [2, 2, 1, 1], [1.0, 0.0, 0.0, 1.0])
    node = helper.make_node("NhwcFusedConv", ["x", "w"], ["y"], domain=MS_DOMAIN)
    probe = helper.make_model(helper.make_graph([node], "probe", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
    probe.ir_version = BUILT_MODEL_IR
    try:
        make_session(probe, ctx.target, level="disable")
    except ort_errors() as exc:
        return (f"the target ({', '.join(ctx.target.execution_providers)}) has no NHWC Conv kernel for "
                f"{helper.tensor_dtype_to_np_dtype(dtype)}: {ort_error_line(exc)}")
    return ""
