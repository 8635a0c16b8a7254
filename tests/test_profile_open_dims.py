"""``profile`` times each leaf of a model with dynamic dims as ``optimize`` runs it: with the
boundary dims that follow the model's dynamic dims open, as ONNX Runtime sees that part of
the written model (pinned to static shapes, ORT fuses differently at load). A static model's
leaves are timed as before; a leaf, or a model, that does not run at another size of its
dynamic dims is timed pinned."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from adaptopt.config import Config, InputSpec, ProfilingConfig
from adaptopt.graph.capture import capture, make_inputs
from adaptopt.graph.index import GraphIndex
from adaptopt.graph.io import load_model_and_signature
from adaptopt.graph.partition import partition
from adaptopt.profile import calibrate, pipeline, profile_model
from tests.conftest import run_model

N = 16
BATCH = 4
QUICK = ProfilingConfig(warmup=1, iterations=3, min_time_s=0.0, max_time_s=0.5, counters=(), per_node=False)


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """Calibration goes to a temporary cache dir, never ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(calibrate.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "adaptopt-cache"))
        yield


@pytest.fixture
def timed_models(monkeypatch) -> list[tuple[onnx.ModelProto, dict]]:
    """Every (model, feeds) the pipeline times, in order (the whole model first)."""
    seen: list[tuple[onnx.ModelProto, dict]] = []
    real = pipeline.measure

    def recording(model, feeds, *args, **kwargs):
        seen.append((model, dict(feeds)))
        return real(model, feeds, *args, **kwargs)

    monkeypatch.setattr(pipeline, "measure", recording)
    return seen


def _chain_model(batch: int | str, extra=lambda last: []) -> onnx.ModelProto:
    """x [batch, N] -> three MatMul+Add+activation blocks -> ``extra(last output)`` -> y [batch, N]."""
    rng = np.random.default_rng(0)
    inits, nodes, last = [], [], "x"
    for i, act in enumerate(("Relu", "Tanh", "Sigmoid")):
        inits += [numpy_helper.from_array((rng.standard_normal((N, N)) / 4).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [last, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                  helper.make_node(act, [f"a{i}"], [f"h{i}"], name=f"act{i}")]
        last = f"h{i}"
    nodes += extra(last)
    nodes.append(helper.make_node("Identity", [nodes[-1].output[0]], ["y"], name="out"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, N])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _load(tmp_path, model: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto, Config]:
    """The pinned model and its own signature, loaded as ``api.profile`` loads them."""
    config = Config(profiling=QUICK, inputs={"x": InputSpec(shape=(BATCH, N))}).with_section("granularity",
                                                                                              min_nodes=3)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    pinned, signature = load_model_and_signature(path, config)
    return pinned, signature, config


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_a_dynamic_models_leaves_are_timed_with_the_batch_dim_open(tmp_path, timed_models):
    skeleton = _chain_model("N")
    pinned, signature, config = _load(tmp_path, skeleton)
    report = profile_model(pinned, config, granularity=1, name="dyn", signature=signature)
    assert len(report.leaves) == 2 and [s.dims for s in report.leaves] == ["open", "open"]
    assert report.whole_model.dims == "pinned" and all(s.dims is None for s in report.subgraphs if s.children)
    leaves = [m for m, _ in timed_models[1:]]
    assert len(leaves) == 2
    for leaf in leaves:  # the batch dim is symbolic on the boundary, the feature dim stays fixed
        for vi in list(leaf.graph.input) + list(leaf.graph.output):
            assert isinstance(_dims(vi)[0], str) and _dims(vi)[1] == N
    # the timed leaves compute what the model computes, at the profiled batch and at another one
    for batch in (BATCH, 3):
        x = np.random.default_rng(batch).random((batch, N), dtype=np.float32)
        values = {"x": x}
        for leaf in leaves:
            values.update(run_model(leaf, {i.name: values[i.name] for i in leaf.graph.input}, level="all"))
        np.testing.assert_allclose(values["y"], run_model(skeleton, {"x": x})["y"], rtol=1e-5, atol=1e-6)


def test_a_static_model_is_timed_as_before(tmp_path, timed_models):
    pinned, signature, config = _load(tmp_path, _chain_model(BATCH))
    report = profile_model(pinned, config, granularity=1, name="static", signature=signature)
    assert [s.dims for s in report.leaves] == ["pinned", "pinned"]
    with_signature = [m.SerializeToString(deterministic=True) for m, _ in timed_models]
    timed_models.clear()
    profile_model(pinned, config, granularity=1, name="static")  # no signature: what every profile did
    assert with_signature == [m.SerializeToString(deterministic=True) for m, _ in timed_models]
    assert all(isinstance(d, int) for m in (onnx.load_from_string(b) for b in with_signature[1:])
               for vi in m.graph.input for d in _dims(vi))


def test_a_model_that_fails_at_the_other_size_times_every_leaf_pinned(tmp_path, timed_models):
    """A Reshape to the profiled batch: the model does not run at another batch size."""
    def reshape(last: str) -> list[onnx.NodeProto]:
        return [helper.make_node("Constant", [], ["shape"], name="shape",
                                 value=numpy_helper.from_array(np.array([BATCH, N], np.int64))),
                helper.make_node("Reshape", [last, "shape"], ["fixed"], name="fixed")]
    pinned, signature, config = _load(tmp_path, _chain_model("N", extra=reshape))
    report = profile_model(pinned, config, granularity=1, name="fixed", signature=signature)
    timed = [s for s in report.leaves if s.timed]
    assert timed and all(s.dims == "pinned" for s in timed)
    assert all(isinstance(d, int) for m, _ in timed_models[1:] for vi in m.graph.input for d in _dims(vi))


def test_a_leaf_that_fails_at_the_other_size_is_timed_pinned(tmp_path):
    """The open leaf is run once at the other size before it is timed open: when ONNX Runtime
    refuses it there (other-size values whose feature dim does not fit the weights), the leaf
    is timed pinned, exactly as :func:`pipeline.leaf_model` makes it."""
    pinned, _, config = _load(tmp_path, _chain_model("N"))
    index = GraphIndex.build(pinned)
    leaf = partition(index, 1, 3).leaves()[1]
    names = list(leaf.boundary_inputs) + list(leaf.boundary_outputs)
    values = capture(pinned, make_inputs(pinned, config), names, config.target)
    fits = {n: np.concatenate([values[n], values[n]]) for n in names}  # as at batch 2 * BATCH
    constants = index.constant_tensors()
    model, _, dims = pipeline.timed_leaf_model(index, leaf, values, constants, fits, config)
    assert dims == "open" and isinstance(_dims(model.graph.input[0])[0], str)
    misfit = {n: v[:, : N // 2] for n, v in fits.items()}
    model, feeds_used, dims = pipeline.timed_leaf_model(index, leaf, values, constants, misfit, config)
    expected, expected_feeds = pipeline.leaf_model(index, leaf, values, constants)
    assert dims == "pinned" and pipeline.open_leaf_model(index, leaf, values, constants, misfit, config) is None
    assert model.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    assert feeds_used.keys() == expected_feeds.keys()
