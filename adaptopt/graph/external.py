"""External data: safe references, weights kept on disk for huge models, light copies.

Safety: every ``location`` is checked before any file is opened: absolute paths,
``..`` and symlinks resolving outside the model's folder are refused, and the range
each tensor declares (offset, length, and the bytes its dims and type need) must lie
inside the file, so nothing is allocated from a size the file cannot back.

Huge models: when the external files a model references hold
:data:`KEEP_ON_DISK_BYTES` or more (the 2 GiB protobuf limit), weights are not read
into memory. Each large tensor stays an external reference; a ``basepath`` entry
(ONNX's own key) records the folder it was validated against, and only files
registered by :func:`attach_external_data` in this process, still the same file
(device, inode, size, mtime), are ever read from.
:func:`raw_bytes` reads one tensor at a time when a writer needs it, so splitting,
merging and saving hold one tensor at a time, never all weights (nor a copy per
subgraph). Below that size weights are loaded into memory, as ONNX Runtime sessions
made from bytes need them inline.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import TensorProto, external_data_helper, helper

from adaptopt.errors import InputError

TWO_GIB = 2**31
EXTERNAL_THRESHOLD = 1024  # tensors at least this many bytes go to a side file
KEEP_ON_DISK_BYTES = TWO_GIB  # external files this large stay on disk (tests lower it)
BASE_KEY = "basepath"
# files kept on disk by attach_external_data -> their identity then, so a file replaced
# since (e.g. saved over) is noticed instead of read at stale offsets
_kept_files: dict[str, tuple[int, int, int, int]] = {}


def all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    yield from external_data_helper._get_all_tensors(model)


def nested_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor but the main graph's initializers: node attributes, control-flow bodies, functions."""
    for node in model.graph.node:
        for attribute in node.attribute:
            yield from external_data_helper._recursive_attribute_processor(
                attribute, external_data_helper._get_initializer_tensors_from_graph)
    yield from external_data_helper._get_attribute_tensors(model)


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in all_tensors(model))


def tensor_nbytes(tensor: TensorProto) -> int | None:
    """Bytes the tensor's dims and type need, None for strings/unknown types, -1 for negative dims."""
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if any(d < 0 for d in tensor.dims):
        return -1
    count = math.prod(tensor.dims)  # exact: numpy's int64 product wraps, and wrapped dims could match
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (count + 1) // 2
    return count * itemsize


def _safe_path(base: Path, location: str, tensor_name: str, name: str) -> Path:
    """``base/location`` after refusing absolute paths, ``..`` and symlinks that leave ``base``."""
    if not location:
        raise InputError(f"{name}: tensor '{tensor_name}' has external data without a location")
    loc_path = Path(location)
    if loc_path.is_absolute() or location.startswith(("/", "\\")) or ":" in loc_path.parts[0]:
        raise InputError(f"{name}: tensor '{tensor_name}' external data location '{location}' is absolute; "
                         "only paths inside the model's folder are allowed")
    if ".." in loc_path.parts or ".." in location.replace("\\", "/").split("/"):
        raise InputError(f"{name}: tensor '{tensor_name}' external data location '{location}' contains '..'")
    full = base / loc_path
    resolved = full.resolve()
    if base not in resolved.parents:
        raise InputError(f"{name}: tensor '{tensor_name}' external data '{location}' resolves outside the "
                         "model's folder (symlink)")
    return resolved


