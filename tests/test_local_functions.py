"""Model-local functions: the work model is inlined so passes reach inside the calls;
when nothing is kept the user's model comes back as given, functions and all."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from adaptopt import api
from adaptopt.config import Config, InputSpec
from adaptopt.graph.functions import inlined
from tests.conftest import run_model


def mlp_model(path) -> str:
    """y = MLP(x, w1) + MLP(x, w2), MLP(x, w) = Relu(MatMul(x, w)) as a local function."""
    rng = np.random.default_rng(0)
    body = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    function = helper.make_function("local", "MLP", ["x", "w"], ["y"], body,
                                    opset_imports=[helper.make_opsetid("", 17)])
    weights = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.1, n) for n in ("w1", "w2")]
    nodes = [helper.make_node("MLP", ["X", "w1"], ["a"], domain="local", name="call1"),
             helper.make_node("MLP", ["X", "w2"], ["b"], domain="local", name="call2"),
             helper.make_node("Add", ["a", "b"], ["Y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [32, 64])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [32, 64])], weights)
    model = helper.make_model(graph, functions=[function], ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    onnx.save(model, path)
    return str(path)


def test_inlining_exposes_the_calls_and_keeps_the_outputs(tmp_path):
    model = onnx.load(mlp_model(tmp_path / "m.onnx"))
    out = inlined(model)
    assert not out.functions and [n.op_type for n in out.graph.node].count("MatMul") == 2
    feeds = {"X": np.random.default_rng(1).random((32, 64), dtype=np.float32)}
    np.testing.assert_allclose(run_model(out, feeds)["Y"], run_model(model, feeds)["Y"], rtol=1e-6)
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    del plain.functions[:]
    assert inlined(plain) is plain  # nothing to inline: the same object


def test_a_fixed_sequence_rewrites_inside_a_local_function(tmp_path):
    """Before: 'no pass of the sequence changed the model' (the MatMuls were inside the calls)."""
    path = mlp_model(tmp_path / "m.onnx")
    config = Config(inputs={"X": InputSpec(shape=(32, 64), values="normal")})
    result = api.optimize(path, config, passes=["quantize_dynamic_int8"], accuracy_budget=0.99, allow_slower=True)
    ops = [n.op_type for n in result.model.graph.node]
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops, ops
    assert result.accuracy["min_cosine"] >= 0.99


def test_the_original_written_keeps_its_functions(tmp_path):
    path = mlp_model(tmp_path / "m.onnx")
    config = Config(inputs={"X": InputSpec(shape=(32, 64))})
    result = api.optimize(path, config, passes=["eliminate_identity"])  # nothing to do: the original is written
    assert not result.improved
    assert result.model.SerializeToString() == onnx.load(path).SerializeToString()
