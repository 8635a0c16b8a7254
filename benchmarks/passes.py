"""Section ``passes``: what each pass of the library does to latency, alone (issue 4).

Per model: the model as adaptopt loads it (shapes pinned from the case's inputs)
is the "before"; every pass of ``adaptopt.passes.registry.all_passes()`` is applied to
it alone in a child process (accuracy budget 0.999, so lossy passes may apply), and
so is the sequence of all exact passes; every modified result is timed together
with "before" (and an A/A copy) by :mod:`benchmarks.harness`. Targets: on the
PP-OCR models the exact passes together beat ORT's own optimization of the original
(ratio < 1.0 at ORT_ENABLE_ALL); on bert_small dynamic int8 >= 1.5x faster than
fp32 with cosine >= 0.99.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnx

from adaptopt.graph.io import load_model, save_model

from benchmarks.cases import BenchCase, select_cases
from benchmarks.harness import TimingPlan, time_variants
from benchmarks.isolate import run_isolated
from benchmarks.report import fmt, table, targets_table

PASS_BUDGET = 0.999
BEFORE, AA, ALL_EXACT = "before", "before (A/A)", "all exact passes"
INT8_MODEL, INT8_SPEEDUP, INT8_COSINE = "bert_small", 1.5, 0.99


def library() -> tuple[list[dict], str]:
    """(name, category, guarantee) of every pass, or an empty list and why."""
    try:
        from adaptopt.passes.registry import all_passes
        return [{"name": p.name, "category": p.category, "guarantee": p.guarantee} for p in all_passes()], ""
    except ImportError as exc:
        return [], f"not available: adaptopt.passes.registry: {exc}"


def pass_step(payload: dict) -> dict:
    """Child: apply ``payload['passes']`` in order to the model; save it when modified."""
    from adaptopt.passes.base import PassContext
    from adaptopt.passes.registry import get_pass
    case = BenchCase.from_payload(payload["case"])
    model = onnx.load(payload["source"])
    config = case.config(payload.get("config"))
    ctx = PassContext(target=config.target, feeds=case.feeds(model, base=payload.get("config")),
                      accuracy_budget=payload["budget"])
    modified, changes = [], {}
    start = time.perf_counter()
    for name in payload["passes"]:
        result = get_pass(name).apply(model, ctx)
        changes[name] = result.changes
        if result.modified:
            modified.append(name)
            model = result.model
    apply_s = time.perf_counter() - start
    if modified:
        save_model(model, payload["dest"])
    return {"apply_s": apply_s, "modified": modified, "changes": changes}


def run_case(case: BenchCase, passes: list[dict], plan: TimingPlan, timeout: float, config: str | None) -> dict:
    rows: dict[str, dict] = {}
    exact = [p["name"] for p in passes if p["guarantee"] == "exact"]
    jobs = [(p["name"], [p["name"]], p) for p in passes] + [(ALL_EXACT, exact, {"category": "-", "guarantee": "exact"})]
    with tempfile.TemporaryDirectory(prefix=f"bench-passes-{case.name}-") as tmp:
        before = Path(tmp) / "before.onnx"
        save_model(load_model(case.path, case.config(config)), before)
        variants = [(BEFORE, before), (AA, before)]
        for label, names, spec in jobs:
            dest = Path(tmp) / f"{len(variants)}.onnx"
            payload = {"case": case.payload(), "source": str(before), "dest": str(dest), "passes": names,
                       "budget": PASS_BUDGET, "config": config}
            outcome = run_isolated("benchmarks.passes:pass_step", payload, timeout)
            row = {"category": spec["category"], "guarantee": spec["guarantee"]}
            if not outcome.ok:
                rows[label] = {**row, "ok": False, "error": outcome.error}
                continue
            rows[label] = {**row, **outcome.value, "ok": True}
            if outcome.value["modified"]:
                variants.append((label, dest))
            else:
                reason = outcome.value["changes"].get(label, {}).get("reason", "not modified")
                rows[label]["skipped"] = f"no-op: {reason}"
        timing = time_variants(variants, case.feeds(onnx.load(str(before)), base=config),
                               case.config(config).target, plan)
    base = timing["variants"][BEFORE].get("median_ms")
    for label, measured in timing["variants"].items():
        row = rows.setdefault(label, {"category": "-", "guarantee": "-", "ok": True})
        row.update(measured, ok=row["ok"] and measured["ok"])
        row["ratio"] = measured["median_ms"] / base if measured.get("ok") and base else None
    return {"model": case.name, "rounds": timing["rounds"], "passes": rows}


def run(args, checkpoint=None) -> dict:
    passes, reason = library()
    if not passes:
        return {"available": False, "reason": reason or "the registry lists no passes", "models": [], "targets": []}
    plan = TimingPlan(rounds=args.rounds, session_repeats=1, max_seconds=20.0 if args.quick else 120.0)
    models = []
    for case in select_cases(args.models, args.input_shape, args.quick):
        print(f"[passes] {case.name}: {len(passes)} passes", flush=True)
        models.append(run_case(case, passes, plan, args.tool_timeout, args.config))
        if checkpoint:
            checkpoint({"models": models})
    return {"available": True, "budget_cosine": PASS_BUDGET, "library": passes, "models": models,
            "targets": targets(models, passes)}


def targets(models: list[dict], passes: list[dict]) -> list[dict]:
    ocr = [m for m in models if m["model"].startswith("ch_")]
    ocr_ratios = [(m["model"], m["passes"][ALL_EXACT].get("ratio")) for m in ocr]
    int8 = [p["name"] for p in passes if "dynamic" in p["name"]]
    bert = next((m for m in models if m["model"] == INT8_MODEL), None)
    q = bert["passes"].get(int8[0], {}) if bert and int8 else {}
    return [
        {"target": "PP-OCR: all exact passes together vs the original at ORT_ENABLE_ALL < 1.0",
         "measured": ", ".join(f"{n} {fmt(r, 3) or 'n/a'}" for n, r in ocr_ratios) or "no PP-OCR model in this run",
         "met": None if not ocr_ratios else all(r is not None and r < 1.0 for _, r in ocr_ratios)},
        {"target": f"{INT8_MODEL}: dynamic int8 >= {INT8_SPEEDUP}x faster than fp32, cosine >= {INT8_COSINE}",
         "measured": (f"{int8[0]}: {1 / q['ratio']:.2f}x, cosine {q['min_cosine']:.5f}" if q.get("ratio")
                      else f"{int8[0] if int8 else 'no dynamic int8 pass'}: {q.get('error') or q.get('skipped') or 'not measured'}"),
         "met": None if bert is None else bool(q.get("ratio")) and 1 / q["ratio"] >= INT8_SPEEDUP
                and q["min_cosine"] >= INT8_COSINE},
    ]


def render(result: dict, markdown: bool = False) -> str:
    if not result.get("available"):
        return result["reason"]
    labels = [p["name"] for p in result["library"]] + [ALL_EXACT]
    models = result["models"]
    rows = []
    for label, spec in zip(labels, result["library"] + [{"category": "-", "guarantee": "exact"}]):
        cells = []
        for m in models:
            r = m["passes"].get(label, {})
            if r.get("ratio") is not None:
                cells.append(fmt(r["ratio"], 3) + ("" if r.get("exact") else f" (cos {r['min_cosine']:.4f})"))
            else:
                cells.append("-" if r.get("skipped") else ("fail" if r.get("error") else ""))
        rows.append([label, spec["category"], spec["guarantee"], *cells])
    noise = ["A/A noise", "", ""] + [fmt(100 * abs(m["passes"][AA]["ratio"] - 1), 2, "%") if m["passes"][AA].get("ratio")
                                     else "" for m in models]
    headers = ["pass", "category", "guarantee", *[m["model"] for m in models]]
    failures = [f"{m['model']} / {k}: {r['error']}" for m in models for k, r in m["passes"].items() if r.get("error")]
    parts = ["Latency after / before (median, ORT_ENABLE_ALL); '-' = the pass did not apply; lossy results show their "
             "min cosine.", "", table(rows + [noise], headers, markdown), "",
             targets_table(result["targets"], markdown)]
    if failures:
        parts += ["", "Failures:", *(f"- {f}" for f in failures)]
    return "\n".join(parts)
