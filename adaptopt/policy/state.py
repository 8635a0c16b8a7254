"""State encoding for the tabular policy.

State = (size bucket, bound class, dominant op family, performance bucket, last pass).
Coarse buckets keep the table small enough to learn from a few hundred measurements
and to transfer between models: a table learnt on one conv net says something about
the conv-dominated, memory-bound, small subgraphs of the next one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable

STOP = "stop"

OP_FAMILIES = {
    "conv": {"Conv", "ConvTranspose", "FusedConv", "QLinearConv", "ConvInteger"},
    "matmul": {"MatMul", "Gemm", "FusedGemm", "MatMulInteger", "MatMulNBits", "DynamicQuantizeMatMul",
               "MatMulIntegerToFloat", "QLinearMatMul", "Attention", "MultiHeadAttention"},
    "norm": {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "SkipLayerNormalization",
             "SimplifiedLayerNormalization", "ReduceMean", "Pow", "Sqrt"},
    "activation": {"Relu", "Sigmoid", "Tanh", "Gelu", "Erf", "HardSigmoid", "HardSwish", "LeakyRelu", "Clip",
                   "Softmax", "Exp", "Log", "FastGelu", "BiasGelu", "QuickGelu"},
    "elementwise": {"Add", "Sub", "Mul", "Div", "Max", "Min", "Neg", "Abs", "Where", "Equal", "Not", "And",
                    "Or", "Less", "Greater", "Cast"},
    "movement": {"Reshape", "Transpose", "Concat", "Slice", "Split", "Gather", "Squeeze", "Unsqueeze",
                 "Flatten", "Expand", "Tile", "Pad", "Resize", "Shape", "Identity", "Constant",
                 "ConstantOfShape", "Range", "GatherElements", "ScatterND"},
    "pool": {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"},
    "quant": {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"},
    "control": {"If", "Loop", "Scan"},
}
_FAMILY_OF = {op: family for family, ops in OP_FAMILIES.items() for op in ops}
# weight of an op when deciding which family dominates (a Conv matters more than a Reshape)
_FAMILY_WEIGHT = {"conv": 8.0, "matmul": 8.0, "norm": 2.0, "pool": 2.0, "activation": 1.0,
                  "elementwise": 1.0, "quant": 1.0, "control": 8.0, "movement": 0.5, "other": 1.0}


def op_family(op_type: str) -> str:
    return _FAMILY_OF.get(op_type, "other")


def dominant_family(op_types: Iterable[str], op_times_ms: dict[str, float] | None = None) -> str:
    """The family with the largest measured time when known, else the largest weighted count."""
    if op_times_ms:
        by_family: Counter = Counter()
        for op, ms in op_times_ms.items():
            by_family[op_family(op)] += ms
        if by_family and max(by_family.values()) > 0:
            return max(sorted(by_family), key=lambda f: by_family[f])
    counts: Counter = Counter()
    for op in op_types:
        family = op_family(op)
        counts[family] += _FAMILY_WEIGHT[family]
    return max(sorted(counts), key=lambda f: counts[f]) if counts else "other"


def size_bucket(node_count: int) -> str:
    for limit, name in ((4, "xs"), (16, "s"), (64, "m"), (256, "l")):
        if node_count <= limit:
            return name
    return "xl"


def performance_bucket(performance: float | None) -> str:
    if performance is None:
        return "unknown"
    for limit, name in ((0.05, "p0"), (0.2, "p1"), (0.5, "p2")):
        if performance < limit:
            return name
    return "p3"


@dataclass(frozen=True)
class State:
    size: str
    bound: str
    family: str
    performance: str
    last_pass: str

    @property
    def key(self) -> str:
        return "|".join((self.size, self.bound, self.family, self.performance, self.last_pass))

    @classmethod
    def from_key(cls, key: str) -> "State":
        return cls(*key.split("|"))

    def after(self, pass_name: str, bound: str | None = None, performance: str | None = None) -> "State":
        return State(self.size, bound or self.bound, self.family, performance or self.performance, pass_name)


def encode(node_count: int, bound: str, op_types: Iterable[str], performance: float | None,
           last_pass: str = "none", op_times_ms: dict[str, float] | None = None) -> State:
    return State(size_bucket(node_count), bound or "unknown", dominant_family(op_types, op_times_ms),
                 performance_bucket(performance), last_pass)
