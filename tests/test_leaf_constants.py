"""Leaves are run as ONNX Runtime sees them in the model: a boundary input that the whole
model fixes (a weight tied to another through Identity, a Constant) is an initializer of the
leaf when it is run and timed, not an input that could vary."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from adaptopt import api
from adaptopt.adapt.cache import MeasurementCache
from adaptopt.adapt.loop import prepare_run
from adaptopt.config import InputSpec
from adaptopt.graph.capture import make_inputs
from adaptopt.graph.index import GraphIndex
from adaptopt.graph.partition import partition
from adaptopt.graph.subgraph import embed_constants
from tests.conftest import run_model
from tests.test_optimize import _check_promise, fast_config  # noqa: F401 - the fixture

N = 16


def _model(nodes, inits, name: str, batch: int | str = 4) -> onnx.ModelProto:
    """x [batch, N] -> ``nodes`` -> y [batch, N], opset 17."""
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, N])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tied_bias_model() -> onnx.ModelProto:
    """x -> MatMul(w1) + b -> Relu -> MatMul(w2) + tied, where ``tied = Identity(b)`` is
    computed first, far from its use, as torch exports shared parameters."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((N, N)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((N, N)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b"),
             numpy_helper.from_array(np.float32(0.5).reshape(()), "half")]
    nodes = [helper.make_node("Identity", ["b"], ["tied"], name="tie"),
             helper.make_node("Constant", [], ["c"], name="const",
                              value=numpy_helper.from_array(np.full(N, 0.25, np.float32))),
             helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("Mul", ["r1", "half"], ["s1"], name="scale"),
             helper.make_node("MatMul", ["s1", "w2"], ["m2"], name="mm2"),
             helper.make_node("Add", ["m2", "tied"], ["a2"], name="add2"),
             helper.make_node("Add", ["a2", "c"], ["y"], name="add3")]
    return _model(nodes, inits, "tied")


def test_constant_tensors_are_what_the_model_fixes():
    model = _tied_bias_model()
    rng_node = helper.make_node("RandomNormalLike", ["x"], ["noise"], name="rand")
    model.graph.node.append(rng_node)
    fixed = GraphIndex.build(model).constant_tensors()
    assert {"tied", "c"} <= fixed
    assert not {"m1", "a1", "y", "noise"} & fixed
    # an initializer also listed as a graph input may be fed: nothing computed from it is fixed
    overridable = _tied_bias_model()
    overridable.graph.input.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [N]))
    assert "tied" not in GraphIndex.build(overridable).constant_tensors()


def test_embed_constants_moves_inputs_to_initializers_and_keeps_the_outputs():
    model = _tied_bias_model()
    feeds = {"x": np.ones((4, N), np.float32)}
    embedded, rest = embed_constants(model, feeds, {"x": feeds["x"]})
    assert [i.name for i in embedded.graph.input] == [] and rest == {}
    assert "x" in {t.name for t in embedded.graph.initializer}
    np.testing.assert_array_equal(run_model(embedded, {})["y"], run_model(model, feeds)["y"])
    same, same_feeds = embed_constants(model, feeds, {"not_an_input": feeds["x"]})
    assert same is model and same_feeds is feeds


def test_a_leaf_reading_a_tied_weight_runs_with_it_as_an_initializer(fast_config):  # noqa: F811
    model = api.pinned_copy(_tied_bias_model(), fast_config, "tied")
    feeds = make_inputs(model, fast_config)
    index = GraphIndex.build(model)
    ctx, _ = prepare_run(model, index, feeds, fast_config, 0.0, cache=MeasurementCache(None, "test"))
    tree = partition(index, 1, 3)
    envs = [ctx.env_for(leaf) for leaf in tree.leaves()]
    reading = [env for env in envs if "tied" in {i.name for i in env.model.graph.input}]
    assert reading, "the partition put the tie and its use in one leaf; the test needs them apart"
    env = reading[0]
    assert "tied" in env.constants
    runnable, run_feeds = env.runnable(env.model)
    assert "tied" not in run_feeds and "tied" in {t.name for t in runnable.graph.initializer}
    assert "tied" in {i.name for i in env.model.graph.input}  # the leaf itself, which is merged, keeps it
    assert env.evaluate(()).valid  # run and validated against the captured outputs
    ctx.measurer.close()


def test_optimize_on_a_tied_weight_model_keeps_its_outputs(tmp_path, fast_config):  # noqa: F811
    original = _tied_bias_model()
    path = tmp_path / "tied.onnx"
    onnx.save(original, path)
    result = api.optimize(str(path), fast_config, accuracy_budget=0.0, seed=0)
    _check_promise(original, result, fast_config)


def test_a_leaf_of_a_dynamic_model_runs_with_its_varying_dims_open(fast_config):  # noqa: F811
    """The written model keeps the user's dynamic dims, and ONNX Runtime fuses a pinned leaf
    differently (MatMul+Add -> Gemm with Reshapes instead of MatMul+BiasGelu on convnext)."""
    from adaptopt.adapt.assemble import other_size_check
    from adaptopt.adapt.prepass import with_signature
    skeleton = _tied_bias_model()
    skeleton.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    skeleton.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    config = fast_config.replace(inputs={"x": InputSpec(shape=(4, N))})
    model = api.pinned_copy(skeleton, config, "tied")
    feeds = make_inputs(model, config)
    index = GraphIndex.build(model)
    ctx, _ = prepare_run(model, index, feeds, config, 0.0, cache=MeasurementCache(None, "test"))
    ctx.use_other_sizes(with_signature(model, skeleton), other_size_check(skeleton, feeds, config)[0])
    env = ctx.env_for(partition(index, 0, 3).leaves()[0])
    assert env.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value > 0  # the leaf itself is pinned
    runnable, _ = env.runnable(env.model)
    assert runnable.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # run with the batch dim open
    assert env.evaluate(()).valid and env.evaluate(("eliminate_identity",)).valid
    ctx.measurer.close()


