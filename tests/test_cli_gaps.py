"""Small robustness gaps: gate values that can never fire, config paths relative to the
config file, YAML keys given twice, and models whose nodes share a name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from adaptopt.cli import cli
from adaptopt.config import load_config, parse_config
from adaptopt.errors import ConfigError
from adaptopt.graph.capture import make_inputs
from adaptopt.graph.io import load_model
from tests.conftest import run_model
from tests.make_bad_models import write_valid

FAST_YAML = """
granularity: {initial_granularity: 1, min_nodes: 3, max_rounds: 1}
profiling: {warmup: 1, iterations: 5, min_time_s: 0.0, max_time_s: 0.2, per_node: true, apart_pairs: 5, apart_seconds: 0.02}
policy: {RL_training_epochs: 2, max_sequence: 2, cache_dir: CACHE}
budget: {seconds: 60}
"""


def fast_config(folder: Path) -> Path:
    path = folder / "fast.yaml"
    path.write_text(FAST_YAML.replace("CACHE", str(folder / "cache")))
    return path


def one_line_error(args: list[str]) -> str:
    """Run the real entry point (click usage errors are one line only there), expect exit 2."""
    done = subprocess.run([sys.executable, "-m", "adaptopt", *args], capture_output=True, text=True, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, (done.returncode, done.stderr)
    assert lines[0].startswith("adaptopt: error: "), lines[0]
    return lines[0]


# ---------------------------------------------------------------- 1. gate and budget values
@pytest.mark.parametrize("option,value", [
    ("--require-speedup", "nan"), ("--require-speedup", "inf"), ("--require-speedup", "-inf"),
    ("--require-speedup", "0"), ("--require-speedup", "-1"), ("--require-speedup", "1e400"),
    ("--budget", "nan"), ("--budget", "inf"),
    ("--accuracy-budget", "nan"), ("--accuracy-budget", "inf"), ("--accuracy-budget", "1.5"),
])
def test_gate_and_budget_values_that_cannot_work_are_usage_errors(tmp_path, option, value):
    """nan compares false with everything: `--require-speedup nan` was accepted and its gate
    could never fire. Non-finite and out-of-range values are refused before any work."""
    model = write_valid(tmp_path)
    out = tmp_path / "out.onnx"
    line = one_line_error(["optimize", str(model), "-o", str(out), option, value])
    assert option in line and "--help" in line
    assert not out.exists()


@pytest.mark.parametrize("option", [["--keep-subgraphs", "kept"], ["--policy", "q.json"]])
def test_options_of_the_search_are_refused_with_a_fixed_pass_sequence(tmp_path, option):
    """--passes runs no search: a --keep-subgraphs folder was silently never written, a
    --policy table never read nor saved. Refused before any work, nothing written."""
    model = write_valid(tmp_path)
    out = tmp_path / "out.onnx"
    option = [option[0], str(tmp_path / option[1])]
    line = one_line_error(["optimize", str(model), "-o", str(out), "--passes", "fold_constants", *option])
    assert option[0] in line and "--passes" in line
    assert not out.exists() and not Path(option[1]).exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-0.5"])
def test_policy_train_accuracy_budget_is_checked_the_same_way(tmp_path, value):
    model = write_valid(tmp_path)
    line = one_line_error(["policy", "train", str(model), "-o", str(tmp_path / "q.json"), "--accuracy-budget", value])
    assert "--accuracy-budget" in line
    assert not (tmp_path / "q.json").exists()


# ---------------------------------------------------------------- 2. inputs_file relative to the config
def test_relative_inputs_file_is_read_from_the_config_folder(tmp_path, monkeypatch):
    """`inputs_file: x.npz` names the file next to the config, from any working folder."""
    model = load_model(write_valid(tmp_path))
    folder, elsewhere = tmp_path / "project" / "configs", tmp_path / "elsewhere"
    folder.mkdir(parents=True)
    elsewhere.mkdir()
    x = np.arange(4, dtype=np.float32).reshape(1, 4) - 1.5
    np.savez(folder / "feeds.npz", x=x)
    (folder / "run.yaml").write_text("inputs_file: feeds.npz\n")
    monkeypatch.chdir(elsewhere)
    config = load_config(folder / "run.yaml")
    assert Path(config.inputs_file) == folder / "feeds.npz"
    np.testing.assert_array_equal(make_inputs(model, config)["x"], x)
    monkeypatch.chdir(tmp_path)  # a relative --config path works too
    config = load_config(Path("project/configs/run.yaml"))
    np.testing.assert_array_equal(make_inputs(model, config)["x"], x)


def test_absolute_and_string_config_inputs_file_keep_their_meaning(tmp_path, monkeypatch):
    absolute = tmp_path / "data" / "feeds.npz"
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text(f"inputs_file: {absolute}\n")
    assert Path(load_config(tmp_path / "cfg" / "run.yaml").inputs_file) == absolute
    monkeypatch.chdir(tmp_path)
    assert parse_config("inputs_file: feeds.npz\n").inputs_file == "feeds.npz"  # no file: the working folder


def test_policy_paths_in_a_config_file_are_read_from_its_folder(tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "run.yaml").write_text("policy:\n  qtable: q.json\n  cache_dir: cache\n")
    policy = load_config(folder / "run.yaml").policy
    assert (Path(policy.qtable), Path(policy.cache_dir)) == (folder / "q.json", folder / "cache")
    assert parse_config("policy:\n  qtable: q.json\n").policy.qtable == "q.json"


def test_profile_finds_the_inputs_file_next_to_its_config(tmp_path, monkeypatch):
    model = write_valid(tmp_path)
    folder = tmp_path / "cfg"
    folder.mkdir()
    np.savez(folder / "feeds.npz", x=np.ones((1, 4), np.float32))
    (folder / "run.yaml").write_text(fast_config(tmp_path).read_text() + "inputs_file: feeds.npz\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["profile", str(model), "--config", str(folder / "run.yaml"), "--format", "json"])
    assert result.exit_code == 0, result.stderr


# ---------------------------------------------------------------- 3. duplicate config keys
@pytest.mark.parametrize("text,line,key", [
    ("granularity: {min_nodes: 3}\nprofiling: {warmup: 1}\ngranularity:\n  min_nodes: 4\n", 3, "granularity"),
    ("granularity:\n  min_nodes: 3\n  max_rounds: 1\n  min_nodes: 4\n", 4, "granularity.min_nodes"),
    ("inputs:\n  x: {shape: [1, 4]}\n  x: {shape: [2, 4]}\n", 3, "inputs.x"),
    ("inputs:\n  x:\n    shape: [1, 4]\n    shape: [2, 4]\n", 4, "inputs.x.shape"),
    ("inputs_file: a.npz\ninputs_file: b.npz\n", 2, "inputs_file"),
])
def test_duplicate_config_keys_are_refused_with_key_and_line(tmp_path, text, line, key):
    """YAML loaders keep the last of two equal keys silently; a config must not."""
    config = tmp_path / "dup.yaml"
    config.write_text(text)
    model = write_valid(tmp_path)
    result = CliRunner().invoke(cli, ["split", str(model), "-o", str(tmp_path / "split"), "--config", str(config)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.stderr)
    assert f"{config}:{line}: duplicate config key '{key}'" in lines[0], lines[0]
    assert not (tmp_path / "split").exists()
    with pytest.raises(ConfigError, match=f"<config>:{line}: duplicate config key '{key}'"):
        parse_config(text)


def test_equal_keys_in_different_mappings_are_fine():
    config = parse_config("budget: {seconds: 30}\naccuracy: {budget: 0.99}\n"
                          "inputs:\n  a: {shape: [1]}\n  b: {shape: [1]}\n")
    assert config.budget.seconds == 30 and config.accuracy.budget == 0.99 and set(config.inputs) == {"a", "b"}


# ---------------------------------------------------------------- 4. nodes sharing a name
def same_name_model() -> onnx.ModelProto:
    """Two MatMul + Add + Relu + Identity blocks, every node named "block" (exporters write
    such models; onnxruntime refuses them: "two nodes with same node name")."""
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(2):
        inits += [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"], name="block"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name="block"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name="block"),
                  helper.make_node("Identity", [f"r{i}"], [f"y{i}"], name="block_1")]
        prev = f"y{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [2, 8])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def reference_outputs(model: onnx.ModelProto, feeds: dict) -> dict:
    """The model's outputs from onnxruntime on a copy with its node names cleared (a node
    name only labels the node; ORT accepts any number of unnamed nodes)."""
    unnamed = onnx.ModelProto()
    unnamed.CopyFrom(model)
    for node in unnamed.graph.node:
        node.name = ""
    return run_model(unnamed, feeds)


def test_nodes_sharing_a_name_are_optimized_and_stay_equal(tmp_path):
    """The ONNX IR asks for unique node names but names are for diagnostics only: such a
    model is renamed on load (first of each name kept) and optimized like any other."""
    model = same_name_model()
    path = tmp_path / "same.onnx"
    path.write_bytes(model.SerializeToString())
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)}
    reference = reference_outputs(model, feeds)
    for extra in (["--passes", "eliminate_identity,fuse_matmul_add", "--allow-slower"], []):
        out = tmp_path / "out.onnx"
        result = CliRunner().invoke(cli, ["optimize", str(path), "-o", str(out), "--config", str(fast_config(tmp_path)),
                                          *extra])
        assert result.exit_code == 0, result.stderr
        written = onnx.load(out)  # as written: no renaming by adaptopt's loader on the way back
        names = [n.name for n in written.graph.node]
        assert len(set(names)) == len(names), names
        if extra:
            assert "Identity" not in {n.op_type for n in written.graph.node}
            assert "Gemm" in {n.op_type for n in written.graph.node}
        got = run_model(written, feeds)
        for name, value in reference.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    assert path.read_bytes() == model.SerializeToString()  # the input is left as it was


def test_profile_runs_on_nodes_sharing_a_name(tmp_path):
    path = tmp_path / "same.onnx"
    path.write_bytes(same_name_model().SerializeToString())
    result = CliRunner().invoke(cli, ["profile", str(path), "--config", str(fast_config(tmp_path)), "--format", "json"])
    assert result.exit_code == 0, result.stderr


def test_names_repeated_inside_a_control_flow_body_are_renamed_there(tmp_path):
    """Each graph is its own namespace: ORT refuses repeats inside an If branch too, and a
    body node may share a name with a node of the outer graph."""
    def vi(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [2])
    then_body = helper.make_graph([helper.make_node("Relu", ["x"], ["t1"], name="step"),
                                   helper.make_node("Neg", ["t1"], ["t2"], name="step")], "then", [], [vi("t2")])
    else_body = helper.make_graph([helper.make_node("Abs", ["x"], ["e1"], name="branch")], "else", [], [vi("e1")])
    nodes = [helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_body, else_branch=else_body)]
    graph = helper.make_graph(nodes, "g", [vi("x"), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [vi("y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "if.onnx"
    path.write_bytes(model.SerializeToString())
    loaded = load_model(path)
    body = next(a.g for a in loaded.graph.node[0].attribute if a.name == "then_branch")
    assert [n.name for n in body.node] == ["step", "step_1"]
    assert loaded.graph.node[0].name == "branch"
    for cond in (True, False):
        feeds = {"x": np.array([-1.0, 2.0], np.float32), "c": np.array(cond)}
        expected = -np.maximum(feeds["x"], 0) if cond else np.abs(feeds["x"])
        np.testing.assert_array_equal(run_model(loaded, feeds)["y"], expected)


def test_the_command_line_tunes_glibc_to_return_freed_model_copies(monkeypatch):
    """Where glibc is the allocator, the mmap threshold is fixed (freed weight-sized buffers go
    back to the system: a 211 MB encoder's run peaked at 2.45 GB instead of 3.23 GB), by the
    entry point only (a program embedding the library keeps its allocator as it is)."""
    import platform
    import adaptopt.cli as cli_module
    import adaptopt.malloc as malloc
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not a glibc system")
    assert malloc.return_freed_memory_promptly() is True
    calls = []
    monkeypatch.setattr(malloc, "return_freed_memory_promptly", lambda: calls.append(1) or True)
    monkeypatch.setattr(sys, "argv", ["adaptopt", "--version"])
    with pytest.raises(SystemExit):
        cli_module.main()
    assert calls == [1]


def test_an_unknown_pass_name_in_a_config_is_refused_at_its_line(tmp_path):
    """Checked only when optimize selected its passes: profile and split took a typo silently."""
    config = tmp_path / "c.yaml"
    config.write_text("passes:\n  disabled:\n    - fuse_gelu\n    - fuse_gleu\n")
    line = one_line_error(["profile", str(write_valid(tmp_path)), "--config", str(config)])
    assert f"{config}:4: passes.disabled: unknown pass 'fuse_gleu'" in line
