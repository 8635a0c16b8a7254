"""Machine calibration (measured, cached per machine) and roofline classification."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adaptopt.config import Config, ProfilingConfig, TargetConfig
from adaptopt.profile import calibrate
from adaptopt.profile.calibrate import MachineProfile, machine_profile
from adaptopt.profile.classify import classify
from adaptopt.profile.cost_model import ModelCost, NodeCost, estimate
from adaptopt.profile.runner import measure

QUICK = ProfilingConfig(warmup=1, iterations=5, min_time_s=0.0, max_time_s=1.0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One calibration for the whole test session, in a temporary cache dir (never ~/.cache)."""
    directory = tmp_path_factory.getbasetemp() / "adaptopt-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(calibrate.CACHE_ENV, str(directory))
        yield directory


@pytest.fixture(scope="module")
def machine(cache_dir) -> MachineProfile:
    return machine_profile(TargetConfig())


def test_calibration_is_measured_and_cached(cache_dir, machine):
    assert machine.peak_gflops > 1 and machine.bandwidth_gbs > 0.5
    assert machine.cache_bandwidth_gbs >= machine.bandwidth_gbs
    assert 0 < machine.session_overhead_ms < 5 and machine.node_overhead_ms >= 0
    stored = json.loads((cache_dir / calibrate.CACHE_FILE).read_text())
    assert machine.key in stored["profiles"]
    again = machine_profile(TargetConfig())
    assert again.cached and again.peak_gflops == machine.peak_gflops and again.key == machine.key


def test_cache_key_names_the_machine_and_target(machine):
    import onnxruntime as ort
    info = machine.fingerprint
    assert info["execution_provider"] == "CPUExecutionProvider" and info["ort_version"] == ort.__version__
    assert info["threads"] == TargetConfig().threads and info["cores"] >= 1
    assert f"ort {ort.__version__}" in machine.key and "CPUExecutionProvider" in machine.key


def test_damaged_cache_is_recalibrated(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "calibrate", lambda target: _fake_machine(key=calibrate.cache_key(
        calibrate.fingerprint(target))))
    (tmp_path / calibrate.CACHE_FILE).write_text("{not json")
    profile = machine_profile(TargetConfig(), cache_dir=str(tmp_path))
    assert not profile.cached and profile.peak_gflops == 100.0
    assert machine_profile(TargetConfig(), cache_dir=str(tmp_path)).cached


def _fake_machine(**changes) -> MachineProfile:
    """A hand-made machine for classification arithmetic (not a measurement)."""
    values = dict(peak_gflops=100.0, bandwidth_gbs=10.0, cache_bandwidth_gbs=10.0, cache_bytes=0,
                  session_overhead_ms=0.01, node_overhead_ms=0.001, fingerprint={}, key="fake", measured_at="")
    values.update(changes)
    return MachineProfile(**values)


def _cost(flops: float, nbytes: float, nodes: int = 1) -> ModelCost:
    per_node = [NodeCost(f"n{i}", "Op", flops / nodes, nbytes / nodes, True) for i in range(nodes)]
    return ModelCost(flops, nbytes, per_node, set())


def test_classification_arithmetic():
    m = _fake_machine()  # balance 10 FLOP/B
    compute = classify(_cost(1e9, 1e6), median_ms=20.0, machine=m)  # 10 ms compute, 0.1 ms memory
    assert compute.bound == "compute" and compute.roofline_bound_ms == pytest.approx(10.0)
    assert compute.performance == pytest.approx(0.5) and compute.intensity == pytest.approx(1000.0)
    memory = classify(_cost(1e6, 1e8), median_ms=40.0, machine=m)  # 10 ms memory
    assert memory.bound == "memory" and memory.performance == pytest.approx(0.25)
    tiny = classify(_cost(10, 100, nodes=5), median_ms=0.02, machine=m)  # overhead 0.015 ms >> roofline
    assert tiny.bound == "overhead" and tiny.overhead_ms == pytest.approx(0.015)
    faster_than_roofline = classify(_cost(1e9, 1e6), median_ms=5.0, machine=m)
    assert faster_than_roofline.performance == 1.0  # clipped to [0, 1]
    unknown = classify(ModelCost(0.0, 0.0, [NodeCost("x", "Loop", 0, 0, False, "no cost model")], {"Loop"}), 1.0, m)
    assert unknown.bound == "unknown"


def test_two_level_roofline_uses_cache_bandwidth_for_small_nodes():
    m = _fake_machine(cache_bandwidth_gbs=100.0, cache_bytes=1_000_000)
    small = classify(_cost(0, 500_000), 1.0, m)  # fits: 500 kB at 100 GB/s
    large = classify(_cost(0, 5_000_000), 1.0, m)  # does not: 5 MB at 10 GB/s
    assert small.memory_ms == pytest.approx(0.005) and large.memory_ms == pytest.approx(0.5)


def _single(op: str, shapes: list[list[int]], out: list[int]):
    from onnx import TensorProto, helper
    names = [f"i{k}" for k in range(len(shapes))]
    graph = helper.make_graph([helper.make_node(op, names, ["y"])], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip(names, shapes)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_large_matmul_is_compute_bound_on_this_machine(machine):
    n = 1024
    model = _single("MatMul", [[n, n], [n, n]], [n, n])
    feeds = {"i0": np.random.default_rng(0).random((n, n), np.float32), "i1": np.ones((n, n), np.float32)}
    m = measure(model, feeds, Config(profiling=QUICK), counters=False)
    verdict = classify(estimate(model), m.timing.median_ms, machine)
    assert verdict.bound == "compute", verdict
    assert 0 < verdict.performance <= 1


def test_large_add_is_memory_bound_on_this_machine(machine):
    n = 1 << 22
    model = _single("Add", [[n], [n]], [n])
    feeds = {"i0": np.ones(n, np.float32), "i1": np.full(n, 2.0, np.float32)}
    m = measure(model, feeds, Config(profiling=QUICK), counters=False)
    verdict = classify(estimate(model), m.timing.median_ms, machine)
    assert verdict.bound == "memory", verdict
    assert verdict.intensity == pytest.approx(1 / 12)
