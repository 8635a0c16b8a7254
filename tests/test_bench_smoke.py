"""Smoke test of `make bench`'s machinery (structure only, never speed)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.cases import BenchCase
from benchmarks.harness import TimingPlan, time_variants
from benchmarks.isolate import run_isolated
from benchmarks.peers import AA, ORIGINAL, add_ratios
from benchmarks.profile import leaf_sum_ms
from benchmarks.report import save_section, update_docs
from benchmarks.split import chain_model

ROW_KEYS = {"ok", "nodes", "file_bytes", "session_ms", "exact", "max_abs_diff", "min_cosine",
            "median_ms", "p10_ms", "p90_ms", "samples", "reps"}


def _tiny(path, scale: float) -> None:
    w = numpy_helper.from_array(np.full((8, 8), scale, np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_harness_times_interleaved_variants(tmp_path):
    _tiny(tmp_path / "a.onnx", 0.1)
    _tiny(tmp_path / "b.onnx", 0.2)
    feeds = {"x": np.ones((1, 8), np.float32)}
    variants = [(ORIGINAL, tmp_path / "a.onnx"), (AA, tmp_path / "a.onnx"), ("other", tmp_path / "b.onnx")]
    result = time_variants(variants, feeds, plan=TimingPlan(rounds=2, warmup=1, session_repeats=1))
    assert result["rounds"] == 2 and list(result["variants"]) == [ORIGINAL, AA, "other"]
    for row in result["variants"].values():
        assert ROW_KEYS <= set(row) and row["samples"] == 2 * row["reps"]
    assert result["variants"][AA]["exact"] and result["variants"][AA]["max_abs_diff"] == 0.0
    assert not result["variants"]["other"]["exact"]  # doubled weights: outputs doubled
    rows = {k: {**v, "kind": "exact-peer" if k == "other" else "original"} for k, v in result["variants"].items()}
    add_ratios(rows)
    assert rows[ORIGINAL]["vs_original"] == 1.0 and "aa_noise_pct" in rows[AA]
    assert rows[ORIGINAL]["best_exact_peer"] is None  # the only peer changed the outputs
    json.dumps(rows)


def test_tool_runs_isolated_and_failures_are_one_line(tmp_path):
    _tiny(tmp_path / "a.onnx", 0.1)
    case = BenchCase("tiny", tmp_path / "a.onnx").payload()
    ok = run_isolated("benchmarks.tools:produce",
                      {"tool": "ort_offline", "case": case, "dest": str(tmp_path / "o.onnx")}, 60)
    assert ok.ok and ok.value["tool_s"] >= 0 and (tmp_path / "o.onnx").is_file()
    bad = run_isolated("benchmarks.tools:produce", {"tool": "no_such_tool", "case": case, "dest": "x"}, 60)
    assert not bad.ok and bad.error == "KeyError: 'no_such_tool'"


def test_results_and_docs_are_merged_by_section(tmp_path):
    results, docs = tmp_path / "latest.json", tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nhand-written header\n")
    save_section("peers", {"models": [1]}, results)
    save_section("split", {"models": [2]}, results)
    assert json.loads(results.read_text())["sections"] == {"peers": {"models": [1]}, "split": {"models": [2]}}
    update_docs("peers", "first", docs)
    update_docs("split", "other", docs)
    update_docs("peers", "second", docs)
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written header\n")
    assert "second" in text and "first" not in text and text.count("BEGIN GENERATED: peers") == 1


def test_generated_chain_and_profile_leaf_sum():
    model = chain_model(50, width=4)
    onnx.checker.check_model(model)
    assert len(model.graph.node) == 50
    report = {"subgraphs": [{"id": "0", "parent": None, "latency_ms": 3.0},
                            {"id": "1", "parent": "0", "latency_ms": 1.0},
                            {"id": "2", "parent": "0", "latency_ms": 1.5}]}
    assert leaf_sum_ms(report) == 2.5


def test_learning_random_rows_pool_their_seeds():
    """Random search is scored as the mean over its seeds (one seed's luck is not its expected result)."""
    from benchmarks.learning import _pool_random, render
    row = lambda s, m: {"speedup": s, "search_speedup": s + 0.1, "measurements": m, "sequences": {}}  # noqa: E731
    rows = _pool_random({"oracle": row(2.0, 40), "random/0": row(1.5, 10), "q-learning": row(1.9, 12),
                         "random/1": row(1.9, 12)})
    assert list(rows) == ["oracle", "random", "q-learning"]
    assert rows["random"]["speedup"] == 1.7 and rows["random"]["measurements"] == 11
    assert rows["random"]["seeds"] == [1.5, 1.9]
    for r in rows.values():
        r.update(of_oracle_speedup=None, of_oracle_measurements=None)
    text = render({"models": [{"model": "m", "strategies": rows}], "transfer": [], "leaves_per_model": 4,
                   "accuracy_budget": 0.999, "oracle_limit": 200}, markdown=True)
    assert "random (mean of 2 seeds, 1.5-1.9)" in text
