"""Rendering helpers for the CLI: summaries, report files, progress on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from adaptopt.errors import InputError
from adaptopt.graph.io import atomic_path


def optimize_summary(result, output: str, report_path: str | None) -> dict:
    r = result.report["result"]
    apart = r.get("apart") or {}
    # speedup: timed apart (each model alone in a fresh process, as a user runs it) when those
    # pairs agreed on it, else side by side in one process
    return {"speedup": result.speedup, "improved": result.improved,
            "speedup_in_process": r.get("speedup_in_process") if result.improved else None,
            # the median pair timed apart, when timed
            "speedup_apart": apart.get("speedup") if result.improved else None,
            "latency_ms": result.latency_ms, "accuracy": result.accuracy,
            "output": output, "report": report_path, "message": r["message"]}


def report_format(path: str) -> str:
    """``json`` or ``md``, from the report file's name (anything else is bad input)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".md", ".markdown"):
        return "md"
    raise InputError(f"--report {path}: use a .json or .md file name")


def write_report(report: dict, path: str) -> None:
    if report_format(path) == "json":
        text = json.dumps(report, indent=1, default=str)
    else:
        from adaptopt.report.optimize import render_markdown
        text = render_markdown(report)
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def progress_printer():
    """A progress callback drawing click's progress bar on stderr (None when not a terminal)."""
    if not sys.stderr.isatty():
        return None
    bars: dict[str, object] = {}

    def show(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = click.progressbar(length=total, label=f"{stage:<24}", file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)
        if done >= total:
            bar.__exit__(None, None, None)

    return show
