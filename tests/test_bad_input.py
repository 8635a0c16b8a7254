"""Bad input, clear error: every command refuses every broken model and config the same way.

Exit code 2, exactly one line on stderr naming the problem (``--debug`` adds the
traceback), no output file, and the input left byte-for-byte unchanged. Odd but
valid models split and merge back to a model that computes the same outputs.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from adaptopt import api
from adaptopt.cli import cli
from adaptopt.config import Config, load_config
from adaptopt.errors import InputError
from adaptopt.graph.io import load_model
from tests.conftest import run_model
from tests.make_bad_models import BAD_CONFIGS, BAD_MODELS, ODD_MODELS, write_split_folder, write_valid

COMMANDS = [c for c in ("split", "profile", "optimize", "merge") if c in cli.commands]
CONFIG_COMMANDS = [c for c in COMMANDS if any(p.name == "config_path" for p in cli.commands[c].params)]


def snapshot(folder: Path) -> dict[str, str]:
    """Path -> content hash of every file under ``folder`` (symlinks by their target name)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            files[str(path)] = "link:" + str(path.readlink())
        elif path.is_file():
            files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def command_args(command: str, model: Path, out: Path) -> list[str]:
    """Arguments that run ``command`` on ``model`` (a split folder for merge) writing under ``out``."""
    if command == "merge":
        return ["merge", str(write_split_folder(model.parent, model)), "-o", str(out / "merged.onnx")]
    args = [command, str(model)]
    if any("-o" in p.opts for p in cli.commands[command].params):
        args += ["-o", str(out / ("split" if command == "split" else "result.onnx"))]
    return args


def assert_refused(args: list[str], watched: Path, out: Path, expect: str) -> str:
    before = snapshot(watched)
    result = CliRunner().invoke(cli, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("adaptopt: error: ") and re.search(expect, lines[0]), lines[0]
    assert result.stdout == ""
    assert snapshot(watched) == before  # input unchanged, no temp or partial file left next to it
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))
    return lines[0]


def case_folder(tmp_path: Path) -> tuple[Path, Path]:
    case, out = tmp_path / "case", tmp_path / "out"
    case.mkdir()
    out.mkdir()
    return case, out


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", BAD_MODELS, ids=lambda c: c.name)
def test_bad_model_refused_by_every_command(tmp_path, case, command):
    folder, out = case_folder(tmp_path)
    model = case.write(folder)
    args = command_args(command, model, out)  # merge: writes the manifest before the snapshot
    assert_refused(args, tmp_path, out, case.expect)


@pytest.mark.parametrize("case", BAD_MODELS, ids=lambda c: c.name)
def test_bad_model_load_raises_input_error(tmp_path, case):
    with pytest.raises(InputError, match=case.expect) as info:
        load_model(case.write(tmp_path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize("name,text,expect", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_refused(tmp_path, command, name, text, expect):
    folder, out = case_folder(tmp_path)
    model = write_valid(folder)
    config = folder / "config.yaml"
    config.write_text(text)
    line = assert_refused(command_args(command, model, out) + ["--config", str(config)], tmp_path, out, expect)
    assert "config.yaml" in line  # the error names the file


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "merge"])
def test_bad_model_on_stdin(tmp_path, command):
    _, out = case_folder(tmp_path)
    args = [command, "-"] + (["-o", str(out / "result")] if any("-o" in p.opts for p in cli.commands[command].params)
                             else [])
    result = CliRunner().invoke(cli, args, input=b"\x08\x07garbage that is not a model")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "<stdin>" in result.stderr and not any(out.iterdir())


def test_debug_adds_the_traceback(tmp_path):
    folder, out = case_folder(tmp_path)
    model = BAD_MODELS[0].write(folder)
    result = CliRunner().invoke(cli, ["--debug", "split", str(model), "-o", str(out / "s")])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "InputError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("adaptopt: error: ")


def test_missing_model_file(tmp_path):
    result = CliRunner().invoke(cli, ["split", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "s")])
    assert result.exit_code == 2 and "no such file" in result.stderr
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- odd but valid models
@pytest.mark.parametrize("case", ODD_MODELS, ids=lambda c: c.name)
def test_odd_model_split_merge_round_trip(tmp_path, case):
    model, feeds = case.build()
    path = tmp_path / "odd.onnx"
    path.write_bytes(model.SerializeToString())
    config = Config().with_section("granularity", min_nodes=1)
    result = api.split(path, tmp_path / "split", config, 3)
    assert len(result.manifest["leaves"]) >= 2  # really split, not passed through whole
    merged = api.merge(tmp_path / "split", tmp_path / "merged.onnx")
    reference, got = run_model(model, feeds), run_model(merged, feeds)
    assert list(reference) == list(got)
    for name, value in reference.items():
        if value.dtype == object:
            assert value.tolist() == got[name].tolist()
        else:
            # ORT pre-packs constant MatMul weights but not overridable inputs: ulp-level differences
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)
    assert path.read_bytes() == model.SerializeToString()


