"""Rewrites are also checked at other sizes of the dynamic dims; dims tied by arithmetic
(a KV-cache decoder's mask is past + seq long) must not make that check vanish."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from adaptopt.adapt.assemble import check_other_shapes, other_shape_candidates, other_size_check
from adaptopt.config import Config


def _kv_like() -> onnx.ModelProto:
    """y = Concat(past, x) * mask: runs only when total == past + seq."""
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", f, ["batch", "seq"]),
              helper.make_tensor_value_info("past", f, ["batch", "past_seq"]),
              helper.make_tensor_value_info("mask", f, ["batch", "total_seq"])]
    nodes = [helper.make_node("Concat", ["past", "x"], ["cat"], axis=1), helper.make_node("Mul", ["cat", "mask"], ["y"])]
    out = [helper.make_tensor_value_info("y", f, ["batch", "total_seq"])]
    return helper.make_model(helper.make_graph(nodes, "kv", inputs, out), opset_imports=[helper.make_opsetid("", 17)])


def _feeds(batch: int, seq: int, past: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.random((batch, seq), np.float32), "past": rng.random((batch, past), np.float32),
            "mask": np.ones((batch, past + seq), np.float32)}


def test_tied_dims_fall_back_to_moving_one_named_dim():
    model = _kv_like()
    for batch, seq, past in [(1, 8, 0), (1, 1, 8), (1, 8, 8)]:
        alt, runs = other_size_check(model, _feeds(batch, seq, past), Config())
        assert runs, (batch, seq, past)
        assert alt["mask"].shape[1] == alt["past"].shape[1] + alt["x"].shape[1]
        assert alt["x"].shape != (batch, seq) or alt["past"].shape != (batch, past)  # some size really moved


def test_every_dim_moves_first_then_each_named_dim_alone():
    shapes = [{k: v.shape for k, v in c.items()} for c in other_shape_candidates(_kv_like(), _feeds(1, 8, 0))]
    assert shapes[0] == {"x": (2, 4), "past": (2, 1), "mask": (2, 4)}
    assert shapes[1] == {"x": (2, 8), "past": (2, 0), "mask": (2, 8)}  # batch alone
    assert shapes[5] == {"x": (2, 9), "past": (2, 1), "mask": (2, 9)}  # every dim one larger
    assert shapes[-1] == {"x": (1, 8), "past": (1, 1), "mask": (1, 9)}  # past and total one larger
    assert len(shapes) == 1 + 4 + 1 + 6  # batch, seq, past_seq, total_seq; then each pair of them


def _with_length_output(model: onnx.ModelProto, folded: bool) -> onnx.ModelProto:
    """``model`` with a second output, the mask's length: computed from its shape, or (as a
    constant fold at past 0 / seq 8 would leave it) the constant 8."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if folded:
        out.graph.initializer.append(helper.make_tensor("eight", TensorProto.INT64, [1], [8]))
        out.graph.node.append(helper.make_node("Identity", ["eight"], ["length"]))
    else:
        out.graph.node.extend([helper.make_node("Shape", ["mask"], ["mask_shape"], start=1)])
        out.graph.node.append(helper.make_node("Identity", ["mask_shape"], ["length"]))
    out.graph.output.append(helper.make_tensor_value_info("length", TensorProto.INT64, [1]))
    return out


def test_a_fold_of_tied_dims_is_caught_at_other_sizes():
    """A GPT-2 decoder step optimized at past 0 was checked with only its batch moved, and a
    fold of its causal mask baked in seq and past: now the sizes tried together move every
    named dim, each where the original runs."""
    original, folded = _with_length_output(_kv_like(), False), _with_length_output(_kv_like(), True)
    feeds = _feeds(1, 8, 0)
    assert check_other_shapes(original, original, feeds, Config()).ok
    caught = check_other_shapes(original, folded, feeds, Config())
    assert not caught.ok and "at other input sizes" in caught.reason


def test_a_model_that_runs_at_no_other_size_says_so():
    """Only one size works (a Reshape to a fixed element count): no check, and the caller is told."""
    f = TensorProto.FLOAT
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", f, ["n"])], [helper.make_tensor_value_info("y", f, [2, 4])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [2, 4])]), opset_imports=[helper.make_opsetid("", 17)])
    alt, runs = other_size_check(model, {"x": np.ones(8, np.float32)}, Config())
    assert alt is None and not runs
