"""Nsight Compute (``ncu``): DRAM throughput and L1/L2 hit rates of a subgraph's kernels.

``ncu`` replays every kernel many times, so it cannot sit inside the timed loop: the
model and its inputs are written to a temporary folder and one run is profiled in a
child process (``python -m adaptopt.hal.ncu MODEL FEEDS PROVIDERS``). Per-kernel
metrics are averaged weighted by kernel duration. Available only when ``ncu`` is on
PATH; without it, or without a GPU, the backend says so.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Mapping

import numpy as np
import onnx

from adaptopt.hal.base import Availability, Backend, Reading, missing

NAME = "ncu"
METRICS = {  # reading name -> (ncu metric, unit)
    "dram_throughput": ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "% of peak"),
    "l1_hit_rate": ("l1tex__t_sector_hit_rate.pct", "%"),
    "l2_hit_rate": ("lts__t_sector_hit_rate.pct", "%"),
}
DURATION = "gpu__time_duration.sum"
TIMEOUT_S = 600


def parse_csv(text: str) -> dict[str, Reading]:
    """Duration-weighted mean of each metric over the kernels in ``ncu --csv`` output."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]  # drops ==PROF== chatter
    kernels: dict[str, dict[str, float]] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        try:
            value = float(row["Metric Value"].replace(",", ""))
        except (KeyError, ValueError):
            continue
        kernels.setdefault(row.get("ID", ""), {})[row.get("Metric Name", "")] = value
    out = {}
    for name, (metric, unit) in METRICS.items():
        pairs = [(k[metric], k.get(DURATION, 1.0)) for k in kernels.values() if metric in k]
        weight = sum(w for _, w in pairs)
        out[name] = (Reading(sum(v * w for v, w in pairs) / weight, unit, NAME, True) if pairs and weight > 0
                     else missing(unit, NAME, f"ncu reported no {metric}"))
    out["kernels"] = Reading(float(len(kernels)), "count", NAME, True)
    return out


def profile(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], providers: list[str]) -> dict[str, Reading]:
    """Run ``model`` once under ``ncu`` and return its kernel metrics (missing with the reason on failure)."""
    exe = shutil.which("ncu")
    if exe is None:
        return {n: missing(u, NAME, "ncu not on PATH") for n, (_, u) in METRICS.items()}
    with tempfile.TemporaryDirectory(prefix="adaptopt-ncu-") as tmp:
        model_path, feeds_path = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "feeds.npz")
        onnx.save_model(model, model_path, save_as_external_data=model.ByteSize() >= 2**31)
        np.savez(feeds_path, **dict(feeds))
        metrics = ",".join([m for m, _ in METRICS.values()] + [DURATION])
        cmd = [exe, "--csv", "--metrics", metrics, "--target-processes", "all",
               sys.executable, "-m", "adaptopt.hal.ncu", model_path, feeds_path, ",".join(providers)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return {n: missing(u, NAME, f"ncu took over {TIMEOUT_S} s") for n, (_, u) in METRICS.items()}
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:300]
        return {n: missing(u, NAME, f"ncu failed: {why}") for n, (_, u) in METRICS.items()}
    return parse_csv(done.stdout)


class NcuBackend(Backend):
    name = NAME
    live = False  # runs its own child process after the timed loop

    def availability(self) -> Availability:
        exe = shutil.which("ncu")
        if exe is None:
            return Availability(False, "ncu (Nsight Compute) not on PATH")
        return Availability(True, f"{exe}; profiles one run in a child process")


def _child(model_path: str, feeds_path: str, providers: str) -> None:
    """What ``ncu`` profiles: one session run of the model on the given providers."""
    from adaptopt.config import TargetConfig
    from adaptopt.runtime import make_session, run

    target = TargetConfig(execution_providers=tuple(providers.split(",")), device="cuda")
    with np.load(feeds_path, allow_pickle=False) as data:
        feeds = {k: data[k] for k in data.files}
    run(make_session(model_path, target), feeds)


if __name__ == "__main__":
    _child(*sys.argv[1:4])
