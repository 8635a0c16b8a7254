"""Memory passes: transpose cancellation, NHWC, tiling, buffer settings, prefetched weights."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from adaptopt.passes import tiling
from adaptopt.passes.base import PassContext, boundary_names, finish
from adaptopt.passes.registry import get_pass
from adaptopt.runtime import ORT_CONFIG_KEY, make_session, model_session_config
from adaptopt.validate import compare
from tests.test_passes_support import (
    CPU,
    assert_noop,
    assert_rewrites,
    const,
    make_model,
    outputs,
    prepared,
    random_feeds,
    rng_array,
    tensor,
)


def test_cancel_transposes_sinks_through_elementwise_ops():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Relu", ["t"], ["r"]), helper.make_node("Add", ["r", "c"], ["a"]),
             helper.make_node("Transpose", ["a"], ["y"], perm=[0, 3, 1, 2])]
    model = make_model(nodes, [tensor("x", [1, 3, 4, 5])], [tensor("y", [1, 3, 4, 5])], [const("c", rng_array([3]))])
    result = assert_rewrites("cancel_transposes", model, random_feeds(model), {"Transpose": -2})
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Add"]


def test_cancel_transposes_hoists_a_shared_transpose_out_of_a_binary_op():
    nodes = [helper.make_node("Transpose", ["a"], ["ta"], perm=[1, 0]),
             helper.make_node("Transpose", ["b"], ["tb"], perm=[1, 0]),
             helper.make_node("Mul", ["ta", "tb"], ["y"])]
    model = make_model(nodes, [tensor("a", [2, 3]), tensor("b", [2, 3])], [tensor("y", [3, 2])])
    assert_rewrites("cancel_transposes", model, random_feeds(model), {"Transpose": -1})


def test_cancel_transposes_is_a_noop_without_a_partner():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]), helper.make_node("Relu", ["t"], ["y"])]
    assert_noop("cancel_transposes", make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [3, 2])]))


def _channels_last_blocks(blocks: int, op: str = "Add", batch="n") -> onnx.ModelProto:
    """ConvNeXt-style blocks: a depthwise Conv on the channels-first stream, the branch
    channels-last (Transpose, MatMul), Transposed back and added to the stream; a
    channels-last LayerNorm-like tail reads the stream through one more Transpose."""
    nodes, inits, stream = [], [], "x"
    for k in range(blocks):
        inits += [const(f"w{k}", rng_array([4, 1, 3, 3], seed=k)), const(f"m{k}", rng_array([4, 4], seed=10 + k))]
        nodes += [helper.make_node("Conv", [stream, f"w{k}"], [f"c{k}"], group=4, pads=[1, 1, 1, 1]),
                  helper.make_node("Transpose", [f"c{k}"], [f"t{k}"], perm=[0, 2, 3, 1]),
                  helper.make_node("MatMul", [f"t{k}", f"m{k}"], [f"b{k}"]),
                  helper.make_node("Transpose", [f"b{k}"], [f"u{k}"], perm=[0, 3, 1, 2]),
                  helper.make_node(op, [stream, f"u{k}"], [f"s{k}"])]
        stream = f"s{k}"
    nodes += [helper.make_node("Transpose", [stream], ["tail"], perm=[0, 2, 3, 1]),
              helper.make_node("Relu", ["tail"], ["y"])]
    return make_model(nodes, [tensor("x", [batch, 4, 5, 6])], [tensor("y", [batch, 5, 6, 4])], inits)


def test_transpose_residuals_keeps_the_stream_in_the_branch_layout():
    model = _channels_last_blocks(3)
    # 3 branch Transposes go; one twin of the stream comes in, and a Transpose back after
    # every block but the last, whose inverse (the tail's Transpose) goes with it: 7 -> 6
    result = assert_rewrites("transpose_residuals", model, random_feeds(model), {"Transpose": -1})
    assert result.changes["rewrites"] == 3
    adds = [n for n in result.model.graph.node if n.op_type == "Add"]
    producers = {o: n for n in result.model.graph.node for o in n.output}
    # every Add now reads the MatMul's channels-last output directly
    assert all(any(producers[i].op_type == "MatMul" for i in n.input if i in producers) for n in adds)
    # what the next Conv reads is a Transpose of the stream, which ORT folds into its reorder
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"][1:]
    assert all(producers[c.input[0]].op_type == "Transpose" for c in convs)


def test_transpose_residuals_keeps_operand_order():
    model = _channels_last_blocks(2, op="Sub")
    assert_rewrites("transpose_residuals", model, random_feeds(model))


def test_transpose_residuals_leaves_a_single_step_alone():
    # one residual op alone would trade its branch's Transpose for two
    assert_noop("transpose_residuals", _channels_last_blocks(1))


class NhwcFusedConv(OpRun):
    """Reference semantics of ORT's contrib NhwcFusedConv (channels-last X and Y, OIHW W)."""

    op_domain = "com.microsoft"

    def _run(self, x, w, b=None, **attrs):
        attrs = {k: v for k, v in attrs.items() if v is not None and k not in ("activation", "activation_params")}
        node = helper.make_node("Conv", ["x", "w"] + (["b"] if b is not None else []), ["y"], **attrs)
        inputs = [tensor("x", None), tensor("w", None)] + ([tensor("b", None)] if b is not None else [])
        conv = helper.make_model(helper.make_graph([node], "conv", inputs, [tensor("y", None)]),
                                 opset_imports=[helper.make_opsetid("", 17)])
        feeds = {"x": np.transpose(x, (0, 3, 1, 2)), "w": w} | ({"b": b} if b is not None else {})
        return (np.transpose(ReferenceEvaluator(conv).run(None, feeds)[0], (0, 2, 3, 1)),)


