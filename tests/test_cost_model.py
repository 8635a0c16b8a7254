"""Cost model: every covered op against FLOPs and bytes worked out by hand.

Each case builds a one-node model whose tensors have static shapes; the expected
figures are written as the arithmetic of the conventions in ``cost_ops``. Nodes with
bodies (Loop, Scan, If, local function calls) are checked against their bodies' figures.
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


# ------------------------------------------------------------------ nodes with bodies
def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def graph_model(nodes, inputs, outputs, inits=(), functions=(), opsets=(("", 17),)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, functions=list(functions),
                             opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def weight(name, *shape):
    return onnx.numpy_helper.from_array(np.zeros(shape, np.float32), name)


def int64(name, value):
    return onnx.numpy_helper.from_array(np.array(value, np.int64), name)


def matmul_loop_body(cond_out_node=None):
    """s_out = s_in @ W; the condition handed on unchanged (or computed by ``cond_out_node``)."""
    cond = cond_out_node or helper.make_node("Identity", ["cond_in"], ["cond_out"])
    return helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "W"], ["s_out"]), cond], "body",
        [vi("i", I64, []), vi("cond_in", T.BOOL, []), vi("s_in", F, ["B", 8])],
        [vi("cond_out", T.BOOL, []), vi("s_out", F, ["B", 8])])


MATMUL_4x8x8 = (2 * 4 * 8 * 8, 4 * (32 + 64 + 32))  # one body run of matmul_loop_body on [4, 8]: flops, bytes


def loop_model(trip_count_init=True, body=None) -> onnx.ModelProto:
    loop = helper.make_node("Loop", ["M", "", "X"], ["s"], name="loop", body=body or matmul_loop_body())
    inits = [weight("W", 8, 8)] + ([int64("M", 5)] if trip_count_init else [])
    inputs = [vi("X", F, [4, 8])] + ([] if trip_count_init else [vi("M", I64, [])])
    return graph_model([loop], inputs, [vi("s", F, [4, 8])], inits)


def test_loop_with_a_constant_trip_count_is_the_body_times_the_trips():
    cost = estimate(loop_model())
    node = cost.per_node[0]
    assert node.known and not node.partial, node.reason
    assert (node.flops, node.bytes) == (5 * MATMUL_4x8x8[0], 5 * MATMUL_4x8x8[1])
    assert "x 5 iterations" in node.reason and not cost.is_partial and cost.unknown_ops == set()
    assert node.runs == 5  # one run moves bytes / runs


def test_loop_trip_count_from_a_constant_node_or_the_run_time_value():
    model = loop_model(trip_count_init=False)
    as_constant = graph_model([helper.make_node("Constant", [], ["M"], value_int=3)] + list(model.graph.node),
                              [vi("X", F, [4, 8])], [vi("s", F, [4, 8])], [weight("W", 8, 8)])
    assert estimate(as_constant).flops == 3 * MATMUL_4x8x8[0]
    seen = estimate(model, {"M": np.array(7, np.int64)}).per_node[0]
    assert seen.flops == 7 * MATMUL_4x8x8[0] and "run time" in seen.reason


def test_loop_whose_trip_count_is_unknown_counts_the_body_once_as_a_lower_bound():
    for model, flops in ((loop_model(trip_count_init=False), MATMUL_4x8x8[0]),  # M is a model input: no value
                         (loop_model(body=matmul_loop_body(cond_out_node=helper.make_node(  # may stop early
                             "Not", ["cond_in"], ["cond_out"]))), MATMUL_4x8x8[0] + 1)):  # + the Not
        cost = estimate(model)
        node = cost.per_node[0]
        assert node.known and node.partial and "lower bound" in node.reason
        assert node.flops == flops
        assert cost.is_partial and cost.partial_nodes == 1 and cost.unknown_nodes == 0


def test_nested_loops_multiply_and_read_the_outer_trip_count():
    inner = helper.make_node("Loop", ["N", "", "s_in"], ["s_out"], body=matmul_loop_body())
    outer_body = helper.make_graph(
        [inner, helper.make_node("Identity", ["cond_in"], ["cond_out"])], "outer",
        [vi("i", I64, []), vi("cond_in", T.BOOL, []), vi("s_in", F, ["B", 8])],
        [vi("cond_out", T.BOOL, []), vi("s_out", F, ["B", 8])])
    model = loop_model(body=outer_body)
    model.graph.initializer.append(int64("N", 4))
    assert estimate(model).flops == 5 * 4 * MATMUL_4x8x8[0]


def scan_model(steps: int, axis: int = 0) -> onnx.ModelProto:
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "Wx"], ["p"]), helper.make_node("Add", ["h_prev", "p"], ["h_new"]),
         helper.make_node("Identity", ["h_new"], ["y_t"])], "body",
        [vi("h_prev", F, [2, 8]), vi("x_t", F, [2, 4])], [vi("h_new", F, [2, 8]), vi("y_t", F, [2, 8])])
    x_shape = [steps, 2, 4] if axis == 0 else [2, steps, 4]
    scan = helper.make_node("Scan", ["h0", "X"], ["h", "ys"], name="scan", body=body, num_scan_inputs=1,
                            scan_input_axes=[axis])
    return graph_model([scan], [vi("h0", F, [2, 8]), vi("X", F, x_shape)],
                       [vi("h", F, [2, 8]), vi("ys", F, [steps, 2, 8])], [weight("Wx", 4, 8)])


@pytest.mark.parametrize("axis", [0, 1])
def test_scan_is_the_body_times_the_steps(axis):
    step_flops = 2 * 2 * 8 * 4 + 2 * 8  # MatMul [2,4]@[4,8], Add [2,8]
    step_bytes = 4 * (8 + 32 + 16) + 4 * (16 + 16 + 16)  # MatMul x_t, Wx, p; Add h_prev, p, h_new (Identity: 0)
    node = estimate(scan_model(6, axis)).per_node[0]
    assert node.known and not node.partial, node.reason
    assert (node.flops, node.bytes) == (6 * step_flops, 6 * step_bytes)


def if_model(cond=None) -> onnx.ModelProto:
    then = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["a"])], "then", [], [vi("a", F, [4, 16])])
    other = helper.make_graph([helper.make_node("Relu", ["X"], ["r"]), helper.make_node("Concat", ["r", "r"], ["b"],
                                                                                         axis=1)],
                              "else", [], [vi("b", F, [4, 16])])
    node = helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)
    inits = [weight("W", 8, 16)] + ([onnx.numpy_helper.from_array(np.array(cond), "c")] if cond is not None else [])
    inputs = [vi("X", F, [4, 8])] + ([vi("c", T.BOOL, [])] if cond is None else [])
    return graph_model([node], inputs, [vi("y", F, [4, 16])], inits)


THEN = (2 * 4 * 16 * 8, 4 * (32 + 128 + 64))  # MatMul [4,8]@[8,16]
ELSE = (32, 4 * (32 + 32) + 4 * (32 + 32 + 64))  # Relu, Concat (0 flops)


def test_if_counts_the_costlier_branch_as_an_upper_bound():
    cost = estimate(if_model())
    node = cost.per_node[0]
    assert node.known and not node.partial
    assert (node.flops, node.bytes) == THEN and "upper bound" in node.reason and "then_branch" in node.reason


def test_if_with_a_known_condition_counts_the_branch_taken():
    assert (estimate(if_model(cond=False)).flops, estimate(if_model(cond=False)).bytes) == ELSE
    seen = estimate(if_model(), {"c": np.array(False)}).per_node[0]
    assert (seen.flops, seen.bytes) == ELSE and "run time" in seen.reason


def mlp_function() -> onnx.FunctionProto:
    """MLP(x, w) = Relu(Gemm(x, w, transB=<the call's transB>))."""
    gemm = helper.make_node("Gemm", ["x", "w"], ["t"])
    gemm.attribute.append(helper.make_attribute_ref("transB", onnx.AttributeProto.INT))
    return helper.make_function("local", "MLP", ["x", "w"], ["y"], [gemm, helper.make_node("Relu", ["t"], ["y"])],
                                opset_imports=[helper.make_opsetid("", 17)], attributes=["transB"])


def test_local_function_calls_cost_their_body_with_the_call_shapes_and_attributes():
    calls = [helper.make_node("MLP", ["X", "W1"], ["h"], name="mlp1", domain="local", transB=1),
             helper.make_node("MLP", ["h", "W2"], ["y"], name="mlp2", domain="local", transB=0)]
    model = graph_model(calls, [vi("X", F, [4, 8])], [vi("y", F, [4, 32])],
                        [weight("W1", 16, 8), weight("W2", 16, 32)], functions=[mlp_function()],
                        opsets=(("", 17), ("local", 1)))
    model.graph.value_info.append(vi("h", F, ["N", 16]))
    cost = estimate(model, {"h": (4, 16)})  # the run-time shape of h
    first, second = cost.per_node
    assert first.known and second.known and not cost.is_partial, (first.reason, second.reason)
    # Gemm [4,8] x [16,8]^T -> [4,16], then Relu; Gemm [4,16] x [16,32] -> [4,32], then Relu
    assert (first.flops, second.flops) == (2 * 4 * 16 * 8 + 64, 2 * 4 * 32 * 16 + 128)
    assert first.bytes == 4 * (32 + 128 + 64) + 4 * (64 + 64)


def test_body_nodes_that_cannot_be_costed_stay_visible():
    odd = helper.make_node("Frobnicate", ["s_out"], ["f"], domain="my.domain")
    body = matmul_loop_body()
    body.node.append(odd)
    model = loop_model(body=body)
    model.opset_import.append(helper.make_opsetid("my.domain", 1))
    cost = estimate(model)
    node = cost.per_node[0]
    assert node.known and node.partial and "Frobnicate" in node.reason
    assert node.flops == 5 * MATMUL_4x8x8[0]  # what could be costed, a lower bound
    assert cost.unknown_ops == {"Frobnicate"} and cost.is_partial

    nothing = matmul_loop_body()
    del nothing.node[0]  # only the condition's Identity and the unknown op are left
    nothing.node.append(helper.make_node("Frobnicate", ["s_in"], ["s_out"], domain="my.domain"))
    cost = estimate(loop_model(body=nothing))
    assert not cost.per_node[0].known and cost.unknown_ops == {"Loop", "Frobnicate"} and cost.flops == 0
