"""Profiling: timing loop, per-node times from ORT's profiler, the whole-model pipeline, the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from adaptopt import api
from adaptopt.cli import cli
from adaptopt.config import Config, ProfilingConfig, TargetConfig
from adaptopt.graph.capture import capture, make_inputs
from adaptopt.graph.index import GraphIndex
from adaptopt.graph.partition import partition
from adaptopt.profile import calibrate, node_times, profile_model
from adaptopt.profile.pipeline import leaf_model
from adaptopt.profile.runner import measure, profile_nodes, time_model
from adaptopt.report.render import render
from adaptopt.report.schema import SCHEMA_VERSION, check_profile, profile_dict
from adaptopt.runtime import make_session, run

QUICK = ProfilingConfig(warmup=1, iterations=5, min_time_s=0.0, max_time_s=1.0)


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """Calibration goes to a temporary cache dir shared by the test session, never ~/.cache."""
    directory = tmp_path_factory.getbasetemp() / "adaptopt-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(calibrate.CACHE_ENV, str(directory))
        yield directory


@pytest.fixture
def quick() -> Config:
    return Config(profiling=QUICK)


@pytest.fixture
def resnet(resnet_model) -> onnx.ModelProto:
    model = onnx.shape_inference.infer_shapes(resnet_model)
    GraphIndex.build(model)  # names every node, as load_model + the pipeline do
    return model


# ------------------------------------------------------------------ timing
def test_time_model_meets_iterations_and_reports_spread(resnet, quick):
    timing = time_model(resnet, make_inputs(resnet, quick), quick.target, quick.profiling)
    assert timing.iterations >= QUICK.iterations == len(timing.samples_ms)
    assert 0 < timing.median_ms <= timing.p90_ms and timing.spread_ms >= 0


def test_time_model_stops_at_max_time(resnet):
    capped = ProfilingConfig(warmup=0, iterations=10**6, min_time_s=0.0, max_time_s=0.05)
    timing = time_model(resnet, make_inputs(resnet, Config()), TargetConfig(), capped)
    assert 1 <= timing.iterations < 10**6


def test_measure_reads_counters_with_backend_and_kind(resnet, quick):
    m = measure(resnet, make_inputs(resnet, quick), quick)
    counters = m.counters
    assert counters["task_clock"].backend == "perf" and counters["task_clock"].value > 0
    assert counters["cpu_time"].backend == "rusage" and counters["cpu_time"].measured
    assert counters["achieved_gflops"].backend == "analytic" and not counters["achieved_gflops"].measured
    assert "sm_clock" not in counters  # GPU backends do not apply to a CPU target
    assert m.node_times_ms is None


def test_per_node_times_are_attributed_to_the_models_nodes(resnet):
    times = profile_nodes(resnet, make_inputs(resnet, Config()), TargetConfig(), runs=3)
    names = {n.name for n in resnet.graph.node}
    convs = {n.name for n in resnet.graph.node if n.op_type == "Conv"}
    assert set(times) <= names | {node_times.UNATTRIBUTED}
    assert sum(times.values()) > 0 and convs & set(times)


def test_trace_parsing_skips_warmup_and_deletes_the_file(tmp_path):
    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 10},
              {"cat": "Node", "name": "A_kernel_time", "ts": 2, "dur": 5, "args": {"op_name": "Relu"}},
              {"cat": "Session", "name": "model_run", "ts": 100, "dur": 10},
              {"cat": "Node", "name": "A_kernel_time", "ts": 101, "dur": 4, "args": {"op_name": "Relu"}},
              {"cat": "Node", "name": "B_kernel_time", "ts": 105, "dur": 2, "args": {"op_name": "Add"}}]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(events))
    kernels, runs = node_times.read_trace(str(path), skip_runs=1)
    assert runs == 1 and [(k.name, k.dur_us) for k in kernels] == [("A", 4.0), ("B", 2.0)]
    assert not path.exists()


def test_fused_and_generated_kernels_resolve_to_original_nodes():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="/enc/MatMul"),
             helper.make_node("Add", ["mm", "b"], ["y"], name="Add_1"),
             helper.make_node("Conv", ["y", "k"], ["conv_out"], name="Conv_7"),
             helper.make_node("BatchNormalization", ["conv_out", "s", "b", "m", "v"], ["bn_out"], name="BN_8")]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    resolve = node_times.resolver(model)
    assert resolve("/enc/MatMul/MatMulAddFusion") == "/enc/MatMul"
    assert resolve("/enc/MatMul@0/MatMulScaleFusion//MatmulTransposeFusion/") == "/enc/MatMul"
    assert resolve("fused Add_1") == "Add_1"
    assert resolve("conv_out_nchwc") == "Conv_7"  # named after its output tensor
    assert resolve("bn_out_nchwc", "Conv") == "Conv_7"  # Conv+BN fused: named after the BN output
    assert resolve("bn_out_nchwc", "BatchNormalization") == "BN_8"
    assert resolve("ReorderInput_token_3") is None
    run = [node_times.KernelEvent(n, "", 1000.0, 0) for n in
           ("ReorderInput_token_3", "conv_out_nchwc", "ReorderOutput", "fused Add_1")]
    times = node_times.attribute(run, 1, model)
    assert times == {"Conv_7": 3.0, "Add_1": 1.0}  # reorders charged to the conv they serve
    # one hiccup among ten runs does not set a node's time (a mean charged it 10x too much)
    runs = [node_times.KernelEvent("fused Add_1", "", 4000.0 if r == 3 else 4.0, r) for r in range(10)]
    assert node_times.attribute(runs, 10, model) == {"Add_1": 0.004}


# ------------------------------------------------------------------ the pipeline
def test_constant_boundary_inputs_become_initializers(resnet, quick):
    const = helper.make_node("Constant", [], ["two"], name="Const_0",
                             value=onnx.numpy_helper.from_array(np.array(2.0, np.float32)))
    scaled = helper.make_node("Mul", [resnet.graph.input[0].name, "two"], ["x2"], name="Mul_0")
    model = onnx.ModelProto()
    model.CopyFrom(resnet)
    for node in model.graph.node:
        node.input[:] = ["x2" if i == resnet.graph.input[0].name else i for i in node.input]
    model.graph.node.insert(0, scaled)
    model.graph.node.insert(0, const)
    model = onnx.shape_inference.infer_shapes(model)
    index = GraphIndex.build(model)
    assert "two" in index.constant_tensors()
    tree = partition(index, 2, 2)
    feeds = make_inputs(model, quick)
    values = capture(model, feeds, [n for s in tree.leaves() for n in s.boundary_inputs + s.boundary_outputs])
    for leaf in tree.leaves():
        sub, sub_feeds = leaf_model(index, leaf, values, index.constant_tensors())
        assert not set(sub_feeds) & index.constant_tensors()
        out = run(make_session(sub, TargetConfig(), level="disable"), sub_feeds)
        for name, value in out.items():  # the leaf still computes exactly what the whole model did
            np.testing.assert_allclose(value, values[name], rtol=1e-5, atol=1e-6)


def test_profile_report_follows_the_schema(resnet, quick):
    report = profile_model(resnet, quick, granularity=2, name="resnet")
    data = profile_dict(report)
    assert check_profile(data) == []
    assert data["schema_version"] == SCHEMA_VERSION
    json.dumps(data, allow_nan=False)  # strict JSON: no NaN/inf anywhere
    leaves = [s for s in data["subgraphs"] if s["leaf"]]
    assert sum(s["nodes"] for s in leaves) == len(resnet.graph.node)  # leaves tile the model
    assert data["sum_leaf_latency_ms"] == pytest.approx(sum(s["latency_ms"] for s in leaves))
    assert data["whole_model"]["latency_ms"] > 0 and data["session_overhead_ms"] > 0
    by_id = {s["id"]: s for s in data["subgraphs"]}
    for s in data["subgraphs"]:
        if s["children"]:  # internal nodes aggregate their children
            assert not s["timed"]
            assert s["latency_ms"] == pytest.approx(sum(by_id[c]["latency_ms"] for c in s["children"]))
            assert s["flops"] == pytest.approx(sum(by_id[c]["flops"] for c in s["children"]))
        elif s["timed"]:
            assert s["latency_ms"] > 0 and s["counters"]["task_clock"]["backend"] == "perf"
        assert s["bound"] in ("compute", "memory", "overhead", "unknown")
    assert any(s["profiler_ms"] for s in leaves)  # per-node times landed in the leaves


def test_every_format_renders(resnet, quick):
    report = profile_model(resnet, quick, granularity=1, name="resnet")
    assert json.loads(render(report, "json"))["model"] == "resnet"
    csv_text = render(report, "csv")
    assert csv_text.splitlines()[0].startswith("id,parent,leaf") and "task_clock [ms/run]" in csv_text
    assert render(report, "md").startswith("# adaptopt profile: resnet")
    table = render(report, "table")
    assert "whole model:" in table and "bound" in table


def test_profile_bert_with_config_inputs(bert_model, bert_config):
    config = bert_config.replace(profiling=QUICK)
    report = profile_model(onnx.shape_inference.infer_shapes(bert_model), config, granularity=1)
    assert len(report.leaves) == 2 and report.whole_model.latency_ms > 0
    assert {s.classification.bound for s in report.subgraphs} <= {"compute", "memory", "overhead", "unknown"}


# ------------------------------------------------------------------ the command line
def _dynamic_model(path) -> str:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "dyn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "W"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_cli_dynamic_dims_without_shapes_exit_2_naming_the_input(tmp_path):
    result = CliRunner().invoke(cli, ["profile", _dynamic_model(tmp_path / "dyn.onnx")])
    assert result.exit_code == 2
    assert "input 'x'" in result.output and "--input-shape" in result.output
    assert "Traceback" not in result.output


def test_cli_profile_json_to_file(tmp_path, resnet_model):
    path = tmp_path / "resnet.onnx"
    onnx.save(resnet_model, path)
    config = tmp_path / "quick.yaml"
    config.write_text("profiling: {warmup: 1, iterations: 3, min_time_s: 0.0}\n")
    out = tmp_path / "report.json"
    result = CliRunner().invoke(cli, ["profile", str(path), "--config", str(config), "--granularity", "1",
                                      "--format", "json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert check_profile(data) == [] and data["granularity"] == 1


def test_cli_profile_with_input_shape(tmp_path):
    path = _dynamic_model(tmp_path / "dyn.onnx")
    result = CliRunner().invoke(cli, ["profile", path, "--input-shape", "x=2x3x8", "--granularity", "0",
                                      "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("id,")


def test_cli_hal_lists_backends_and_calibration():
    result = CliRunner().invoke(cli, ["hal", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert "CPUExecutionProvider" in data["execution_providers"]
    backends = {b["name"]: b for b in data["backends"]}
    assert set(backends) == {"perf", "rusage", "analytic", "nvml", "ncu"}
    assert backends["perf"]["available"] and backends["perf"]["events"]["task_clock"] == "available"
    assert data["machine"]["peak_gflops"] > 0
    table = CliRunner().invoke(cli, ["hal"])
    assert table.exit_code == 0 and "machine calibration" in table.output


def test_api_profile_loads_and_profiles(tmp_path, resnet_model):
    path = tmp_path / "resnet.onnx"
    onnx.save(resnet_model, path)
    report = api.profile(path, Config(profiling=QUICK), granularity=1)
    assert report.model == str(path) and report.granularity == 1 and len(report.leaves) == 2


def test_probes_are_closed_when_a_run_fails():
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"], name="bad")], "bad",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
                               helper.make_tensor_value_info("s", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.ones(4, np.float32), "s": np.array([3], np.int64)}  # 4 elements cannot be 3
    import os
    open_fds = len(os.listdir("/proc/self/fd"))
    from adaptopt.errors import InputError
    with pytest.raises(InputError, match="failed to run"):
        measure(model, feeds, Config(profiling=ProfilingConfig(warmup=0, iterations=3)))
    assert len(os.listdir("/proc/self/fd")) == open_fds  # the perf counters were closed


def test_runtime_tensors_give_the_cost_model_what_inference_cannot():
    from adaptopt.profile.cost_model import estimate
    from adaptopt.profile.runner import runtime_tensors
    nodes = [helper.make_node("Gelu", ["x"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("Relu", ["g"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "contrib", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    assert estimate(model).unknown_nodes == 2  # ONNX shape inference knows nothing of com.microsoft ops
    tensors = runtime_tensors(model, {"x": np.ones((2, 4), np.float32)}, TargetConfig())
    cost = estimate(model, tensors)
    assert cost.unknown_nodes == 0 and cost.flops == 5 * 8 + 8


def test_scalar_inputs_keep_their_rank():
    nodes = [helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="u"),
             helper.make_node("Concat", ["n1", "v"], ["y"], name="c", axis=0)]
    graph = helper.make_graph(nodes, "scalar", [helper.make_tensor_value_info("n", TensorProto.INT64, []),
                                                helper.make_tensor_value_info("v", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [3])],
                              initializer=[onnx.numpy_helper.from_array(np.array([0], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"n": np.array(7, np.int64), "v": np.array([1, 2], np.int64)}  # a 0-d input must stay 0-d
    assert measure(model, feeds, Config(profiling=QUICK), counters=False).timing.median_ms > 0


def test_sessions_hold_no_copy_of_the_model_bytes_and_do_not_fall_back(resnet):
    """ORT's Python session keeps the model's bytes for its provider fallback (a model-sized
    copy per session: 2.1x the model instead of 1.1x on a 211 MB encoder); providers are
    chosen before any session here, so the fallback is off and the copy is let go."""
    session = make_session(resnet, TargetConfig())
    assert not [v for v in vars(session).values() if isinstance(v, bytes)]
    assert session._enable_fallback is False
    feeds = {i.name: np.zeros([d.dim_value for d in i.type.tensor_type.shape.dim], np.float32)
             for i in resnet.graph.input}
    assert run(session, feeds)  # still runs
