"""``python -m benchmarks --section all|peers|split|profile|passes|learning``.

Each section's module has ``run(args) -> dict`` and (except ``learning``, which may
omit it) ``render(result, markdown) -> str``. The dispatcher adds the run's metadata
(date, machine, versions, commit, command), saves the section into
``benchmarks/results/latest.json``, prints its tables and regenerates its block of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from adaptopt.errors import AdaptoptError

from benchmarks.harness import machine
from benchmarks.isolate import REPO
from benchmarks.report import DOCS, QUICK_RESULTS, RESULTS, run_header, save_section, update_docs

SECTIONS = ("peers", "split", "profile", "passes", "learning")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--section", default="all", choices=("all",) + SECTIONS)
    p.add_argument("--models", nargs="+", metavar="PATH",
                   help="model files or known names (resnet_small, ch_PP-OCRv4_rec_infer, ...), or the "
                        "groups 'examples' / 'shared'; default: examples + ../shared/models")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=DxD",
                   help="input shape for models given as paths (repeatable)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds per model (default 30, quick 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: two example models, few rounds")
    p.add_argument("--config", default=None, help="adaptopt config for the adaptopt rows (default: built-in)")
    p.add_argument("--tool-timeout", type=float, default=300.0, help="seconds per peer tool run")
    p.add_argument("--adaptopt-timeout", type=float, default=300.0, help="seconds per adaptopt run (the target is 300)")
    p.add_argument("--results", default=None,
                   help=f"results JSON, sections merged in (default {RESULTS.relative_to(REPO)}; "
                        f"--quick: {QUICK_RESULTS.relative_to(REPO)})")
    p.add_argument("--no-docs", action="store_true",
                   help=f"do not rewrite {DOCS.relative_to(REPO)} (implied by --quick)")
    p.add_argument("--rerender", action="store_true",
                   help="measure nothing: re-render tables and docs from the results JSON")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 30
    if args.results is None:
        args.results = str(QUICK_RESULTS if args.quick else RESULTS)
    args.no_docs = args.no_docs or args.quick  # a smoke run never replaces the published numbers
    return args


def commit() -> str:
    def git(*cmd: str) -> str:
        proc = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def run_section(name: str, args: argparse.Namespace, argv: list[str]) -> dict:
    module = importlib.import_module(f"benchmarks.{name}")
    started = time.perf_counter()
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "commit": commit(), "command": "python -m benchmarks " + shlex.join(argv), "wall_s": 0.0}

    def checkpoint(partial: dict) -> None:
        save_section(name, {**partial, "meta": {**meta, "partial": True}}, args.results)

    result = module.run(args) if name == "learning" else module.run(args, checkpoint)
    meta.update(wall_s=time.perf_counter() - started, load_end=os.getloadavg()[0])
    result = {**result, "meta": meta}
    save_section(name, result, args.results)
    publish(name, module, result, args)
    return result


def rerender_section(name: str, args: argparse.Namespace) -> None:
    """Tables and docs again from the stored results (ratios/targets recomputed where the
    section can), without measuring anything."""
    module = importlib.import_module(f"benchmarks.{name}")
    stored = json.loads(Path(args.results).read_text())["sections"].get(name) if Path(args.results).is_file() else None
    if stored is None:
        print(f"[{name}] nothing stored in {args.results}", flush=True)
        return
    recompute = getattr(module, "recompute", None)
    result = recompute(stored) if recompute else stored
    save_section(name, result, args.results)
    publish(name, module, result, args)


def publish(name: str, module, result: dict, args: argparse.Namespace) -> None:
    """Print the section's tables and regenerate its block of the docs page."""
    meta = result["meta"]
    render = getattr(module, "render", None)
    body = render(result, True) if render else "```json\n" + json.dumps(result, indent=1, default=str) + "\n```"
    print(render(result, False) if render else body, flush=True)
    if not args.no_docs:
        update_docs(name, f"## Section `{name}`\n\n{run_header(meta)}\n{body}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    names = SECTIONS if args.section == "all" else (args.section,)
    for name in names:
        if importlib.util.find_spec(f"benchmarks.{name}") is None:
            print(f"[{name}] not available: benchmarks/{name}.py is missing", flush=True)
            continue
        print(f"== section {name} ==", flush=True)
        try:
            if args.rerender:
                rerender_section(name, args)
            else:
                run_section(name, args, argv)
        except AdaptoptError as exc:
            print(f"[{name}] error: {exc}", file=sys.stderr)
            return int(exc.exit_code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
