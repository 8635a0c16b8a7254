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

import io
import math
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf import unknown_fields
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


def check_external_data(model: onnx.ModelProto, base_dir: Path, name: str,
                        skip: Collection[int] = ()) -> dict[Path, int]:
    """Refuse unsafe or inconsistent external-data references; no data file is read.

    Returns the size of every referenced file (only ``stat`` is called on them).
    ``skip``: positions of main-graph initializers to leave alone.
    """
    base = Path(base_dir).resolve()
    sizes: dict[Path, int] = {}
    for position, tensor in enumerate(all_tensors(model)):  # main-graph initializers come first
        if tensor.data_location != TensorProto.EXTERNAL or position in skip:
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


def attach_external_data(model: onnx.ModelProto, base_dir: Path, name: str, skip: Collection[int] = ()) -> None:
    """Check the model's external data, then load it, or keep it on disk for huge files.

    Tensors smaller than :data:`EXTERNAL_THRESHOLD` are always loaded (shape
    inference reads small constants such as Reshape targets), and so are tensors
    inside nodes (Constant values, control-flow bodies): subgraph files copy nodes
    whole, so only main-graph initializers can be shared through ``weights.bin``.
    ``skip``: positions of main-graph initializers to leave alone (``io._Deferred``).
    """
    sizes = check_external_data(model, base_dir, name, skip)
    if not sizes:
        return
    base = Path(base_dir).resolve()
    keep = sum(sizes.values()) >= KEEP_ON_DISK_BYTES
    declared = sum(int(external_info(t).get("length") or 0) for position, t in enumerate(all_tensors(model))
                   if t.data_location == TensorProto.EXTERNAL and position not in skip)
    if not keep and declared > sum(sizes.values()):
        # each range fits its file, but overlapping ones could make loading allocate without bound
        raise InputError(f"{name}: external data ranges overlap: tensors declare {declared} bytes from files "
                         f"holding {sum(sizes.values())}")
    if keep:
        _kept_files.update((str(path), _identity(path)) for path in sizes)
    main = len(model.graph.initializer)
    for position, tensor in enumerate(all_tensors(model)):  # main-graph initializers come first
        if tensor.data_location != TensorProto.EXTERNAL or position in skip:
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
    return stat_identity(path.stat())


def stat_identity(st) -> tuple[int, int, int, int]:
    """A file's device, inode, size and modification time: it is the same file, unchanged."""
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
    """Serialized size, counted piece by piece (no serialized copy of the model is made);
    protobuf refuses to count past 2 GiB, so that reads as 2 GiB."""
    try:
        if has_unknown_fields(model) or has_unknown_fields(model.graph):  # pieces leave them out
            return model.ByteSize()
        return min(ModelPieces(model).size(), TWO_GIB)
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
    :func:`light_pieces` writes the same bytes without copying the nodes.
    """
    light = onnx.ModelProto()
    copy_fields(model, light, skip=("graph",))
    copy_fields(model.graph, light.graph, skip=("initializer",))
    for tensor in model.graph.initializer:
        light.graph.initializer.append(stub_tensor(tensor, stub_location) if is_heavy(tensor) else tensor)
    return light


def stub_tensor(tensor: TensorProto, stub_location: str | None = None) -> TensorProto:
    """``tensor``'s name, type, dims and doc string (those it has), stored externally, with no data."""
    stub = TensorProto()
    for field in ("name", "data_type", "doc_string"):
        if tensor.HasField(field):
            setattr(stub, field, getattr(tensor, field))
    stub.dims.extend(tensor.dims)
    stub.data_location = TensorProto.EXTERNAL
    if stub_location is not None:
        set_external(stub, stub_location, 0, max(tensor_nbytes(tensor) or 0, 0))
    return stub


