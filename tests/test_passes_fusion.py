"""Kernel fusion: Conv+BN / affine, MatMul+Add, activations, HardSwish, SiLU, GELU, LayerNorm,
and the ORT transformer fusions."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from tests.test_passes_support import (
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


def paddle_block(opset: int = 12):
    """What paddle2onnx leaves after a conv: ``Mul(w, conv) + b``, a four-op hard-swish, a
    second affine, then a 1x1 conv; weights as ``Constant`` nodes."""
    def constant(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.float32)))
    nodes = [constant("w1", rng_array([8, 4, 3, 3], 1, 0.3)), constant("s", [0.9]), constant("t", [0.2]),
             constant("three", 3.0), constant("zero", 0.0), constant("six", 6.0), constant("s2", [1.1]),
             constant("t2", [-0.1]), constant("w2", rng_array([6, 8, 1, 1], 2, 0.3)),
             helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["s", "c"], ["m"]), helper.make_node("Add", ["m", "t"], ["a"]),
             helper.make_node("Add", ["a", "three"], ["a3"]), helper.make_node("Clip", ["a3", "zero", "six"], ["r6"]),
             helper.make_node("Mul", ["a", "r6"], ["ar6"]), helper.make_node("Div", ["ar6", "six"], ["hs"]),
             helper.make_node("Mul", ["s2", "hs"], ["m2"]), helper.make_node("Add", ["m2", "t2"], ["a2"]),
             helper.make_node("Conv", ["a2", "w2"], ["y"])]
    return make_model(nodes, [tensor("x", [1, 4, 10, 10])], [tensor("y", [1, 6, 10, 10])], opset=opset)


def test_conv_bn_folds_batch_norm(resnet_model):
    model = prepared(resnet_model)
    assert_rewrites("fuse_conv_bn", model, feeds_for(model), {"BatchNormalization": -6})


@pytest.mark.parametrize("group", [1, 2, 4])
def test_conv_bn_folds_into_a_conv_transpose(group):
    """A grouped ConvTranspose's weight is [C_in, C_out / group, k, k]: output channel
    g * C_out / group + j is column j of group g's rows (a sweep's segmentation head kept its
    BatchNormalization after a grouped ConvTranspose)."""
    rng = np.random.default_rng(group)
    stats = [const(name, rng.uniform(0.5, 1.5, 8).astype(np.float32)) for name in ("scale", "shift", "mean", "var")]
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], strides=[2, 2], group=group),
             helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["y"])]
    model = make_model(nodes, [tensor("x", [1, 4, 5, 5])], [tensor("y", [1, 8, 11, 11])],
                       [const("w", rng_array([4, 8 // group, 3, 3], group)), *stats])
    assert_rewrites("fuse_conv_bn", model, random_feeds(model), {"BatchNormalization": -1})


def test_conv_bn_is_a_noop_without_batch_norm():
    assert_noop("fuse_conv_bn", paddle_block())


def test_conv_affine_folds_paddle_affines_before_and_after_convs():
    model = paddle_block()
    result = assert_rewrites("fuse_conv_affine", model, random_feeds(model), {"Mul": -2, "Add": -2})
    assert sum(n.op_type == "Conv" for n in result.model.graph.node) == 2


def test_conv_affine_keeps_add_before_a_padded_conv():
    nodes = [helper.make_node("Add", ["x", "b"], ["xb"]), helper.make_node("Conv", ["xb", "w"], ["y"], pads=[1] * 4)]
    model = make_model(nodes, [tensor("x", [1, 2, 5, 5])], [tensor("y", [1, 3, 5, 5])],
                       [const("b", rng_array([2, 1, 1])), const("w", rng_array([3, 2, 3, 3]))])
    assert_noop("fuse_conv_affine", model)


@pytest.mark.parametrize("opset, ops", [(12, {"Clip": -1, "Div": -1, "HardSigmoid": 1}), (14, {"HardSwish": 1})])
def test_hardswish_fuses_the_paddle_form(opset, ops):
    model = paddle_block(opset)
    assert_rewrites("fuse_hardswish", model, random_feeds(model), ops)


def test_hardswish_is_a_noop_without_the_pattern(resnet_model):
    assert_noop("fuse_hardswish", prepared(resnet_model))


def test_silu_becomes_quickgelu():
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["s", "x"], ["y"])]
    model = make_model(nodes, [tensor("x", [2, 8])], [tensor("y", [2, 8])])
    assert_rewrites("fuse_silu", model, random_feeds(model), {"Sigmoid": -1, "Mul": -1, "com.microsoft.QuickGelu": 1})
    assert_noop("fuse_silu", paddle_block())


def test_matmul_add_becomes_gemm(bert_model, bert_config):
    model = prepared(bert_model, bert_config)
    assert_rewrites("fuse_matmul_add", model, feeds_for(model, bert_config), {"MatMul": -12, "Add": -12, "Gemm": 12})
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    model = make_model(nodes, [tensor("x", [4, 8])], [tensor("y", [4, 5])],
                       [const("w", rng_array([8, 5])), const("b", rng_array([5]))])
    assert_rewrites("fuse_matmul_add", model, random_feeds(model), {"Gemm": 1, "MatMul": -1, "Add": -1})


def test_matmul_add_with_a_dynamic_batch_becomes_gemm():
    """A 2-D MLP input [N, 8] (a dynamic batch): Gemm takes it as it is, at any batch; a bias
    that would broadcast the output to rank 3 is left alone."""
    from adaptopt.runtime import make_session, run
    from tests.test_passes_support import CPU, apply
    w, b = rng_array([8, 5]), rng_array([5])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    model = make_model(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 5])], [const("w", w), const("b", b)])
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    result = assert_rewrites("fuse_matmul_add", model, feeds, {"Gemm": 1, "MatMul": -1, "Add": -1})
    x = np.random.default_rng(1).standard_normal((7, 8)).astype(np.float32)
    np.testing.assert_allclose(run(make_session(result.model, CPU), {"x": x})["y"], x @ w + b, rtol=1e-5, atol=1e-5)
    wide = make_model(nodes, [tensor("x", ["N", 8])], [tensor("y", [1, "N", 5])],
                      [const("w", w), const("b", rng_array([1, 1, 5]))])
    assert not apply("fuse_matmul_add", wide, feeds).modified


def test_matmul_add_is_a_noop_without_constant_weights():
    nodes = [helper.make_node("MatMul", ["x", "x"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    model = make_model(nodes, [tensor("x", [4, 4])], [tensor("y", [4, 4])], [const("b", rng_array([4]))])
    assert_noop("fuse_matmul_add", model)


def test_conv_and_gemm_activations_fuse_into_contrib_ops(bert_model, bert_config):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4), helper.make_node("LeakyRelu", ["c"], ["l"], alpha=0.1),
             helper.make_node("Conv", ["l", "w2"], ["c2"]), helper.make_node("Clip", ["c2", "lo", "hi"], ["y"])]
    model = make_model(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", [1, 4, 6, 6])],
                       [const("w", rng_array([5, 3, 3, 3])), const("w2", rng_array([4, 5, 1, 1])),
                        const("lo", np.float32(0)), const("hi", np.float32(6))])
    assert_rewrites("fuse_conv_activation", model, random_feeds(model), {"com.microsoft.FusedConv": 2, "Conv": -2})
    model = prepared(bert_model, bert_config)  # pooler: Gemm + Tanh
    assert_rewrites("fuse_conv_activation", model, feeds_for(model, bert_config), {"com.microsoft.FusedGemm": 1})
    assert_noop("fuse_conv_activation", paddle_block())


def test_gelu_and_layernorm_fuse_in_bert(bert_model, bert_config):
    model = prepared(bert_model, bert_config)
    feeds = feeds_for(model, bert_config)
    assert_rewrites("fuse_gelu", model, feeds, {"Erf": -2, "com.microsoft.Gelu": 2})
    assert_rewrites("fuse_layernorm", model, feeds, {"LayerNormalization": 5, "ReduceMean": -10})


def test_gelu_and_layernorm_are_noops_elsewhere(resnet_model):
    assert_noop("fuse_gelu", prepared(resnet_model))
    assert_noop("fuse_layernorm", prepared(resnet_model))
    assert "opset >= 17" in assert_noop("fuse_layernorm", paddle_block(12))


def test_transformer_fusions_via_onnxruntime(bert_model, bert_config):
    model = prepared(bert_model, bert_config)
    result = assert_rewrites("fuse_attention", model, feeds_for(model, bert_config),
                             {"com.microsoft.SkipLayerNormalization": 4})
    assert result.changes["fused"]["SkipLayerNormalization"] == 4
    assert all(n.name.startswith("fuse_attention/") for n in result.model.graph.node if n.domain == "com.microsoft")
    assert_noop("fuse_attention", paddle_block())


def _pad_conv(pads, mode="constant", value=None, conv_pads=(1, 1, 1, 1), second_reader=False, auto_pad=None):
    """TF-style "same" padding as exporters write it: an asymmetric Pad, then a Conv."""
    pad_inputs = ["x", "pads"] + (["value"] if value is not None else [])
    conv_attrs = {"auto_pad": auto_pad} if auto_pad else {"pads": list(conv_pads)}
    nodes = [helper.make_node("Pad", pad_inputs, ["xp"], mode=mode),
             helper.make_node("Conv", ["xp", "w"], ["y"], strides=[2, 2], **conv_attrs)]
    inits = [const("w", rng_array([4, 3, 3, 3], 3, 0.3)), numpy_helper.from_array(np.array(pads, np.int64), "pads")]
    if value is not None:
        inits.append(const("value", np.array(value, np.float32)))
    outs = [tensor("y", None)]
    if second_reader:
        nodes.append(helper.make_node("Relu", ["xp"], ["r"]))
        outs.append(tensor("r", None))
    return make_model(nodes, [tensor("x", [1, 3, 9, 9])], outs, inits)


def test_pad_conv_folds_an_asymmetric_zero_pad():
    model = prepared(_pad_conv([0, 0, 0, 1, 0, 0, 1, 2]))
    result = assert_rewrites("fuse_pad_conv", model, random_feeds(model), {"Pad": -1})
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
    assert list(next(a for a in conv.attribute if a.name == "pads").ints) == [1, 2, 2, 3]


def test_pad_conv_folds_into_a_valid_conv():
    """EfficientNet's export: Pad then Conv(auto_pad=VALID)."""
    model = prepared(_pad_conv([0, 0, 0, 1, 0, 0, 1, 2], value=0.0, auto_pad="VALID"))
    result = assert_rewrites("fuse_pad_conv", model, random_feeds(model), {"Pad": -1})
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
    assert list(next(a for a in conv.attribute if a.name == "pads").ints) == [0, 1, 1, 2]


