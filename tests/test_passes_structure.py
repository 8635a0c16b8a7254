"""Loop unrolling, channel pruning, mixed precision and gradient accumulation."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from adaptopt.config import TargetConfig
from adaptopt.passes.base import PassContext
from adaptopt.passes.registry import get_pass
from tests.test_passes_support import (
    apply,
    assert_noop,
    assert_rewrites,
    const,
    feeds_for,
    make_model,
    prepared,
    random_feeds,
    rng_array,
    tensor,
)

GPU = TargetConfig(execution_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))


# ---------------------------------------------------------------- loops
def _loop_body():
    """``v = v * 2 + i`` with ``v`` also emitted as a scan output; the condition passes through."""
    nodes = [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
             helper.make_node("Cast", ["i"], ["i_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["v_in", "two"], ["v2"]), helper.make_node("Add", ["v2", "i_f"], ["v_out"]),
             helper.make_node("Mul", ["v_out", "outer"], ["scan_v"])]  # reads an outer-scope tensor
    return helper.make_graph(
        nodes, "body",
        [tensor("i", [], TensorProto.INT64), tensor("cond_in", [], TensorProto.BOOL), tensor("v_in", [3])],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("v_out", [3]), tensor("scan_v", [3])],
        initializer=[const("two", np.float32(2.0))])


def _loop_model(trips: int):
    nodes = [helper.make_node("Relu", ["x"], ["outer"]),
             helper.make_node("Loop", ["M", "", "x"], ["v_final", "stacked"], body=_loop_body())]
    return make_model(nodes, [tensor("x", [3])], [tensor("v_final", [3]), tensor("stacked", [trips, 3])],
                      [const("M", np.array(trips, np.int64))])


def test_unroll_loop_with_static_trip_count():
    model = _loop_model(4)
    result = assert_rewrites("unroll_loops", model, random_feeds(model), {"Loop": -1, "Concat": 1})
    assert sum(n.op_type == "Add" for n in result.model.graph.node) == 4


def test_unroll_scan_both_directions():
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "xi"], ["s_out"]), helper.make_node("Mul", ["s_out", "xi"], ["yi"])],
        "scan_body", [tensor("s_in", [2]), tensor("xi", [2])], [tensor("s_out", [2]), tensor("yi", [2])])
    nodes = [helper.make_node("Scan", ["s0", "x"], ["s_final", "ys"], body=body, num_scan_inputs=1,
                              scan_input_directions=[1], scan_output_directions=[1])]
    model = make_model(nodes, [tensor("s0", [2]), tensor("x", [5, 2])], [tensor("s_final", [2]), tensor("ys", [5, 2])])
    assert_rewrites("unroll_loops", model, random_feeds(model), {"Scan": -1, "Gather": 5})


def test_unroll_is_a_noop_for_dynamic_trip_counts():
    nodes = [helper.make_node("Relu", ["x"], ["outer"]),
             helper.make_node("Loop", ["M", "", "x"], ["v_final", "stacked"], body=_loop_body())]
    model = make_model(nodes, [tensor("x", [3]), tensor("M", [], TensorProto.INT64)],
                       [tensor("v_final", [3]), tensor("stacked", None)])
    assert_noop("unroll_loops", model)


# ---------------------------------------------------------------- pruning
def _conv_pair(zero_channels=(1, 4), bias_value=0.0):
    w1 = rng_array([6, 3, 3, 3], 1)
    b1 = rng_array([6], 2)
    for c in zero_channels:
        w1[c] = 0.0
        b1[c] = bias_value
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4), helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"])]
    return make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 4, 8, 8])],
                      [const("w1", w1), const("b1", b1), const("w2", rng_array([4, 6, 1, 1], 3)),
                       const("b2", rng_array([4], 4))])


def test_prune_zero_channels_cuts_producer_and_consumer():
    model = _conv_pair()
    result = assert_rewrites("prune_zero_channels", model, random_feeds(model))
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert sorted(s for s in shapes.values() if len(s) == 4) == [[4, 3, 3, 3], [4, 4, 1, 1]]


def test_prune_zero_channels_folds_constant_channels_into_the_bias():
    model = _conv_pair(bias_value=0.7)  # zero weights, non-zero bias: relu(0.7) reaches the 1x1 conv
    assert_rewrites("prune_zero_channels", model, random_feeds(model))


def test_prune_zero_channels_gemm_pair():
    w1 = rng_array([8, 5])
    w1[:, 2] = 0.0
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("Gemm", ["t", "w2", "b2"], ["y"], transB=1)]
    model = make_model(nodes, [tensor("x", [3, 8])], [tensor("y", [3, 4])],
                       [const("w1", w1), const("w2", rng_array([4, 5])), const("b2", rng_array([4]))])
    assert_rewrites("prune_zero_channels", model, random_feeds(model))


def test_prune_zero_channels_is_a_noop_on_dense_weights():
    assert_noop("prune_zero_channels", _conv_pair(zero_channels=()))


def test_prune_magnitude_finds_the_largest_ratio_within_budget():
    model = _conv_pair(zero_channels=())
    feeds = random_feeds(model)
    loose = apply("prune_channels_magnitude", model, feeds, budget=0.5)
    tight = apply("prune_channels_magnitude", model, feeds, budget=0.9999999)
    assert loose.modified and loose.changes["rewrites"] == 1
    assert not tight.modified and "budget" in tight.changes["reason"]
    kept = next(t for t in loose.model.graph.initializer if len(t.dims) == 4 and t.dims[1] == 3).dims[0]
    assert kept < 6


# ---------------------------------------------------------------- mixed precision
def test_mixed_precision_keeps_boundary_types(bert_model, bert_config):
    model = prepared(bert_model, bert_config)
    result = assert_rewrites("mixed_precision_fp16", model, feeds_for(model, bert_config), budget=0.999, target=GPU)
    fp16 = [t for t in result.model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert fp16 and all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in result.model.graph.output)
    softmax = [n for n in result.model.graph.node if n.op_type == "Softmax"]
    casts_to_float = {n.output[0] for n in result.model.graph.node if n.op_type == "Cast"
                      and n.attribute[0].i == TensorProto.FLOAT}
    assert all(s.input[0] in casts_to_float for s in softmax)  # softmax stays a float32 island


def test_mixed_precision_does_not_apply_on_cpu_targets(resnet_model):
    model = prepared(resnet_model)
    assert "GPU" in assert_noop("mixed_precision_fp16", model, feeds_for(model), budget=0.99)


# ---------------------------------------------------------------- gradient accumulation
def _training_model():
    """Inference ``y = x @ W``; training_info: mean-squared-error gradient and one Adagrad step."""
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [tensor("x", [4, 3])], [tensor("y", [4, 2])],
                       [const("W", rng_array([3, 2])), const("H", np.zeros((3, 2), np.float32)),
                        const("T", np.array(0, np.int64))])
    nodes = [helper.make_node("MatMul", ["bx", "W"], ["pred"]), helper.make_node("Sub", ["pred", "by"], ["err"]),
             helper.make_node("Transpose", ["bx"], ["bxt"]), helper.make_node("MatMul", ["bxt", "err"], ["g0"]),
             helper.make_node("Constant", [], ["scale"], value=const("s", np.float32(0.5))),
             helper.make_node("Mul", ["g0", "scale"], ["G"]),
             helper.make_node("Constant", [], ["R"], value=const("r", np.float32(0.1))),
             helper.make_node("Adagrad", ["R", "T", "W", "G", "H"], ["W_new", "H_new"], domain="ai.onnx.preview.training",
                              epsilon=1e-6),
             helper.make_node("Constant", [], ["one"], value=const("o", np.array(1, np.int64))),
             helper.make_node("Add", ["T", "one"], ["T_new"])]
    algorithm = helper.make_graph(nodes, "train", [tensor("bx", [2, 3]), tensor("by", [2, 2])],
                                  [tensor("W_new", [3, 2]), tensor("H_new", [3, 2]), tensor("T_new", [], TensorProto.INT64)])
    info = model.training_info.add()
    info.algorithm.CopyFrom(algorithm)
    for key, value in (("W", "W_new"), ("H", "H_new"), ("T", "T_new")):
        info.update_binding.add(key=key, value=value)
    model.opset_import.append(helper.make_opsetid("ai.onnx.preview.training", 1))
    return model


def _train(model: onnx.ModelProto, batches) -> np.ndarray:
    """Run the training algorithm once per batch (onnx.reference), applying update_binding."""
    info = model.training_info[0]
    state = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    graph = onnx.GraphProto()
    graph.CopyFrom(info.algorithm)
    used = {i for n in graph.node for i in n.input}
    graph.input.extend(helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
                       for k, v in state.items() if k in used)
    runner = ReferenceEvaluator(helper.make_model(graph, opset_imports=list(model.opset_import)))
    for bx, by in batches:
        feeds = {k: v for k, v in state.items() if k in used} | {"bx": bx, "by": by}
        results = dict(zip([o.name for o in graph.output], runner.run(None, feeds)))
        state.update({b.key: results[b.value] for b in info.update_binding})
    return state["W"]


def test_gradient_accumulation_commits_the_mean_gradient_every_k_calls():
    model = _training_model()
    result = get_pass("gradient_accumulation").apply(model, PassContext())
    assert result.modified and result.changes["rewrites"] == 1
    onnx.checker.check_model(result.model)
    assert [o.name for o in result.model.graph.output] == ["y"]
    rng = np.random.default_rng(0)
    micro = [(rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((2, 2)).astype(np.float32))
             for _ in range(4)]
    start = numpy_helper.to_array(model.graph.initializer[0])
    assert np.array_equal(_train(result.model, micro[:3]), start)  # nothing is committed before the 4th call
    assert np.allclose(_train(result.model, micro), _train_mean(model, micro), atol=1e-5)


def _train_mean(model, micro) -> np.ndarray:
    """One Adagrad step on the mean of the micro-batch gradients (the accumulated update)."""
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    grads = [0.5 * bx.T @ (bx @ w - by) for bx, by in micro]
    g = np.mean(grads, axis=0)
    h = g * g  # Adagrad: H = H + G^2 (H starts at 0), T = 0 so the rate is R
    return (w - 0.1 * g / (np.sqrt(h) + 1e-6)).astype(np.float32)


def test_gradient_accumulation_is_not_applicable_to_inference_graphs(resnet_model):
    assert "inference graph" in assert_noop("gradient_accumulation", prepared(resnet_model))
