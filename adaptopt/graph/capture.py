"""Reference inputs and one reference run that records boundary tensors.

Every subgraph is profiled and validated on the activations the real model produces
there, never on random data in the middle of a network.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper

from adaptopt.config import Config, InputSpec, TargetConfig
from adaptopt.errors import InputError, ModelError
from adaptopt.runtime import make_session, ort_error_line, ort_errors, run


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    init_names = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init_names]


def make_inputs(model: onnx.ModelProto, config: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input, from the config's ``inputs``/``inputs_file``."""
    if config.inputs_file:
        return _load_npz(model, Path(config.inputs_file))
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model_inputs(model):
        spec = config.inputs.get(vi.name, InputSpec())
        shape = spec.shape if spec.shape is not None else static_shape(vi)
        if shape is None:
            dims = _dims_text(vi)
            example = "x".join(str(d) if isinstance(d, int) else "N" for d in _dims(vi))
            raise ModelError(f"input '{vi.name}' has dynamic dims {dims}: give its shape with --input-shape "
                             f"{vi.name}={example}, or as inputs: {{{vi.name}: {{shape: [...]}}}} in the config")
        dtype = _input_dtype(vi, spec)
        _check_size(vi.name, tuple(shape), dtype, sum(f.nbytes for f in feeds.values()))
        feeds[vi.name] = fill(rng, tuple(shape), dtype, spec)
    return feeds


def _input_dtype(vi: onnx.ValueInfoProto, spec: InputSpec) -> np.dtype:
    """The dtype an input is generated with: the config's, else the model's."""
    return np.dtype(spec.dtype) if spec.dtype else _np_dtype(vi)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: assume the 24 GiB machine we test on
        return 24 << 30


def _check_size(name: str, shape: tuple[int, ...], dtype: np.dtype, so_far: int) -> None:
    """Refuse generated inputs that would take over a quarter of the machine's memory (the
    model's activations and every copy a run makes come on top), before allocating them:
    ``--input-shape x=99999999999x4`` was a MemoryError (exit 1)."""
    size = math.prod(shape) * dtype.itemsize
    limit = _memory_bytes() // 4
    if so_far + size > limit:
        raise ModelError(f"input '{name}' of shape {list(shape)} ({dtype}) would take {size / (1 << 30):.1f} GiB: "
                         f"the inputs may take at most a quarter of this machine's memory ({limit / (1 << 30):.1f} GiB)")


def unconfigured_inputs(model: onnx.ModelProto, config: Config) -> dict[str, str]:
    """Inputs whose values nobody configured (no ``values:``, no ``inputs_file``), and what they
    are filled with (:func:`fill`), which is what a lossy rewrite's accuracy is checked on:
    floats "uniform01" (uniform in [0, 1)), integers "0 or 1" (booleans, drawn from both of
    their values, are not listed)."""
    if config.inputs_file:
        return {}
    out = {}
    for vi in model_inputs(model):
        spec = config.inputs.get(vi.name, InputSpec())
        dtype = _input_dtype(vi, spec)
        if spec.values is not None or dtype == np.bool_:
            continue
        if np.issubdtype(dtype, np.floating):
            out[vi.name] = "uniform01"
        elif np.issubdtype(dtype, np.integer):
            out[vi.name] = "0 or 1"
    return out


def _dims(vi: onnx.ValueInfoProto) -> list:
    if not vi.type.tensor_type.HasField("shape"):
        return ["?"]
    return [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or "?")
            for d in vi.type.tensor_type.shape.dim]


def _dims_text(vi: onnx.ValueInfoProto) -> str:
    return "[" + ", ".join(str(d) for d in _dims(vi)) + "]"


def static_shape(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = vi.type.tensor_type.shape.dim
    if any(not d.HasField("dim_value") or d.dim_value < 0 for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def _np_dtype(vi: onnx.ValueInfoProto) -> np.dtype:
    if not vi.type.HasField("tensor_type"):
        raise ModelError(f"input '{vi.name}' is not a tensor; adaptopt can only feed tensor inputs")
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"input '{vi.name}' has an element type adaptopt cannot generate") from None


def fill(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, spec: InputSpec) -> np.ndarray:
    if spec.values == "ones":
        return np.ones(shape, dtype)
    if spec.values == "zeros":
        return np.zeros(shape, dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    integer = np.issubdtype(dtype, np.integer)
    if spec.values == "range":
        lo, hi = spec.value_range
        if integer:
            return rng.integers(int(lo), int(hi), shape).astype(dtype)
        return rng.uniform(lo, hi, shape).astype(dtype)
    if spec.values == "normal":
        return rng.standard_normal(shape).astype(dtype)
    if integer:  # uniform01 for an integer input would be all zeros: use small ids instead
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.random(shape).astype(dtype)


def _load_npz(model: onnx.ModelProto, path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InputError(f"inputs_file {path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise InputError(f"inputs_file {path}: one .npy array, not an .npz of arrays named after the inputs")
        with data:
            feeds = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"inputs_file {path}: not a readable .npz ({exc})") from None
    missing = [vi.name for vi in model_inputs(model) if vi.name not in feeds]
    if missing:
        raise InputError(f"inputs_file {path}: no array for input(s) {', '.join(missing)}")
    return feeds


# element types ONNX Runtime cannot hand to numpy (bfloat16, float8, 4-bit): no tensor of
# these can be captured, so no boundary or output of these can be checked
NO_NUMPY_TYPES = {onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ,
                  onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.FLOAT8E5M2FNUZ,
                  *(getattr(onnx.TensorProto, t) for t in ("UINT4", "INT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, t))}


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every typed tensor of the graph (inputs, outputs, value infos)."""
    return {vi.name: vi.type.tensor_type.elem_type
            for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
            if vi.type.HasField("tensor_type")}


def capture(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], tensors: Iterable[str],
            target: TargetConfig | None = None) -> dict[str, np.ndarray]:
    """Run ``model`` once and return the graph outputs and the named intermediate tensors.

    Intermediate tensors of a type numpy cannot hold (:data:`NO_NUMPY_TYPES`) are left out
    (a subgraph bordering one cannot be run alone and is kept as it is); a graph output
    of such a type is bad input: nothing could check the model's results."""
    target = target or TargetConfig()
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    types = elem_types(probe)
    unreadable = [o.name for o in probe.graph.output if types.get(o.name) in NO_NUMPY_TYPES]
    if unreadable:
        name = onnx.TensorProto.DataType.Name(types[unreadable[0]]).lower()
        raise ModelError(f"output '{unreadable[0]}' is {name}: numpy has no {name}, so its values cannot be "
                         "read back and compared")
    wanted = [t for t in dict.fromkeys(tensors)
              if t not in present and t not in feeds and types.get(t) not in NO_NUMPY_TYPES]
    init_names = {i.name for i in probe.graph.initializer}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in wanted if t not in init_names)
    try:
        session = make_session(probe, target, level="disable")
        values = run(session, feeds)
    except ort_errors() as exc:
        raise ModelError(f"reference run failed: {ort_error_line(exc)}") from None
    values.update({k: v for k, v in feeds.items()})
    for name in wanted:
        if name in init_names:
            values[name] = onnx.numpy_helper.to_array(next(i for i in probe.graph.initializer if i.name == name))
    return values

