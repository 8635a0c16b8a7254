"""Rewrites are also checked at other sizes of the dynamic dims; dims tied by arithmetic
(a KV-cache decoder's mask is past + seq long) must not make that check vanish."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from adaptopt.adapt.assemble import other_shape_candidates, other_size_check
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
    assert len(shapes) == 1 + 4  # batch, seq, past_seq, total_seq


def test_a_model_that_runs_at_no_other_size_says_so():
    """Only one size works (a Reshape to a fixed element count): no check, and the caller is told."""
    f = TensorProto.FLOAT
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", f, ["n"])], [helper.make_tensor_value_info("y", f, [2, 4])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [2, 4])]), opset_imports=[helper.make_opsetid("", 17)])
    alt, runs = other_size_check(model, {"x": np.ones(8, np.float32)}, Config())
    assert alt is None and not runs
