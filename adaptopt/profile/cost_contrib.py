"""FLOPs of ONNX Runtime contrib ops (``com.microsoft``) that the pass library creates.

A fused op counts the operations of the ONNX ops it replaces, so a fusion leaves the
FLOPs unchanged and lowers the bytes (the intermediate tensors are gone): the gain
shows up where it really is. Conventions are those of :mod:`cost_ops`.
"""

from __future__ import annotations

import math

from adaptopt.profile.cost_ops import (DYNAMIC_QUANTIZE_PER_ELEMENT, NodeView, Rule, UnknownShape, conv, gemm,
                                       layernorm_flops, norm_rows)

GELU_ERF = 5  # Div, Erf, Add, Mul, Mul
GELU_TANH = 9  # Pow (2 mul), Mul, Add, Mul, Tanh, Add, Mul, Mul
SOFTMAX = 5


def gelu(v: NodeView) -> tuple[float, None]:
    """Gelu (ONNX opset 20 or contrib): erf form 5 per element, tanh form 9."""
    per = GELU_TANH if v.attr_str("approximate", "none") == "tanh" else GELU_ERF
    return float(per * v.numel_out()), None


def fast_gelu(v: NodeView) -> tuple[float, None]:
    """FastGelu(X, bias?): tanh approximation, plus the bias add."""
    return float((GELU_TANH + (1 if v.has_input(1) else 0)) * v.numel_out()), None


def bias_gelu(v: NodeView) -> tuple[float, None]:
    return float((GELU_ERF + 1) * v.numel_out()), None


def quick_gelu(v: NodeView) -> tuple[float, None]:
    """x * Sigmoid(alpha * x): Mul, Sigmoid, Mul."""
    return 3.0 * v.numel_out(), None


def bias_add(v: NodeView) -> tuple[float, None]:
    """BiasAdd(X, bias, skip): two adds per element."""
    return 2.0 * v.numel_out(), None


def fused_conv(v: NodeView) -> tuple[float, None]:
    """FusedConv(X, W, B?, Z?): Conv, + Z (one add), + the activation (one per element)."""
    flops, _ = conv(v)
    extra = (1 if v.has_input(3) else 0) + (1 if v.attr_str("activation") else 0)
    return flops + extra * v.numel_out(), None


def fused_gemm(v: NodeView) -> tuple[float, None]:
    flops, _ = gemm(v)
    return flops + (v.numel_out() if v.attr_str("activation") else 0), None


def fused_matmul(v: NodeView) -> tuple[float, None]:
    """FusedMatMul(A, B) with transA/transB and alpha: 2*K per output, + the alpha scaling."""
    a = v.in_shape(0)
    k = a[-2] if v.attr("transA", 0) and len(a) >= 2 else a[-1]
    alpha = float(v.attr("alpha", 1.0))
    return 2.0 * v.numel_out() * k + (v.numel_out() if alpha != 1.0 else 0), None


def skip_layernorm(v: NodeView) -> tuple[float, None]:
    """SkipLayerNormalization(input, skip, gamma, beta?, bias?): skip add (+bias add) then LayerNorm."""
    shape = v.in_shape(0)
    rows, _ = norm_rows(shape, -1)
    elements = math.prod(shape)
    adds = 1 + (1 if v.has_input(4) else 0)
    return layernorm_flops(elements, rows, v.has_input(3)) + adds * elements, None


def rms_flops(elements: int, rows: int) -> float:
    """Pow, ReduceMean, Div, Mul (scale) per element; mean divide, eps add, Sqrt per row."""
    return float(4 * elements + 3 * rows)


def simplified_layernorm(v: NodeView) -> tuple[float, None]:
    shape = v.in_shape(0)
    rows, _ = norm_rows(shape, int(v.attr("axis", -1)))
    return rms_flops(math.prod(shape), rows), None


def skip_simplified_layernorm(v: NodeView) -> tuple[float, None]:
    """SkipSimplifiedLayerNormalization(input, skip, gamma, bias?)."""
    shape = v.in_shape(0)
    rows, _ = norm_rows(shape, -1)
    adds = 1 + (1 if v.has_input(3) else 0)
    return rms_flops(math.prod(shape), rows) + adds * math.prod(shape), None


