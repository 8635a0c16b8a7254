"""FLOPs and bytes of standard ONNX operators (contrib ops live in ``cost_contrib``).

Conventions, so that every figure can be recomputed by hand:

- **bytes** = every input tensor read once plus every output written once (weights
  included: they are read on every run), except: *views* (Reshape, Squeeze, Flatten,
  Identity, ...) move nothing (ONNX Runtime aliases their buffers); Slice and the
  Gather family read only what they take (``indices + 2 * output``).
- **flops** = the scalar operations of the op written as ONNX elementwise ops: one
  per output element for an elementwise op (transcendental or not), ``n - 1`` per
  element for variadic Sum/Max/Min (Mean: ``n``), ``2*M*N*K`` for a matrix product
  (a multiply and an add), plus one per output element for a bias. Normalizations
  count their decomposition (see each function). Data movement is 0 flops.
- A shape the model does not know raises :class:`UnknownShape`: the node's cost is
  then *unknown*, never zero.
"""

from __future__ import annotations

import math
from typing import Callable

import onnx
from onnx import helper

Rule = Callable[["NodeView"], tuple[float, float | None]]  # -> (flops, bytes or None for the default)


class UnknownShape(Exception):
    """A shape or element type the cost of a node needs is not known."""


class NodeView:
    """One node with the shapes and element sizes of its tensors."""

    def __init__(self, node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]], itemsizes: dict[str, float]):
        self.node = node
        self.shapes = shapes
        self.itemsizes = itemsizes
        self._attrs = {a.name: a for a in node.attribute}

    # ---------------------------------------------------------------- tensors
    def input(self, i: int) -> str | None:
        return self.node.input[i] if i < len(self.node.input) and self.node.input[i] else None

    def has_input(self, i: int) -> bool:
        return self.input(i) is not None

    def shape(self, name: str | None) -> tuple[int, ...]:
        if name is None or name not in self.shapes:
            raise UnknownShape(f"shape of tensor '{name}' is unknown")
        return self.shapes[name]

    def in_shape(self, i: int) -> tuple[int, ...]:
        if not self.has_input(i):
            raise UnknownShape(f"input {i} of {self.node.op_type} is absent")
        return self.shape(self.input(i))

    def out_shape(self, i: int = 0) -> tuple[int, ...]:
        return self.shape(self.node.output[i] if i < len(self.node.output) else None)

    def numel_in(self, i: int) -> int:
        return math.prod(self.in_shape(i))

    def numel_out(self, i: int = 0) -> int:
        return math.prod(self.out_shape(i))

    def nbytes(self, name: str) -> float:
        if name not in self.itemsizes:
            raise UnknownShape(f"element type of tensor '{name}' is unknown")
        return math.prod(self.shape(name)) * self.itemsizes[name]

    def in_bytes(self, i: int) -> float:
        return self.nbytes(self.input(i)) if self.has_input(i) else 0.0

    def out_bytes(self, i: int = 0) -> float:
        return self.nbytes(self.node.output[i])

    def io_bytes(self) -> float:
        """Every present input read once and every output written once."""
        names = [n for n in self.node.input if n] + [n for n in self.node.output if n]
        return float(sum(self.nbytes(n) for n in names))

    # ---------------------------------------------------------------- attributes
    def attr(self, name: str, default=None):
        a = self._attrs.get(name)
        return default if a is None else helper.get_attribute_value(a)

    def attr_str(self, name: str, default: str = "") -> str:
        value = self.attr(name, default)
        return value.decode() if isinstance(value, bytes) else value


# ------------------------------------------------------------------ elementwise
def elementwise(per_element: float = 1.0) -> Rule:
    return lambda v: (per_element * v.numel_out(), None)


def variadic(v: NodeView) -> tuple[float, None]:
    """Sum/Max/Min of n inputs: n - 1 operations per output element (Mean: one more, the divide)."""
    n = len([i for i in v.node.input if i])
    extra = 1 if v.node.op_type == "Mean" else 0
    return float(max(n - 1, 0) + extra) * v.numel_out(), None


