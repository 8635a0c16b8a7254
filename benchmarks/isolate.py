"""Run one benchmark step in a child process with a timeout.

Parent side: :func:`run_isolated` starts ``python -m benchmarks.isolate MODULE:FUNC
PAYLOAD RESULT``; the child calls ``FUNC(payload) -> dict`` and writes the dict as
JSON. Nothing is caught in the child: an exception, a crash or a hang ends the child,
and the parent turns it into one error line (the exception's first line, the signal,
or the timeout). The process boundary is the error boundary, so no step needs a
catch-all handler.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Outcome:
    """What a child step returned (``ok``) or why it did not (``error``, one line)."""

    ok: bool
    value: dict = field(default_factory=dict)
    error: str = ""
    wall_s: float = 0.0


def run_isolated(func: str, payload: dict, timeout_s: float) -> Outcome:
    """Call ``func`` ("module:function") on ``payload`` in a fresh interpreter."""
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        payload_path, result_path = Path(tmp) / "payload.json", Path(tmp) / "result.json"
        payload_path.write_text(json.dumps(payload))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, "-m", "benchmarks.isolate", func, str(payload_path), str(result_path)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  timeout=timeout_s, text=True, errors="replace")
        except subprocess.TimeoutExpired:
            return Outcome(False, error=f"timed out after {timeout_s:.0f} s", wall_s=time.perf_counter() - start)
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not result_path.is_file():
            return Outcome(False, error=error_line(proc.stderr, proc.returncode), wall_s=wall)
        return Outcome(True, json.loads(result_path.read_text()), wall_s=wall)


def error_line(stderr: str, returncode: int) -> str:
    """The first line of the child's final exception, or how it died."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"crashed ({name})"
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        for line in lines[starts[-1] + 1:]:
            if line and not line[0].isspace():
                return re.sub(r"^(?:\w+\.)+(\w+:)", r"\1", line.strip())[:300]  # pkg.mod.Error: -> Error:
    tail = [line.strip() for line in lines if line.strip()]
    return (tail[-1][:300] if tail else f"exit code {returncode}")


def _child(func: str, payload_path: str, result_path: str) -> None:
    module_name, _, func_name = func.partition(":")
    function = getattr(importlib.import_module(module_name), func_name)
    result = function(json.loads(Path(payload_path).read_text()))
    Path(result_path).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    _child(*sys.argv[1:4])