def embed_layernorm(v: NodeView) -> tuple[float, float]:
    """EmbedLayerNormalization(ids, segment_ids?, word, pos, segment?, gamma, beta, ...):
    2 adds (1 without segments) per element + LayerNorm; reads the ids and the gathered rows only."""
    shape = v.out_shape(0)
    elements = math.prod(shape)
    tables = 3 if v.has_input(4) else 2
    flops = (tables - 1) * elements + layernorm_flops(elements, elements // shape[-1], v.has_input(6))
    read = v.in_bytes(0) + v.in_bytes(1) + tables * v.out_bytes(0) + v.in_bytes(5) + v.in_bytes(6)
    written = sum(v.out_bytes(i) for i in range(len(v.node.output)) if v.node.output[i])
    return float(flops), float(read + written)


# ------------------------------------------------------------------ attention
def attention_core(batch: int, heads: int, q_len: int, kv_len: int, q_hidden: int, v_hidden: int,
                   masked: bool) -> float:
    """Q K^T (2*S*L per query channel), scale, mask add, softmax, then P V (2*S*L per value channel)."""
    scores = batch * heads * q_len * kv_len
    return (2.0 * batch * q_len * kv_len * q_hidden + 2.0 * batch * q_len * kv_len * v_hidden
            + scores * (1 + SOFTMAX + (1 if masked else 0)))


def attention(v: NodeView) -> tuple[float, None]:
    """Attention(input [B,S,Hin], weights [Hin, Hq+Hk+Hv], bias?, mask_index?, past?, attention_bias?)."""
    batch, seq, hidden_in = v.in_shape(0)
    sizes = v.attr("qkv_hidden_sizes") or [v.in_shape(1)[1] // 3] * 3
    hq, hk, hv = (int(s) for s in sizes)
    heads = int(v.attr("num_heads", 1))
    past = v.in_shape(4)[3] if v.has_input(4) else 0
    qkv = hq + hk + hv
    projection = 2.0 * batch * seq * hidden_in * qkv + (batch * seq * qkv if v.has_input(2) else 0)
    masked = v.has_input(3) or v.has_input(5) or bool(v.attr("unidirectional", 0))
    return projection + attention_core(batch, heads, seq, seq + past, hq, hv, masked), None


def multi_head_attention(v: NodeView) -> tuple[float, None]:
    """MultiHeadAttention(query, key?, value?, bias?, key_padding_mask?, attention_bias?, ...).

    key/value [B, L, H] or [B, heads, L, head_size]; without key, query is packed [B, S, heads, 3, head_size].
    """
    heads = int(v.attr("num_heads", 1))
    q = v.in_shape(0)
    if not v.has_input(1):
        if len(q) != 5:
            raise UnknownShape("MultiHeadAttention without key needs packed query [B, S, N, 3, H]")
        batch, seq, _, _, head = q
        kv_len, hq, hv = seq, heads * head, heads * head
    else:
        batch, seq, hq = q[0], q[1], math.prod(q[2:])
        k, value = v.in_shape(1), v.in_shape(2)
        kv_len = k[2] if len(k) == 4 else k[1]
        hv = value[1] * value[3] if len(value) == 4 else value[-1]
    bias = batch * (seq * hq + kv_len * (hq + hv)) if v.has_input(3) else 0
    masked = v.has_input(4) or v.has_input(5)
    return bias + attention_core(batch, heads, seq, kv_len, hq, hv, masked), None


def group_query_attention(v: NodeView) -> tuple[float, None]:
    """GroupQueryAttention(query [B,S,Hq], key [B,S,Hkv], value, past_key [B,kv_heads,P,h]?, ...):
    keys are shared by groups of query heads, so the products count every query head."""
    batch, seq, hq = v.in_shape(0)
    heads = int(v.attr("num_heads", 1))
    past = v.in_shape(3)[2] if v.has_input(3) else 0
    return attention_core(batch, heads, seq, seq + past, hq, hq, True), None


def rotary_embedding(v: NodeView) -> tuple[float, None]:
    """x * cos + rotate(x) * sin: Mul, Mul, Add per element."""
    return 3.0 * v.numel_out(), None


# ------------------------------------------------------------------ quantized products
def k_of(v: NodeView) -> int:
    return v.in_shape(0)[-1]


def matmul_integer_to_float(v: NodeView) -> tuple[float, None]:
    """MatMulIntegerToFloat(A, B, a_scale, b_scale, a_zp?, b_zp?, bias?): product, scale (+ bias)."""
    out = v.numel_out()
    return 2.0 * out * k_of(v) + out + (out if v.has_input(6) else 0), None


def dynamic_quantize_matmul(v: NodeView) -> tuple[float, None]:
    """DynamicQuantizeMatMul(A, B, b_scale, b_zp?, bias?): quantize A, integer product, scale (+ bias)."""
    out = v.numel_out()
    quantize = DYNAMIC_QUANTIZE_PER_ELEMENT * v.numel_in(0)
    return quantize + 2.0 * out * k_of(v) + out + (out if v.has_input(4) else 0), None


def matmul_nbits(v: NodeView) -> tuple[float, None]:
    """MatMulNBits(A [..., K], B packed [N, blocks, blob], scales, zero_points?, g_idx?, bias?):
    2*K per output, + dequantizing the N*K weights (Sub, Mul), + the bias."""
    k, n = int(v.attr("K")), int(v.attr("N"))
    out = v.numel_out()
    return 2.0 * out * k + 2.0 * n * k + (out if v.has_input(5) else 0), None


def qgemm(v: NodeView) -> tuple[float, None]:
    """QGemm(A, a_scale, a_zp, B, b_scale, b_zp, C?, y_scale?, y_zp?): Gemm + requantize (2 per output)."""
    a = v.in_shape(0)
    m, k = (a[1], a[0]) if v.attr("transA", 0) else (a[0], a[1])
    n = v.out_shape()[1]
    return 2.0 * m * n * k + (m * n if v.has_input(6) else 0) + 2.0 * m * n, None


def qlinear_binary(v: NodeView) -> tuple[float, None]:
    """QLinearAdd/QLinearMul: dequantize both inputs (2 each), the op, requantize (2)."""
    return 7.0 * v.numel_out(), None


CONTRIB: dict[str, Rule] = {
    "FusedConv": fused_conv, "FusedGemm": fused_gemm, "FusedMatMul": fused_matmul,
    "Attention": attention, "MultiHeadAttention": multi_head_attention, "GroupQueryAttention": group_query_attention,
    "RotaryEmbedding": rotary_embedding,
    "SkipLayerNormalization": skip_layernorm, "SimplifiedLayerNormalization": simplified_layernorm,
    "SkipSimplifiedLayerNormalization": skip_simplified_layernorm, "EmbedLayerNormalization": embed_layernorm,
    "Gelu": gelu, "FastGelu": fast_gelu, "BiasGelu": bias_gelu, "QuickGelu": quick_gelu, "BiasAdd": bias_add,
    "MatMulIntegerToFloat": matmul_integer_to_float, "DynamicQuantizeMatMul": dynamic_quantize_matmul,
    "MatMulNBits": matmul_nbits, "QGemm": qgemm, "QLinearAdd": qlinear_binary, "QLinearMul": qlinear_binary,
}
