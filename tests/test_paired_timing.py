"""During the search a rewrite is timed against its original, interleaved round by round,
and its time is the original's times the paired ratio: drift between two timings taken at
different times is not read as a gain."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from adaptopt import api
from adaptopt.adapt.cache import MeasurementCache
from adaptopt.adapt.loop import prepare_run
from adaptopt.adapt.verify import paired_timing
from adaptopt.graph.capture import make_inputs
from adaptopt.graph.index import GraphIndex
from adaptopt.graph.partition import partition
from tests.test_optimize import fast_config  # noqa: F401 - the fixture

N = 32


def _mlp() -> onnx.ModelProto:
    """x [4, N] -> MatMul -> Add -> Relu -> MatMul -> Add -> y: fuse_matmul_add applies."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", (N, N)), ("b1", (N,)), ("w2", (N, N)), ("b2", (N,)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
             helper.make_node("Add", ["m2", "b2"], ["y"], name="add2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, N])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class _FixedTimes:
    """Runs for real; the original times ``original_ms`` alone, a rewrite ``ratio`` of it paired."""

    def __init__(self, inner, original_ms: float, ratio: float):
        self.inner, self.original_ms, self.ratio = inner, original_ms, ratio
        self.alone: list[onnx.ModelProto] = []
        self.pairs: list[tuple[onnx.ModelProto, onnx.ModelProto]] = []

    def run(self, model, feeds):
        return self.inner.run(model, feeds)

    def time(self, model, feeds):
        self.alone.append(model)
        return SimpleNamespace(median_ms=self.original_ms, spread_ms=0.01 * self.original_ms)

    def time_pair(self, baseline, candidate, feeds):
        self.pairs.append((baseline, candidate))
        return self.ratio

    def close(self):
        self.inner.close()


def _env(config, cache: MeasurementCache, original_ms: float, ratio: float):
    model = api.pinned_copy(_mlp(), config, "mlp")
    index = GraphIndex.build(model)
    ctx, _ = prepare_run(model, index, make_inputs(model, config), config, 0.0, cache=cache)
    ctx.measurer = _FixedTimes(ctx.measurer, original_ms, ratio)
    return ctx.env_for(partition(index, 0, 3).leaves()[0]), ctx.measurer


def test_a_rewrite_is_timed_against_the_original_and_cached_as_a_share_of_it(tmp_path, fast_config):  # noqa: F811
    env, measurer = _env(fast_config, MeasurementCache(tmp_path, "fp"), original_ms=10.0, ratio=0.5)
    assert "fuse_matmul_add" in env.actions(())
    outcome = env.evaluate(("fuse_matmul_add",))
    assert outcome.valid and outcome.time_ms == 5.0
    assert len(measurer.alone) == 1  # the original alone, once; the rewrite only in a pair
    (baseline, candidate), = measurer.pairs
    assert baseline.SerializeToString() == env.runnable(env.model)[0].SerializeToString()
    assert {n.op_type for n in candidate.graph.node} != {n.op_type for n in baseline.graph.node}
    measurer.close()

    # read back from the file: the rewrite is its share of the original, whatever the original
    # reads now (here its entry is gone and it is measured again, at 20 ms)
    cache = MeasurementCache(tmp_path, "fp")
    cache.entries = {key: entry for key, entry in cache.entries.items() if not key.endswith(":")}
    again, measurer = _env(fast_config, cache, original_ms=20.0, ratio=0.9)
    assert again.evaluate(()).time_ms == 20.0
    assert again.evaluate(("fuse_matmul_add",)).time_ms == 10.0 and not measurer.pairs
    measurer.close()


def _matmul_chain(layers: int, width: int = 256) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((width, width)) / width).astype(np.float32), f"w{i}")
             for i in range(layers)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"],
                              ["y" if i == layers - 1 else f"h{i + 1}"]) for i in range(layers)]
    graph = helper.make_graph(nodes, f"chain{layers}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_paired_timing_is_the_candidates_share_of_the_baseline(fast_config):  # noqa: F811
    """16 MatMuls against 1 (16x the work): the ratio is candidate over baseline, well above 1,
    and the other way round well below (each a median of per-round ratios)."""
    light, heavy = _matmul_chain(1), _matmul_chain(16)
    feeds = {"x": np.ones((64, 256), np.float32)}
    slower = paired_timing(light, heavy, feeds, fast_config.target, rounds=3, max_seconds=1.0)
    faster = paired_timing(heavy, light, feeds, fast_config.target, rounds=3, max_seconds=1.0)
    assert slower > 3.0 and faster < 1 / 3.0
