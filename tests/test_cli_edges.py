"""Operational edges of the command line found by a sweep: a reader that leaves early,
`-` and empty paths, input shapes that contradict each other or cannot fit, a bad Q-table
read before any work, the model's identity kept through a rewrite, and a lossy result's
accuracy said to rest on generated inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from adaptopt import api
from adaptopt.config import Config, InputSpec
from adaptopt.errors import InputError
from tests.make_bad_models import write_valid
from tests.test_cli_gaps import one_line_error


def shared_dim_model(path: Path) -> Path:
    """A[N, 4] + B[N, 4]: two inputs naming the same dim."""
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, ["N", 4])
    b = helper.make_tensor_value_info("B", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Add", ["A", "B"], ["Y"], name="add")], "g", [a, b], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_a_reader_that_leaves_early_is_not_an_internal_error(tmp_path):
    """`adaptopt merge DIR -o - | head -c 10`: exit 141 (as a tool killed by SIGPIPE), no
    message; it was exit 1 'internal error: BrokenPipeError'. (The 4 MB model cannot fit in
    the pipe's buffer: the write must meet the closed end.)"""
    w = numpy_helper.from_array(np.ones((1024, 1024), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1024])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1024])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="r")]
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                                opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    api.split(path, tmp_path / "split", Config(), 0)
    done = subprocess.run(f"set -o pipefail; {sys.executable} -m adaptopt merge {tmp_path / 'split'} -o - | head -c 10",
                          shell=True, executable="/bin/bash", capture_output=True, check=False)
    assert done.returncode == 141, done.stderr
    assert len(done.stdout) == 10 and done.stderr == b""


def test_profile_to_dash_writes_stdout_not_a_file_named_dash(tmp_path):
    model = write_valid(tmp_path)
    done = subprocess.run([sys.executable, "-m", "adaptopt", "profile", str(model), "-o", "-", "--format", "json"],
                          capture_output=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(b"{") and not (tmp_path / "-").exists()


@pytest.mark.parametrize("option", ["-o", "--report", "--policy", "--keep-subgraphs"])
def test_an_empty_path_is_refused_not_ignored(tmp_path, option):
    """`-o ""` wrote MODEL.opt.onnx and `--report ""` wrote no report, both silently."""
    model = write_valid(tmp_path)
    args = ["optimize", str(model), option, ""] + ([] if option == "-o" else ["-o", str(tmp_path / "o.onnx")])
    assert "empty path" in one_line_error(args)
    assert not (tmp_path / "model.opt.onnx").exists() and not (tmp_path / "o.onnx").exists()


def test_inputs_sharing_a_dim_name_must_agree(tmp_path):
    """It was ORT's 'Node () Op (Add) Incompatible dimensions' (and split wrote the folder)."""
    model = shared_dim_model(tmp_path / "dyn.onnx")
    for command in (["split", str(model), "-o", str(tmp_path / "s")], ["profile", str(model)]):
        line = one_line_error([*command, "--input-shape", "A=2x4", "--input-shape", "B=3x4"])
        assert "dim 'N' is 2 in input 'A' but 3 in input 'B'" in line
    assert not (tmp_path / "s").exists()


def test_an_input_shape_given_twice_is_refused(tmp_path):
    model = shared_dim_model(tmp_path / "dyn.onnx")
    line = one_line_error(["profile", str(model), "--input-shape", "A=2x4", "--input-shape", "A=3x4",
                           "--input-shape", "B=2x4"])
    assert "--input-shape A given twice" in line


def test_inputs_too_big_for_the_machine_are_refused_before_allocating(tmp_path):
    """`--input-shape A=99999999999x4` was 'internal error: MemoryError' (exit 1)."""
    model = shared_dim_model(tmp_path / "dyn.onnx")
    line = one_line_error(["profile", str(model), "--input-shape", "A=99999999999x4",
                           "--input-shape", "B=99999999999x4"])
    assert "input 'A' of shape [99999999999, 4]" in line and "quarter of this machine's memory" in line


def test_a_bad_policy_file_fails_before_any_measuring(tmp_path, monkeypatch):
    """The Q-table was read after the pre-pass (26 s of timing on a 5-node model)."""
    import adaptopt.adapt.loop as loop
    bad = tmp_path / "q.json"
    bad.write_text("[" * 100_000)

    def no_capture(*_args, **_kwargs):
        raise AssertionError("the model was run before the Q-table was read")

    monkeypatch.setattr(loop, "capture", no_capture)
    with pytest.raises(InputError):
        api.optimize(write_valid(tmp_path), Config(), qtable=str(bad))


def test_a_rewrite_keeps_the_models_producer_docs_and_metadata():
    """ORT's quantizer signed its output 'onnx.quantize' 0.1.0 over the user's producer."""
    from adaptopt.passes.base import PassContext
    from adaptopt.passes.registry import get_pass
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="acme-exporter", producer_version="9.9.9", doc_string="the model",
                              model_version=7, domain="com.acme")
    helper.set_model_props(model, {"license": "MIT", "author": "someone"})
    ctx = PassContext(feeds={"x": rng.random((8, 64), dtype=np.float32)}, accuracy_budget=0.99)
    result = get_pass("quantize_dynamic_int8").apply(model, ctx)
    assert result.modified
    out = result.model
    assert (out.producer_name, out.producer_version, out.doc_string, out.model_version, out.domain) == \
        ("acme-exporter", "9.9.9", "the model", 7, "com.acme")
    props = {p.key: p.value for p in out.metadata_props}
    assert props["license"] == "MIT" and props["author"] == "someone"


