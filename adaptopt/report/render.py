"""Rendering a profile report: a terminal table, JSON, CSV or Markdown.

Every format is built from :func:`adaptopt.report.schema.profile_dict`, so they never
disagree. Missing numbers print as ``n/a`` (tables) or an empty cell (CSV), not 0.
"""

from __future__ import annotations

import csv
import io
import json

from tabulate import tabulate

from adaptopt.profile.pipeline import ProfileReport
from adaptopt.report.schema import profile_dict

FORMATS = ("table", "json", "csv", "md")
COLUMNS = ("id", "nodes", "main ops", "median ms", "p90 ms", "profiler ms", "GFLOP", "MB", "FLOP/B", "perf", "bound")
CSV_FIELDS = ("id", "parent", "leaf", "timed", "nodes", "latency_ms", "latency_p90_ms", "spread_ms", "iterations",
              "profiler_ms", "flops", "bytes", "intensity", "performance", "bound", "roofline_bound_ms",
              "compute_ms", "memory_ms", "overhead_ms", "unknown_nodes")


def render(report: ProfileReport | dict, fmt: str) -> str:
    data = report if isinstance(report, dict) else profile_dict(report)
    if fmt == "json":
        return json.dumps(data, indent=1)
    if fmt == "csv":
        return to_csv(data)
    if fmt == "md":
        return to_markdown(data)
    if fmt == "table":
        return to_table(data)
    raise ValueError(f"unknown report format {fmt!r} (known: {', '.join(FORMATS)})")


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ops(op_types: dict[str, int], limit: int = 3) -> str:
    ops = [f"{op}x{n}" for op, n in op_types.items() if op != "Constant"][:limit]
    return " ".join(ops)


def rows(data: dict) -> list[list[str]]:
    out = []
    for s in data["subgraphs"]:
        sid = s["id"] if s["leaf"] else f"{s['id']} (sum)"
        sid += " (const)" if s.get("constant") else ""
        out.append([sid, s["nodes"], _ops(s["op_types"]), _num(s["latency_ms"]), _num(s["latency_p90_ms"]),
                    _num(s["profiler_ms"]), _num(s["flops"] / 1e9), _num(s["bytes"] / 1e6, 2),
                    _num(s["intensity"], 2), _num(s["performance"], 2), s["bound"]])
    return out


def summary_lines(data: dict) -> list[str]:
    m, w = data["machine"], data["whole_model"]
    ratio = data.get("split_cost_ratio")
    return [
        f"model: {data['model']}   target: {', '.join(data['target']['resolved_providers'])}, "
        f"{data['target']['threads']} threads   granularity: {data['granularity']}",
        f"machine: {_num(m['peak_gflops'], 1)} GFLOP/s peak, {_num(m['bandwidth_gbs'], 1)} GB/s memory, "
        f"{_num(m['cache_bandwidth_gbs'], 1)} GB/s cache (<= {m['cache_bytes'] // 1024} KiB/node), "
        f"session overhead {_num(m['session_overhead_ms'] * 1e3, 1)} us"
        f"{' (cached)' if m.get('cached') else ''}",
        f"whole model: {_num(w['latency_ms'])} ms median (p90 {_num(w['latency_p90_ms'])}), "
        f"{w['bound']}-bound, performance {_num(w['performance'], 2)}; sum of leaf medians "
        f"{_num(data['sum_leaf_latency_ms'])} ms ({'n/a' if ratio is None else f'{ratio:+.1%}'} vs whole)",
    ]


def counter_lines(data: dict) -> list[str]:
    """Whole-model counters; missing ones grouped by reason; then unavailable backends and why."""
    lines, missing_by_reason = [], {}
    for name, r in data["whole_model"]["counters"].items():
        if r["value"] is None:
            reason = r.get("reason", "").split(": ", 1)[-1]
            missing_by_reason.setdefault((r["backend"], reason), []).append(name)
            continue
        kind = "measured" if r["measured"] else "derived"
        lines.append(f"  {name:<26} {r['value']:<12.4g} {r['unit']:<12} [{r['backend']}, {kind}]")
    for (backend, reason), names in missing_by_reason.items():
        lines.append(f"  n/a [{backend}] {', '.join(names)}: {reason}")
    for b in data["backends"]:
        if not b["available"]:
            lines.append(f"  backend {b['name']}: unavailable - {b['reason']}")
    return lines


def to_table(data: dict) -> str:
    parts = summary_lines(data) + ["", tabulate(rows(data), headers=COLUMNS, tablefmt="simple"), "",
                                   "whole-model counters:"] + counter_lines(data)
    return "\n".join(parts)


def to_markdown(data: dict) -> str:
    parts = [f"# adaptopt profile: {data['model']}", ""] + [f"- {line}" for line in summary_lines(data)]
    parts += ["", "## Subgraphs", "", tabulate(rows(data), headers=COLUMNS, tablefmt="github"), "",
              "Rows marked `(sum)` are internal tree nodes: their figures add up their leaves. "
              "`(const)` leaves compute only constants (folded by ORT in the whole model): not timed.", "",
              "## Whole-model counters", "", "```"] + counter_lines(data) + ["```", ""]
    return "\n".join(parts)


def to_csv(data: dict) -> str:
    counters = list(dict.fromkeys(n for s in data["subgraphs"] for n in s["counters"]))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    units = {n: r["unit"] for s in data["subgraphs"] for n, r in s["counters"].items()}
    writer.writerow(list(CSV_FIELDS) + ["op_types"] + [f"{n} [{units[n]}]" for n in counters])
    for s in data["subgraphs"]:
        values = ["" if s[f] is None else s[f] for f in CSV_FIELDS]
        ops = " ".join(f"{op}:{n}" for op, n in s["op_types"].items())
        readings = [s["counters"].get(n, {}).get("value") for n in counters]
        writer.writerow(values + [ops] + ["" if v is None else v for v in readings])
    return buffer.getvalue()


def render_hal(data: dict, fmt: str) -> str:
    """``adaptopt hal``: execution providers, counter backends (available? why), calibration."""
    if fmt == "json":
        return json.dumps(data, indent=1)
    m = data["machine"]
    lines = [f"onnxruntime {data['onnxruntime']}; execution providers: {', '.join(data['execution_providers'])}"]
    lines += [f"  {p} is listed but unusable: {why}" for p, why in data.get("unusable_providers", {}).items()]
    lines += ["",
             tabulate([[b["name"], "yes" if b["available"] else "no", b["reason"]] for b in data["backends"]],
                      headers=("backend", "available", "reason / what it reads"), tablefmt="simple")]
    for b in data["backends"]:
        for event, status in b.get("events", {}).items():
            lines.append(f"  {b['name']}.{event}: {status}")
    origin = "cached" if m["cached"] else "measured now"
    lines += ["", f"machine calibration ({origin}, {m['measured_at']}): {m['key']}",
              f"  peak {m['peak_gflops']:.1f} GFLOP/s, memory {m['bandwidth_gbs']:.1f} GB/s, "
              f"cache {m['cache_bandwidth_gbs']:.1f} GB/s (<= {m['cache_bytes'] // 1024} KiB), "
              f"balance {m['balance_flop_per_byte']:.1f} FLOP/B",
              f"  session overhead {m['session_overhead_ms'] * 1e3:.2f} us, "
              f"per kernel {m['node_overhead_ms'] * 1e3:.3f} us"]
    return "\n".join(lines)