def external_info(tensor: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _checked_range(tensor: TensorProto, info: dict[str, str], size: int, name: str) -> tuple[int, int]:
    location = info.get("location", "")
    try:
        offset = int(info.get("offset") or 0)
        length = int(info["length"]) if info.get("length") else size - offset
    except ValueError:
        raise InputError(f"{name}: tensor '{tensor.name}' has a non-numeric external data offset/length") from None
    if offset < 0 or length < 0 or offset + length > size:
        raise InputError(f"{name}: tensor '{tensor.name}' external data range [{offset}, {offset + length}) "
                         f"is beyond the end of '{location}' ({size} bytes)")
    expected = tensor_nbytes(tensor)
    if expected is not None and expected < 0:
        raise InputError(f"{name}: tensor '{tensor.name}' has negative dims {list(tensor.dims)}")
    if expected is not None and length != expected:
        raise InputError(f"{name}: tensor '{tensor.name}' declares {expected} bytes but its external data "
                         f"holds {length}")
    return offset, length


def check_external_data(model: onnx.ModelProto, base_dir: Path, name: str) -> dict[Path, int]:
    """Refuse unsafe or inconsistent external-data references; no data file is read.

    Returns the size of every referenced file (only ``stat`` is called on them).
    """
    base = Path(base_dir).resolve()
    sizes: dict[Path, int] = {}
    for tensor in all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = external_info(tensor)
        location = info.get("location", "")
        full = _safe_path(base, location, tensor.name, name)
        if not full.is_file():
            raise InputError(f"{name}: external data file '{location}' for tensor '{tensor.name}' not found "
                             f"in {base_dir}")
        if full not in sizes:
            sizes[full] = full.stat().st_size
        _checked_range(tensor, info, sizes[full], name)
    return sizes


def attach_external_data(model: onnx.ModelProto, base_dir: Path, name: str) -> None:
    """Check the model's external data, then load it, or keep it on disk for huge files.

    Tensors smaller than :data:`EXTERNAL_THRESHOLD` are always loaded (shape
    inference reads small constants such as Reshape targets), and so are tensors
    inside nodes (Constant values, control-flow bodies): subgraph files copy nodes
    whole, so only main-graph initializers can be shared through ``weights.bin``.
    """
    sizes = check_external_data(model, base_dir, name)
    if not sizes:
        return
    base = Path(base_dir).resolve()
    keep = sum(sizes.values()) >= KEEP_ON_DISK_BYTES
    declared = sum(int(external_info(t).get("length") or 0) for t in all_tensors(model)
                   if t.data_location == TensorProto.EXTERNAL)
    if not keep and declared > sum(sizes.values()):
        # each range fits its file, but overlapping ones could make loading allocate without bound
        raise InputError(f"{name}: external data ranges overlap: tensors declare {declared} bytes from files "
                         f"holding {sum(sizes.values())}")
    if keep:
        _kept_files.update((str(path), _identity(path)) for path in sizes)
    main = len(model.graph.initializer)
    for position, tensor in enumerate(all_tensors(model)):  # main-graph initializers come first
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {k: v for k, v in external_info(tensor).items() if k != BASE_KEY}
        _, length = _checked_range(tensor, info, sizes[_safe_path(base, info["location"], tensor.name, name)], name)
        if keep and length >= EXTERNAL_THRESHOLD and position < main:
            set_external(tensor, info["location"], int(info.get("offset") or 0), length, base=str(base))
        else:
            data = _read_range(base, info, tensor, name)
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
            tensor.raw_data = data


def _read_range(base: Path, info: dict[str, str], tensor: TensorProto, name: str) -> bytes:
    path = _safe_path(base, info.get("location", ""), tensor.name, name)
    try:
        size = path.stat().st_size
        offset, length = _checked_range(tensor, info, size, name)
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
    except OSError as exc:
        raise InputError(f"{name}: cannot read external data of tensor '{tensor.name}': {exc.strerror}") from None
    if len(data) != length:
        raise InputError(f"{name}: external data of tensor '{tensor.name}' was truncated while reading")
    return data


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def kept_files() -> dict[str, tuple[int, int, int, int]]:
    """The external-data files this process loaded and checked, with their identities."""
    return dict(_kept_files)


def trust_kept_files(files: dict[str, tuple[int, int, int, int]]) -> None:
    """Adopt another adaptopt process's checked files (a worker serving its parent)."""
    _kept_files.update(files)


def checked_file(tensor: TensorProto) -> Path:
    """The file of a tensor kept on disk, after checking it is one this process loaded, unchanged."""
    info = external_info(tensor)
    location = info.get("location", "")
    name = f"tensor '{tensor.name}'"
    base = Path(info.get(BASE_KEY, ""))
    path = _safe_path(base, location, tensor.name, name) if base.is_absolute() else None
    if path is None or str(path) not in _kept_files:
        raise InputError(f"{name} refers to external data '{location}' that was not loaded through adaptopt")
    try:
        same = _identity(path) == _kept_files[str(path)]
    except OSError:
        same = False
    if not same:
        raise InputError(f"{name}: external data file {path} was replaced or changed since the model was loaded")
    return path


def read_external_bytes(tensor: TensorProto) -> bytes:
    """The bytes of a tensor kept on disk by :func:`attach_external_data`."""
    checked_file(tensor)
    info = external_info(tensor)
    return _read_range(Path(info[BASE_KEY]), info, tensor, f"tensor '{tensor.name}'")


def on_disk(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL and BASE_KEY in external_info(tensor)


def raw_bytes(tensor: TensorProto) -> bytes | None:
    """The tensor's payload as little-endian bytes (read from disk when kept there), or None."""
    if tensor.data_type == TensorProto.STRING:
        return None
    if tensor.data_location == TensorProto.EXTERNAL:
        return read_external_bytes(tensor) if on_disk(tensor) else None
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return onnx.numpy_helper.to_array(tensor).tobytes() if tensor_nbytes(tensor) else None


def mapped_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Read-only memory maps of the main-graph initializers kept on disk, by name.

    For ONNX Runtime sessions of such models: keep the model as it is (its external
    stubs) and pass these with ``SessionOptions.add_external_initializers(names,
    [OrtValue.ortvalue_from_numpy(a) for a in arrays])``; pages are read on demand,
    no weight is copied into the model.
    """
    maps = {}
    for tensor in model.graph.initializer:
        if not on_disk(tensor):
            continue
        checked_file(tensor)
        info = external_info(tensor)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        path = Path(info[BASE_KEY]) / info["location"]
        maps[tensor.name] = np.memmap(path, dtype=dtype, mode="r", offset=int(info.get("offset") or 0),
                                      shape=tuple(tensor.dims))
    return maps


def set_external(tensor: TensorProto, location: str, offset: int, length: int, base: str | None = None) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    entries = [("location", location), ("offset", str(offset)), ("length", str(length))]
    if base is not None:
        entries.append((BASE_KEY, base))
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


# ---------------------------------------------------------------- light copies
def byte_size(model: onnx.ModelProto) -> int:
    """Serialized size; protobuf refuses to even count past 2 GiB, so that reads as 2 GiB."""
    try:
        return model.ByteSize()
    except EncodeError:
        return TWO_GIB


def is_heavy(tensor: TensorProto) -> bool:
    """Weights a light copy leaves out: on disk, or at least EXTERNAL_THRESHOLD bytes inline."""
    if tensor.data_location == TensorProto.EXTERNAL:
        return True
    return tensor.data_type != TensorProto.STRING and tensor.ByteSize() >= EXTERNAL_THRESHOLD


def light_copy(model: onnx.ModelProto, stub_location: str | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose heavy main-graph initializers carry no data.

    Nothing of the original is modified and no weight is copied. Heavy tensors
    become external references: to ``stub_location`` (offset 0, their declared
    length) when given, else with no entries (the caller fills them in).
    """
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    for tensor in model.graph.initializer:
        if not is_heavy(tensor):
            light.graph.initializer.append(tensor)
            continue
        stub = light.graph.initializer.add()
        stub.name, stub.data_type, stub.doc_string = tensor.name, tensor.data_type, tensor.doc_string
        stub.dims.extend(tensor.dims)
        stub.data_location = TensorProto.EXTERNAL
        if stub_location is not None:
            set_external(stub, stub_location, 0, max(tensor_nbytes(tensor) or 0, 0))
    return light


def _copy_fields(src, dst, skip: str) -> None:
    for descriptor, value in src.ListFields():
        if descriptor.name == skip:
            continue
        target = getattr(dst, descriptor.name)
        if _is_repeated(descriptor):
            target.extend(value)
        elif descriptor.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(dst, descriptor.name, value)


def _is_repeated(descriptor) -> bool:
    if hasattr(descriptor, "is_repeated"):  # protobuf >= 6 dropped ``label``
        return bool(descriptor.is_repeated)
    return descriptor.label == descriptor.LABEL_REPEATED