def light_pieces(model: onnx.ModelProto, stub_location: str, *, value_info: bool = True) -> ModelPieces:
    """``light_copy(model, stub_location)``, every other external tensor (in nodes, bodies
    and functions) also pointed at ``stub_location``, as pieces: written, the bytes of
    that copy, but no node is copied unless it holds such a tensor. ``value_info=False``
    leaves the main graph's value infos out (the ONNX checker never reads them)."""
    head = model
    if any(_is_external(t) for f in model.functions for t in external_data_helper._get_attribute_tensors_from_graph(f)):
        head = onnx.ModelProto()
        copy_fields(model, head, skip=("graph",))
        copy_fields(model.graph, head.graph, skip=("node", "initializer", "value_info"))
        if model.HasField("graph"):
            head.graph.SetInParent()
        for function in head.functions:
            _stub_external(external_data_helper._get_attribute_tensors_from_graph(function), stub_location)
    patched = {}
    for position, node in enumerate(model.graph.node):
        if node.attribute and any(_is_external(t) for t in node_tensors(node)):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            _stub_external(node_tensors(copy), stub_location)
            patched[position] = copy
    nodes = [patched.get(i, n) for i, n in enumerate(model.graph.node)] if patched else model.graph.node
    inits = [stub_tensor(t, stub_location).SerializeToString() if is_heavy(t) else t for t in model.graph.initializer]
    # ``model``'s own lists, not ``head``'s: a head built for patched functions has none
    return ModelPieces(head, node=nodes, initializer=inits, value_info=model.graph.value_info if value_info else ())


def inference_pieces(model: onnx.ModelProto) -> ModelPieces:
    """The model shape inference runs on: heavy main-graph initializers become typed graph
    inputs (those not listed already), so no weight is written and ONNX's data propagation
    only sees small constants. Overridable initializers (listed as inputs, IR >= 4) are left
    out too: inferred from their default, a Reshape shape the user may feed looked static,
    and passes removed or folded it."""
    from adaptopt.graph.index import overridable_initializers
    keep, extra = [], []
    listed = {i.name for i in model.graph.input}
    overridable = overridable_initializers(model)
    for tensor in model.graph.initializer:
        if tensor.name in overridable:
            continue  # listed: a typed input whose value inference does not see
        if not is_heavy(tensor):
            keep.append(tensor)
        elif tensor.name not in listed:
            extra.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                         .SerializeToString())
    return ModelPieces(model, initializer=keep, extra_inputs=extra)


def node_tensors(node: onnx.NodeProto) -> Iterator[TensorProto]:
    """Tensors inside one node: attribute values, and initializers and attributes of its bodies."""
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for body in bodies:
            yield from body.initializer
            for inner in body.node:
                yield from node_tensors(inner)


def _is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def _stub_external(tensors: Iterator[TensorProto], stub_location: str) -> None:
    for tensor in list(tensors):
        if _is_external(tensor):
            set_external(tensor, stub_location, 0, max(tensor_nbytes(tensor) or 0, 0))


def copy_fields(src, dst, skip: tuple[str, ...]) -> None:
    """Copy every field ``src`` has, but those named in ``skip``, into ``dst``."""
    for descriptor, value in src.ListFields():
        if descriptor.name not in skip:
            _set_field(dst, descriptor, value)


def _set_field(dst, descriptor, value) -> None:
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


# ---------------------------------------------------------------- piecewise serialization
# A ModelProto written field by field, in field-number order, is byte for byte what
# ``SerializeToString`` gives; the graph's three big repeated fields (node,
# initializer, value_info) are written one element at a time. So a model is saved,
# and light copies reach the ONNX checker and shape inference, without a serialized
# copy of the whole model in memory nor a Python copy of its nodes.
_GRAPH = 7  # ModelProto.graph
_NODE, _INITIALIZER, _INPUT, _VALUE_INFO = 1, 5, 11, 13  # GraphProto fields
BLOCK_BYTES = 4 << 20  # scans and parses read files in blocks about this large
_WRITE_BYTES = 256 << 10  # pieces are written in chunks about this large


def varint(value: int) -> bytes:
    if value < len(_SMALL_VARINTS):
        return _SMALL_VARINTS[value]
    return _varint(value)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


_SMALL_VARINTS = [_varint(n) for n in range(1 << 14)]  # every length below 16 KiB: one or two bytes


def varint_sizes(values: np.ndarray) -> np.ndarray:
    """Bytes each of ``values`` (non-negative) takes as a varint."""
    values = np.asarray(values, dtype=np.uint64)
    size = np.ones(values.shape, dtype=np.int64)
    for bits in range(7, 64, 7):
        size += values >= np.uint64(1 << bits)
    return size


def length_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: key, length, payload."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def has_unknown_fields(message) -> bool:
    """Fields the schema does not know, which piecewise writing would drop (then use SerializeToString)."""
    return len(unknown_fields.UnknownFieldSet(message)) > 0


