"""Helpers shared by the pass tests (no tests here): the four checks every pass gets,
small model builders, and a random-DAG strategy for the hypothesis tests."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from adaptopt.config import Config, TargetConfig
from adaptopt.graph.capture import make_inputs
from adaptopt.graph.io import infer_shapes, pin_input_shapes
from adaptopt.passes.base import PassContext, PassResult, boundary_names
from adaptopt.passes.registry import get_pass
from adaptopt.runtime import make_session, run
from adaptopt.validate import compare

CPU = TargetConfig()


def prepared(model: onnx.ModelProto, config: Config | None = None) -> onnx.ModelProto:
    """Pinned (from the config) and shape-inferred, as ``load_model`` leaves a model
    (on a copy: pinning edits the proto in place and the fixtures are shared)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    model = copy
    if config is not None and config.inputs:
        model = pin_input_shapes(model, config.inputs, "test")
    return infer_shapes(model)


def feeds_for(model: onnx.ModelProto, config: Config | None = None) -> dict[str, np.ndarray]:
    return make_inputs(model, config or Config())


def outputs(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """ORT with optimizations off, so ORT's own fusions cannot hide a broken rewrite."""
    return run(make_session(model, CPU, level="disable"), feeds)


def apply(name: str, model: onnx.ModelProto, feeds: dict | None = None, budget: float = 0.0,
          target: TargetConfig = CPU) -> PassResult:
    return get_pass(name).apply(model, PassContext(target=target, feeds=feeds, accuracy_budget=budget))


def assert_rewrites(name: str, model: onnx.ModelProto, feeds: dict, expected_ops: dict[str, int] | None = None,
                    budget: float = 0.0, target: TargetConfig = CPU, cosine: float = 0.999) -> PassResult:
    """(a) changes as expected and outputs match, (c) boundary kept, (d) checker + ORT load.

    ``expected_ops`` gives op-count deltas (``{"BatchNormalization": -6}``); exact passes
    must match within 1e-4 relative, lossy ones keep ``cosine``.
    """
    snapshot = model.SerializeToString()
    result = apply(name, model, feeds, budget, target)
    assert result.modified, result.changes
    assert model.SerializeToString() == snapshot, "the pass mutated its input"
    assert result.changes["rewrites"] > 0
    for op, delta in (expected_ops or {}).items():
        assert result.changes["ops"].get(op, 0) == delta, (op, result.changes["ops"])
    assert boundary_names(result.model) == boundary_names(model)
    onnx.checker.check_model(result.model)
    make_session(result.model, CPU, level="all")  # ORT's own load-time checks and optimizers accept it
    before, after = outputs(model, feeds), outputs(result.model, feeds)
    if get_pass(name).guarantee == "exact":
        verdict = compare(before, after, exact_tolerance=1e-4)
    else:
        verdict = compare(before, after, budget=cosine)
    assert verdict.ok, verdict.reason
    return result


def assert_noop(name: str, model: onnx.ModelProto, feeds: dict | None = None, budget: float = 0.0,
                target: TargetConfig = CPU) -> str:
    """(b) where a pass does not apply it returns the very same model, with a reason."""
    snapshot = model.SerializeToString()
    pass_ = get_pass(name)
    ctx = PassContext(target=target, feeds=feeds, accuracy_budget=budget)
    verdict = pass_.applies(model, ctx)
    result = pass_.apply(model, ctx)
    assert not verdict.ok and verdict.reason
    assert not result.modified and result.model is model and result.changes["reason"]
    assert model.SerializeToString() == snapshot
    return verdict.reason


def make_model(nodes, inputs, outputs_, initializers=(), opset: int = 17, domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs_, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return infer_shapes(model)


def tensor(name: str, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def rng_array(shape, seed=0, scale=1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


# ---------------------------------------------------------------- random DAGs
_UNARY = ("Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Identity")
_BINARY = ("Add", "Mul", "Sub")


@st.composite
def random_dags(draw, max_nodes: int = 12) -> onnx.ModelProto:
    """Small float graphs of elementwise / MatMul / Transpose / Reshape / Identity nodes,
    with constants, duplicated nodes and transpose pairs so every cleanup has work."""
    n_inputs = draw(st.integers(1, 2))
    shape = (2, draw(st.sampled_from([3, 4])), 4)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    live = [f"in{i}" for i in range(n_inputs)]  # tensors of shape ``shape``
    nodes, inits = [], []
    for k in range(1, draw(st.integers(1, max_nodes)) + 1):
        kind = draw(st.sampled_from(["unary", "binary", "const_binary", "matmul", "transpose_pair", "reshape",
                                     "duplicate", "const_chain", "cast_pair"]))
        src = draw(st.sampled_from(live))
        out = f"t{k}"
        if kind == "unary":
            nodes.append(helper.make_node(draw(st.sampled_from(_UNARY)), [src], [out]))
        elif kind == "binary":
            nodes.append(helper.make_node(draw(st.sampled_from(_BINARY)), [src, draw(st.sampled_from(live))], [out]))
        elif kind == "const_binary":
            inits.append(const(f"c{k}", rng.standard_normal(shape[-1:]).astype(np.float32)))
            nodes.append(helper.make_node(draw(st.sampled_from(_BINARY)), [src, f"c{k}"], [out]))
        elif kind == "matmul":
            inits.append(const(f"w{k}", (rng.standard_normal((shape[-1], shape[-1])) * 0.5).astype(np.float32)))
            inits.append(const(f"b{k}", rng.standard_normal(shape[-1]).astype(np.float32)))
            nodes += [helper.make_node("MatMul", [src, f"w{k}"], [out + "m"]),
                      helper.make_node("Add", [out + "m", f"b{k}"], [out])]
        elif kind == "transpose_pair":
            nodes += [helper.make_node("Transpose", [src], [out + "a"], perm=[0, 2, 1]),
                      helper.make_node("Relu", [out + "a"], [out + "b"]),
                      helper.make_node("Transpose", [out + "b"], [out], perm=[0, 2, 1])]
        elif kind == "reshape":
            inits += [const(f"s{k}a", np.array([shape[0] * shape[1], shape[2]], np.int64)),
                      const(f"s{k}b", np.array(shape, np.int64))]
            nodes += [helper.make_node("Reshape", [src, f"s{k}a"], [out + "r"]),
                      helper.make_node("Reshape", [out + "r", f"s{k}b"], [out])]
        elif kind == "duplicate":
            op = draw(st.sampled_from(_UNARY))
            nodes += [helper.make_node(op, [src], [out + "x"]), helper.make_node(op, [src], [out + "y"]),
                      helper.make_node("Add", [out + "x", out + "y"], [out])]
        elif kind == "const_chain":
            inits.append(const(f"c{k}", rng.standard_normal(shape[-1:]).astype(np.float32)))
            nodes += [helper.make_node("Neg", [f"c{k}"], [out + "n"]),
                      helper.make_node("Add", [src, out + "n"], [out])]
        else:
            nodes += [helper.make_node("Cast", [src], [out + "d"], to=TensorProto.DOUBLE),
                      helper.make_node("Cast", [out + "d"], [out], to=TensorProto.FLOAT)]
        live.append(out)
    n_outputs = draw(st.integers(1, min(2, len(live) - n_inputs)))
    outs = live[-n_outputs:]
    return make_model(nodes, [tensor(n, list(shape)) for n in live[:n_inputs]],
                      [tensor(n, list(shape)) for n in outs], inits, opset=17)
