"""Decomposed scaled-dot-product attention -> ``com.microsoft.MultiHeadAttention`` (compute, exact).

Exporters write attention as a handful of ops per layer, and the TorchScript export of
``scaled_dot_product_attention`` adds a NaN guard after the Softmax that ONNX Runtime's
own BERT/GPT fusions do not recognise, so the model runs unfused::

    q4 = Transpose(Reshape(q, [B,S,H,D]), 0213) [* c]        (or any [B,H,S,D] tensor)
    kt = Transpose(Reshape(k, [B,T,H,D]), 0231) [* c]        (or Transpose(k4, 0132))
    p  = Softmax(MatMul(q4, kt) [* c | / c] [masked] [+ bias], axis=-1)
    p  = Where(IsNaN(p), 0, p)                               (optional guard)
    o  = Reshape(Transpose(MatMul(p, v4), 0213), [B,S,H*D])  (or o4 itself)

``fuse_sdpa`` replaces each match by one ``MultiHeadAttention`` (``scale`` = the product
of the constant factors, ``attention_bias`` = the additive bias, broadcast to
``[B|1, H|1, S, T]``); key/value are passed as ``[B,T,hidden]`` when both come from such
reshapes, else as ``[B,H,T,D]`` (so grouped-query attention's repeated K/V work too).

The guard makes a row whose keys are all masked (bias -inf everywhere) output 0 instead
of NaN. The fused kernel does not know that rule, so it is kept explicitly: such rows are
found from the bias (``ReduceMax == -inf``) and set to 0 by a ``Where`` on the output.
``masked`` is ``Where(keep, scores, fill)`` (or ``Where(drop, fill, scores)``) with a
boolean mask and a constant fill of at most -1e30 (GPT-2's ``torch.where(causal_mask,
w, finfo.min)``): it becomes part of the additive bias, ``Where(keep, bias, fill + bias)``.
The fill must be that large so that adding the scores to it changes nothing (a row whose
keys are all masked is uniform, in the original and fused alike); a fill of -1e4 would
not be absorbed, and is left alone.

Nothing of the input's shapes is baked in: reshapes use ``0``/``-1`` and broadcasts read
the runtime shape, so the rewrite holds at every size of dynamic dims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx

from adaptopt.passes.base import MS_DOMAIN, PassContext, default_opset
from adaptopt.passes.edit import GraphEditor, RulePass, attr, is_op, split_const
from adaptopt.passes.prune import remove_dead_nodes
from adaptopt.passes.symbolic import Dims, SymbolicShapes

_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")


def _perm(node: onnx.NodeProto | None) -> tuple[int, ...] | None:
    return tuple(attr(node, "perm", ())) if is_op(node, "Transpose") else None


@dataclass(frozen=True)
class _Operand:
    """A tensor feeding the fused node and what it takes to get there.

    ``layout``: ``bsh`` [B,S,H*D] (MultiHeadAttention's own), ``bhsd`` [B,H,S,D],
    ``bhds`` [B,H,D,S] (a transposed key), ``bshd`` [B,S,H,D] (heads split, not moved).
    ``factor``: the constant it was scaled by on the way to the MatMul.
    """

    name: str
    layout: str
    factor: float = 1.0


# a Where-mask's fill (times the factors after it) must be at most this to become an
# additive bias: scores added to it vanish in float32 rounding (see the module docstring)
MASK_FILL_MAX = -1e30


@dataclass(frozen=True)
class _WhereMask:
    """``Where(cond, scores, fill)`` (``keep`` True) or ``Where(cond, fill, scores)``."""

    cond: str
    fill: np.ndarray  # a scalar, already times the factors met after the Where
    keep: bool


@dataclass
class _Match:
    query: _Operand
    key: _Operand
    value: _Operand
    heads: int
    scale: float
    bias: str | None
    bias_factor: float  # the bias is scaled too when the scale comes after the Add
    bias_shape: Dims  # left-padded to rank 4
    bias_rank: int
    guard: bool
    out3: str | None  # the [B,S,H*Dv] tensor the pattern ends in (its producer is replaced)
    out4: str  # the [B,H,S,Dv] attention output (replaced when ``out3`` is None)
    head_size_v: int
    mask: _WhereMask | None = None


class FuseScaledDotProductAttentionPass(RulePass):
    name = "fuse_sdpa"
    category = "compute"
    guarantee = "exact"
    description = ("Decomposed attention (MatMul, scale, additive or Where mask, Softmax, NaN guard, MatMul) -> "
                   "MultiHeadAttention")
    no_match: ClassVar[str] = "no decomposed scaled-dot-product attention (MatMul -> Softmax -> MatMul over heads)"

    def target_reason(self, model: onnx.ModelProto, ctx: PassContext) -> str:
        providers = ctx.target.execution_providers
        if not any(p in providers for p in _PROVIDERS) and not ctx.target.allow_cpu_fallback:
            return "MultiHeadAttention is an ONNX Runtime CPU/CUDA kernel and the target has neither provider"
        if default_opset(model) < 13:
            return f"needs opset >= 13 (model has {default_opset(model)})"
        return ""

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        if default_opset(ed.model) < 13:
            return 0
        softmaxes = [n for n in ed.nodes if is_op(n, "Softmax")]
        shape = SymbolicShapes(ed) if softmaxes else None
        count = 0
        for softmax in softmaxes:
            match = _match(ed, shape, softmax) if ed.alive(softmax) else None
            if match is not None:
                _replace(ed, match)
                count += 1
        if count:
            remove_dead_nodes(ed)
        return count


# ---------------------------------------------------------------- matching
def _scalar_factor(ed: GraphEditor, node: onnx.NodeProto | None, x: str) -> float | None:
    """c when ``node`` computes x * c or x / c (then 1/c) for a nonzero float scalar constant."""
    split = split_const(ed, node) if is_op(node, ("Mul", "Div")) else None
    if split is None or split[0] != x or split[1].size != 1 or not float(split[1].reshape(-1)[0]):
        return None
    return float(split[1].reshape(-1)[0])


def _strip_scale(ed: GraphEditor, name: str) -> tuple[str, float]:
    """Follow scalar Mul/Div producers up from ``name``: (the unscaled tensor, the factor)."""
    factor = 1.0
    while True:
        node = ed.producer(name)
        step = next(((x, c) for x in (node.input if node is not None else ())
                     if (c := _scalar_factor(ed, node, x)) is not None), None)
        if step is None:
            return name, factor
        name, factor = step[0], factor * step[1]


def _split_source(ed: GraphEditor, shape: SymbolicShapes, split: str, heads: int, head_size: int) -> _Operand | None:
    """The [B,S,H*D] tensor that [B,S,H,D] ``split`` is a Reshape of."""
    node = ed.producer(split)
    if not is_op(node, "Reshape"):
        return None
    source, factor = _strip_scale(ed, node.input[0])
    dims = shape(source)
    if dims is None or len(dims) != 3 or dims[-1] != heads * head_size:
        return None
    return _Operand(source, "bsh", factor)


def _heads_operand(ed: GraphEditor, shape: SymbolicShapes, bhsd: str, heads: int, head_size: int) -> _Operand:
    """A [B,H,S,D] tensor as the cheapest operand: its [B,S,H*D] source when it is one's
    head split (Reshape + Transpose 0213), else itself."""
    node = ed.producer(bhsd)
    if _perm(node) == (0, 2, 1, 3):
        inner, factor = _strip_scale(ed, node.input[0])
        found = _split_source(ed, shape, inner, heads, head_size)
        if found is not None:
            return _Operand(found.name, "bsh", factor * found.factor)
    return _Operand(bhsd, "bhsd")


def _key_operand(ed: GraphEditor, shape: SymbolicShapes, kt: str, heads: int, head_size: int) -> tuple[_Operand, _Operand]:
    """The key as ([B,T,H*D] or best available, [B,H,T,D]-compatible) operands."""
    node = ed.producer(kt)
    if _perm(node) == (0, 1, 3, 2):
        k4, factor = _strip_scale(ed, node.input[0])
        best = _heads_operand(ed, shape, k4, heads, head_size)
        return _Operand(best.name, best.layout, best.factor * factor), _Operand(k4, "bhsd", factor)
    if _perm(node) == (0, 2, 3, 1):
        split, factor = _strip_scale(ed, node.input[0])
        found = _split_source(ed, shape, split, heads, head_size)
        four = _Operand(split, "bshd", factor)
        return (_Operand(found.name, "bsh", factor * found.factor) if found else four), four
    four = _Operand(kt, "bhds")
    return four, four


def _scores_chain(ed: GraphEditor, softmax: onnx.NodeProto):
    """Walk up from the Softmax input: (QK MatMul, scale, bias, bias factor, Where-mask) or None.

    A factor met before the Add (``(QK + bias) * c``) scales the bias too: it is returned
    as the bias factor, and must be positive (a masked -inf must stay -inf); likewise for a
    Where-mask's fill."""
    name, scale, bias, bias_factor, mask = softmax.input[0], 1.0, None, 1.0, None
    for _ in range(10):
        node = ed.producer(name)
        if node is None or ed.sole_consumer(name) is None:
            return None
        if is_op(node, "MatMul"):
            return node, scale, bias, bias_factor, mask
        if is_op(node, "Add") and bias is None and mask is None:
            a, b = node.input[0], node.input[1]
            pick = next(((x, y) for x, y in ((a, b), (b, a)) if _leads_to_scores(ed, x)), None)
            if pick is None or scale <= 0:
                return None
            (name, bias), bias_factor = pick, scale
            continue
        if is_op(node, "Where") and mask is None:
            found = _where_mask(ed, node, scale)
            if found is None:
                return None
            name, mask = found
            continue
        step = next(((x, c) for x in node.input if (c := _scalar_factor(ed, node, x)) is not None), None)
        if step is None:
            return None
        name, scale = step[0], scale * step[1]
    return None


def _leads_to_matmul(ed: GraphEditor, name: str) -> bool:
    base, _ = _strip_scale(ed, name)
    return is_op(ed.producer(base), "MatMul")


def _leads_to_scores(ed: GraphEditor, name: str) -> bool:
    """``name`` is the scores (scaled), or a Where-mask over them: the side of an Add that is not the bias."""
    if _leads_to_matmul(ed, name):
        return True
    node = ed.producer(_strip_scale(ed, name)[0])
    return is_op(node, "Where") and any(_leads_to_matmul(ed, x) for x in node.input[1:])


def _where_mask(ed: GraphEditor, node: onnx.NodeProto, factor: float) -> tuple[str, _WhereMask] | None:
    """(the scores the Where masks, the mask) when ``node`` is ``Where(keep, scores, fill)``
    or ``Where(drop, fill, scores)`` with a scalar fill that, times ``factor`` (> 0), is at
    most ``MASK_FILL_MAX``."""
    cond, a, b = node.input
    for keep, scores, fill_name in ((True, a, b), (False, b, a)):
        fill = ed.const(fill_name)
        if fill is None or fill.size != 1 or fill.dtype.kind != "f" or not _leads_to_matmul(ed, scores):
            continue
        scaled = (fill.reshape(()) * fill.dtype.type(factor)).astype(fill.dtype)
        if factor <= 0 or not scaled <= MASK_FILL_MAX:
            return None
        return scores, _WhereMask(cond, scaled, keep)
    return None


def _guarded(ed: GraphEditor, probs: str) -> tuple[str, bool] | None:
    """(the tensor the PV MatMul reads, whether it is Where(IsNaN(p), 0, p))."""
    users = ed.consumers(probs)
    if ed.is_output(probs):
        return None
    if len(users) == 1:
        return probs, False
    isnan = next((u for u in users if is_op(u, "IsNaN")), None)
    where = next((u for u in users if is_op(u, "Where")), None)
    if len(users) != 2 or isnan is None or where is None or ed.sole_consumer(isnan.output[0]) is not where:
        return None
    zero = ed.const(where.input[1])
    if list(where.input) != [isnan.output[0], where.input[1], probs] or zero is None or np.any(zero != 0):
        return None
    return where.output[0], True


def _bias_dims(shape: tuple[int, ...] | None, b: int, h: int, s: int, t: int) -> tuple[int, ...] | None:
    """The bias's shape left-padded to rank 4 when it broadcasts as MultiHeadAttention's
    ``attention_bias`` may ([B|1, H|1, S|1, T|1]; the 1s in S/T get expanded)."""
    if shape is None or len(shape) > 4:
        return None
    dims = (1,) * (4 - len(shape)) + tuple(shape)
    ok = all(d in (1, full) for d, full in zip(dims, (b, h, s, t)))
    return dims if ok else None


def _data_reader(ed: GraphEditor, name: str) -> onnx.NodeProto | None:
    """The one node that reads ``name``'s values; ``Shape`` readers are not counted (exporters
    compute the merge-heads target shape from the tensor; that becomes dead with the merge)."""
    if ed.is_output(name):
        return None
    readers = [n for n in ed.consumers(name) if not is_op(n, "Shape")]
    return readers[0] if len(readers) == 1 else None


def _merged_heads(ed: GraphEditor, shape: SymbolicShapes, out4: str, b: int, s: int, h: int, dv: int) -> str | None:
    """The [B,S,H*Dv] tensor when ``out4`` only feeds [no-op Reshape] -> Transpose 0213 -> Reshape."""
    node = _data_reader(ed, out4)
    if is_op(node, "Reshape") and shape(node.output[0]) == (b, h, s, dv):
        node = _data_reader(ed, node.output[0])
    if _perm(node) != (0, 2, 1, 3):
        return None
    node = ed.sole_consumer(node.output[0])
    if not is_op(node, "Reshape") or shape(node.output[0]) != (b, s, h * dv):
        return None
    return node.output[0]


def _match(ed: GraphEditor, shape: SymbolicShapes, softmax: onnx.NodeProto) -> _Match | None:
    scores = shape(softmax.input[0])
    if scores is None or len(scores) != 4 or not shape.is_float(softmax.input[0]):
        return None
    if attr(softmax, "axis", -1) not in (-1, 3):
        return None
    guarded = _guarded(ed, softmax.output[0])
    pv = ed.sole_consumer(guarded[0]) if guarded else None
    if not is_op(pv, "MatMul") or pv.input[0] != guarded[0]:
        return None
    chain = _scores_chain(ed, softmax)
    if chain is None:
        return None
    qk, scale, bias, bias_factor, mask = chain
    b, h, s, t = scores
    q4, q_scale = _strip_scale(ed, qk.input[0])
    kt, k_scale = _strip_scale(ed, qk.input[1])
    q_shape, kt_shape, v_shape = shape(q4), shape(kt), shape(pv.input[1])
    if q_shape is None or kt_shape is None or v_shape is None or len(q_shape) != 4 or len(v_shape) != 4:
        return None
    d, dv = q_shape[3], v_shape[3]
    if q_shape != (b, h, s, d) or kt_shape != (b, h, d, t) or v_shape[:3] != (b, h, t):
        return None
    if not all(isinstance(x, int) for x in (h, d, dv)) or not all(map(shape.is_float, (q4, kt, pv.input[1]))):
        return None
    query = _heads_operand(ed, shape, q4, h, d)
    key, key4 = _key_operand(ed, shape, kt, h, d)
    value = _heads_operand(ed, shape, pv.input[1], h, dv)
    if value.factor != 1.0:
        value = _Operand(pv.input[1], "bhsd")
    if key.layout != "bsh" or value.layout != "bsh":
        key, value = key4, _Operand(pv.input[1], "bhsd")  # both 4-D: MultiHeadAttention wants one format
    bias_dims, bias_rank = None, 0
    if bias is not None:
        bias_dims = _bias_dims(shape(bias), b, h, s, t)
        bias_rank = len(shape(bias) or ())
        if bias_dims is None or not shape.is_float(bias):
            return None
    if mask is not None:
        cond_dims = _bias_dims(shape(mask.cond), b, h, s, t)
        if cond_dims is None or shape.dtype(mask.cond) != onnx.TensorProto.BOOL:
            return None
        bias_rank = max(bias_rank, len(shape(mask.cond)))
        bias_dims = cond_dims if bias_dims is None else \
            tuple(x if x != 1 else y for x, y in zip(bias_dims, cond_dims))
    guard = guarded[1] and (bias is not None or mask is not None)
    if guard and bias_dims[1] != 1 and h != 1:
        return None  # a per-head mask: the fully-masked-row rule would need a per-head output mask
    return _Match(query=query, key=key, value=value, heads=h, scale=scale * q_scale * k_scale * query.factor * key.factor,
                  bias=bias, bias_factor=bias_factor, bias_shape=bias_dims or (), bias_rank=bias_rank, guard=guard,
                  out3=_merged_heads(ed, shape, pv.output[0], b, s, h, dv), out4=pv.output[0], head_size_v=dv,
                  mask=mask)


# ---------------------------------------------------------------- rewriting
_TO_BHSD = {"bhsd": None, "bhds": (0, 1, 3, 2), "bshd": (0, 2, 1, 3)}


def _as_bsh(ed: GraphEditor, operand: _Operand) -> str:
    if operand.layout == "bsh":
        return operand.name
    moved = ed.add_node("Transpose", [_as_bhsd(ed, operand)], base="to_bshd", perm=[0, 2, 1, 3]).output[0]
    return ed.add_node("Reshape", [moved, ed.add_const(np.array([0, 0, -1], np.int64), "bsh_shape")],
                       base="merge_heads").output[0]


def _as_bhsd(ed: GraphEditor, operand: _Operand) -> str:
    perm = _TO_BHSD[operand.layout]
    if perm is None:
        return operand.name
    return ed.add_node("Transpose", [operand.name], base="to_bhsd", perm=list(perm)).output[0]


def _dim(ed: GraphEditor, tensor: str, axis: int) -> str:
    shape = ed.add_node("Shape", [tensor], base="shape").output[0]
    return ed.add_node("Gather", [shape, ed.add_const(np.array([axis], np.int64), "axis")], base="dim",
                       axis=0).output[0]


def _attention_bias(ed: GraphEditor, m: _Match, query: str, key: str) -> str:
    """The bias at rank 4, scaled when the pattern scales it, expanded over the query/key
    positions it broadcasts along."""
    bias = m.bias
    if bias and m.bias_factor != 1.0:
        factor = ed.add_const(np.array(m.bias_factor, np.float32), "bias_scale")
        bias = ed.add_node("Mul", [bias, factor], base="bias_scaled").output[0]
    if m.mask is not None:  # Where(keep, bias, fill + bias): the fill where the scores were masked
        fill = ed.add_const(m.mask.fill, "mask_fill")
        masked = ed.add_node("Add", [fill, bias], base="mask_fill_bias").output[0] if bias else fill
        bias = bias or ed.add_const(np.zeros((), m.mask.fill.dtype), "zero")
        branches = [bias, masked] if m.mask.keep else [masked, bias]
        bias = ed.add_node("Where", [m.mask.cond, *branches], base="mask_bias").output[0]
    pad = 4 - m.bias_rank
    if pad:
        bias = ed.add_node("Unsqueeze", [bias, ed.add_const(np.arange(pad, dtype=np.int64), "axes")],
                           base="bias_rank4").output[0]
    if m.bias_shape[2] == 1 or m.bias_shape[3] == 1:  # 1 at the traced size may still be S or T: expand always
        rows = _dim(ed, query, 1)
        cols = _dim(ed, key, 1 if m.key.layout == "bsh" else 2)
        shape = ed.add_node("Concat", [ed.add_const(np.array([1, 1], np.int64), "ones"), rows, cols],
                            base="bias_shape", axis=0).output[0]
        bias = ed.add_node("Expand", [bias, shape], base="bias_full").output[0]
    return bias


def _masked_rows_to_zero(ed: GraphEditor, m: _Match, bias4: str, out: str, final: str | None) -> str:
    """Where(row has a key that is not -inf, out, 0): the NaN guard's rule for fully masked rows."""
    axes = np.array([1, 3], np.int64)
    if default_opset(ed.model) >= 18:
        peak = ed.add_node("ReduceMax", [bias4, ed.add_const(axes, "axes")], base="row_max", keepdims=0)
    else:
        peak = ed.add_node("ReduceMax", [bias4], base="row_max", axes=axes.tolist(), keepdims=0)
    live = ed.add_node("Greater", [peak.output[0], ed.add_const(np.array(-np.inf, np.float32), "minus_inf")],
                       base="row_live").output[0]
    live = ed.add_node("Unsqueeze", [live, ed.add_const(np.array([-1], np.int64), "axes")], base="row_live").output[0]
    zero = ed.add_const(np.array(0.0, np.float32), "zero")
    return ed.add_node("Where", [live, out, zero], [final] if final else 1, base="masked_rows").output[0]


def _replace(ed: GraphEditor, m: _Match) -> None:
    query = _as_bsh(ed, m.query)
    key, value = (m.key.name, m.value.name) if m.key.layout == "bsh" else (_as_bhsd(ed, m.key), m.value.name)
    bias = _attention_bias(ed, m, query, key) if m.bias or m.mask else ""
    final = m.out3
    if final is not None:
        ed.remove(ed.producer(final))
    else:
        ed.remove(ed.producer(m.out4))
    direct = final if final is not None and not m.guard else None
    fused = ed.add_node("MultiHeadAttention", [query, key, value, "", "", bias], [direct] if direct else 1,
                        domain=MS_DOMAIN, base="attention", num_heads=m.heads, scale=float(m.scale)).output[0]
    if m.guard:
        fused = _masked_rows_to_zero(ed, m, bias, fused, final)
    if final is None:
        split = ed.add_node("Reshape", [fused, ed.add_const(np.array([0, 0, m.heads, m.head_size_v], np.int64),
                                                            "bshd_shape")], base="split_heads").output[0]
        ed.add_node("Transpose", [split], [m.out4], base="to_bhsd", perm=[0, 2, 1, 3])