class ModelPieces:
    """``model`` as it serializes, with its graph's node, initializer and value_info lists
    replaced by ``node``, ``initializer`` and ``value_info`` when given, and ``extra_inputs``
    appended to the graph inputs. Elements are messages, or ``bytes`` already serialized.
    A sequence of elements may offer ``payload_sizes()`` (each element's serialized size
    as an array, or None): the size of the model is then counted without serializing them.

    ``model``'s own top-level and graph-level unknown fields are not written.
    """

    def __init__(self, model: onnx.ModelProto, *, node=None, initializer=None, value_info=None,
                 extra_inputs=()) -> None:
        graph = model.graph
        self.model = model
        self.groups = {_NODE: graph.node if node is None else node,
                       _INITIALIZER: graph.initializer if initializer is None else initializer,
                       _VALUE_INFO: graph.value_info if value_info is None else value_info}
        self.extra_inputs = extra_inputs

    def _graph_sections(self) -> list:
        """The graph's content in field-number order: bytes, or (field number, elements)."""
        graph = self.model.graph
        return [(_NODE, self.groups[_NODE]), _fields_bytes(graph, 1, 5), (_INITIALIZER, self.groups[_INITIALIZER]),
                _fields_bytes(graph, 5, _INPUT + 1), (_INPUT, self.extra_inputs), _fields_bytes(graph, _INPUT + 1, 13),
                (_VALUE_INFO, self.groups[_VALUE_INFO]), _fields_bytes(graph, 13, None)]

    def _sections(self) -> tuple[bytes, list, bytes, bool]:
        graph_sections = self._graph_sections()
        present = self.model.HasField("graph") or any(not isinstance(s, bytes) and len(s[1]) for s in graph_sections)
        return _fields_bytes(self.model, 0, _GRAPH), graph_sections, _fields_bytes(self.model, _GRAPH + 1, None), present

    def size(self) -> int:
        """Bytes the model serializes to."""
        head, graph_sections, tail, present = self._sections()
        size = len(head) + len(tail)
        if present:
            inner = sum(_section_size(s) for s in graph_sections)
            size += len(varint(_GRAPH << 3 | 2)) + len(varint(inner)) + inner
        return size

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.write(buffer)
        return buffer.getvalue()

    def write(self, fh) -> int:
        """Write the serialized model to the binary file ``fh``; returns the bytes written."""
        head, graph_sections, tail, present = self._sections()
        out = bytearray(head)
        written = len(head)
        if present:
            inner = sum(_section_size(s) for s in graph_sections)
            out += varint(_GRAPH << 3 | 2) + varint(inner)
            written += len(varint(_GRAPH << 3 | 2)) + len(varint(inner)) + inner
            for section in graph_sections:
                if isinstance(section, bytes):
                    out += section
                    continue
                number, elements = section
                key = varint(number << 3 | 2)
                for element in elements:
                    data = element if isinstance(element, bytes) else element.SerializeToString()
                    out += key
                    out += varint(len(data))
                    out += data
                    if len(out) >= _WRITE_BYTES:
                        fh.write(out)
                        out.clear()
        out += tail
        fh.write(out)
        return written + len(tail)


def _fields_bytes(message, low: int, high: int | None) -> bytes:
    """The serialized fields of ``message`` numbered in [low, high), as they appear in its serialization."""
    part = type(message)()
    for descriptor, value in message.ListFields():
        if descriptor.number >= low and (high is None or descriptor.number < high) \
                and not (isinstance(message, onnx.GraphProto) and descriptor.number in (_NODE, _INITIALIZER, _VALUE_INFO)):
            _set_field(part, descriptor, value)
    return part.SerializeToString()


def _section_size(section) -> int:
    if isinstance(section, bytes):
        return len(section)
    number, elements = section
    key = len(varint(number << 3 | 2))
    sizes = elements.payload_sizes() if hasattr(elements, "payload_sizes") else None
    if sizes is not None:
        return int(key * len(sizes) + varint_sizes(sizes).sum() + sizes.sum())
    total = 0
    for element in elements:
        n = len(element) if isinstance(element, bytes) else element.ByteSize()
        total += key + len(varint(n)) + n
    return total


def scan_fields(buf, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, end) of each field of the message in ``buf[start:end]``.

    Varints, fixed 32/64-bit values and length-delimited fields (whose value excludes the
    length); raises ``ValueError`` on groups or on anything malformed.
    """
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        field_start = pos
        key, pos = read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value_start = pos
            _, pos = read_varint(buf, pos, end)
        elif wire == 2:
            length, value_start = read_varint(buf, pos, end)
            pos = value_start + length
        elif wire in (1, 5):
            value_start, pos = pos, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire} not supported")
        if number == 0 or pos > end:
            raise ValueError("malformed message")
        yield number, wire, field_start, value_start, pos


def read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("malformed varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
