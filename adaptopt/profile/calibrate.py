"""Machine calibration: measured peak compute, bandwidth and fixed run costs, cached per machine.

Four microbenchmarks through ONNX Runtime on the target's execution provider (about 2 s
on a CPU):

- ``peak_gflops``: fp32 MatMul, 512 and 1024 square on a CPU (4096 on a GPU); the
  fastest run of any size, so the roofline ceiling is one that real kernels reach;
- ``bandwidth_gbs``: an Add of two large fp32 vectors (2**24 elements, 192 MB moved per
  run on a CPU; 2**27 on a GPU) into a preallocated output, fastest run, bytes counted
  as the cost model counts them (two reads and a write);
- ``cache_bandwidth_gbs``: the same Add on vectors that fit the per-core caches (CPU
  only; ``cache_bytes`` = L2 size x threads from sysfs): nodes that move less than
  ``cache_bytes`` are held to this higher ceiling (a two-level roofline);
- ``session_overhead_ms``: one run of an Identity model on one float: the fixed cost
  every session run pays whatever it computes;
- ``node_overhead_ms``: the extra cost of one more trivial kernel (a chain of 32 Neg
  on one float, unoptimized), i.e. per-kernel dispatch/launch cost.

Results are cached in ``<cache dir>/machine.json`` keyed by CPU model, core count,
ONNX Runtime version, execution provider and threads (and GPU name on a GPU). The
cache dir is the argument (``policy.cache_dir``), else ``$ADAPTOPT_CACHE_DIR``, else
``~/.cache/adaptopt``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from adaptopt.config import ProfilingConfig, TargetConfig
from adaptopt.graph.io import atomic_path
from adaptopt.runtime import BUILT_MODEL_IR, init_thread_pool, resolve_providers

CACHE_FILE = "machine.json"
CACHE_VERSION = 2
CACHE_ENV = "ADAPTOPT_CACHE_DIR"
_OPSET = [helper.make_opsetid("", 17)]
_QUICK = ProfilingConfig(warmup=2, iterations=5, min_time_s=0.1, max_time_s=1.0)
_TINY = ProfilingConfig(warmup=20, iterations=200, min_time_s=0.05, max_time_s=0.5)


@dataclass(frozen=True)
class MachineProfile:
    """What the roofline is drawn from; ``cached`` says whether it was read from the cache file."""

    peak_gflops: float
    bandwidth_gbs: float
    cache_bandwidth_gbs: float
    cache_bytes: int  # a node moving at most this many bytes runs from cache
    session_overhead_ms: float
    node_overhead_ms: float
    fingerprint: dict
    key: str
    measured_at: str
    cached: bool = False

    @property
    def balance(self) -> float:
        """Machine balance in FLOP/byte: intensities above it are compute-bound."""
        return self.peak_gflops / self.bandwidth_gbs

    def to_dict(self) -> dict:
        out = asdict(self)
        out["balance_flop_per_byte"] = self.balance
        return out


def resolve_cache_dir(explicit: str | None = None) -> Path:
    """The cache folder of the calibration and of the measurements: the config's
    (``policy.cache_dir``), else ``$ADAPTOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/adaptopt``,
    else ``~/.cache/adaptopt``."""
    base = explicit or os.environ.get(CACHE_ENV)
    if base:
        return Path(base).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "adaptopt"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def per_core_cache_bytes() -> int | None:
    """The size of the largest cache level private to one core (L2 on most x86), from sysfs."""
    best = None
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            shared = (index / "shared_cpu_list").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        if kind == "Instruction" or "," in shared or "-" in shared:
            continue  # instruction caches and caches shared between cores do not count
        units = {"K": 1024, "M": 1024**2, "G": 1024**3}
        value = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        best = max(best or 0, value)
    return best


def _gpu_name() -> str:
    from adaptopt.hal import nvml
    nv, reason = nvml._init()
    if nv is None:
        return f"unknown GPU ({reason})"
    name = nv.nvmlDeviceGetName(nv.nvmlDeviceGetHandleByIndex(0))
    return name.decode() if isinstance(name, bytes) else name


def fingerprint(target: TargetConfig) -> dict:
    """What a calibration depends on: CPU model, cores, ORT version, EP, threads (GPU name on a GPU)."""
    import onnxruntime as ort
    from adaptopt.profile.runner import GPU_PROVIDERS
    ep = resolve_providers(target)[0]
    # the process-wide pool keeps the size of its first use, whatever this target asks
    info = {"cpu_model": cpu_model(), "cores": os.cpu_count() or 1, "ort_version": ort.__version__,
            "execution_provider": ep, "threads": init_thread_pool(target.threads)}
    if ep in GPU_PROVIDERS:
        info["gpu"] = _gpu_name()
    return info


def cache_key(info: dict) -> str:
    parts = [info["cpu_model"], f"{info['cores']} cores", f"ort {info['ort_version']}", info["execution_provider"],
             f"{info['threads']} threads"] + ([info["gpu"]] if "gpu" in info else [])
    return " | ".join(str(p) for p in parts)


# ------------------------------------------------------------------ microbenchmark models
def _model(nodes: list, inputs: list, outputs: list) -> onnx.ModelProto:
    return helper.make_model(helper.make_graph(nodes, "calibration", inputs, outputs), opset_imports=_OPSET,
                             ir_version=BUILT_MODEL_IR)


def _vi(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def matmul_model(n: int) -> onnx.ModelProto:
    return _model([helper.make_node("MatMul", ["a", "b"], ["y"])], [_vi("a", [n, n]), _vi("b", [n, n])],
                  [_vi("y", [n, n])])


def add_model(n: int) -> onnx.ModelProto:
    return _model([helper.make_node("Add", ["a", "b"], ["y"])], [_vi("a", [n]), _vi("b", [n])], [_vi("y", [n])])


def identity_model() -> onnx.ModelProto:
    return _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", [1])], [_vi("y", [1])])


def chain_model(length: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Neg", [f"t{i}"], [f"t{i + 1}"]) for i in range(length)]
    return _model(nodes, [_vi("t0", [1])], [_vi(f"t{length}", [1])])


# ------------------------------------------------------------------ measuring
def measure_peak_gflops(target: TargetConfig, sizes: tuple[int, ...]) -> float:
    from adaptopt.profile.runner import time_model
    best = 0.0
    for n in sizes:
        a = np.full((n, n), 0.5, np.float32)
        timing = time_model(matmul_model(n), {"a": a, "b": a}, target, _QUICK)
        best = max(best, 2.0 * n**3 / (min(timing.samples_ms) / 1e3) / 1e9)
    return best


def measure_bandwidth_gbs(target: TargetConfig, n: int, profiling: ProfilingConfig = _QUICK) -> float:
    from adaptopt.profile.runner import time_model
    a, b = np.full(n, 0.5, np.float32), np.full(n, 0.25, np.float32)
    # preallocated output: the allocator's page faults are not the memory system's bandwidth
    timing = time_model(add_model(n), {"a": a, "b": b}, target, profiling, outputs={"y": np.empty(n, np.float32)})
    return 3.0 * 4 * n / (min(timing.samples_ms) / 1e3) / 1e9


def measure_overheads(target: TargetConfig, chain: int = 32) -> tuple[float, float]:
    """(session run overhead, per-kernel overhead) in ms."""
    from adaptopt.profile.runner import time_model
    one = {"x": np.ones(1, np.float32)}
    session_ms = time_model(identity_model(), one, target, _TINY).median_ms
    chain_ms = time_model(chain_model(chain), {"t0": one["x"]}, target, _TINY, level="disable").median_ms
    return session_ms, max(chain_ms - session_ms, 0.0) / chain


def calibrate(target: TargetConfig) -> MachineProfile:
    """Run the microbenchmarks now (no cache)."""
    from adaptopt.profile.runner import GPU_PROVIDERS
    info = fingerprint(target)
    gpu = info["execution_provider"] in GPU_PROVIDERS
    session_ms, node_ms = measure_overheads(target)
    bandwidth = measure_bandwidth_gbs(target, 2**27 if gpu else 2**24)
    cache_bytes = 0 if gpu else (per_core_cache_bytes() or 0) * info["threads"]
    # an Add moving half the caches (2 reads + 1 write of n floats)
    cache_n = 2 ** int(np.log2(max(cache_bytes // 24, 1)))
    cache_bandwidth = measure_bandwidth_gbs(target, cache_n, _TINY) if cache_bytes else bandwidth
    return MachineProfile(
        peak_gflops=measure_peak_gflops(target, (4096,) if gpu else (512, 1024)),
        bandwidth_gbs=bandwidth, cache_bandwidth_gbs=max(cache_bandwidth, bandwidth), cache_bytes=cache_bytes,
        session_overhead_ms=session_ms, node_overhead_ms=node_ms, fingerprint=info, key=cache_key(info),
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: undecodable bytes or JSON
        return {}  # no cache or a damaged one: calibrate again and rewrite it
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("profiles"), dict):
        return {}
    return data["profiles"]


def cached_profile(target: TargetConfig, directory: str | None = None) -> MachineProfile | None:
    """The cached calibration for this machine and target, or None (nothing is measured)."""
    entry = _read_cache(resolve_cache_dir(directory) / CACHE_FILE).get(cache_key(fingerprint(target)))
    if not isinstance(entry, dict):
        return None
    fields = {k: entry[k] for k in MachineProfile.__dataclass_fields__ if k in entry}
    try:
        found = replace(MachineProfile(**fields), cached=True)
    except TypeError:
        return None  # an entry written by another version: recalibrate
    if not all(isinstance(getattr(found, f), (int, float)) and getattr(found, f) > 0
               for f in ("peak_gflops", "bandwidth_gbs")):
        return None  # damaged: recalibrate
    return found


def machine_profile(target: TargetConfig, cache_dir: str | None = None, refresh: bool = False) -> MachineProfile:
    """This machine's calibration for ``target``: from the cache, or measured now and cached."""
    if not refresh and (found := cached_profile(target, cache_dir)) is not None:
        return found
    profile = calibrate(target)
    path = resolve_cache_dir(cache_dir) / CACHE_FILE
    profiles = _read_cache(path)
    entry = profile.to_dict()
    entry.pop("cached")
    entry.pop("balance_flop_per_byte")
    profiles[profile.key] = entry
    from adaptopt.errors import InputError
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "profiles": profiles}, indent=1))
    except (OSError, InputError):  # atomic_path says InputError for a target it cannot create
        pass  # an unwritable cache dir costs a recalibration next time, nothing else
    return profile
