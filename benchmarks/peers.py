"""Section ``peers``: adaptopt against the optimizers people use today, side by side.

Per model: every tool runs in its own child process with a timeout (a crash or a hang
is one error line); then the original (twice: an A/A pair), and every variant that
was produced, are timed together in this process by :mod:`benchmarks.harness`.
Ratios come from those medians: against the original, against the fastest peer that
kept the outputs exact, and against the fastest peer within the accuracy budget.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from adaptopt import api

from benchmarks.cases import BenchCase, select_cases
from benchmarks.harness import TimingPlan, model_facts, time_variants
from benchmarks.isolate import run_isolated
from benchmarks.report import fmt, table, targets_table
from benchmarks.tools import BUDGET_COSINE

ORIGINAL, AA = "original", "original (A/A)"
ADAPTOPT_MISSING = "not available: adaptopt.api.optimize missing"


@dataclass(frozen=True)
class VariantSpec:
    label: str
    tool: str
    kind: str  # exact-peer | lossy-peer | adaptopt
    options: dict = field(default_factory=dict)
    transformer_only: bool = False


VARIANTS = (
    VariantSpec("ort-offline", "ort_offline", "exact-peer"),
    VariantSpec("onnxsim", "onnxsim", "exact-peer"),
    VariantSpec("onnxslim", "onnxslim", "exact-peer"),
    VariantSpec("onnxoptimizer", "onnxoptimizer", "exact-peer"),
    VariantSpec("ort-transformers", "ort_transformers", "exact-peer", transformer_only=True),
    VariantSpec("q-dynamic", "quant_dynamic", "lossy-peer"),
    VariantSpec("q-dynamic-matmul", "quant_dynamic_matmul", "lossy-peer"),
    VariantSpec("q-static-qdq", "quant_static_qdq", "lossy-peer"),
    VariantSpec("adaptopt", "adaptopt", "adaptopt", {"accuracy_budget": 0.0}),
    VariantSpec(f"adaptopt@{BUDGET_COSINE}", "adaptopt", "adaptopt", {"accuracy_budget": BUDGET_COSINE}),
)


def transformer_type(model: onnx.ModelProto) -> str | None:
    """``"bert"`` when the graph has MatMul/Softmax attention and a LayerNorm (fused,
    or decomposed as ReduceMean feeding Sub/Pow, RMSNorm included), else None."""
    ops = {n.op_type for n in model.graph.node}
    if not {"MatMul", "Softmax"} <= ops:
        return None
    if ops & {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization"}:
        return "bert"
    reduce_outputs = {o for n in model.graph.node if n.op_type == "ReduceMean" for o in n.output}
    norm_like = any(n.op_type in ("Sub", "Pow", "Add") and set(n.input) & reduce_outputs for n in model.graph.node)
    return "bert" if norm_like else None


def run_case(case: BenchCase, plan: TimingPlan, tool_timeout: float, adaptopt_timeout: float,
             config: str | None = None) -> dict:
    """All variants of one model: produce them, then time them together."""
    original = onnx.load(str(case.path), load_external_data=False)
    model_type = transformer_type(original)
    feeds = case.feeds(onnx.load(str(case.path)), seed=0, base=config)
    rows: dict[str, dict] = {ORIGINAL: {"kind": "original"}, AA: {"kind": "original"}}
    with tempfile.TemporaryDirectory(prefix=f"bench-{case.name}-") as tmp:
        produced = [(ORIGINAL, case.path), (AA, case.path)]
        for spec in VARIANTS:
            dest = Path(tmp) / f"{spec.label}.onnx"
            rows[spec.label] = _produce(spec, case, dest, model_type, config,
                                        adaptopt_timeout if spec.kind == "adaptopt" else tool_timeout)
            if rows[spec.label]["ok"]:
                produced.append((spec.label, dest))
        timing = time_variants(produced, feeds, case.config(config).target, plan)
    for label, measured in timing["variants"].items():
        tool_ok = rows[label].get("ok", True)
        rows[label].update(measured)
        rows[label]["ok"] = tool_ok and measured["ok"]
    add_ratios(rows)
    return {"model": case.name, "path": str(case.path), "group": case.group, "inputs": case.inputs,
            "transformer": model_type, "rounds": timing["rounds"], **model_facts(case.path), "variants": rows}


def _produce(spec: VariantSpec, case: BenchCase, dest: Path, model_type: str | None, config: str | None,
             timeout: float) -> dict:
    row = {"kind": spec.kind, "tool": spec.tool, "ok": False}
    if spec.transformer_only and model_type is None:
        return {**row, "skipped": "not a transformer (no MatMul/Softmax attention with LayerNorm)"}
    if spec.kind == "adaptopt" and not hasattr(api, "optimize"):
        return {**row, "error": ADAPTOPT_MISSING}
    payload = {"tool": spec.tool, "case": case.payload(), "dest": str(dest), "config": config,
               "model_type": model_type, **spec.options}
    outcome = run_isolated("benchmarks.tools:produce", payload, timeout)
    if not outcome.ok:
        return {**row, "error": outcome.error, "step_s": outcome.wall_s}
    return {**row, **outcome.value, "ok": True, "step_s": outcome.wall_s}


def add_ratios(rows: dict[str, dict]) -> None:
    """Latency ratios from the medians: vs original, vs best exact peer, vs best peer in budget."""
    base = rows[ORIGINAL].get("median_ms")
    peers = {k: r for k, r in rows.items() if r.get("kind", "").endswith("peer") and r.get("ok")}
    # a lossy tool is never the best *exact* peer, even where its outputs pass the exact rule
    # (near-zero outputs, e.g. a text detector on noise, can pass it at cosine 0.2)
    exact = {k: r["median_ms"] for k, r in peers.items() if r.get("exact") and r["kind"] == "exact-peer"}
    in_budget = {k: r["median_ms"] for k, r in peers.items() if r.get("min_cosine", 0.0) >= BUDGET_COSINE}
    best_exact = min(exact, key=exact.get) if exact else None
    best_budget = min(in_budget, key=in_budget.get) if in_budget else None
    for row in rows.values():
        median = row.get("median_ms") if row.get("ok") else None
        row["vs_original"] = median / base if median and base else None
        row["vs_best_exact_peer"] = median / exact[best_exact] if median and best_exact else None
        row["vs_best_peer_in_budget"] = median / in_budget[best_budget] if median and best_budget else None
    rows[ORIGINAL]["best_exact_peer"] = best_exact
    rows[ORIGINAL]["best_peer_in_budget"] = best_budget
    if base and rows[AA].get("median_ms"):
        rows[AA]["aa_noise_pct"] = 100.0 * abs(rows[AA]["median_ms"] / base - 1.0)


def geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def targets(models: list[dict]) -> list[dict]:
    """The three targets of issue 6, judged on the measured rows."""
    lossless = [m["variants"]["adaptopt"] for m in models]
    lossy = [(m["variants"][f"adaptopt@{BUDGET_COSINE}"], m["variants"]["q-dynamic"]) for m in models]
    ratios = [r["vs_best_exact_peer"] for r in lossless if r.get("vs_best_exact_peer") and r.get("exact")]
    missing = next((r.get("error") for r in lossless if not r.get("ok")), None)
    g = geomean(ratios)
    out = [{
        "target": "adaptopt lossless: geomean latency vs best exact peer <= 0.90, never > 1.0",
        "measured": (f"geomean {g:.3f}, worst {max(ratios):.3f} over {len(ratios)} models" if ratios else missing),
        "met": bool(ratios) and len(ratios) == len(models) and g <= 0.90 and max(ratios) <= 1.0,
    }]
    faster = [(a["vs_original"], a, q) for a, q in lossy if a.get("ok")]
    beats_q = [q.get("ok") and a["median_ms"] < q["median_ms"] and a["min_cosine"] >= q["min_cosine"]
               for _, a, q in faster]
    out.append({
        "target": f"adaptopt cos>={BUDGET_COSINE}: >= 2x faster than original and faster than q-dynamic "
                  "at equal or better accuracy",
        "measured": (f"speedups {', '.join(f'{1 / r:.2f}x' for r, _, _ in faster)}; beats q-dynamic on "
                     f"{sum(beats_q)}/{len(faster)}" if faster else missing),
        "met": bool(faster) and len(faster) == len(models) and all(r <= 0.5 for r, _, _ in faster) and all(beats_q),
    })
    runs = [m["variants"][k] for m in models for k in ("adaptopt", f"adaptopt@{BUDGET_COSINE}")]
    walls = [r["tool_s"] for r in runs if r.get("tool_s") is not None]
    failed = [r["error"] for r in runs if r.get("error") and r["error"] != ADAPTOPT_MISSING]
    measured = f"max {max(walls):.1f} s" if walls else missing
    if failed:
        measured = f"{measured}; {len(failed)} run(s) failed, first: {failed[0]}"
    out.append({"target": "adaptopt wall time <= 300 s per model (default config)", "measured": measured,
                "met": bool(walls) and not failed and max(walls) <= 300})
    return out


def run(args, checkpoint=None) -> dict:
    """Section entry: every selected model, one after the other."""
    plan = TimingPlan(rounds=args.rounds, session_repeats=1 if args.quick else 3,
                      max_seconds=20.0 if args.quick else 150.0)
    result: dict = {"plan": plan.__dict__, "budget_cosine": BUDGET_COSINE, "models": []}
    for case in select_cases(args.models, args.input_shape, args.quick):
        print(f"[peers] {case.name}: running {len(VARIANTS)} tools, then timing", flush=True)
        result["models"].append(run_case(case, plan, args.tool_timeout, args.adaptopt_timeout, args.config))
        print(render_model(result["models"][-1]), flush=True)
        if checkpoint:
            checkpoint(result)
    result["targets"] = targets(result["models"])
    return result


COLUMNS = ("variant", "status", "tool s", "nodes", "MB", "session ms", "median ms", "p90 ms", "x orig",
           "x best exact peer", "x best peer in budget", "max abs diff", "min cos", "exact")


def _status(row: dict, width: int) -> str:
    if row.get("ok"):
        return "ok"
    text = row.get("error") or row.get("skipped", "")
    text = (text if "error" not in row else f"FAIL: {text}").replace("|", "/")  # a cell of a markdown table
    return text if len(text) <= width else text[:width - 3] + "..."


def render_model(model: dict, markdown: bool = False) -> str:
    rows = []
    for label, r in model["variants"].items():
        rows.append([label, _status(r, 140 if markdown else 60), fmt(r.get("tool_s")), fmt(r.get("nodes")),
                     fmt(r["file_bytes"] / 1e6 if r.get("file_bytes") else None), fmt(r.get("session_ms"), 1),
                     fmt(r.get("median_ms"), 3), fmt(r.get("p90_ms"), 3), fmt(r.get("vs_original"), 3),
                     fmt(r.get("vs_best_exact_peer"), 3), fmt(r.get("vs_best_peer_in_budget"), 3),
                     fmt(r.get("max_abs_diff"), 6), fmt(r.get("min_cosine"), 6), fmt(r.get("exact"))])
    orig = model["variants"][ORIGINAL]
    noise = model["variants"][AA].get("aa_noise_pct")
    title = (f"{model['model']} ({model['nodes']} nodes, inputs {_inputs_text(model)}, {model['rounds']} rounds; "
             f"A/A noise {fmt(noise, 2, '%')}; best exact peer: {orig.get('best_exact_peer')}; "
             f"best peer with cos >= {BUDGET_COSINE}: {orig.get('best_peer_in_budget')})")
    head = f"#### {title}\n\n" if markdown else f"\n{title}\n"
    return head + table(rows, COLUMNS, markdown)


def _inputs_text(model: dict) -> str:
    parts = [f"{n}={'x'.join(map(str, s['shape']))}" for n, s in model["inputs"].items() if s.get("shape")]
    return ", ".join(parts) or "static"


def render_summary(models: list[dict], markdown: bool = False) -> str:
    """One line per model: every variant's latency ratio vs the original (lower is faster)."""
    labels = [ORIGINAL + " ms", "A/A noise"] + [s.label for s in VARIANTS]
    rows = []
    for m in models:
        v = m["variants"]
        cells = [fmt(v[ORIGINAL].get("median_ms"), 2), fmt(v[AA].get("aa_noise_pct"), 2, "%")]
        for spec in VARIANTS:
            r = v[spec.label]
            cell = fmt(r.get("vs_original"), 3) if r.get("ok") else ("n/a" if "skipped" in r else "fail")
            mark = "" if not r.get("ok") or r.get("exact") else f" (cos {r['min_cosine']:.4f})"
            cells.append(cell + mark)
        rows.append([m["model"], *cells])
    return table(rows, ["model", *labels], markdown)


def recompute(result: dict) -> dict:
    """Ratios and targets again from the stored medians (``--rerender``)."""
    for model in result["models"]:
        add_ratios(model["variants"])
    return {**result, "targets": targets(result["models"])}


def render(result: dict, markdown: bool = False) -> str:
    parts = ["Latency ratio vs the original (median, ORT CPU EP, ORT_ENABLE_ALL); lossy variants show their "
             "min cosine; fail = the tool or its model failed (see the per-model tables).", "",
             render_summary(result["models"], markdown), "",
             targets_table(result.get("targets", []), markdown)]
    if markdown:
        parts.insert(0, "### Peers: summary\n")
        parts.append("\n### Peers: per model\n")
    parts += [render_model(m, markdown) + "\n" for m in result["models"]]
    return "\n".join(parts)
