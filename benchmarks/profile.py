"""Section ``profile``: wall time of ``adaptopt.api.profile`` (issue 3).

Each model is profiled twice in a child process with the default config (plus its
input shapes): at granularity 3 (timed; target: ch_PP-OCRv4_rec_infer under 60 s)
and at granularity 2, where the sum of the leaf subgraphs' median latencies is set
beside the whole model's median (target: within 25%).
"""

from __future__ import annotations

import dataclasses
import time

from adaptopt import api

from benchmarks.cases import BenchCase, select_cases
from benchmarks.isolate import run_isolated
from benchmarks.report import fmt, table, targets_table

TIMED_GRANULARITY, SUM_GRANULARITY = 3, 2
REC_MODEL, REC_TARGET_S, SUM_TARGET = "ch_PP-OCRv4_rec_infer", 60.0, 0.25
PROFILE_MISSING = "not available: adaptopt.api.profile missing"


def report_dict(result) -> dict:
    """The profile report as the JSON shape of issue 3, whatever object carries it."""
    if isinstance(result, dict):
        return result
    if callable(getattr(result, "to_dict", None)):
        return result.to_dict()
    if dataclasses.is_dataclass(result):
        return dataclasses.asdict(result)
    raise TypeError(f"api.profile returned {type(result).__name__}, which has no to_dict()")


def leaf_sum_ms(report: dict) -> float | None:
    """Sum of the median latencies of the leaf subgraphs (those that are nobody's parent)."""
    subgraphs = report.get("subgraphs") or []
    parents = {s.get("parent") for s in subgraphs}
    leaves = [s["latency_ms"] for s in subgraphs if s.get("id") not in parents and s.get("latency_ms") is not None]
    return float(sum(leaves)) if leaves else None


def profile_step(payload: dict) -> dict:
    """Child: one ``api.profile`` call, timed; the figures this section needs from its report."""
    case = BenchCase.from_payload(payload["case"])
    start = time.perf_counter()
    result = api.profile(str(case.path), case.config(payload.get("config")), payload["granularity"])
    wall = time.perf_counter() - start
    report = report_dict(result)
    whole = (report.get("whole_model") or {}).get("latency_ms")
    return {"wall_s": wall, "whole_ms": whole, "leaf_sum_ms": leaf_sum_ms(report),
            "subgraphs": len(report.get("subgraphs") or []), "session_overhead_ms": report.get("session_overhead_ms")}


def run(args, checkpoint=None) -> dict:
    rows = []
    for case in select_cases(args.models, args.input_shape, args.quick):
        row: dict = {"model": case.name}
        for granularity in (TIMED_GRANULARITY, SUM_GRANULARITY):
            if not hasattr(api, "profile"):
                row[f"g{granularity}"] = {"ok": False, "error": PROFILE_MISSING}
                continue
            print(f"[profile] {case.name} granularity {granularity}", flush=True)
            outcome = run_isolated("benchmarks.profile:profile_step",
                                   {"case": case.payload(), "config": args.config, "granularity": granularity},
                                   args.adaptopt_timeout)
            row[f"g{granularity}"] = {"ok": True, **outcome.value} if outcome.ok else {"ok": False, "error": outcome.error}
        rows.append(row)
        if checkpoint:
            checkpoint({"models": rows})
    return {"models": rows, "targets": targets(rows)}


def _sum_error(row: dict) -> float | None:
    g = row.get(f"g{SUM_GRANULARITY}", {})
    if not g.get("ok") or not g.get("whole_ms") or g.get("leaf_sum_ms") is None:
        return None
    return g["leaf_sum_ms"] / g["whole_ms"] - 1.0


def targets(rows: list[dict]) -> list[dict]:
    rec = next((r for r in rows if r["model"] == REC_MODEL), None)
    timed = rec and rec[f"g{TIMED_GRANULARITY}"]
    errors = [e for e in (_sum_error(r) for r in rows) if e is not None]
    first_error = next((r[k]["error"] for r in rows for k in r if k != "model" and not r[k]["ok"]), "no models")
    return [
        {"target": f"{REC_MODEL} (1x3x48x320) at granularity {TIMED_GRANULARITY} < {REC_TARGET_S:.0f} s",
         "measured": (f"{timed['wall_s']:.1f} s" if timed and timed["ok"] else
                      (timed["error"] if timed else f"{REC_MODEL} not in this run")),
         "met": None if rec is None else bool(timed["ok"] and timed["wall_s"] < REC_TARGET_S)},
        {"target": f"sum of leaf medians within {SUM_TARGET:.0%} of whole-model median at granularity {SUM_GRANULARITY}",
         "measured": (f"worst {max(errors, key=abs):+.1%} over {len(errors)} models" if errors else first_error),
         "met": bool(errors) and len(errors) == len(rows) and all(abs(e) <= SUM_TARGET for e in errors)},
    ]


def render(result: dict, markdown: bool = False) -> str:
    headers = ("model", f"g{TIMED_GRANULARITY} wall s", f"g{TIMED_GRANULARITY} subgraphs", "whole ms",
               f"g{SUM_GRANULARITY} leaf sum ms", "sum / whole - 1", "status")
    rows = []
    for r in result["models"]:
        timed, summed = r[f"g{TIMED_GRANULARITY}"], r[f"g{SUM_GRANULARITY}"]
        err = _sum_error(r)
        status = "ok" if timed["ok"] and summed["ok"] else (timed.get("error") or summed.get("error"))
        rows.append([r["model"], fmt(timed.get("wall_s"), 1), fmt(timed.get("subgraphs")), fmt(summed.get("whole_ms"), 3),
                     fmt(summed.get("leaf_sum_ms"), 3), f"{err:+.1%}" if err is not None else "", status])
    return table(rows, headers, markdown) + "\n\n" + targets_table(result["targets"], markdown)