def _sequence_model() -> onnx.ModelProto:
    """A constant sequence of two differently shaped weights, read after two other nodes."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((N, N)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(0, np.int64), "i0"),
             numpy_helper.from_array(np.array(1, np.int64), "i1")]
    nodes = [helper.make_node("SequenceConstruct", ["w", "b"], ["seq"], name="pack"),
             helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Neg", ["r"], ["n"], name="neg"),
             helper.make_node("SequenceAt", ["seq", "i0"], ["w0"], name="take_w"),
             helper.make_node("SequenceAt", ["seq", "i1"], ["b0"], name="take_b"),
             helper.make_node("MatMul", ["n", "w0"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b0"], ["y"], name="add")]
    return _model(nodes, inits, "seq")


def test_a_sequence_crossing_a_leaf_is_neither_a_constant_nor_a_crash(tmp_path, fast_config):  # noqa: F811
    """A sequence (or optional) value is not a tensor: never folded into a leaf as one, and a
    leaf it crosses into is left as it is (validation compares arrays; ragged ones crashed)."""
    model = _sequence_model()
    assert "seq" not in GraphIndex.build(model).constant_tensors()
    pinned = api.pinned_copy(model, fast_config, "seq")
    index = GraphIndex.build(pinned)
    ctx, _ = prepare_run(pinned, index, make_inputs(pinned, fast_config), fast_config, 0.0,
                         cache=MeasurementCache(None, "test"))
    envs = [ctx.env_for(leaf) for leaf in partition(index, 2, 1).leaves()]
    crossing = [env for env in envs if "seq" in {i.name for i in env.model.graph.input}]
    assert crossing and all("not a tensor" in env.blocked and not env.evaluate(()).valid for env in crossing)
    ctx.measurer.close()
    path = tmp_path / "seq.onnx"
    onnx.save(model, path)
    _check_promise(model, api.optimize(str(path), fast_config, accuracy_budget=0.0, seed=0), fast_config)


def _if_model() -> onnx.ModelProto:
    """y = If(cond, x + w, x - w) with a dynamic batch dim."""
    w = numpy_helper.from_array(np.linspace(-1, 1, N, dtype=np.float32), "w")
    branches = [helper.make_graph([helper.make_node(op, ["r", "w"], [out])], name, [],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
                for op, out, name in (("Add", "t", "then"), ("Sub", "e", "else"))]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="positive"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=branches[0], else_branch=branches[1])]
    return _model(nodes, [w, numpy_helper.from_array(np.float32(0.0).reshape(()), "zero")], "if", batch="batch")


def test_a_model_with_branches_is_checked_and_written_for_other_sizes_too(tmp_path, fast_config):  # noqa: F811
    """The pinned work model's If bodies held the profiled sizes: at another batch size ONNX
    Runtime refused them, so no leaf of such a model was checked there (and the written model
    kept a branch output fixed at the profiled size)."""
    from adaptopt.adapt.assemble import other_size_check
    from adaptopt.adapt.prepass import with_signature
    skeleton = _if_model()
    config = fast_config.replace(inputs={"x": InputSpec(shape=(4, N))})
    model = api.pinned_copy(skeleton, config, "if")
    feeds = make_inputs(model, config)
    signed = with_signature(model, skeleton)
    other, _ = other_size_check(skeleton, feeds, config)
    assert other["x"].shape[0] != 4
    expected = run_model(skeleton, other)["y"]
    np.testing.assert_allclose(run_model(signed, other)["y"], expected)  # refused before
    index = GraphIndex.build(model)
    ctx, _ = prepare_run(model, index, feeds, config, 0.0, cache=MeasurementCache(None, "test"))
    ctx.use_other_sizes(signed, other)
    ctx.env_for(partition(index, 0, 3).leaves()[0])
    assert ctx.other_model is not None  # the other-size capture worked
    ctx.measurer.close()
    path = tmp_path / "if.onnx"
    onnx.save(skeleton, path)
    result = api.optimize(str(path), config, passes=["eliminate_identity", "fold_constants"], allow_slower=True)
    branch = next(n for n in result.model.graph.node if n.op_type == "If")
    assert all(not vi.type.tensor_type.HasField("shape") for g in branch.attribute for vi in g.g.output)
    np.testing.assert_allclose(run_model(result.model, other)["y"], expected, rtol=1e-6)


def test_profile_leaves_a_leaf_fed_by_a_sequence_untimed(tmp_path, fast_config):  # noqa: F811
    path = tmp_path / "seq.onnx"
    onnx.save(_sequence_model(), path)
    report = api.profile(str(path), fast_config, granularity=1)
    assert report.whole_model.latency_ms > 0 and len(report.leaves) >= 2
