"""Section ``split``: split + merge wall time and peak memory (issue 2).

A generated 100,000-node model (a residual MatMul/Add/Relu/Mul/Add chain with its
own weights per block) at granularity 6, and the example and shared models. Split
and merge each run in a child process, whose peak RSS (``VmHWM``) is read at the end;
the RSS after imports (``VmRSS`` before the call) is reported beside it, so the
growth caused by the split itself is visible. Target on this machine: 100k nodes
split at granularity 6 and merged back in under 30 s, memory growth under 3x the
model's size.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.cases import BenchCase, select_cases
from benchmarks.isolate import run_isolated
from benchmarks.report import fmt, table, targets_table

GRANULARITY = 6
CHAIN_NODES, QUICK_CHAIN_NODES = 100_000, 20_000
WIDTH = 32
TARGET_S, TARGET_MEMORY_X = 30.0, 3.0


def chain_model(n_nodes: int, width: int = WIDTH, seed: int = 0) -> onnx.ModelProto:
    """Blocks of 5 nodes: ``x + Mul(Relu(Add(MatMul(x, W_i), b_i)), s)``; one W_i, b_i per block."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], [numpy_helper.from_array(np.full(width, 0.1, np.float32), "scale")]
    x = "x"
    for i in range(n_nodes // 5):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) * 0.01).astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(np.zeros(width, np.float32) + i % 7 * 0.01, f"b{i}"))
        names = [f"b{i}_{k}" for k in range(5)]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [names[0]], name=f"mm{i}"),
                  helper.make_node("Add", [names[0], f"b{i}"], [names[1]], name=f"add{i}"),
                  helper.make_node("Relu", [names[1]], [names[2]], name=f"relu{i}"),
                  helper.make_node("Mul", [names[2], "scale"], [names[3]], name=f"mul{i}"),
                  helper.make_node("Add", [x, names[3]], [names[4]], name=f"res{i}")]
        x = names[4]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _rss() -> dict[str, int]:
    """Current and peak resident set size of this process, bytes (Linux /proc)."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def split_step(payload: dict) -> dict:
    """Child: one split (``mode=split``) or one merge (``mode=merge``), timed, with peak RSS."""
    import onnxruntime  # noqa: F401  (library code in the baseline: the split may import it lazily)

    from adaptopt import api
    baseline = _rss()["VmRSS"]
    start = time.perf_counter()
    if payload["mode"] == "split":
        case = BenchCase.from_payload(payload["case"])
        result = api.split(case.path, payload["dir"], case.config(), granularity=payload["granularity"])
        extra = {"tree_nodes": len(result.manifest["nodes"]), "leaves": len(result.manifest["leaves"])}
    else:
        model = api.merge(payload["dir"], payload["dest"])
        extra = {"merged_nodes": len(model.graph.node)}
    return {"wall_s": time.perf_counter() - start, "baseline_rss": baseline, "peak_rss": _rss()["VmHWM"], **extra}


def measure(case: BenchCase, granularity: int, timeout: float) -> dict:
    """Split then merge ``case`` in two children; times, memory, sizes."""
    row = {"model": case.name, "granularity": granularity, "file_bytes": case.path.stat().st_size,
           "nodes": len(onnx.load(str(case.path), load_external_data=False).graph.node)}
    with tempfile.TemporaryDirectory(prefix=f"bench-split-{case.name}-") as tmp:
        base = {"case": case.payload(), "dir": f"{tmp}/tree", "dest": f"{tmp}/merged.onnx", "granularity": granularity}
        for mode in ("split", "merge"):
            outcome = run_isolated("benchmarks.split:split_step", {**base, "mode": mode}, timeout)
            if not outcome.ok:
                return {**row, "ok": False, "error": f"{mode}: {outcome.error}"}
            row[mode] = outcome.value
    peak_growth = max(row[m]["peak_rss"] - row[m]["baseline_rss"] for m in ("split", "merge"))
    return {**row, "ok": row["merge"]["merged_nodes"] == row["nodes"],
            "error": "" if row["merge"]["merged_nodes"] == row["nodes"] else "merged node count differs",
            "total_s": row["split"]["wall_s"] + row["merge"]["wall_s"],
            "peak_rss": max(row[m]["peak_rss"] for m in ("split", "merge")), "peak_growth": peak_growth,
            "growth_x_model": peak_growth / row["file_bytes"]}


def run(args, checkpoint=None) -> dict:
    n_nodes = QUICK_CHAIN_NODES if args.quick else CHAIN_NODES
    cases = select_cases(args.models, args.input_shape, args.quick)  # bad --models fail before any work
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-chain-") as tmp:
        path = Path(tmp) / f"chain_{n_nodes}.onnx"
        onnx.save(chain_model(n_nodes), str(path))
        print(f"[split] generated {path.name}: {path.stat().st_size / 1e6:.0f} MB", flush=True)
        rows.append(measure(BenchCase(path.stem, path, {}, "generated"), GRANULARITY, args.tool_timeout))
    for case in cases:
        print(f"[split] {case.name}", flush=True)
        rows.append(measure(case, GRANULARITY, args.tool_timeout))
        if checkpoint:
            checkpoint({"models": rows})
    chain = rows[0]
    target = {"target": f"{n_nodes} nodes: split (g{GRANULARITY}) + merge < {TARGET_S:.0f} s, memory growth "
                        f"< {TARGET_MEMORY_X:.0f}x model size",
              "measured": (f"{chain['total_s']:.1f} s, growth {chain['growth_x_model']:.2f}x "
                           f"(peak RSS {chain['peak_rss'] / chain['file_bytes']:.2f}x incl. interpreter)"
                           if chain.get("ok") else chain.get("error")),
              "met": bool(chain.get("ok")) and chain["total_s"] < TARGET_S and chain["growth_x_model"] < TARGET_MEMORY_X}
    return {"models": rows, "targets": [target]}


def render(result: dict, markdown: bool = False) -> str:
    headers = ("model", "nodes", "MB", "g", "split s", "merge s", "total s", "peak RSS MB", "growth MB",
               "growth / size", "status")
    rows = []
    for r in result["models"]:
        ok = r.get("ok")
        rows.append([r["model"], fmt(r["nodes"]), fmt(r["file_bytes"] / 1e6, 1), fmt(r["granularity"]),
                     fmt(r["split"]["wall_s"] if ok else None), fmt(r["merge"]["wall_s"] if ok else None),
                     fmt(r.get("total_s")), fmt(r["peak_rss"] / 1e6 if ok else None, 0),
                     fmt(r["peak_growth"] / 1e6 if ok else None, 0), fmt(r.get("growth_x_model")),
                     "ok" if ok else f"FAIL: {r.get('error')}"])
    note = ("Peak RSS is the child's VmHWM; growth = peak minus the RSS after imports (interpreter, numpy, "
            "onnx, onnxruntime). Split and merge run in separate children; the larger of the two is shown.")
    return "\n\n".join([table(rows, headers, markdown), targets_table(result["targets"], markdown), note])
