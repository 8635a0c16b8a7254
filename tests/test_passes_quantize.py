"""Quantization: dynamic int8, static QDQ calibrated on the feeds, weight-only int4."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from adaptopt.config import TargetConfig
from adaptopt.passes import quantize
from adaptopt.passes.base import PassContext
from adaptopt.validate import compare
from tests.test_passes_support import (
    CPU,
    apply,
    assert_noop,
    assert_rewrites,
    const,
    feeds_for,
    make_model,
    outputs,
    prepared,
    random_feeds,
    rng_array,
    tensor,
)

GPU_ONLY = TargetConfig(execution_providers=("CUDAExecutionProvider",), allow_cpu_fallback=False)


def _no_weights():
    nodes = [helper.make_node("MatMul", ["x", "x"], ["y"])]
    return make_model(nodes, [tensor("x", [4, 4])], [tensor("y", [4, 4])])


def test_dynamic_int8_quantizes_matmuls_and_gemms(bert_model, bert_config):
    model = prepared(bert_model, bert_config)
    result = assert_rewrites("quantize_dynamic_int8", model, feeds_for(model, bert_config), {"MatMul": -12, "Gemm": -1},
                             budget=0.999, cosine=0.999)
    assert result.changes["rewrites"] == 13


def test_dynamic_int8_is_a_noop_without_weights_or_cpu():
    assert "constant float weights" in assert_noop("quantize_dynamic_int8", _no_weights(), budget=0.99)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", [2, 8])], [tensor("y", [2, 8])],
                       [const("w", rng_array([8, 8]))])
    assert "CPU" in assert_noop("quantize_dynamic_int8", model, budget=0.99, target=GPU_ONLY)


def test_static_qdq_is_calibrated_on_the_feeds(resnet_model):
    model = prepared(resnet_model)
    feeds = feeds_for(model)
    result = assert_rewrites("quantize_static_qdq", model, feeds, budget=0.999, cosine=0.999)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("QuantizeLinear") >= 8 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")


def test_static_qdq_needs_feeds(resnet_model):
    assert "ctx.feeds" in assert_noop("quantize_static_qdq", prepared(resnet_model), feeds=None, budget=0.99)


def test_static_qdq_refuses_a_float16_graph():
    """ORT's quantizer raised inside on a half-precision model; the pass now says why it does not apply."""
    from onnx import TensorProto
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float16), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4, 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.ones((4, 16), np.float16)}
    assert "float16" in assert_noop("quantize_static_qdq", model, feeds=feeds, budget=0.99)


def test_static_qdq_refuses_a_budget_it_cannot_keep(resnet_model):
    model = prepared(resnet_model)
    result = apply("quantize_static_qdq", model, feeds_for(model), budget=0.9999999)
    assert not result.modified and "budget" in result.changes["reason"]


def test_calibration_feeds_are_seeded_draws_like_the_capture():
    feeds = {"x": np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32),
             "ids": np.random.default_rng(1).integers(5, 50, (1, 16)),
             "shape": np.array([1, 3, 8, 8], np.int64)}
    draws = list(quantize.calibration_feeds(feeds))
    again = list(quantize.calibration_feeds(feeds))
    assert len(draws) == quantize.CALIBRATION_SAMPLES == 8
    assert draws[0] == feeds  # the captured values themselves come first
    for draw, same in zip(draws[1:], again[1:]):
        assert all(np.array_equal(draw[k], same[k]) for k in feeds)  # seeded: same feeds, same draws
        for k, v in feeds.items():
            assert draw[k].shape == v.shape and draw[k].dtype == v.dtype
            assert v.min() <= draw[k].min() and draw[k].max() <= v.max()
        assert not np.array_equal(draw["x"], feeds["x"]) and not np.array_equal(draw["ids"], feeds["ids"])
        assert np.array_equal(draw["shape"], feeds["shape"])  # 1-D integers (shapes, axes) are kept
    assert len({d["x"].tobytes() for d in draws}) == len(draws)


