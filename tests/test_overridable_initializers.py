"""Initializers the user may override: listed in ``graph.input`` of an IR >= 4 model, an
initializer is only a default value that a feed of that input replaces, and ONNX Runtime
neither folds nor fuses through it (``Graph::GetConstantInitializer``). Passes must
not either, and must keep it and its graph input; below IR 4 the listing is mandatory
and such initializers are constants, folded as before.

Outputs are read straight from the ORT session: ``adaptopt.runtime.run`` passes only
the feeds ``session.get_inputs()`` names, and ORT leaves overridable initializers out
of that list, so it would drop the very feed these tests are about."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from adaptopt import api
from adaptopt.config import Config, ProfilingConfig, TargetConfig
from adaptopt.graph.index import GraphIndex, overridable_initializers
from adaptopt.graph.io import infer_shapes, save_model
from adaptopt.graph.subgraph import extract_range
from adaptopt.passes.base import PassContext, PassContractError, finish
from adaptopt.passes.edit import GraphEditor
from adaptopt.passes.registry import get_pass
from adaptopt.runtime import make_session
from adaptopt.validate import compare

CPU = TargetConfig()


@dataclass(frozen=True)
class Case:
    """A graph with one weight (``weight``) a pass would fold or fuse if it were a constant."""

    pass_name: str
    nodes: tuple
    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    weights: dict = field(hash=False)
    weight: str
    budget: float = 0.0  # > 0: a lossy pass, judged by cosine similarity

    def model(self, ir_version: int) -> onnx.ModelProto:
        """The case at ``ir_version``: below 4 every initializer is listed as an input (the
        checker requires it), from 4 on only ``weight`` is (the one the user may feed)."""
        listed = [n for n in self.weights if ir_version < 4 or n == self.weight]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(self.x_shape))]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(self.weights[n].shape)) for n in listed]
        graph = helper.make_graph(list(self.nodes), "overridable", inputs,
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(self.y_shape))],
                                  [numpy_helper.from_array(v, n) for n, v in self.weights.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = ir_version
        return infer_shapes(model)

    def x(self) -> np.ndarray:
        return _array(self.x_shape, 100)

    def other_weight(self) -> np.ndarray:
        """Another value for ``weight``, as a user would feed it (positive where it is a
        BatchNormalization variance)."""
        value = self.weights[self.weight]
        return (np.abs(_array(value.shape, 200)) + 0.5).astype(np.float32)


def _array(shape, seed: int, scale: float = 0.5) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _node(op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, **attrs)


def _conv_bn(weight: str) -> Case:
    weights = {"w": _array([4, 3, 3, 3], 1), "scale": np.abs(_array([4], 2)) + 0.5, "bias": _array([4], 3),
               "mean": _array([4], 4), "var": np.abs(_array([4], 5)) + 0.5}
    nodes = (_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             _node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"]))
    return Case("fuse_conv_bn", nodes, (1, 3, 6, 6), (1, 4, 6, 6), weights, weight)


def _matmul_then(op: str, pass_name: str, weight: str) -> Case:
    weights = {"w": _array([16, 8], 1), "v": np.abs(_array([8], 2)) + 0.5}
    nodes = (_node("MatMul", ["x", "w"], ["m"]), _node(op, ["m", "v"], ["y"]))
    return Case(pass_name, nodes, (4, 16), (4, 8), weights, weight)


def _transposed_weight(pass_name: str) -> Case:
    nodes = (_node("Transpose", ["w"], ["wt"]), _node("MatMul", ["x", "wt"], ["y"]))
    return Case(pass_name, nodes, (4, 16), (4, 8), {"w": _array([8, 16], 1)}, "w")


def _duplicate_constants() -> Case:
    """``w`` and ``w_copy`` hold the same bytes: merging them would make a feed of ``w``
    reach the ``w_copy`` branch too."""
    value = _array([8], 1)
    nodes = (_node("Add", ["x", "w"], ["a"]), _node("Add", ["x", "w_copy"], ["b"]), _node("Mul", ["a", "b"], ["y"]))
    return Case("eliminate_common_subexpressions", nodes, (4, 8), (4, 8), {"w": value, "w_copy": value.copy()}, "w")


def _gemm_transposed() -> Case:
    nodes = (_node("Gemm", ["x", "w"], ["y"], transB=1),)
    return Case("prefetch_weights", nodes, (4, 16), (4, 8), {"w": _array([8, 16], 1)}, "w")


def _two_matmuls(pass_name: str) -> Case:
    """A constant weight ``v`` an ORT quantizer may quantize next to one the user may feed
    (and feeds outside the default's range: a range calibrated on the default would clip it)."""
    weights = {"v": _array([64, 64], 1, 0.2), "w": _array([64, 64], 2, 0.2)}
    nodes = (_node("MatMul", ["x", "v"], ["m"]), _node("Relu", ["m"], ["r"]), _node("MatMul", ["r", "w"], ["y"]))
    return Case(pass_name, nodes, (4, 64), (4, 64), weights, "w", budget=0.99)


def _zero_channel() -> Case:
    """Channel 2 of the first Gemm is the constant 0.7 (zero weights, its bias): pruning it
    folds 0.7 * row 2 of ``w2`` into the second Gemm's bias ``c``, which the user may feed."""
    w1 = _array([8, 6], 1)
    w1[:, 2] = 0.0
    weights = {"w1": w1, "b1": np.full([6], 0.7, np.float32), "w2": _array([6, 5], 2), "c": _array([5], 3)}
    nodes = (_node("Gemm", ["x", "w1", "b1"], ["h"]), _node("Relu", ["h"], ["r"]),
             _node("Gemm", ["r", "w2", "c"], ["y"]))
    return Case("prune_zero_channels", nodes, (4, 8), (4, 5), weights, "c")


CASES = {
    "fold_constants": _transposed_weight("fold_constants"),
    "fuse_conv_bn-weight": _conv_bn("w"),
    "fuse_conv_bn-scale": _conv_bn("scale"),
    "fuse_matmul_add-weight": _matmul_then("Add", "fuse_matmul_add", "w"),
    "fuse_matmul_add-bias": _matmul_then("Add", "fuse_matmul_add", "v"),
    "fuse_matmul_scale-weight": _matmul_then("Mul", "fuse_matmul_scale", "w"),
    "fuse_matmul_scale-scale": _matmul_then("Mul", "fuse_matmul_scale", "v"),
    "eliminate_common_subexpressions": _duplicate_constants(),
    "prefetch_weights-transpose": _transposed_weight("prefetch_weights"),
    "prefetch_weights-gemm": _gemm_transposed(),
    "prune_zero_channels-bias": _zero_channel(),
    "quantize_dynamic_int8": _two_matmuls("quantize_dynamic_int8"),
    "quantize_static_qdq": _two_matmuls("quantize_static_qdq"),
}


def fed_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of ``model`` on ``feeds``, overridable initializers among them (see the
    module docstring), ORT optimizations off."""
    session = make_session(model, CPU, level="disable")
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _apply(case: Case, model: onnx.ModelProto):
    feeds = {"x": case.x()}
    return get_pass(case.pass_name).apply(model, PassContext(target=CPU, feeds=feeds, accuracy_budget=case.budget))


def _same(case: Case, before: dict, after: dict) -> None:
    verdict = compare(before, after, exact_tolerance=1e-4, budget=case.budget)
    assert verdict.ok, verdict.reason


def _assert_kept(original: onnx.ModelProto, result: onnx.ModelProto, name: str) -> None:
    """``name`` is still an initializer, listed as a graph input, with its original value."""
    assert name in [i.name for i in result.graph.input]
    before = {t.name: t for t in original.graph.initializer}[name]
    after = {t.name: t for t in result.graph.initializer}.get(name)
    assert after is not None, f"{name} is no initializer any more"
    np.testing.assert_array_equal(numpy_helper.to_array(after), numpy_helper.to_array(before))
    assert name in overridable_initializers(result)


@pytest.mark.parametrize("key", sorted(CASES))
def test_a_pass_keeps_an_overridable_weight_fed_by_the_user(key):
    case = CASES[key]
    model = case.model(8)
    feeds = {"x": case.x(), case.weight: case.other_weight()}
    before = fed_outputs(model, feeds)
    assert not np.allclose(before["y"], fed_outputs(model, {"x": case.x()})["y"]), "the feed must matter"
    result = _apply(case, model)
    _assert_kept(model, result.model, case.weight)
    _same(case, before, fed_outputs(result.model, feeds))
    _same(case, fed_outputs(model, {"x": case.x()}), fed_outputs(result.model, {"x": case.x()}))


@pytest.mark.parametrize("key", sorted(CASES))
def test_below_ir_4_a_listed_initializer_is_a_constant_and_still_folded(key):
    case = CASES[key]
    model = case.model(3)
    assert overridable_initializers(model) == frozenset()
    result = _apply(case, model)
    assert result.modified, result.changes
    _same(case, fed_outputs(model, {"x": case.x()}), fed_outputs(result.model, {"x": case.x()}))


def test_the_rule_is_listed_as_an_input_and_ir_4_or_later():
    case = CASES["fold_constants"]
    assert overridable_initializers(case.model(8)) == {"w"}
    assert overridable_initializers(case.model(4)) == {"w"}
    assert overridable_initializers(case.model(3)) == frozenset()
    unlisted = case.model(8)
    del unlisted.graph.input[1:]
    assert overridable_initializers(unlisted) == frozenset()


def test_constant_queries_follow_the_rule():
    case = CASES["fold_constants"]
    assert GraphEditor(case.model(8), "probe").const("w") is None
    assert GraphEditor(case.model(3), "probe").const("w") is not None
    assert "wt" not in GraphIndex.build(case.model(8)).constant_tensors()
    assert "wt" in GraphIndex.build(case.model(3)).constant_tensors()


def test_the_contract_refuses_a_pass_that_drops_an_overridable_initializer():
    model = CASES["fold_constants"].model(8)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    kept = [t for t in broken.graph.initializer if t.name != "w"]
    del broken.graph.initializer[:]
    broken.graph.initializer.extend(kept)
    with pytest.raises(PassContractError, match="overridable initializer"):
        finish(model, broken, "some_pass")


# ---------------------------------------------------------------- end to end (api.optimize)
def _scaled_projection(ir_version: int) -> onnx.ModelProto:
    """x @ Transpose(w) * s + b -> Relu, ``w`` overridable at IR >= 4: fold_constants and
    fuse_matmul_scale would bake ``w`` into one weight."""
    weights = {"w": _array([64, 64], 1, 0.2), "s": np.abs(_array([64], 2)) + 0.5, "b": _array([64], 3)}
    nodes = (_node("Transpose", ["w"], ["wt"]), _node("MatMul", ["x", "wt"], ["m"]), _node("Mul", ["m", "s"], ["ms"]),
             _node("Add", ["ms", "b"], ["a"]), _node("Relu", ["a"], ["y"]))
    return Case("fold_constants", nodes, (4, 64), (4, 64), weights, "w").model(ir_version)


@pytest.fixture
def fast_config(tmp_path) -> Config:
    return Config(granularity=Config().granularity.__class__(initial_granularity=1, min_nodes=3, max_rounds=1),
                  profiling=ProfilingConfig(warmup=1, iterations=5, min_time_s=0.0, max_time_s=0.2,
                                            apart_pairs=5, apart_seconds=0.02),
                  policy=Config().policy.__class__(RL_training_epochs=2, max_sequence=2,
                                                   cache_dir=str(tmp_path / "cache")))


def _optimize_keeps_w_overridable(path: Path, config: Config, **options) -> None:
    model = _scaled_projection(8)
    save_model(model, path)
    result = api.optimize(path, config, allow_slower=True, **options)
    _assert_kept(model, result.model, "w")
    x = _array([4, 64], 7)
    other = _array([64, 64], 8, 0.2)
    _same(Case("", (), (), (), {}, ""), fed_outputs(model, {"x": x, "w": other}),
          fed_outputs(result.model, {"x": x, "w": other}))


def test_optimize_with_a_fixed_sequence_keeps_an_overridable_weight(tmp_path, fast_config):
    _optimize_keeps_w_overridable(tmp_path / "m.onnx", fast_config,
                                  passes=["fold_constants", "fuse_matmul_scale", "fuse_matmul_add"])


def test_a_leaf_of_a_split_keeps_an_overridable_weight_listed():
    """A leaf lists the overridable initializers it reads as inputs too (graph/subgraph.py
    _range_head): unlisted, on the leaf they were constants that the passes folded."""
    index = GraphIndex.build(_scaled_projection(8))
    leaf = extract_range(index, 0, len(index))
    assert overridable_initializers(leaf) == {"w"}


def test_optimize_search_keeps_an_overridable_weight(tmp_path, fast_config):
    _optimize_keeps_w_overridable(tmp_path / "m.onnx", fast_config)


def test_a_model_below_ir_4_is_loaded_with_its_listed_weights_as_constants(tmp_path, fast_config):
    """Below IR 4 every initializer had to be listed as an input, and ONNX Runtime refuses a
    feed of one: loading moves the model to IR 4 without those listings, so the passes
    still fold them (listed at IR 4 they would be inputs the user may feed)."""
    from adaptopt.graph.io import load_model_and_signature
    path = tmp_path / "ir3.onnx"
    save_model(_scaled_projection(3), path)
    model, signature = load_model_and_signature(path)
    assert model.ir_version == 4 and [i.name for i in signature.graph.input] == ["x"]
    assert overridable_initializers(model) == frozenset()
    result = api.optimize(path, fast_config, allow_slower=True, passes=["fold_constants", "fuse_matmul_scale"])
    assert "Transpose" not in {n.op_type for n in result.model.graph.node}  # w was folded
    x = _array([4, 64], 7)
    reference = make_session(_scaled_projection(3), CPU).run(None, {"x": x})[0]
    np.testing.assert_allclose(make_session(result.model, CPU).run(None, {"x": x})[0], reference, rtol=1e-4, atol=1e-5)


def _reshape_by_fed_shape(kind: str) -> onnx.ModelProto:
    """x -> Relu -> Reshape(shp) [-> Shape -> Cast | -> Reshape(c1) first]: ``shp`` an
    overridable initializer ([4, 16], the no-op default) the user may feed."""
    shp = numpy_helper.from_array(np.array([4, 16], np.int64), "shp")
    inits = [shp]
    if kind == "identity":
        nodes = [_node("Relu", ["x"], ["r"]), _node("Reshape", ["r", "shp"], ["y"])]
    elif kind == "shape":
        nodes = [_node("Relu", ["x"], ["r"]), _node("Reshape", ["r", "shp"], ["s"]), _node("Shape", ["s"], ["h"]),
                 _node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)]
    else:  # chain
        inits.append(numpy_helper.from_array(np.array([64], np.int64), "c1"))
        nodes = [_node("Relu", ["x"], ["r"]), _node("Reshape", ["r", "c1"], ["f"]), _node("Reshape", ["f", "shp"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16]),
                                           helper.make_tensor_value_info("shp", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return infer_shapes(model)


@pytest.mark.parametrize("kind, pass_name", [("identity", "eliminate_identity"), ("shape", "fold_constants"),
                                             ("chain", "simplify_chains")])
def test_a_shape_the_user_may_feed_is_not_inferred_from_its_default(kind, pass_name):
    """Shape inference read an overridable shape's default, so the Reshape looked static: a
    no-op to remove, a Shape to fold, a chain to collapse; fed [2, 32], the output kept [4, 16]."""
    model = _reshape_by_fed_shape(kind)
    result = get_pass(pass_name).apply(model, PassContext(target=CPU)).model
    feeds = {"x": np.arange(64, dtype=np.float32).reshape(4, 16), "shp": np.array([2, 32], np.int64)}
    want, got = fed_outputs(model, feeds), fed_outputs(result, feeds)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(want[name], got[name])


def test_split_then_merge_keeps_an_overridable_weight_listed(tmp_path):
    """The split's root file lists the overridable initializers after the real inputs, so the
    merged model still lets the user feed them (they were dropped from its inputs)."""
    model = _scaled_projection(8)
    save_model(model, tmp_path / "m.onnx")
    api.split(tmp_path / "m.onnx", tmp_path / "split", Config(), granularity=2)
    merged = api.merge(tmp_path / "split")
    _assert_kept(model, merged, "w")
    feeds = {"x": _array([4, 64], 7), "w": _array([64, 64], 8, 0.2)}
    _same(Case("", (), (), (), {}, ""), fed_outputs(model, feeds), fed_outputs(merged, feeds))


def test_kept_subgraphs_merge_back_with_an_overridable_weight_listed(tmp_path, fast_config):
    save_model(_scaled_projection(8), tmp_path / "m.onnx")
    api.optimize(tmp_path / "m.onnx", fast_config, allow_slower=True, keep_subgraphs=tmp_path / "kept")
    _assert_kept(_scaled_projection(8), api.merge(tmp_path / "kept"), "w")