def movement(v: NodeView) -> tuple[float, None]:
    return 0.0, None


def view(v: NodeView) -> tuple[float, float]:
    """Reshape-like ops: ONNX Runtime aliases the buffer, nothing moves."""
    return 0.0, 0.0


def gather(v: NodeView) -> tuple[float, float]:
    """Reads the indices and only the gathered elements, writes the output."""
    return 0.0, v.in_bytes(1) + 2 * v.out_bytes(0)


def slice_(v: NodeView) -> tuple[float, float]:
    """Reads the slice (same size as the output) and the small index tensors; writes the output."""
    index_bytes = sum(v.in_bytes(i) for i in range(1, len(v.node.input)))
    return 0.0, 2 * v.out_bytes(0) + index_bytes


def range_(v: NodeView) -> tuple[float, None]:
    return float(v.numel_out()), None  # one add per element written


def cumsum(v: NodeView) -> tuple[float, None]:
    return float(v.numel_in(0)), None


def einsum(v: NodeView) -> tuple[float, None]:
    """Naive contraction: one multiply-add per point of the joint index space (2 flops)."""
    equation = v.attr_str("equation").replace(" ", "")
    lhs = equation.split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for i, term in enumerate(lhs):
        if "..." in term:
            raise UnknownShape("einsum with ellipsis is not costed")
        for letter, dim in zip(term, v.in_shape(i)):
            sizes[letter] = max(sizes.get(letter, 1), dim)
    points = math.prod(sizes.values())
    return float(2 * points if len(lhs) > 1 else points), None


# ------------------------------------------------------------------ reductions, softmax
REDUCE_COSTS = {  # op -> (flops per input element, flops per output element)
    "ReduceSum": (1, 0), "ReduceMean": (1, 1), "ReduceMax": (1, 0), "ReduceMin": (1, 0), "ReduceProd": (1, 0),
    "ReduceL1": (2, 0), "ReduceL2": (2, 1), "ReduceSumSquare": (2, 0), "ReduceLogSum": (1, 1),
    "ReduceLogSumExp": (2, 1), "ArgMax": (1, 0), "ArgMin": (1, 0),
    "GlobalAveragePool": (1, 1), "GlobalMaxPool": (1, 0), "GlobalLpPool": (2, 1),
}


def reduce_(v: NodeView) -> tuple[float, None]:
    per_in, per_out = REDUCE_COSTS[v.node.op_type]
    return float(per_in * v.numel_in(0) + per_out * v.numel_out()), None


def softmax(v: NodeView) -> tuple[float, None]:
    """ReduceMax, Sub, Exp, ReduceSum, Div (LogSoftmax: Log, Sub): 5 per element."""
    return 5.0 * v.numel_out(), None


# ------------------------------------------------------------------ normalizations
def batchnorm(v: NodeView) -> tuple[float, None]:
    """(x - mean) / sqrt(var + eps) * scale + B: 4 per element, plus Add and Sqrt per channel."""
    channels = v.numel_in(1)
    return 4.0 * v.numel_out() + 2.0 * channels, None