def test_static_qdq_calibrates_on_several_samples_deterministically(resnet_model):
    model = prepared(resnet_model)
    feeds = feeds_for(model)
    ctx = PassContext(target=CPU, feeds=feeds, accuracy_budget=0.999)
    single, used_single = quantize.calibrate(model, ctx, samples=1)
    several, used = quantize.calibrate(model, ctx)
    assert (used_single, used) == (1, 8) and single.keys() == several.keys()
    assert all(isinstance(lo, np.ndarray) and lo.dtype == np.float32 for lo, _ in several.values())
    # min/max over all samples: never narrower than the captured feed's, and wider somewhere
    assert all(several[k][0] <= single[k][0] and several[k][1] >= single[k][1] for k in single)
    assert sum(several[k][1] > single[k][1] for k in single) > len(single) // 2
    first, second = apply("quantize_static_qdq", model, feeds, 0.999), apply("quantize_static_qdq", model, feeds, 0.999)
    assert first.modified and first.changes["calibration_samples"] == 8
    assert first.model.SerializeToString() == second.model.SerializeToString()


def _dead_on_the_capture():
    """Gemm -> Relu -> Gemm whose hidden units are all off on the captured input (h == 0)
    and on for nearby inputs: one sample calibrates h to the range [0, 0]."""
    rng = np.random.default_rng(0)
    x = rng.random((8, 32)).astype(np.float32)
    w1 = rng_array([32, 16], 1)
    b1 = (-(x @ w1).max(axis=0) - 0.05).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["p"]), helper.make_node("Relu", ["p"], ["h"]),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["y"])]
    model = make_model(nodes, [tensor("x", [8, 32])], [tensor("y", [8, 8])],
                       [const("w1", w1), const("b1", b1), const("w2", rng_array([16, 8], 2)),
                        const("b2", np.full(8, 0.01, np.float32))])
    return model, {"x": x}


def _scale_of(model, tensor_name: str) -> float:
    [q] = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor_name]
    return float(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == q.input[1])))


def test_static_qdq_quantizes_a_tensor_one_sample_would_calibrate_to_zero(monkeypatch):
    model, feeds = _dead_on_the_capture()
    ctx = PassContext(target=CPU, feeds=feeds, accuracy_budget=0.99)
    single, _ = quantize.calibrate(model, ctx, samples=1)
    several, _ = quantize.calibrate(model, ctx)
    assert float(single["h"][1]) == 0.0 < float(several["h"][1])
    # held-out inputs near the capture (other seeds than the calibration's)
    held_out = [quantize.draw_like(np.random.default_rng(100 + s), feeds["x"]) for s in range(10)]

    def held_out_cosine(result) -> float:
        return min(compare(outputs(model, {"x": x}), outputs(result.model, {"x": x}), budget=0.99).min_cosine
                   for x in held_out)

    result = assert_rewrites("quantize_static_qdq", model, feeds, budget=0.99, cosine=0.99)
    assert 0.0 < _scale_of(result.model, "h") < 0.1 and held_out_cosine(result) > 0.95
    calibrate = quantize.calibrate
    monkeypatch.setattr(quantize, "calibrate", lambda m, c: calibrate(m, c, samples=1))
    one = apply("quantize_static_qdq", model, feeds, 0.99)
    # the zero range becomes ORT's fallback scale 1.0: right on the capture, wrong elsewhere
    assert one.modified and _scale_of(one.model, "h") == 1.0 and held_out_cosine(one) < 0.5