def test_nhwc_rewrite_is_exact_and_cancels_inner_transposes():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4), helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], strides=[2, 2])]
    model = make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 5, 4, 4])],
                       [const("w1", rng_array([4, 3, 3, 3], 1)), const("w2", rng_array([5, 4, 1, 1], 2)),
                        const("b2", rng_array([5], 3))])
    work = onnx.ModelProto()
    work.CopyFrom(model)
    rewritten, changes = get_pass("convert_nhwc").transform(work, PassContext(target=CPU))
    rewritten = finish(model, rewritten, "convert_nhwc")
    ops = [n.op_type for n in rewritten.graph.node]
    assert changes["rewrites"] == 2 and ops.count("NhwcFusedConv") == 2 and ops.count("Transpose") == 2
    assert boundary_names(rewritten) == boundary_names(model)
    feeds = random_feeds(model)
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    got = ReferenceEvaluator(rewritten, new_ops=[NhwcFusedConv]).run(None, feeds)[0]
    assert compare({"y": want}, {"y": got}, exact_tolerance=1e-5).ok


def test_nhwc_does_not_apply_where_the_target_lacks_the_kernel():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"])]
    model = make_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 2, 4, 4])], [const("w", rng_array([2, 3, 1, 1]))])
    assert "no NHWC Conv kernel" in assert_noop("convert_nhwc", model)


@pytest.fixture
def small_cache(monkeypatch):
    """Tiling applies above the last-level cache size; pretend it is small."""
    monkeypatch.setattr(tiling, "last_level_cache_bytes", lambda: 0)


def test_tiling_splits_a_strided_conv_and_its_epilogue_along_rows(small_cache):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2], pads=[2, 1, 2, 1]),
             helper.make_node("Mul", ["s", "c"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Sigmoid", ["a"], ["g"]), helper.make_node("Mul", ["a", "g"], ["y"])]
    model = make_model(nodes, [tensor("x", [1, 4, 300, 301])], [tensor("y", None)],
                       [const("w", rng_array([48, 4, 5, 5])), const("s", rng_array([48, 1, 1])),
                        const("b", rng_array([1]))])
    result = assert_rewrites("tile_operator", model, random_feeds(model), {"Conv": 4, "Slice": 5, "Concat": 1})
    pads = [list(helper.get_attribute_value(a)) for n in result.model.graph.node if n.op_type == "Conv"
            for a in n.attribute if a.name == "pads"]
    # the image edges keep their padding; the last tile needs only 1 of the 2 bottom rows
    # (output rows = floor((300 + 4 - 5) / 2) + 1 = 150 never reach the second)
    assert pads[0] == [2, 1, 0, 1] and pads[-1] == [0, 1, 1, 1] and all(p == [0, 1, 0, 1] for p in pads[1:-1])
    assert sum(n.op_type == "Sigmoid" for n in result.model.graph.node) == 5


def test_tiling_splits_a_large_matmul_and_its_epilogue_along_rows(small_cache):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    model = make_model(nodes, [tensor("x", [1, 2304, 512])], [tensor("y", [1, 2304, 512])],
                       [const("w", rng_array([512, 512], 0, 0.05)), const("b", rng_array([512]))])
    assert_rewrites("tile_operator", model, random_feeds(model), {"MatMul": 4, "Relu": 4, "Concat": 1})  # 4.5 MiB in 5 tiles


def test_tiling_needs_an_epilogue_that_leaves_by_one_tensor(small_cache):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["r"]),
             helper.make_node("Add", ["m", "r"], ["y"]), helper.make_node("Neg", ["m"], ["z"])]
    model = make_model(nodes, [tensor("x", [1, 2048, 512])], [tensor("y", None), tensor("z", None)],
                       [const("w", rng_array([512, 512], 0, 0.05))])
    assert_noop("tile_operator", model)