def test_float_inputs_nobody_configured_are_named_with_an_accuracy_budget(tmp_path):
    """The cosine of a lossy result is checked on inputs filled uniform in [0, 1) unless the
    config says otherwise; the run says so, and the report lists them."""
    from adaptopt.adapt.loop import note_assumed_inputs
    model = onnx.load(shared_dim_model(tmp_path / "dyn.onnx"))
    said: list[str] = []
    configured = {"A": InputSpec(shape=(2, 4), values="normal"), "B": InputSpec(shape=(2, 4))}
    report = {"settings": {}}
    note_assumed_inputs(model, Config(inputs=configured), 0.99, True, report, said.append)
    assert report["settings"]["inputs_assumed"] == {"inputs": ["B"], "values": "uniform01"}
    assert len(said) == 1 and "B filled uniform in [0, 1)" in said[0]
    for config, budget in ((Config(inputs=configured, inputs_file="x.npz"), 0.99), (Config(inputs=configured), 0.0)):
        report = {"settings": {}}
        note_assumed_inputs(model, config, budget, True, report, said.append)
        assert "inputs_assumed" not in report["settings"]
    assert len(said) == 1


def test_integer_inputs_nobody_configured_are_named_with_an_accuracy_budget():
    """Token ids nobody configured are filled with 0 or 1: a T5-style encoder kept its budget
    there and missed it on ids in [0, 100). Booleans (both values drawn) are not named."""
    from onnx import TensorProto, helper

    from adaptopt.adapt.loop import note_assumed_inputs
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8]),
              helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 8])]
    graph = helper.make_graph([helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
                               helper.make_node("Cast", ["keep"], ["k"], to=TensorProto.FLOAT),
                               helper.make_node("Mul", ["f", "k"], ["y"])], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    said: list[str] = []
    report = {"settings": {}}
    note_assumed_inputs(model, Config(), 0.99, True, report, said.append)
    assert report["settings"]["inputs_assumed"] == {"inputs": [], "values": "uniform01", "integer_inputs": ["ids"],
                                                    "integer_values": "0 or 1"}
    assert len(said) == 1 and "ids filled with 0 or 1" in said[0] and "keep" not in said[0]
    report = {"settings": {}}
    note_assumed_inputs(model, Config(inputs={"ids": InputSpec(values="range", value_range=(0, 100))}), 0.99, True,
                        report, said.append)
    assert "inputs_assumed" not in report["settings"]


def test_an_unusable_measurement_cache_is_said_once(tmp_path):
    """ADAPTOPT_CACHE_DIR naming a file: the run works in memory (it did, silently)."""
    import os
    model = write_valid(tmp_path)
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("x")
    done = subprocess.run([sys.executable, "-m", "adaptopt", "optimize", str(model), "-o", str(tmp_path / "o.onnx"),
                           "--passes", "eliminate_identity"], capture_output=True, check=False,
                          env={**os.environ, "ADAPTOPT_CACHE_DIR": str(blocker)})
    assert done.returncode == 0, done.stderr
    warnings = [l for l in done.stderr.decode().splitlines() if "warning" in l]
    assert len(warnings) == 1 and "not usable (it is a file, not a folder)" in warnings[0]


def test_a_cache_that_fails_mid_run_is_reported(tmp_path, monkeypatch):
    """A disk that fills up during the run: the run goes on in memory, the report names it
    (cache_unusable) and one warning says it; a cache unusable from the start is in the
    report too, but the CLI has already said it (test_an_unusable_measurement_cache_is_said_once)."""
    from adaptopt.adapt.cache import MeasurementCache
    from adaptopt.adapt.loop import note_cache_trouble

    def full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")
    cache = MeasurementCache(tmp_path, "fp")
    said: list[str] = []
    report: dict = {}
    note_cache_trouble(cache, cache.unusable, report, said.append)
    assert report == {} and said == []
    monkeypatch.setattr("adaptopt.adapt.cache._append_line", full)
    cache.put("k", time_ms=1.0)
    note_cache_trouble(cache, None, report, said.append)
    assert "No space left on device" in report["cache_unusable"]
    assert len(said) == 1 and said[0].startswith("warning: measurement cache") and "\n" not in said[0]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    from_start = MeasurementCache(blocker, "fp")
    report, said = {}, []
    note_cache_trouble(from_start, from_start.unusable, report, said.append)
    assert "it is a file" in report["cache_unusable"] and said == []
    from adaptopt.report.optimize import render_markdown
    result = {"message": "m", "speedup": 1.0, "latency_ms": {"original": 1.0, "optimized": 1.0}, "aa_noise": 0.0,
              "accuracy": {"max_abs_diff": 0.0, "min_cosine": 1.0}}
    text = render_markdown({"model": {"name": "m"}, "result": result, **report})
    assert "Note: the measurement cache" in text and "it is a file" in text


def test_static_quantization_is_withheld_while_input_values_are_assumed():
    """Calibrated passes fit ranges to the generated inputs; with any input's values assumed
    they are not searched unless passes.enabled names them. Dynamic int8 is not withheld."""
    from adaptopt.adapt.session import select_passes, withhold_calibrated
    from adaptopt.config import PassesConfig
    passes = select_passes(Config(), None, 0.99)
    kept, withheld = withhold_calibrated(passes, Config(), {"x": "uniform01"})
    names = {p.name for p in kept}
    assert "quantize_static_qdq" in withheld and "x" in withheld["quantize_static_qdq"]
    assert "quantize_static_qdq" not in names and "quantize_dynamic_int8" in names
    assert set(withheld) == {p.name for p in passes if p.calibrated}
    assert withhold_calibrated(passes, Config(), {}) == (passes, {})  # every input configured
    named = Config(passes=PassesConfig(enabled=("quantize_static_qdq", "quantize_dynamic_int8")))
    kept, withheld = withhold_calibrated(select_passes(named, None, 0.99), named, {"x": "uniform01"})
    assert withheld == {} and "quantize_static_qdq" in {p.name for p in kept}