def test_static_qdq_types_contrib_op_outputs_for_the_bias():
    """The quantizer skips a tensor of unknown type (output of com.microsoft.Gelu) and then
    could not quantize the bias of the Conv reading it."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Gelu", ["c"], ["g"], domain="com.microsoft"),
             helper.make_node("Conv", ["g", "w2", "b2"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [tensor("x", [1, 4, 8, 8])], [tensor("y", [1, 8, 8, 8])],
                       [const("w1", rng_array([8, 4, 3, 3], 1, 0.3)), const("b1", rng_array([8], 2, 0.1)),
                        const("w2", rng_array([8, 8, 3, 3], 3, 0.3)), const("b2", rng_array([8], 4, 0.1))],
                       domains=[("com.microsoft", 1)])
    assert "g" not in {vi.name for vi in model.graph.value_info}
    result = assert_rewrites("quantize_static_qdq", model, random_feeds(model), budget=0.99, cosine=0.99)
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == "g" for n in result.model.graph.node)


def test_static_qdq_splits_fused_convs_to_quantize_them(resnet_model):
    model = prepared(resnet_model)
    feeds = feeds_for(model)
    fused = apply("fuse_conv_activation", apply("fuse_conv_bn", model, feeds).model, feeds).model
    convs = sum(n.op_type in ("Conv", "FusedConv") for n in fused.graph.node)
    assert any(n.op_type == "FusedConv" for n in fused.graph.node)
    result = assert_rewrites("quantize_static_qdq", fused, feeds, budget=0.999, cosine=0.999)
    ops = [n.op_type for n in result.model.graph.node]
    assert "FusedConv" not in ops and ops.count("Conv") == convs
    quantized = {n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"}
    conv_inputs = {n.input[0] for n in result.model.graph.node if n.op_type == "Conv"}
    dq_outputs = {n.output[0] for n in result.model.graph.node if n.op_type == "DequantizeLinear"}
    assert conv_inputs <= dq_outputs and quantized  # every Conv reads a dequantized input



def test_static_qdq_applies_where_every_conv_is_fused():
    """FusedConv with Clip (its bounds as activation_params) and LeakyRelu (alpha) only."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["d"], pads=[1, 1, 1, 1]),
             helper.make_node("LeakyRelu", ["d"], ["y"], alpha=0.2)]
    model = make_model(nodes, [tensor("x", [1, 4, 8, 8])], [tensor("y", [1, 8, 8, 8])],
                       [const("w1", rng_array([8, 4, 3, 3], 1, 0.3)), const("b1", rng_array([8], 2, 0.1)),
                        const("lo", np.array(0, np.float32)), const("hi", np.array(0.6, np.float32)),
                        const("w2", rng_array([8, 8, 3, 3], 3, 0.3)), const("b2", rng_array([8], 4, 0.1))])
    feeds = random_feeds(model)
    fused = apply("fuse_conv_activation", model, feeds).model
    assert [n.op_type for n in fused.graph.node].count("FusedConv") == 2
    result = assert_rewrites("quantize_static_qdq", fused, feeds, {"com.microsoft.FusedConv": -2, "Conv": 2},
                             budget=0.99, cosine=0.99)
    ops = {n.op_type for n in result.model.graph.node}
    assert "LeakyRelu" in ops and "Clip" not in ops  # the quantizer folds Clip [0, 0.6] into the Q range

def test_int4_packs_large_matmul_weights():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = make_model(nodes, [tensor("x", [1, 16, 128])], [tensor("y", [1, 16, 96])],
                       [const("w", rng_array([128, 256], 1, 0.1)), const("w2", rng_array([256, 96], 2, 0.1))])
    # 4-bit weights cost more accuracy than int8: the documented budget is cosine 0.99
    result = assert_rewrites("quantize_weights_int4", model, random_feeds(model), {"com.microsoft.MatMulNBits": 2},
                             budget=0.99, cosine=0.99)
    packed = [t for t in result.model.graph.initializer if t.data_type == 2]  # uint8
    assert sum(np.prod(t.dims) for t in packed) < (128 * 256 + 256 * 96) * 4 / 6


def test_int4_on_the_bert_example_keeps_the_documented_budget(bert_model, bert_config):
    model = prepared(bert_model, bert_config)
    assert_rewrites("quantize_weights_int4", model, feeds_for(model, bert_config), {"MatMul": -12},
                    budget=0.99, cosine=0.99)


def test_int4_ignores_small_matmuls():
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", [2, 8])], [tensor("y", [2, 8])],
                       [const("w", rng_array([8, 8]))])
    assert ">= 4096" in assert_noop("quantize_weights_int4", model, budget=0.99)
