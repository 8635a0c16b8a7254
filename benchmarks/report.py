"""Results out: terminal tables, ``benchmarks/results/latest.json``, ``docs/benchmarks.md``.

The JSON file keeps one entry per section; running one section replaces only that
entry. ``docs/benchmarks.md`` keeps its hand-written header; each section owns the
text between ``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``
(appended at the end the first time).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, Sequence

from tabulate import tabulate

from benchmarks.isolate import REPO

RESULTS = REPO / "benchmarks" / "results" / "latest.json"
QUICK_RESULTS = REPO / "benchmarks" / "results" / "quick.json"  # --quick smoke runs (git-ignored)
DOCS = REPO / "docs" / "benchmarks.md"
SCHEMA_VERSION = 1


def fmt(value, digits: int = 2, suffix: str = "") -> str:
    """A number for a table cell; missing values are an empty cell, never a zero."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10 ** -digits or abs(value) >= 1e6):
            return f"{value:.1e}{suffix}"
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def table(rows: Iterable[Sequence], headers: Sequence[str], markdown: bool = False) -> str:
    return tabulate(list(rows), headers=list(headers), tablefmt="github" if markdown else "simple",
                    disable_numparse=True)


def save_section(name: str, data: dict, path: Path = RESULTS) -> Path:
    """Write ``data`` as section ``name`` of the results file, keeping the other sections."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema_version": SCHEMA_VERSION, "sections": {}}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("schema_version") == SCHEMA_VERSION:
            doc["sections"] = old.get("sections", {})
    doc["sections"][name] = data
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)
    return path


def update_docs(name: str, markdown: str, path: Path = DOCS) -> Path:
    """Replace (or append) the generated block of section ``name`` in the docs page."""
    begin, end = f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run_header(meta: dict) -> str:
    """Date, machine, versions and the command: the first lines of every generated block."""
    m = meta["machine"]
    v = m["versions"]
    load = (f" Load average (1 min) {m['load_avg_1m']:.1f} at the start, {meta['load_end']:.1f} at the end "
            f"on {m['cores']} cores." if "load_end" in meta else "")
    return (f"Run {meta['date']} on {m['cpu']} ({m['cores']} cores), Python {m['python']}, "
            f"onnxruntime {m['ort']}, onnx {v['onnx']}, onnxsim {v['onnxsim']}, onnxslim {v['onnxslim']}, "
            f"onnxoptimizer {v['onnxoptimizer']}; commit {meta['commit']}. Section wall time "
            f"{meta['wall_s'] / 60:.1f} min.{load}\n\nReproduce: `{meta['command']}`\n")


def targets_table(targets: Sequence[dict], markdown: bool = False) -> str:
    """The section's targets: what was asked, what was measured, whether it was met."""
    rows = [[t["target"], t["measured"], "n/a" if t["met"] is None else fmt(t["met"])] for t in targets]
    return table(rows, ["target", "measured", "met (n/a: not in this run)"], markdown)