def test_tiling_ignores_small_ops(resnet_model, small_cache):
    assert "last-level cache" in assert_noop("tile_operator", prepared(resnet_model))


def test_tiling_leaves_outputs_that_fit_the_cache(monkeypatch):
    monkeypatch.setattr(tiling, "last_level_cache_bytes", lambda: 64 << 20)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
    model = make_model(nodes, [tensor("x", [1, 2048, 512])], [tensor("y", [1, 2048, 512])],
                       [const("w", rng_array([512, 512], 0, 0.05))])
    assert_noop("tile_operator", model)


def test_buffer_settings_are_written_into_ort_config(resnet_model):
    model = prepared(resnet_model)
    result = assert_rewrites("buffers_low_memory", model, random_feeds(model))
    value = json.loads(next(p.value for p in result.model.metadata_props if p.key == ORT_CONFIG_KEY))
    assert value == {"session_options": {"enable_cpu_mem_arena": False, "enable_mem_pattern": False,
                                         "enable_mem_reuse": True}}
    assert model_session_config(result.model)["enable_mem_pattern"] is False
    assert "already carries" in assert_noop("buffers_no_arena", result.model)


def test_buffer_settings_merge_with_existing_ones(resnet_model):
    model = prepared(resnet_model)
    first = get_pass("buffers_no_pattern").apply(model, PassContext(target=CPU)).model
    second = get_pass("buffers_no_arena").apply(first, PassContext(target=CPU)).model
    assert model_session_config(second) == {"enable_mem_pattern": False, "enable_cpu_mem_arena": False}
    assert np.array_equal(outputs(second, random_feeds(model))["logits"], outputs(model, random_feeds(model))["logits"])


def test_prefetch_precomputes_weight_transforms_and_gemm_layout():
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["m"]),
             helper.make_node("Constant", [], ["scale"], value=const("v", np.float32(0.5))),
             helper.make_node("Cast", ["b16"], ["b"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["m", "scale"], ["s"]),
             helper.make_node("Gemm", ["s", "g", "b"], ["y"], transB=1)]
    model = make_model(nodes, [tensor("x", [2, 6])], [tensor("y", [2, 3])],
                       [const("w", rng_array([4, 6])), const("g", rng_array([3, 4])),
                        const("b16", rng_array([3]).astype(np.float16))])
    result = assert_rewrites("prefetch_weights", model, random_feeds(model), {"Transpose": -1, "Cast": -1, "Constant": -1})
    gemm = next(n for n in result.model.graph.node if n.op_type == "Gemm")
    assert all(a.i == 0 for a in gemm.attribute if a.name == "transB")


def test_prefetch_keeps_scalar_constants_scalar():
    nodes = [helper.make_node("Constant", [], ["start"], value=const("v0", np.array(0, np.int64))),
             helper.make_node("Constant", [], ["step"], value=const("v1", np.array(1, np.int64))),
             helper.make_node("Range", ["start", "n", "step"], ["y"])]
    model = make_model(nodes, [tensor("n", [], TensorProto.INT64)], [tensor("y", None, TensorProto.INT64)])
    result = get_pass("prefetch_weights").apply(model, PassContext(target=CPU))
    assert all(list(t.dims) == [] for t in result.model.graph.initializer)
    run_all = make_session(result.model, CPU, level="all")  # ORT's Range shape check wants scalars
    assert list(run_all.run(None, {"n": np.array(3, np.int64)})[0]) == [0, 1, 2]


def test_prefetch_is_a_noop_on_plain_weights():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = make_model(nodes, [tensor("x", [2, 4])], [tensor("y", [2, 3])], [const("w", rng_array([4, 3]))])
    assert_noop("prefetch_weights", model)
