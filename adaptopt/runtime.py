"""ONNX Runtime sessions, made one way for every stage.

All sessions of a process share one global intra-op thread pool
(``use_per_session_threads = False``): interleaved sessions with their own pools
slow each other down through spinning workers, which would poison every timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
from typing import Mapping, Sequence

import numpy as np
import onnx

from adaptopt.config import TargetConfig
from adaptopt.errors import InputError, ModelError

# IR version of the models adaptopt builds itself (examples, probes, calibration models):
# not onnx's newest, which an onnx package newer than the installed ONNX Runtime would
# write and that runtime would refuse.
BUILT_MODEL_IR = 8

_pool_lock = threading.Lock()
_pool_threads: int | None = None

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _ort():
    import onnxruntime as ort
    ort.set_default_logger_severity(4)  # ORT errors reach us as exceptions; its log lines would be noise
    return ort


def init_thread_pool(threads: int) -> int:
    """Create the process-wide thread pool once; later calls keep the first size."""
    global _pool_threads
    with _pool_lock:
        if _pool_threads is None:
            from onnxruntime.capi import _pybind_state as C
            intra = threads if threads > 0 else (os.cpu_count() or 1)
            C.set_global_thread_pool_sizes(intra, 1)
            _pool_threads = intra
        return _pool_threads


_provider_problems: dict[str, str] = {}  # provider -> why it cannot start (probed once per process)


def provider_problem(name: str, target: TargetConfig) -> str | None:
    """Why ``name`` cannot start here, or None when it can.

    A provider this build lists may still fail to start (TensorRT without its
    libraries, CUDA without a driver). ORT then prints a banner on stdout and retries
    with the next provider on every session; probing once, with the process's
    stdout/stderr silenced, drops it cleanly instead (``-o -`` pipelines stay clean).
    """
    ort = _ort()
    if name not in ort.get_available_providers():
        return "not in this onnxruntime build"
    if name == "CPUExecutionProvider":
        return None
    if name not in _provider_problems:
        _provider_problems[name] = _probe_provider(ort, name, target)
    return _provider_problems[name] or None


def _probe_provider(ort, name: str, target: TargetConfig) -> str:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)],
                                  ir_version=BUILT_MODEL_IR)
    with _silenced_fds():
        try:
            session = ort.InferenceSession(probe.SerializeToString(), session_options(target, "disable"),
                                           providers=[name, "CPUExecutionProvider"])
        except ort_errors() as exc:
            return f"cannot start: {ort_error_line(exc)}"
    return "" if name in session.get_providers() else "cannot start (its libraries did not load)"


@contextlib.contextmanager
def _silenced_fds():
    """Silence stdout and stderr: Python's streams (ORT's fallback banner is a print) and
    file descriptors 1 and 2 (native code writes there directly)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        os.close(devnull)


def unusable_providers(target: TargetConfig) -> dict[str, str]:
    """The configured EPs that cannot start here, and why (what a run falls back from)."""
    problems = {p: provider_problem(p, target) for p in target.execution_providers}
    return {p: why for p, why in problems.items() if why is not None}


def fallback_warning(target: TargetConfig) -> str:
    """One line saying which configured EPs are replaced by the CPU here ("" when none)."""
    missing = unusable_providers(target)
    if not missing or not target.allow_cpu_fallback:
        return ""
    return ("execution provider(s) not usable here, running on " + ", ".join(resolve_providers(target)) + ": "
            + "; ".join(f"{p} {why}" for p, why in missing.items()))


def resolve_providers(target: TargetConfig) -> list[str]:
    """The configured EPs that can start here, in priority order."""
    wanted = list(target.execution_providers)
    problems = {p: provider_problem(p, target) for p in wanted}
    chosen = [p for p in wanted if problems[p] is None]
    missing = [p for p in wanted if problems[p] is not None]
    if missing and not target.allow_cpu_fallback:
        raise InputError("execution provider(s) not usable here: "
                         + "; ".join(f"{p} {problems[p]}" for p in missing)
                         + " (target.allow_cpu_fallback is false)")
    if "CPUExecutionProvider" not in chosen and target.allow_cpu_fallback:
        chosen.append("CPUExecutionProvider")
    if not chosen:
        raise InputError("no configured execution provider is available")
    return chosen


def session_options(target: TargetConfig, level: str = "all", profile_prefix: str | None = None,
                    extra: Mapping[str, str] | None = None):
    ort = _ort()
    init_thread_pool(target.threads)
    so = ort.SessionOptions()
    so.use_per_session_threads = False
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[level])
    so.log_severity_level = 4
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    for key, value in (extra or {}).items():
        so.add_session_config_entry(key, value)
    return so


