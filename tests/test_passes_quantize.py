"""Quantization: dynamic int8, static QDQ calibrated on the feeds, weight-only int4."""

from __future__ import annotations

import numpy as np
from onnx import helper

from adaptopt.config import TargetConfig
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


def test_static_qdq_refuses_a_budget_it_cannot_keep(resnet_model):
    model = prepared(resnet_model)
    result = apply("quantize_static_qdq", model, feeds_for(model), budget=0.9999999)
    assert not result.modified and "budget" in result.changes["reason"]


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
