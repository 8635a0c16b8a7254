"""Model I/O: read from a path or stdin, external data in and out, atomic writes.

Loading runs the ONNX checker and shape inference and pins dynamic dims from the
config. External-data locations are checked before any file is opened: absolute
paths, ``..`` and symlinks that leave the model's folder are refused, and declared
tensor sizes are checked against the file before anything is allocated.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, external_data_helper, helper

from adaptopt.config import Config, InputSpec
from adaptopt.errors import InputError
from adaptopt.graph.index import sort_topologically

TWO_GIB = 2**31
EXTERNAL_THRESHOLD = 1024  # tensors at least this many bytes go to the side file


def read_model_bytes_or_path(source: str | Path) -> tuple[bytes | None, Path | None]:
    """``-`` reads stdin; otherwise check the path exists and is a readable file."""
    if str(source) == "-":
        data = sys.stdin.buffer.read()
        return data, None
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")
    return None, path


def load_model(source: str | Path, config: Config | None = None, *, infer: bool = True) -> onnx.ModelProto:
    """Load, check, shape-infer and pin a model. External data is loaded into memory."""
    data, path = read_model_bytes_or_path(source)
    name = "<stdin>" if path is None else str(path)
    if data is not None and not data:
        raise InputError(f"{name}: empty input, not an ONNX model")
    try:
        if path is not None:
            with open(path, "rb") as fh:
                model = onnx.load_model(fh, load_external_data=False)
        else:
            model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{name}: not a valid ONNX model ({_first_line(exc) or 'protobuf parse error'})") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{name}: not a valid ONNX model (no graph: empty or not a model file)")
    base_dir = path.parent if path is not None else Path.cwd()
    check_external_data(model, base_dir, name)
    if uses_external_data(model):
        external_data_helper.load_external_data_for_model(model, str(base_dir))
    sort_topologically(model.graph)  # unsorted-but-valid graphs are accepted; cycles are refused
    check_model(model, name)
    if config is not None and config.inputs:
        model = pin_input_shapes(model, config.inputs, name)
    if infer:
        model = infer_shapes(model, name)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def check_model(model: onnx.ModelProto, name: str = "<model>") -> None:
    try:
        if model.ByteSize() < TWO_GIB:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(_strip_weights(model))
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise InputError(f"{name}: ONNX checker failed: {_checker_reason(exc)}") from None


def _checker_reason(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if not ln.startswith("==>") and "Context" not in ln:
            return ln[:300]
    return lines[0][:300] if lines else type(exc).__name__


def _strip_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with initializer payloads replaced by zeros of the same shape (checker only)."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for init in light.graph.initializer:
        init.ClearField("raw_data")
        init.data_location = TensorProto.DEFAULT
    return light


def infer_shapes(model: onnx.ModelProto, name: str = "<model>") -> onnx.ModelProto:
    """ONNX shape inference; a model it cannot handle keeps whatever shapes it has."""
    if model.ByteSize() >= TWO_GIB:
        return model
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as exc:
        raise InputError(f"{name}: shape inference failed: {_first_line(exc)}") from None


def pin_input_shapes(model: onnx.ModelProto, inputs: Mapping[str, InputSpec], name: str) -> onnx.ModelProto:
    """Set dynamic dims of graph inputs from the config; refuse conflicts with fixed dims."""
    graph_inputs = {i.name: i for i in model.graph.input}
    init_names = {i.name for i in model.graph.initializer}
    for input_name, spec in inputs.items():
        if input_name not in graph_inputs or input_name in init_names:
            known = ", ".join(i for i in graph_inputs if i not in init_names)
            raise InputError(f"{name}: config input '{input_name}' is not an input of the model (inputs: {known})")
        if spec.shape is None:
            continue
        tensor_type = graph_inputs[input_name].type.tensor_type
        dims = tensor_type.shape.dim
        if tensor_type.HasField("shape") and len(dims) != len(spec.shape):
            raise InputError(f"{name}: input '{input_name}' has rank {len(dims)} but the config gives shape "
                             f"{list(spec.shape)}")
        if not tensor_type.HasField("shape"):
            tensor_type.shape.dim.extend(onnx.TensorShapeProto.Dimension() for _ in spec.shape)
        for i, (dim, want) in enumerate(zip(tensor_type.shape.dim, spec.shape)):
            if dim.HasField("dim_value") and dim.dim_value >= 0 and dim.dim_value != want:
                raise InputError(f"{name}: input '{input_name}' dim {i} is fixed at {dim.dim_value}, "
                                 f"config asks {want}")
            dim.Clear()
            dim.dim_value = want
    # Stale symbolic shapes would conflict with the pinned ones: infer them again.
    del model.graph.value_info[:]
    return model


def dynamic_inputs(model: onnx.ModelProto) -> dict[str, list]:
    """Graph inputs (not initializers) with a dim that is not a fixed number."""
    init_names = {i.name for i in model.graph.initializer}
    result = {}
    for vi in model.graph.input:
        if vi.name in init_names or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            result[vi.name] = ["?"]
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or "?")
                for d in tt.shape.dim]
        if any(not isinstance(d, int) for d in dims):
            result[vi.name] = dims
    return result


# ------------------------------------------------------------------ external data
def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in _all_tensors(model))


def _all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    yield from external_data_helper._get_all_tensors(model)


def check_external_data(model: onnx.ModelProto, base_dir: Path, name: str) -> None:
    """Refuse unsafe or inconsistent external-data references before opening files."""
    base = base_dir.resolve()
    for tensor in _all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise InputError(f"{name}: tensor '{tensor.name}' has external data without a location")
        loc_path = Path(location)
        if loc_path.is_absolute() or location.startswith(("/", "\\")) or ":" in loc_path.parts[0]:
            raise InputError(f"{name}: tensor '{tensor.name}' external data location '{location}' is absolute; "
                             "only paths inside the model's folder are allowed")
        if ".." in loc_path.parts:
            raise InputError(f"{name}: tensor '{tensor.name}' external data location '{location}' contains '..'")
        full = base / loc_path
        resolved = full.resolve()
        if base not in resolved.parents and resolved != base:
            raise InputError(f"{name}: tensor '{tensor.name}' external data '{location}' resolves outside the "
                             "model's folder (symlink)")
        if not full.is_file():
            raise InputError(f"{name}: external data file '{location}' for tensor '{tensor.name}' not found "
                             f"in {base_dir}")
        size = full.stat().st_size
        offset = int(info.get("offset", 0) or 0)
        expected = _tensor_nbytes(tensor)
        length = int(info["length"]) if info.get("length") else (size - offset)
        if offset < 0 or offset + length > size:
            raise InputError(f"{name}: tensor '{tensor.name}' external data range [{offset}, {offset + length}) "
                             f"is beyond the end of '{location}' ({size} bytes)")
        if expected is not None and length != expected:
            raise InputError(f"{name}: tensor '{tensor.name}' declares {expected} bytes but its external data "
                             f"holds {length}")


def _tensor_nbytes(tensor: TensorProto) -> int | None:
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (int(np.prod(tensor.dims, dtype=np.int64)) + 1) // 2
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


# ------------------------------------------------------------------ atomic saving
@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path in ``target``'s folder; rename it onto ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_model(model: onnx.ModelProto, destination: str | Path, *, external: bool | None = None) -> None:
    """Write ``model`` atomically to a path, or to stdout for ``-``.

    Models of 2 GiB or more (or ``external=True``) put their large tensors in a side
    file ``<name>.data`` next to the model; both files are renamed into place only
    once complete. The in-memory ``model`` is not modified.
    """
    size = model.ByteSize()
    if str(destination) == "-":
        if size >= TWO_GIB:
            raise InputError("a model of 2 GiB or more cannot be written to stdout; give -o PATH")
        sys.stdout.buffer.write(model.SerializeToString())
        sys.stdout.buffer.flush()
        return
    target = Path(destination)
    if external is None:
        external = size >= TWO_GIB
    if not external:
        with atomic_path(target) as tmp:
            tmp.write_bytes(model.SerializeToString())
        return
    data_name = target.name + ".data"
    with atomic_path(target.parent / data_name) as tmp_data, atomic_path(target) as tmp_model:
        _write_external(model, tmp_model, tmp_data, data_name)


def _write_external(model: onnx.ModelProto, model_path: Path, data_path: Path, data_name: str) -> None:
    """Stream large tensors to ``data_path`` and write a light model that points at them."""
    light = onnx.ModelProto()
    light.CopyFrom(model) if model.ByteSize() < TWO_GIB else _copy_without_raw(model, light)
    originals = {t.name: t for t in _all_tensors(model)}
    with open(data_path, "wb") as fh:
        for tensor in _all_tensors(light):
            source = originals.get(tensor.name, tensor)
            raw = _raw_bytes(source)
            if raw is None or len(raw) < EXTERNAL_THRESHOLD:
                continue
            offset = fh.tell()
            fh.write(raw)
            pad = (-fh.tell()) % 4096  # page-align the next tensor, so it can be memory-mapped
            fh.write(b"\0" * pad)
            _set_external(tensor, data_name, offset, len(raw))
    model_path.write_bytes(light.SerializeToString())


def _copy_without_raw(model: onnx.ModelProto, light: onnx.ModelProto) -> None:
    stash = []
    for tensor in _all_tensors(model):
        if tensor.HasField("raw_data"):
            stash.append((tensor, tensor.raw_data))
            tensor.ClearField("raw_data")
    try:
        light.CopyFrom(model)
    finally:
        for tensor, raw in stash:
            tensor.raw_data = raw


def _raw_bytes(tensor: TensorProto) -> bytes | None:
    if tensor.data_location == TensorProto.EXTERNAL or tensor.data_type == TensorProto.STRING:
        return None
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return onnx.numpy_helper.to_array(tensor).tobytes() if _tensor_nbytes(tensor) else None


def _set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
