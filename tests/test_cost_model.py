"""Cost model: every covered op against FLOPs and bytes worked out by hand.

Each case builds a one-node model whose tensors have static shapes; the expected
figures are written as the arithmetic of the conventions in ``cost_ops``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper

from adaptopt.profile.cost_model import estimate

F, I64, U8, I8, I32 = T.FLOAT, T.INT64, T.UINT8, T.INT8, T.INT32
MS = "com.microsoft"


def one_node(op: str, inputs: list, outputs: list, domain: str = "", **attrs) -> onnx.ModelProto:
    """A model with a single ``op`` node; ``inputs``/``outputs`` are (name, type, shape), None = absent input."""
    names = [i[0] if i else "" for i in inputs]
    node = helper.make_node(op, names, [o[0] for o in outputs], name="n", domain=domain, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(*i) for i in inputs if i],
                              [helper.make_tensor_value_info(*o) for o in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])


CASES = {
    # op: (model, flops, bytes)
    "Conv+bias": (one_node("Conv", [("x", F, [1, 3, 8, 8]), ("w", F, [4, 3, 3, 3]), ("b", F, [4])],
                           [("y", F, [1, 4, 6, 6])]),
                  2 * (4 * 6 * 6) * (3 * 3 * 3) + 4 * 6 * 6, 4 * (192 + 108 + 4 + 144)),
    "Conv depthwise": (one_node("Conv", [("x", F, [1, 4, 8, 8]), ("w", F, [4, 1, 3, 3])], [("y", F, [1, 4, 6, 6])],
                                group=4), 2 * 144 * 9, 4 * (256 + 36 + 144)),
    "ConvTranspose": (one_node("ConvTranspose", [("x", F, [1, 2, 4, 4]), ("w", F, [2, 3, 3, 3])],
                               [("y", F, [1, 3, 6, 6])]), 2 * 32 * 3 * 9, 4 * (32 + 54 + 108)),
    "MatMul batched": (one_node("MatMul", [("a", F, [2, 3, 4]), ("b", F, [4, 5])], [("y", F, [2, 3, 5])]),
                       2 * 30 * 4, 4 * (24 + 20 + 30)),
    "MatMul 1-D": (one_node("MatMul", [("a", F, [4]), ("b", F, [4, 5])], [("y", F, [5])]), 2 * 5 * 4,
                   4 * (4 + 20 + 5)),
    "Gemm transA+C": (one_node("Gemm", [("a", F, [4, 3]), ("b", F, [4, 5]), ("c", F, [5])], [("y", F, [3, 5])],
                               transA=1), 2 * 3 * 5 * 4 + 15, 4 * (12 + 20 + 5 + 15)),
    "Relu": (one_node("Relu", [("x", F, [2, 3])], [("y", F, [2, 3])]), 6, 48),
    "Add broadcast": (one_node("Add", [("a", F, [2, 3]), ("b", F, [3])], [("y", F, [2, 3])]), 6, 4 * (6 + 3 + 6)),
    "Sum of 3": (one_node("Sum", [("a", F, [4]), ("b", F, [4]), ("c", F, [4])], [("y", F, [4])]), 2 * 4, 4 * 16),
    "Mean of 3": (one_node("Mean", [("a", F, [4]), ("b", F, [4]), ("c", F, [4])], [("y", F, [4])]), 3 * 4, 4 * 16),
    "ReduceMean": (one_node("ReduceMean", [("x", F, [2, 3, 4])], [("y", F, [2, 3, 1])], axes=[2]), 24 + 6,
                   4 * (24 + 6)),
    "ReduceSum": (one_node("ReduceSum", [("x", F, [2, 3, 4])], [("y", F, [1, 1, 1])]), 24, 4 * 25),
    "Softmax": (one_node("Softmax", [("x", F, [2, 5])], [("y", F, [2, 5])]), 5 * 10, 80),
    "BatchNormalization": (one_node("BatchNormalization", [("x", F, [1, 2, 3, 3])] +
                                    [(n, F, [2]) for n in ("s", "b", "m", "v")], [("y", F, [1, 2, 3, 3])]),
                           4 * 18 + 2 * 2, 4 * (18 + 8 + 18)),
    "LayerNormalization": (one_node("LayerNormalization", [("x", F, [2, 4]), ("s", F, [4]), ("b", F, [4])],
                                    [("y", F, [2, 4])]), 8 * 7 + 2 * 4, 4 * (8 + 4 + 4 + 8)),
    "InstanceNormalization": (one_node("InstanceNormalization", [("x", F, [1, 2, 3, 3]), ("s", F, [2]),
                                                                 ("b", F, [2])], [("y", F, [1, 2, 3, 3])]),
                              18 * 7 + 2 * 4, 4 * (18 + 2 + 2 + 18)),
    "MaxPool": (one_node("MaxPool", [("x", F, [1, 1, 4, 4])], [("y", F, [1, 1, 2, 2])], kernel_shape=[2, 2],
                         strides=[2, 2]), 4 * 4, 4 * (16 + 4)),
    "AveragePool": (one_node("AveragePool", [("x", F, [1, 1, 4, 4])], [("y", F, [1, 1, 3, 3])],
                             kernel_shape=[2, 2]), 9 * 4, 4 * (16 + 9)),
    "GlobalAveragePool": (one_node("GlobalAveragePool", [("x", F, [1, 2, 3, 3])], [("y", F, [1, 2, 1, 1])]),
                          18 + 2, 4 * 20),
    "Resize nearest": (one_node("Resize", [("x", F, [1, 1, 2, 2]), None, ("s", F, [4])], [("y", F, [1, 1, 4, 4])]),
                       0, 4 * (4 + 4 + 16)),
    "Resize linear": (one_node("Resize", [("x", F, [1, 1, 2, 2]), None, ("s", F, [4])], [("y", F, [1, 1, 4, 4])],
                               mode="linear"), 2 * 4 * 16, 4 * (4 + 4 + 16)),
    "Gather": (one_node("Gather", [("d", F, [10, 4]), ("i", I64, [3])], [("y", F, [3, 4])]), 0, 3 * 8 + 2 * 48),
    "Reshape": (one_node("Reshape", [("x", F, [2, 3]), ("s", I64, [1])], [("y", F, [6])]), 0, 0),
    "Transpose": (one_node("Transpose", [("x", F, [2, 3])], [("y", F, [3, 2])]), 0, 48),
    "Concat": (one_node("Concat", [("a", F, [2, 3]), ("b", F, [2, 2])], [("y", F, [2, 5])], axis=1), 0,
               4 * (6 + 4 + 10)),
    "Slice": (one_node("Slice", [("x", F, [4, 6]), ("st", I64, [1]), ("en", I64, [1]), ("ax", I64, [1])],
                       [("y", F, [2, 6])]), 0, 2 * 48 + 3 * 8),
    "Einsum": (one_node("Einsum", [("a", F, [2, 3, 4]), ("b", F, [2, 4, 5])], [("y", F, [2, 3, 5])],
                        equation="bij,bjk->bik"), 2 * (2 * 3 * 4 * 5), 4 * (24 + 40 + 30)),
    "QuantizeLinear": (one_node("QuantizeLinear", [("x", F, [2, 4]), ("s", F, [1]), ("z", U8, [1])],
                                [("y", U8, [2, 4])]), 4 * 8, 32 + 4 + 1 + 8),
    "DequantizeLinear": (one_node("DequantizeLinear", [("x", U8, [2, 4]), ("s", F, [1]), ("z", U8, [1])],
                                  [("y", F, [2, 4])]), 2 * 8, 8 + 4 + 1 + 32),
    "MatMulInteger": (one_node("MatMulInteger", [("a", U8, [3, 4]), ("b", I8, [4, 5])], [("y", I32, [3, 5])]),
                      2 * 15 * 4, 12 + 20 + 4 * 15),
    "QLinearConv": (one_node("QLinearConv", [("x", U8, [1, 3, 8, 8]), ("xs", F, [1]), ("xz", U8, [1]),
                                             ("w", I8, [4, 3, 3, 3]), ("ws", F, [1]), ("wz", I8, [1]),
                                             ("ys", F, [1]), ("yz", U8, [1])], [("y", U8, [1, 4, 6, 6])]),
                    2 * 144 * 27 + 2 * 144, 192 + 4 + 1 + 108 + 4 + 1 + 4 + 1 + 144),
    # ---- ONNX Runtime contrib ops
    "FusedConv": (one_node("FusedConv", [("x", F, [1, 3, 8, 8]), ("w", F, [4, 3, 3, 3]), ("b", F, [4])],
                           [("y", F, [1, 4, 6, 6])], domain=MS, activation="Relu"),
                  2 * 144 * 27 + 144 + 144, 4 * (192 + 108 + 4 + 144)),
    "FusedGemm": (one_node("FusedGemm", [("a", F, [4, 3]), ("b", F, [4, 5]), ("c", F, [5])], [("y", F, [3, 5])],
                           domain=MS, transA=1, activation="Relu"), 2 * 3 * 5 * 4 + 15 + 15, 4 * 52),
    "Attention": (one_node("Attention", [("x", F, [1, 4, 8]), ("w", F, [8, 24]), ("b", F, [24])],
                           [("y", F, [1, 4, 8])], domain=MS, num_heads=2),
                  (2 * 4 * 8 * 24 + 4 * 24) + 2 * 4 * 4 * 8 + 2 * 4 * 4 * 8 + (2 * 4 * 4) * 6,
                  4 * (32 + 192 + 24 + 32)),
    "MultiHeadAttention": (one_node("MultiHeadAttention", [("q", F, [1, 4, 8]), ("k", F, [1, 6, 8]),
                                                           ("v", F, [1, 6, 8])], [("y", F, [1, 4, 8])], domain=MS,
                                    num_heads=2), 2 * 4 * 6 * 8 * 2 + (2 * 4 * 6) * 6, 4 * (32 + 48 + 48 + 32)),
    "SkipLayerNormalization": (one_node("SkipLayerNormalization", [("x", F, [2, 4]), ("s", F, [2, 4]),
                                                                   ("g", F, [4]), ("b", F, [4])],
                                        [("y", F, [2, 4])], domain=MS), 8 * 7 + 2 * 4 + 8, 4 * (8 + 8 + 4 + 4 + 8)),
    "LayerNormalization (contrib)": (one_node("LayerNormalization", [("x", F, [2, 4]), ("s", F, [4]),
                                                                     ("b", F, [4])], [("y", F, [2, 4])], domain=MS),
                                     8 * 7 + 2 * 4, 4 * 24),
    "Gelu": (one_node("Gelu", [("x", F, [2, 4])], [("y", F, [2, 4])], domain=MS), 5 * 8, 64),
    "FastGelu+bias": (one_node("FastGelu", [("x", F, [2, 4]), ("b", F, [4])], [("y", F, [2, 4])], domain=MS),
                      10 * 8, 4 * (8 + 4 + 8)),
    "BiasGelu": (one_node("BiasGelu", [("x", F, [2, 4]), ("b", F, [4])], [("y", F, [2, 4])], domain=MS),
                 6 * 8, 4 * 20),
    "DynamicQuantizeMatMul": (one_node("DynamicQuantizeMatMul", [("a", F, [3, 4]), ("b", I8, [4, 5]),
                                                                 ("s", F, [1])], [("y", F, [3, 5])], domain=MS),
                              6 * 12 + 2 * 15 * 4 + 15, 48 + 20 + 4 + 60),
    "MatMulIntegerToFloat": (one_node("MatMulIntegerToFloat", [("a", U8, [3, 4]), ("b", I8, [4, 5]),
                                                               ("as", F, [1]), ("bs", F, [1])], [("y", F, [3, 5])],
                                      domain=MS), 2 * 15 * 4 + 15, 12 + 20 + 4 + 4 + 60),
    "MatMulNBits": (one_node("MatMulNBits", [("a", F, [3, 32]), ("b", U8, [4, 1, 16]), ("s", F, [4])],
                             [("y", F, [3, 4])], domain=MS, K=32, N=4, bits=4, block_size=32),
                    2 * 12 * 32 + 2 * 4 * 32, 4 * 96 + 64 + 16 + 48),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cost_equals_hand_computed(case):
    model, flops, nbytes = CASES[case]
    cost = estimate(model)
    node = cost.per_node[0]
    assert node.known, node.reason
    assert (node.flops, node.bytes) == (flops, nbytes)
    assert (cost.flops, cost.bytes) == (flops, nbytes)
    assert cost.unknown_ops == set()


def test_unknown_op_is_reported_not_zero():
    model = one_node("Frobnicate", [("x", F, [2])], [("y", F, [2])], domain="my.domain")
    model.opset_import.append(helper.make_opsetid("my.domain", 1))
    cost = estimate(model)
    assert not cost.per_node[0].known
    assert "my.domain:Frobnicate" in cost.per_node[0].reason
    assert cost.unknown_ops == {"Frobnicate"} and cost.unknown_nodes == 1
    assert cost.intensity is None  # nothing known: no intensity, not 0


def test_unknown_shape_is_reported_with_the_tensor():
    model = one_node("Relu", [("x", F, ["N", 3])], [("y", F, ["N", 3])])
    node = estimate(model).per_node[0]
    assert not node.known and "'y'" in node.reason


def test_run_time_shapes_win_over_inference():
    model = one_node("MatMul", [("a", F, ["N", 4]), ("b", F, [4, 5])], [("y", F, ["N", 5])])
    captured = {"a": np.zeros((6, 4), np.float32), "y": np.zeros((6, 5), np.float32)}
    cost = estimate(model, captured)
    assert cost.per_node[0].known
    assert cost.flops == 2 * 30 * 4 and cost.bytes == 4 * (24 + 20 + 30)
    as_tuples = estimate(model, {"a": (6, 4), "y": (6, 5)})  # element sizes from the value infos
    assert (as_tuples.flops, as_tuples.bytes) == (cost.flops, cost.bytes)


def test_subset_and_totals_over_a_real_model(resnet_model):
    cost = estimate(onnx.shape_inference.infer_shapes(resnet_model))
    convs = [n for n in cost.per_node if n.op_type == "Conv"]
    assert convs and all(n.known and n.flops > 0 for n in convs)
    part = cost.subset(n.name for n in convs)
    assert part.flops == sum(n.flops for n in convs)
    assert part.flops < cost.flops