@pytest.mark.parametrize("case", [
    dict(pads=[0, 0, 0, 1, 0, 0, 1, 2], mode="reflect"),      # not zeros
    dict(pads=[0, 0, 0, 1, 0, 0, 1, 2], value=0.5),          # non-zero constant
    dict(pads=[0, 1, 0, 0, 0, 0, 0, 0]),                      # pads the channel axis
    dict(pads=[0, 0, 0, 1, 0, 0, 1, 2], second_reader=True),  # the padded tensor is read elsewhere
    dict(pads=[0, 0, 0, 1, 0, 0, 1, 2], auto_pad="SAME_UPPER"),  # its own padding depends on the size
])
def test_pad_conv_leaves_other_pads_alone(case):
    assert_noop("fuse_pad_conv", prepared(_pad_conv(**case)))


def _layer_scale_block(scale_op="Mul", bias=True, scale_shape=(6,), constant_first=False):
    """ConvNeXt's pointwise layer: MatMul(x, W) + b, times a per-channel layer scale."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"])]
    last = "m"
    if bias:
        nodes.append(helper.make_node("Add", ["b", "m"], ["a"]))
        last = "a"
    inputs = ["g", last] if constant_first and scale_op == "Mul" else [last, "g"]
    nodes.append(helper.make_node(scale_op, inputs, ["y"]))
    inits = [const("w", rng_array([4, 6], 1)), const("b", rng_array([6], 2)),
             const("g", rng_array(scale_shape, 3, 0.5) + 1.5)]
    return make_model(nodes, [tensor("x", [2, 3, 4])], [tensor("y", [2, 3, 6])], inits)


@pytest.mark.parametrize("kwargs", [{}, {"scale_op": "Div"}, {"bias": False}, {"constant_first": True},
                                    {"scale_shape": (1, 1, 6)}, {"scale_shape": ()}])
def test_matmul_scale_folds_the_layer_scale_into_weight_and_bias(kwargs):
    model = _layer_scale_block(**kwargs)
    result = assert_rewrites("fuse_matmul_scale", model, random_feeds(model), {kwargs.get("scale_op", "Mul"): -1})
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"][:2 if kwargs.get("bias", True) else 1]


def test_matmul_scale_leaves_a_scale_that_varies_along_other_axes():
    assert_noop("fuse_matmul_scale", _layer_scale_block(scale_shape=(3, 6)))