def _odd_runs():
    for command in [c for c in ("profile", "optimize") if c in cli.commands]:
        for case in ODD_MODELS:
            yield pytest.param(command, case, id=f"{command}-{case.name}")


@pytest.mark.parametrize("command,case", list(_odd_runs()))
def test_odd_model_profile_and_optimize(tmp_path, command, case):
    """Odd models are optimized when possible, else passed through: never refused, never a crash."""
    model, feeds = case.build()
    path = tmp_path / "odd.onnx"
    path.write_bytes(model.SerializeToString())
    args = [command, str(path)] + (["-o", str(tmp_path / "out.onnx"), "--budget", "20"] if command == "optimize"
                                   else [])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    assert path.read_bytes() == model.SerializeToString()
    if command == "optimize":
        reference = run_model(model, feeds)
        got = run_model(load_model(tmp_path / "out.onnx"), feeds)
        for name, value in reference.items():
            if value.dtype == object:
                assert value.tolist() == got[name].tolist()
            else:
                np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, equal_nan=True, err_msg=name)


def _refused(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.stderr, result.exception)
    return lines[0]


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    """A bad -o / --report is bad input found up front (one line, exit 2), not an internal
    error after minutes of measuring, and never a model written before the report fails."""
    model = write_valid(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "out.onnx"
    assert "folder" in _refused(["optimize", str(model), "-o", str(tmp_path / "folder")])
    assert ".json or .md" in _refused(["optimize", str(model), "-o", str(out), "--report", str(tmp_path / "r.txt")])
    assert "not a folder" in _refused(["optimize", str(model), "-o", str(tmp_path / "file.txt" / "m.onnx")])
    assert "not a folder" in _refused(["merge", str(tmp_path / "folder"), "-o", str(tmp_path / "file.txt" / "m.onnx")])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder", "model.onnx"]


def test_a_model_with_no_nodes_is_written_back(tmp_path):
    """Output = input, no node at all: valid, nothing to optimize; the run says so and writes it."""
    from onnx import TensorProto, helper
    graph = helper.make_graph([], "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])])
    path = tmp_path / "empty.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    result = CliRunner().invoke(cli, ["optimize", str(path), "-o", str(tmp_path / "out.onnx"), "--budget", "10"])
    assert result.exit_code == 0, result.stderr
    assert not load_model(tmp_path / "out.onnx", Config()).graph.node


def test_a_zero_sized_dynamic_dim_is_a_valid_shape(tmp_path):
    """--input-shape x=0x4 (an empty batch, a zero-length past): the other-size check must
    not index into the empty feed (it crashed with an IndexError)."""
    model = load_model(write_valid(tmp_path), Config())
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "n"
    path = tmp_path / "dyn.onnx"
    path.write_bytes(model.SerializeToString())
    result = CliRunner().invoke(cli, ["optimize", str(path), "--input-shape", "x=0x4", "-o", str(tmp_path / "o.onnx"),
                                      "--budget", "10"])
    assert result.exit_code == 0, result.stderr
    out = load_model(tmp_path / "o.onnx", Config())
    feeds = {"x": np.ones((3, 4), np.float32)}
    np.testing.assert_allclose(run_model(out, feeds)["y"], run_model(model, feeds)["y"], rtol=1e-6)


def _bf16_model(bf16_output: bool = False):
    """x -> MatMul -> Cast(bf16) -> LayerNormalization (bf16) -> Cast(fp32) -> y (the cast back
    left out for ``bf16_output``): runs in ONNX Runtime, but numpy has no bfloat16."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(np.ones(16, np.float32), "scale"),
             numpy_helper.from_array(np.zeros(16, np.float32), "bias")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Cast", ["m"], ["mb"], to=TensorProto.BFLOAT16),
             helper.make_node("Cast", ["scale"], ["sb"], to=TensorProto.BFLOAT16),
             helper.make_node("Cast", ["bias"], ["bb"], to=TensorProto.BFLOAT16),
             helper.make_node("LayerNormalization", ["mb", "sb", "bb"], ["ln" if not bf16_output else "y"], axis=-1),
             helper.make_node("Relu", ["x"], ["r"])]
    if not bf16_output:
        nodes += [helper.make_node("Cast", ["ln"], ["lf"], to=TensorProto.FLOAT),
                  helper.make_node("Add", ["lf", "r"], ["y"])]
    out_type = TensorProto.BFLOAT16 if bf16_output else TensorProto.FLOAT
    graph = helper.make_graph(nodes, "bf16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", out_type, ["n", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_bfloat16_tensor_inside_the_model_is_left_alone_not_refused(tmp_path):
    """numpy cannot hold bfloat16, so a subgraph bordering such a tensor cannot be captured
    and run alone: it is kept as it is, and the rest is profiled and optimized (this model
    was refused as 'reference run failed'). A bfloat16 graph output cannot be compared at
    all: bad input, said so."""
    path = tmp_path / "bf16.onnx"
    path.write_bytes(_bf16_model().SerializeToString())
    shape = ["--input-shape", "x=8x16"]
    grain = tmp_path / "grain.yaml"
    grain.write_text("granularity: {initial_granularity: 2, min_nodes: 1, max_rounds: 0}\n")
    result = CliRunner().invoke(cli, ["optimize", str(path), *shape, "--config", str(grain), "-o",
                                      str(tmp_path / "o.onnx"), "--budget", "20"])
    assert result.exit_code == 0, result.stderr
    assert CliRunner().invoke(cli, ["profile", str(path), *shape, "--config", str(grain)]).exit_code == 0
    out = load_model(tmp_path / "o.onnx", Config())
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)}
    np.testing.assert_allclose(run_model(out, feeds)["y"], run_model(_bf16_model(), feeds)["y"], rtol=1e-6)
    path.write_bytes(_bf16_model(bf16_output=True).SerializeToString())
    assert "bfloat16" in _refused(["optimize", str(path), *shape, "-o", str(tmp_path / "o2.onnx")])


def test_a_damaged_or_unwritable_cache_costs_measurements_not_the_run(tmp_path, monkeypatch):
    """Garbage in the measurement cache or the calibration file, or a cache 'folder' that is
    a file: the run measures again (in memory) and succeeds."""
    model = write_valid(tmp_path)
    fast = tmp_path / "fast.yaml"
    fast.write_text("profiling: {warmup: 1, iterations: 3, min_time_s: 0.0, max_time_s: 0.05}\n"
                    "policy: {RL_training_epochs: 1, max_sequence: 1}\n")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "measurements.jsonl").write_bytes(np.random.default_rng(0).bytes(2000) + b'\n{"key": 1}\n[1, 2]\n')
    (damaged / "machine.json").write_bytes(np.random.default_rng(1).bytes(300))
    (tmp_path / "a_file").write_text("not a folder")
    for cache in (damaged, tmp_path / "a_file"):
        monkeypatch.setenv("ADAPTOPT_CACHE_DIR", str(cache))
        result = CliRunner().invoke(cli, ["optimize", str(model), "--config", str(fast), "-o",
                                          str(tmp_path / "o.onnx"), "--budget", "20"])
        assert result.exit_code == 0, (cache, result.stderr)


def test_config_scientific_notation_and_bounds():
    from adaptopt.config import parse_config
    from adaptopt.errors import ConfigError
    assert parse_config("accuracy: {exact_tolerance: 1e-4}\n").accuracy.exact_tolerance == 1e-4  # YAML 1.1 string
    for text in ("target: {threads: 100000}\n", "policy: {RL_training_epochs: 1000000000000}\n",
                 "profiling: {warmup: 1000000000000}\n", "budget: !!python/object/apply:os.getcwd []\n"):
        with pytest.raises(ConfigError):
            parse_config(text)


def test_malformed_q_table_manifest_and_inputs_file_are_bad_input(tmp_path):
    model = write_valid(tmp_path)
    table = tmp_path / "q.json"
    table.write_text('{"format": "adaptopt-qtable", "version": 1, "values": {}, "visits": []}')
    assert "visits" in _refused(["policy", "show", str(table)])
    folder = tmp_path / "split"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"format": "adaptopt-split", "root": "0", "leaves": ["0"], '
                                          '"nodes": [{"file": 3}]}')
    assert "manifest" in _refused(["merge", str(folder), "-o", str(tmp_path / "m.onnx")])
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "in.yaml").write_text(f"inputs_file: {tmp_path / 'bad.npz'}\n")
    assert "npz" in _refused(["optimize", str(model), "--config", str(tmp_path / "in.yaml"), "-o",
                              str(tmp_path / "o.onnx")])
    np.save(tmp_path / "one.npy", np.zeros((1, 4), np.float32))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    (tmp_path / "in.yaml").write_text(f"inputs_file: {tmp_path / 'one.npz'}\n")
    assert ".npy" in _refused(["optimize", str(model), "--config", str(tmp_path / "in.yaml"), "-o",
                               str(tmp_path / "o.onnx")])
    long_name = tmp_path / ("d" * 256 + ".onnx")
    assert "255 bytes" in _refused(["optimize", str(model), "-o", str(long_name)])


def test_a_gpu_config_without_a_gpu_runs_on_the_cpu_and_says_so(tmp_path):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: nothing falls back")
    model = write_valid(tmp_path)
    gpu = Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml"
    result = CliRunner().invoke(cli, ["optimize", str(model), "--config", str(gpu), "-o", str(tmp_path / "o.onnx"),
                                      "--report", str(tmp_path / "r.json"), "--budget", "20"])
    assert result.exit_code == 0, result.stderr
    assert "adaptopt: warning: execution provider(s) not usable here, running on CPUExecutionProvider" in result.stderr
    import json
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["target"]["resolved_providers"] == ["CPUExecutionProvider"]
    status = api.hal_status(load_config(str(gpu)))
    assert "CUDAExecutionProvider" in status["unusable_providers"]


def test_usage_errors_are_one_line_too(tmp_path):
    """The entry point turns click's usage block (4 lines) into one line, exit 2."""
    import subprocess
    import sys
    for args, expect in ((["optimize", str(write_valid(tmp_path)), "--config", str(tmp_path)], "--config"),
                         (["nosuchcmd"], "nosuchcmd"), (["optimize", "--budget", "0.5", "x.onnx"], "--budget")):
        done = subprocess.run([sys.executable, "-m", "adaptopt", *args], capture_output=True, text=True)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("adaptopt: error: "), done.stderr
        assert expect in lines[0] and "--help" in lines[0]
    done = subprocess.run([sys.executable, "-m", "adaptopt", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and "adaptopt" in done.stdout


def test_calibration_and_measurements_share_one_cache_folder(tmp_path, monkeypatch):
    """One rule for both caches: the config's folder, else $ADAPTOPT_CACHE_DIR, else
    $XDG_CACHE_HOME/adaptopt, else ~/.cache/adaptopt (XDG was honoured by one cache only)."""
    from adaptopt.profile.calibrate import resolve_cache_dir
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ADAPTOPT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "adaptopt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == tmp_path / "xdg" / "adaptopt"
    monkeypatch.setenv("ADAPTOPT_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(str(tmp_path / "configured")) == tmp_path / "configured"


@pytest.mark.parametrize("command", ["profile", "optimize"])
@pytest.mark.parametrize("kind, expect", [("dynamic", "has dynamic dims"), ("fails", "reference run failed")])
def test_a_model_refused_deep_in_the_pipeline_is_named(tmp_path, command, kind, expect):
    """Errors about what the model holds, found after loading (no shape for a dynamic dim,
    a run that fails), start with the model's file like every other message about it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    dims = ["n"] if kind == "dynamic" else [4]
    index = numpy_helper.from_array(np.array([10], np.int64), "index")  # out of range: fails at run time
    graph = helper.make_graph([helper.make_node("Gather" if kind == "fails" else "Relu",
                                                ["x", "index"] if kind == "fails" else ["x"], ["y"])],
                              "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims if kind == "dynamic" else [1])],
                              [index] if kind == "fails" else [])
    case, out = case_folder(tmp_path)
    path = case / "deep.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    line = assert_refused(command_args(command, path, out), case, out, expect)
    assert line.startswith(f"adaptopt: error: {path}: "), line