ORT_CONFIG_KEY = "ort_config"
# session options a model may carry in its ``ort_config`` metadata (ORT's own format:
# {"session_options": {...}}). ORT itself (ORT_LOAD_CONFIG_FROM_MODEL=1) reads only thread
# counts, execution_mode, graph_optimization_level and enable_profiling from it; adaptopt's
# sessions also apply the memory keys (the opt-in buffers_* passes write them).
_MODEL_OPTIONS = {"enable_mem_pattern": bool, "enable_mem_reuse": bool, "enable_cpu_mem_arena": bool,
                  "execution_mode": str, "inter_op_num_threads": int}


def model_session_config(model: onnx.ModelProto) -> dict:
    """The ``session_options`` a model carries in its ``ort_config`` metadata, if any."""
    for prop in model.metadata_props:
        if prop.key == ORT_CONFIG_KEY:
            try:
                options = json.loads(prop.value).get("session_options", {})
            except (json.JSONDecodeError, AttributeError):
                raise ModelError("the model's ort_config metadata is not valid JSON") from None
            return {k: v for k, v in options.items() if k in _MODEL_OPTIONS}
    return {}


def apply_model_session_config(so, options: Mapping) -> None:
    ort = _ort()
    for key, value in options.items():
        if key == "execution_mode":
            so.execution_mode = getattr(ort.ExecutionMode, str(value))
        elif key == "inter_op_num_threads":
            continue  # the process-wide pool decides threads
        else:
            setattr(so, key, _MODEL_OPTIONS[key](value))


def make_session(model: onnx.ModelProto | bytes | str, target: TargetConfig, level: str = "all",
                 profile_prefix: str | None = None, sess_options=None):
    """An inference session for ``model`` (proto, serialized bytes or a path).

    Session options carried in the model's ``ort_config`` metadata are applied (ORT
    itself applies only some of them: see ``_MODEL_OPTIONS``).
    """
    ort = _ort()
    so = sess_options or session_options(target, level, profile_prefix)
    keep_alive = None
    if isinstance(model, onnx.ModelProto):
        apply_model_session_config(so, model_session_config(model))
        keep_alive = _serve_weights_from_disk(so, model)
        model = model.SerializeToString()
    session = ort.InferenceSession(model, so, providers=resolve_providers(target))
    session._adaptopt_weights = keep_alive  # the memory maps must outlive the session
    _no_fallback(session)
    return session


def _no_fallback(session) -> None:
    """Turn off ONNX Runtime's provider fallback, and let go of the model bytes kept for it.

    On an execution-provider failure ORT's Python session prints a banner on stdout and
    re-creates itself on the fallback providers, from a copy of the model's bytes it keeps
    for the session's whole life. Here providers are probed and chosen before any session
    (:func:`resolve_providers`): a silent switch to the CPU would turn a GPU timing into a CPU
    one and break ``-o -`` pipelines, so a failure is an error instead. Without fallback the
    copy is dead weight: on a 211 MB encoder a session made from bytes added 449 MB to the
    process (2.1x the model: its bytes plus ORT's tensors), 238 MB (1.1x) once it let go.
    """
    session.disable_fallback()
    if isinstance(getattr(session, "_model_bytes", None), bytes):
        session._model_bytes = None


def _serve_weights_from_disk(so, model: onnx.ModelProto):
    """Initializers kept on disk (models over 2 GiB) reach ORT as memory maps, never copied."""
    from adaptopt.graph.external import mapped_initializers
    maps = mapped_initializers(model)
    if not maps:
        return None
    ort = _ort()
    values = [ort.OrtValue.ortvalue_from_numpy(array) for array in maps.values()]
    so.add_external_initializers(list(maps), values)
    return maps, values


def run(session, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    names = list(outputs) if outputs is not None else [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, values))


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types ONNX Runtime raises for models or inputs it cannot handle."""
    from onnxruntime.capi import onnxruntime_pybind11_state as S
    names = ("Fail", "InvalidArgument", "InvalidGraph", "NoSuchFile", "NotImplemented", "RuntimeException",
             "InvalidProtobuf", "EPFail", "NoModel", "ModelLoaded", "EngineError")
    return tuple(getattr(S, n) for n in names if hasattr(S, n)) + (RuntimeError, ValueError)


def ort_error_line(exc: BaseException) -> str:
    """The informative first line of an ONNX Runtime error."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    for marker in ("] ", "Exception : "):
        if marker in line and line.startswith("["):
            line = line.split(marker, 1)[-1]
    line = re.sub(r"^:?\s*\d+\s*:\s*[A-Z_]+\s*:\s*", "", line)  # ": 1 : FAIL : " status prefix
    return line[:300]