def norm_rows(shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    """(rows, elements per row) when normalizing ``shape`` over axes [axis, rank)."""
    axis = axis if axis >= 0 else axis + len(shape)
    return math.prod(shape[:axis]), math.prod(shape[axis:])


def layernorm_flops(elements: int, rows: int, has_bias: bool) -> float:
    """ReduceMean, Sub, Pow, ReduceMean, Div, Mul (+Add bias) per element; mean/var divides, eps, Sqrt per row."""
    return float(elements * (6 + (1 if has_bias else 0)) + rows * 4)


def layernorm(v: NodeView) -> tuple[float, None]:
    shape = v.in_shape(0)
    rows, _ = norm_rows(shape, int(v.attr("axis", -1)))
    return layernorm_flops(math.prod(shape), rows, v.has_input(2)), None


def instancenorm(v: NodeView) -> tuple[float, None]:
    """Layer norm of each (n, c) plane with scale and bias."""
    shape = v.in_shape(0)
    return layernorm_flops(math.prod(shape), shape[0] * shape[1], True), None


def groupnorm(v: NodeView) -> tuple[float, None]:
    shape = v.in_shape(0)
    groups = int(v.attr("num_groups", 1))
    return layernorm_flops(math.prod(shape), shape[0] * groups, True), None


def lpnorm(v: NodeView) -> tuple[float, None]:
    """Square (or Abs), ReduceSum, Div per element; Sqrt per row for p=2."""
    shape = v.in_shape(0)
    axis = int(v.attr("axis", -1))
    axis = axis if axis >= 0 else axis + len(shape)
    rows = math.prod(shape) // shape[axis]
    return float(3 * math.prod(shape) + rows), None


# ------------------------------------------------------------------ linear algebra
def matmul(v: NodeView) -> tuple[float, None]:
    """2 * K per output element, K = A's last dim (numpy matmul semantics, 1-D included)."""
    k = v.in_shape(0)[-1]
    return 2.0 * v.numel_out() * k, None


def qlinear_matmul(v: NodeView) -> tuple[float, None]:
    """QLinearMatMul(a, a_scale, a_zp, b, ...): the product plus requantization (2 per output)."""
    k = v.in_shape(0)[-1]
    return 2.0 * v.numel_out() * k + 2.0 * v.numel_out(), None


def gemm_mnk(v: NodeView, a: int = 0) -> tuple[int, int, int]:
    a_shape = v.in_shape(a)
    m, k = (a_shape[1], a_shape[0]) if v.attr("transA", 0) else (a_shape[0], a_shape[1])
    n = v.out_shape()[1]
    return m, n, k


def gemm(v: NodeView) -> tuple[float, None]:
    """2*M*N*K, plus M*N for the C add (alpha/beta scalings are folded, not counted)."""
    m, n, k = gemm_mnk(v)
    return 2.0 * m * n * k + (m * n if v.has_input(2) else 0), None


def conv_flops(v: NodeView, x: int = 0, w: int = 1) -> float:
    """2 * (C_in / group) * prod(kernel) per output element."""
    w_shape = v.in_shape(w)
    per_output = w_shape[1] * math.prod(w_shape[2:])  # W is [M, C/group, k...]
    return 2.0 * v.numel_out() * per_output


def conv(v: NodeView) -> tuple[float, None]:
    return conv_flops(v) + (v.numel_out() if v.has_input(2) else 0), None


def conv_transpose(v: NodeView) -> tuple[float, None]:
    """Every input element meets (M / group) * prod(kernel) weights: 2 flops each; plus the bias."""
    w_shape = v.in_shape(1)  # W is [C, M/group, k...]
    flops = 2.0 * v.numel_in(0) * w_shape[1] * math.prod(w_shape[2:])
    return flops + (v.numel_out() if v.has_input(2) else 0), None


def qlinear_conv(v: NodeView) -> tuple[float, None]:
    """QLinearConv(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, B): conv + requantize (2 per output)."""
    return conv_flops(v, 0, 3) + 2.0 * v.numel_out() + (v.numel_out() if v.has_input(8) else 0), None


def conv_integer(v: NodeView) -> tuple[float, None]:
    return conv_flops(v), None


# ------------------------------------------------------------------ pooling, resize
def pool(v: NodeView) -> tuple[float, None]:
    """prod(kernel_shape) per output element (LpPool: 2, a power and an add)."""
    kernel = v.attr("kernel_shape")
    if not kernel:
        raise UnknownShape(f"{v.node.op_type} without kernel_shape")
    per = 2 if v.node.op_type == "LpPool" else 1
    return float(per * v.numel_out() * math.prod(kernel)), None


def resize(v: NodeView) -> tuple[float, None]:
    """nearest: a copy (0 flops); linear / cubic: a multiply and an add per neighbour,
    2**r (linear) or 4**r (cubic) neighbours, r = number of axes whose size changes."""
    mode = v.attr_str("mode", "nearest")
    if mode == "nearest":
        return 0.0, None
    in_shape, out_shape = v.in_shape(0), v.out_shape()
    resized = sum(1 for a, b in zip(in_shape, out_shape) if a != b)
    neighbours = (2 if mode == "linear" else 4) ** resized
    return 2.0 * neighbours * v.numel_out(), None


# ------------------------------------------------------------------ quantization
def quantize_linear(v: NodeView) -> tuple[float, None]:
    """Div, Round, saturate per element, plus Add when a zero point is given."""
    return float((3 + (1 if v.has_input(2) else 0)) * v.numel_out()), None


def dequantize_linear(v: NodeView) -> tuple[float, None]:
    """Mul per element, plus Sub when a zero point is given."""
    return float((1 + (1 if v.has_input(2) else 0)) * v.numel_out()), None


DYNAMIC_QUANTIZE_PER_ELEMENT = 6  # ReduceMin, ReduceMax, Div, Round, Add, saturate


def dynamic_quantize_linear(v: NodeView) -> tuple[float, None]:
    return float(DYNAMIC_QUANTIZE_PER_ELEMENT * v.numel_in(0)), None


# ------------------------------------------------------------------ the table
UNARY = ("Abs", "Neg", "Relu", "Floor", "Ceil", "Round", "Sign", "Not", "Reciprocal", "Sqrt", "Exp", "Log", "Sin",
         "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Erf", "Tanh", "Sigmoid",
         "IsNaN", "IsInf", "LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Softplus", "Softsign",
         "HardSigmoid", "HardSwish", "Mish", "Clip", "Shrink", "BitwiseNot")
BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Mod", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
          "And", "Or", "Xor", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "PRelu", "Where")
MOVEMENT = ("Transpose", "Concat", "Split", "Pad", "Tile", "Expand", "DepthToSpace", "SpaceToDepth", "Cast",
            "CastLike", "ReverseSequence", "Compress", "OneHot", "Trilu", "ScatterND", "ScatterElements",
            "Scatter", "ConstantOfShape", "EyeLike", "Upsample")
VIEWS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Shape", "Size", "Constant")

STANDARD: dict[str, Rule] = {
    **{op: elementwise() for op in UNARY + BINARY},
    **{op: variadic for op in ("Sum", "Max", "Min", "Mean")},
    **{op: movement for op in MOVEMENT},
    **{op: view for op in VIEWS},
    **{op: reduce_ for op in REDUCE_COSTS},
    "Gather": gather, "GatherElements": gather, "GatherND": gather, "Slice": slice_,
    "Range": range_, "CumSum": cumsum, "Einsum": einsum, "NonZero": cumsum, "Hardmax": elementwise(),
    "Softmax": softmax, "LogSoftmax": softmax,
    "BatchNormalization": batchnorm, "LayerNormalization": layernorm, "InstanceNormalization": instancenorm,
    "GroupNormalization": groupnorm, "LpNormalization": lpnorm,
    "MatMul": matmul, "MatMulInteger": matmul, "QLinearMatMul": qlinear_matmul, "Gemm": gemm,
    "Conv": conv, "ConvTranspose": conv_transpose, "QLinearConv": qlinear_conv, "ConvInteger": conv_integer,
    "MaxPool": pool, "AveragePool": pool, "LpPool": pool, "Resize": resize,
    "QuantizeLinear": quantize_linear, "DequantizeLinear": dequantize_linear,
    "DynamicQuantizeLinear": dynamic_quantize_linear,
}
