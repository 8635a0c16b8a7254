"""Model I/O: read from a path or stdin, external data in and out, atomic writes.

Loading refuses bad input with one :class:`InputError` line before anything else
looks at it, in this order: empty, unparsable or 2 GiB single files (protobuf also
refuses messages nested more than 100 levels); graphs nested more than
``checks.MAX_GRAPH_DEPTH`` levels; names that are not printable text; opsets and
operators the installed ONNX Runtime does not implement; duplicate, undefined or
cyclic tensors (nodes stored out of order are sorted); unsafe or inconsistent
external data (``graph/external.py``: checked before any data file is opened); then
the ONNX checker and shape inference, and dynamic dims are pinned from the config.

Saving is atomic: a temp file in the target folder renamed onto the target, so an
interrupted or failed write leaves the previous file (or none) and no temp file.

Memory (issue 2): no step holds a second whole copy of a model. A large file is parsed
a block at a time and its large raw weights are read last, after the checker and shape
inference, which run in ONNX's C++ code on light copies written piece by piece to temp
files (``external.ModelPieces``); large files are saved piece by piece too.
"""

from __future__ import annotations

import array
import contextlib
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from adaptopt.config import Config, InputSpec
from adaptopt.errors import InputError
from adaptopt.graph.index import raise_to_ir_4
from adaptopt.graph.checks import (
    check_graph_names,
    check_names_are_text,
    check_nesting,
    check_operators,
    check_opsets,
    node_bodies,
)
from adaptopt.graph.external import (  # some re-exported for the graph modules
    BLOCK_BYTES,
    EXTERNAL_THRESHOLD,
    TWO_GIB,
    ModelPieces,
    all_tensors,
    attach_external_data,
    byte_size,
    copy_fields,
    external_info,
    has_unknown_fields,
    inference_pieces,
    is_heavy,
    length_field,
    light_copy,
    light_pieces,
    nested_tensors,
    on_disk,
    raw_bytes,
    read_varint,
    scan_fields,
    set_external,
    stat_identity,
    tensor_nbytes,
    uses_external_data,
)

DATA_PROP_MAX_LENGTH = 1 << 16  # ONNX data propagation costs ~200 bytes per element
STREAM_BYTES = 1 << 20  # model files this large are written piece by piece, never whole in memory

# Older names, kept for the modules that import them from here.
_all_tensors, _raw_bytes, _set_external, _tensor_nbytes = all_tensors, raw_bytes, set_external, tensor_nbytes


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


def parse_model(source: str | Path, name: str | None = None) -> tuple[onnx.ModelProto, Path | None]:
    """Parse a model (weights left external) and refuse what is not one, or is nested too deeply."""
    model, path, _ = _parse(source, name, defer=False)
    return model, path


def _parse(source: str | Path, name: str | None, defer: bool) -> tuple[onnx.ModelProto, Path | None, _Deferred | None]:
    """``parse_model``; with ``defer``, large raw weights of a file are left in it (:class:`_Deferred`)."""
    data, path = read_model_bytes_or_path(source)
    name = name or ("<stdin>" if path is None else str(path))
    if data is not None and not data:
        raise InputError(f"{name}: empty input, not an ONNX model")
    if path is not None and path.stat().st_size >= TWO_GIB:
        raise InputError(f"{name}: a single ONNX file cannot hold 2 GiB or more (protobuf's limit); "
                         "store the weights as external data")
    deferred = None
    head = b""  # the first bytes, to name a compressed or zipped model (_packed_reason)
    try:
        if path is not None:
            model, deferred, head = _read_model_file(path, defer)
        else:
            head = data[:8]
            if head.startswith(NOT_PROTOBUF):
                raise _Packed(head)
            model = onnx.ModelProto()
            model.ParseFromString(data)
    except _Packed as exc:
        raise InputError(f"{name}: not a valid ONNX model ({_packed_reason(exc.head)})") from None
    except DecodeError as exc:
        raise InputError(f"{name}: not a valid ONNX model ({_packed_reason(head) or _decode_reason(exc)})") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read: {exc.strerror}") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{name}: not a valid ONNX model "
                         f"({_packed_reason(head) or 'no graph: empty or not a model file'})")
    check_nesting(model, name)
    check_names_are_text(model, name)
    return model, path, deferred


def _read_model_file(path: Path, defer: bool = False) -> tuple[onnx.ModelProto, _Deferred | None, bytes]:
    """Parse a model file; one larger than :data:`BLOCK_BYTES` is read a block at a time.

    Protobuf parses concatenated messages as one merged message, so merging the file's
    top-level fields one by one, and its graph in runs of whole elements (each wrapped
    as a ``graph`` field, so nesting depth counts as in one parse), gives exactly what
    parsing the whole file gives, without the file's bytes in memory beside the model.
    A layout the block reader does not follow (groups, malformed fields) is parsed whole,
    so protobuf itself accepts or refuses it. With ``defer``, large raw weights are left
    in the file until :meth:`_Deferred.fill` (None when there are none). Also returns the
    file's first bytes; a file that starts as no model can (gzip, zip) raises :class:`_Packed`
    before it is parsed, another compressed file (bzip2, xz, zstd) when protobuf refuses it.
    """
    model = onnx.ModelProto()
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        head = fh.read(8)
        if head.startswith(NOT_PROTOBUF):
            raise _Packed(head)
        fh.seek(0)
        try:
            if st.st_size > BLOCK_BYTES:
                deferred = _Deferred(path, st) if defer else None
                try:
                    for part in _model_parts(_BlockReader(fh, st.st_size), deferred):
                        model.MergeFromString(part)
                    return model, deferred if deferred is not None and deferred.entries else None, head
                except ValueError:
                    fh.seek(0)
                    model = onnx.ModelProto()
            model.ParseFromString(fh.read())
        except DecodeError:
            if _packed_reason(head):  # bzip2, xz, zstd: named once protobuf refuses them
                raise _Packed(head) from None
            raise
    return model, None, head


class _Deferred:
    """Main-graph initializers parsed without their raw weights, which stay in the model file.

    Such a tensor holds only its name, type and dims and reads as stored externally
    with no location, so light copies stub it and shape inference sees a typed input
    exactly as for the whole tensor; the ONNX checker has nothing to say about it (raw
    data of a numeric type whose size matches its dims). :meth:`fill` reads each raw
    data from the file into it, giving the tensor a full parse would have given.
    """

    def __init__(self, path: Path, st: os.stat_result) -> None:
        self.path, self.identity = path, stat_identity(st)
        self.entries: list[tuple[int, int, int]] = []  # (initializer position, raw data's file offset, length)

    @property
    def positions(self) -> set[int]:
        return {position for position, _, _ in self.entries}

    def fill(self, model: onnx.ModelProto, name: str) -> None:
        initializers = model.graph.initializer
        try:
            with open(self.path, "rb") as fh:
                if stat_identity(os.fstat(fh.fileno())) != self.identity:
                    raise InputError(f"{name}: the file changed while it was being loaded")
                for position, offset, length in sorted(self.entries, key=lambda e: e[1]):
                    fh.seek(offset)
                    data = fh.read(length)
                    if len(data) != length:
                        raise InputError(f"{name}: the file changed while it was being loaded")
                    tensor = initializers[position]  # nothing since the parse added, moved or dropped one
                    tensor.ClearField("data_location")  # what the parse left out, and only that
                    tensor.raw_data = data
        except OSError as exc:
            raise InputError(f"{name}: cannot read its weights again: {exc.strerror}") from None


_DEFERRABLE_FIELDS = frozenset({1, 2, 3, 8, 9, 12, 16})  # TensorProto: dims, type, segment, name, raw, doc, metadata
_INITIALIZER_KEY, _RAW_DATA = 5 << 3 | 2, 9


def _stripped_tensor(buf: bytes, start: int, end: int) -> tuple[bytes, int, int] | None:
    """The TensorProto in ``buf[start:end]`` without its raw data and marked external, with
    where that raw data is in ``buf`` (start, length), when it is one whose raw data can wait
    (see :class:`_Deferred`), else None."""
    try:
        fields = list(scan_fields(buf, start, end))
    except ValueError:
        return None
    raw = [f for f in fields if f[0] == _RAW_DATA]
    if len(raw) != 1 or raw[0][1] != 2 or any(f[0] not in _DEFERRABLE_FIELDS for f in fields):
        return None
    raw_length = raw[0][4] - raw[0][3]
    stripped = b"".join(buf[f[2]:f[4]] for f in fields if f[0] != _RAW_DATA) + b"\x70\x01"  # data_location
    probe = onnx.TensorProto()
    try:
        probe.ParseFromString(stripped)
    except DecodeError:
        return None
    if raw_length < EXTERNAL_THRESHOLD or not probe.HasField("data_type") or tensor_nbytes(probe) != raw_length:
        return None
    return stripped, raw[0][3], raw_length


class _BlockReader:
    """A file read in blocks; ``buf[anchor:]`` stays in memory until the caller moves ``anchor``."""

    def __init__(self, fh, size: int) -> None:
        self.fh, self.size = fh, size
        self.buf, self.base, self.pos, self.anchor = b"", 0, 0, 0

    def tell(self) -> int:
        return self.base + self.pos

    def fill(self, need: int) -> None:
        """Make ``buf[pos:pos + need]`` available; ``ValueError`` past the end of the file."""
        have = len(self.buf) - self.pos
        if have >= need:
            return
        if self.tell() + need > self.size:
            raise ValueError("field runs past the end of the file")
        more = self.fh.read(max(need - have, BLOCK_BYTES))
        self.base += self.anchor
        self.buf, self.pos, self.anchor = self.buf[self.anchor:] + more, self.pos - self.anchor, 0
        if len(self.buf) - self.pos < need:
            raise ValueError("file shorter than its size")

    def varint(self) -> int:
        self.fill(min(10, self.size - self.tell()))
        value, self.pos = read_varint(self.buf, self.pos, len(self.buf))
        return value

    def skip(self, wire: int) -> None:
        """Move past the value of a field of wire type ``wire``."""
        if wire == 0:
            self.varint()
            return
        if wire == 2:
            n = self.varint()
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")
        self.fill(n)
        self.pos += n


def _model_parts(reader: _BlockReader, deferred: _Deferred | None) -> Iterator[bytes]:
    """The file's top-level fields, each graph field cut into runs of whole elements."""
    position = 0  # of the next initializer
    while reader.tell() < reader.size:
        reader.anchor = reader.pos
        key = reader.varint()
        if key >> 3 == 0:
            raise ValueError("field number 0")
        if key != (7 << 3 | 2):  # ModelProto.graph
            reader.skip(key & 7)
            yield reader.buf[reader.anchor:reader.pos]
            continue
        end = reader.varint()
        end += reader.tell()
        if end > reader.size:
            raise ValueError("graph runs past the end of the file")
        yield length_field(7, b"")  # the graph is present even when empty
        while reader.tell() < end:
            reader.anchor = reader.pos
            pieces, size = [], 0
            while reader.tell() < end and size + reader.pos - reader.anchor < BLOCK_BYTES:
                element = reader.tell()
                key = reader.varint()
                if key >> 3 == 0:
                    raise ValueError("field number 0")
                if key != _INITIALIZER_KEY:
                    reader.skip(key & 7)
                    continue
                length = reader.varint()
                reader.fill(length)
                value, reader.pos = reader.pos, reader.pos + length
                stripped = None
                if deferred is not None and length >= EXTERNAL_THRESHOLD:
                    stripped = _stripped_tensor(reader.buf, value, reader.pos)
                if stripped is not None:
                    tensor, raw_start, raw_length = stripped
                    pieces += (reader.buf[reader.anchor:element - reader.base], length_field(5, tensor))
                    size += len(pieces[-2]) + len(pieces[-1])
                    deferred.entries.append((position, reader.base + raw_start, raw_length))
                    reader.anchor = reader.pos
                position += 1
            if reader.tell() > end:
                raise ValueError("graph element runs past the graph")
            pieces.append(reader.buf[reader.anchor:reader.pos])
            yield length_field(7, b"".join(pieces))
    reader.anchor = reader.pos


# leading bytes of packed files a model is often shipped in -> what to say; gzip's and zip's
# can start no protobuf message (field 3 of wire type 7; a field number 0 after "PK"), so a
# file starting with them is refused before it is parsed
PACKED_MAGIC = {
    b"\x1f\x8b": "gzip-compressed: decompress it first, e.g. with gunzip",
    b"PK\x03\x04": "a zip archive: extract the .onnx file from it first",
    b"BZh": "bzip2-compressed: decompress it first, e.g. with bunzip2",
    b"\xfd7zXZ\x00": "xz-compressed: decompress it first, e.g. with unxz",
    b"\x28\xb5\x2f\xfd": "zstd-compressed: decompress it first, e.g. with unzstd",
}
NOT_PROTOBUF = (b"\x1f\x8b", b"PK\x03\x04")


class _Packed(Exception):
    """A model file (or stdin) that is a compressed file or an archive (:data:`PACKED_MAGIC`)."""

    def __init__(self, head: bytes) -> None:
        super().__init__()
        self.head = head


def _packed_reason(head: bytes) -> str | None:
    """What a file starting with ``head`` is when it is a known compressed or archive format."""
    return next((reason for magic, reason in PACKED_MAGIC.items() if head.startswith(magic)), None)


def _decode_reason(exc: DecodeError) -> str:
    if "MaxDepth" in str(exc):
        return "messages nested more than protobuf's 100-level limit"
    return "protobuf parse error: corrupt, truncated or not a model file"


def load_model(source: str | Path, config: Config | None = None, *, infer: bool = True) -> onnx.ModelProto:
    """Load, check, shape-infer and pin a model.

    External data is loaded into memory, or kept on disk when its files hold 2 GiB
    or more (``graph/external.py``). The large raw weights of a model file are read
    last, after the checker and shape inference, which only see light copies
    (:class:`_Deferred`): they are never in memory beside those copies.
    """
    return load_model_and_signature(source, config, infer=infer)[0]


def load_model_and_signature(source: str | Path, config: Config | None = None, *, infer: bool = True
                             ) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """:func:`load_model`, and the model's own signature (:func:`signature_model`, taken
    before the config pins its dims): what a split's root file keeps, so a merge gets
    the user's dynamic dims back. No second copy of the weights is made."""
    model, path, deferred = _parse(source, None, defer=True)
    name = "<stdin>" if path is None else str(path)
    check_opsets(model, name)
    check_operators(model, name)
    check_graph_names(model, name)  # before any weight is read: refusing is cheap
    skip = deferred.positions if deferred is not None else ()
    attach_external_data(model, path.parent if path is not None else Path.cwd(), name, skip=skip)
    check_model(model, name, structure=False)
    # IR < 4 requires every initializer to be a graph input too, and there they are still
    # constants; at IR 4 a listed one is an input the user may feed. Subgraphs and merged
    # models list only real inputs, so the model moves to IR 4 without those listings.
    raise_to_ir_4(model)
    signature = signature_model(model)
    if config is not None and config.inputs:
        model = pin_input_shapes(model, config.inputs, name)
    if infer:
        model = infer_shapes(model, name)
    if deferred is not None:
        deferred.fill(model, name)
    return model, signature


def signature_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without its nodes, weights, value infos and functions: its inputs (those that
    are not initializers), outputs, names and metadata. Light enough to hold beside a
    pinned copy of the model."""
    out = onnx.ModelProto()
    copy_fields(model, out, skip=("graph", "functions"))
    copy_fields(model.graph, out.graph, skip=("node", "initializer", "sparse_initializer", "input",
                                              "value_info", "quantization_annotation"))
    init_names = {i.name for i in model.graph.initializer}
    out.graph.input.extend(i for i in model.graph.input if i.name not in init_names)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def check_model(model: onnx.ModelProto, name: str = "<model>", *, structure: bool = True) -> None:
    """The structural checks of ``graph/checks.py``, then the ONNX checker.

    The structural checks sort nodes stored out of topological order in place.
    The checker reads a light copy written to a temp file, its heavy initializers
    pointing at an empty stub file and without the main graph's value infos (which
    the checker never reads): no weight is copied and no node is copied in Python.
    Then each heavy initializer held in memory goes through the checker's own tensor
    check, which is what the whole-model check does with it.
    """
    if structure:
        check_nesting(model, name)
        check_names_are_text(model, name)
        check_opsets(model, name)
        check_operators(model, name)
        check_graph_names(model, name)
    try:
        with tempfile.TemporaryDirectory(prefix="adaptopt-check-") as tmp:
            (Path(tmp) / "stub.bin").touch()
            with open(Path(tmp) / "model.onnx", "wb") as fh:
                light_pieces(model, "stub.bin", value_info=False).write(fh)
            onnx.checker.check_model(str(Path(tmp) / "model.onnx"))
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL and is_heavy(tensor):
                onnx.checker.check_tensor(tensor)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise InputError(f"{name}: ONNX checker failed: {_checker_reason(exc)}") from None


def _checker_reason(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if not ln.startswith("==>") and "Context" not in ln:
            return ln[:300]
    return lines[0][:300] if lines else type(exc).__name__


def infer_shapes(model: onnx.ModelProto, name: str = "<model>") -> onnx.ModelProto:
    """ONNX shape inference, in place (``model`` is returned).

    Inference runs on a light copy in which every heavy initializer is a typed graph
    input instead: no weight is copied, and ONNX's data propagation, which expands
    an initializer's values into one shape dimension per element (gigabytes for a
    large 1-D weight), only sees the small constants that shape arithmetic uses.
    Data propagation is skipped altogether when a 1-D tensor longer than
    :data:`DATA_PROP_MAX_LENGTH` exists, as it expands graph inputs too.
    The copy goes to ONNX through a temp file and only the results are read back
    (value infos, output types, nodes whose bodies gained value infos), so neither
    side holds a second copy of the model.
    """
    with tempfile.TemporaryDirectory(prefix="adaptopt-infer-") as tmp:
        probe, out = Path(tmp) / "probe.onnx", Path(tmp) / "inferred.onnx"
        with open(probe, "wb") as fh:
            inference_pieces(model).write(fh)
        try:
            onnx.shape_inference.infer_shapes_path(probe, out, check_type=False, strict_mode=False)
            result = _Inferred(out.read_bytes())
            if not result.long_vectors():
                del result  # not held while ONNX infers again
                onnx.shape_inference.infer_shapes_path(probe, out, check_type=False, strict_mode=False,
                                                       data_prop=True)
                result = _Inferred(out.read_bytes())
        except (onnx.shape_inference.InferenceError, RuntimeError, ValueError) as exc:  # ValueError: bad types
            raise InputError(f"{name}: shape inference failed: {_first_line(exc)}") from None
    result.apply(model)
    return model


class _Inferred:
    """The inferred copy as written by ONNX, read field by field without parsing its nodes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.whole: onnx.ModelProto | None = None
        spans: dict[int, list[int]] = {1: [], 11: [], 12: [], 13: []}  # field -> flat (start, end) pairs
        try:
            graphs = [(v, e) for number, wire, _, v, e in scan_fields(data) if number == 7 and wire == 2]
            if len(graphs) != 1:
                raise ValueError("one graph expected")
            for number, wire, field_start, value_start, end in scan_fields(data, *graphs[0]):
                if number in spans and wire == 2:
                    spans[number] += (value_start if number == 1 else field_start, end)
        except ValueError:  # not as ONNX writes it: parse it whole
            self.whole = onnx.load_from_string(data)
        # node payloads and the other fields whole (key and length included), as compact arrays
        self.spans = {number: array.array("q", flat) for number, flat in spans.items()}

    def _pairs(self, number: int) -> Iterator[tuple[int, int]]:
        flat = self.spans[number]
        return zip(flat[0::2], flat[1::2])

    def _graph(self, numbers: tuple[int, ...]) -> onnx.GraphProto:
        """A graph holding only the fields ``numbers`` (inputs 11, outputs 12, value infos 13)."""
        graph = onnx.GraphProto()
        if self.whole is not None:
            for number in numbers:
                field = _GRAPH_FIELDS[number]
                getattr(graph, field).extend(getattr(self.whole.graph, field))
        else:
            graph.MergeFromString(self._raw(numbers))
        return graph

    def _raw(self, numbers: tuple[int, ...]) -> bytes:
        return b"".join(self.data[s:e] for n in numbers for s, e in self._pairs(n))

    def long_vectors(self) -> bool:
        return _long_vectors(self._graph((11, 13, 12)))

    def apply(self, model: onnx.ModelProto) -> None:
        """What the old ``infer_shapes`` copied back: nodes (bodies gain value infos), value infos, output types."""
        graph = model.graph
        if self.whole is not None or len(self.spans[1]) // 2 != len(graph.node):
            inferred = self.whole or onnx.load_from_string(self.data)
            del graph.node[:]
            graph.node.extend(inferred.graph.node)
        else:  # a node inference left unchanged is not replaced by its equal
            for node, (start, end) in zip(graph.node, self._pairs(1)):
                data = self.data[start:end]
                if node.SerializeToString() != data:
                    node.ParseFromString(data)
        del graph.value_info[:]
        if self.whole is not None:
            graph.value_info.extend(self.whole.graph.value_info)
        else:  # parsed straight into the model: no second copy of the value infos
            model.MergeFromString(length_field(7, self._raw((13,))))
        for out, typed in zip(graph.output, self._graph((12,)).output):
            out.type.CopyFrom(typed.type)


_GRAPH_FIELDS = {11: "input", 12: "output", 13: "value_info"}


def _long_vectors(graph: onnx.GraphProto) -> bool:
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else ()
        if len(dims) == 1 and dims[0].dim_value > DATA_PROP_MAX_LENGTH:
            return True
    return False


def pin_input_shapes(model: onnx.ModelProto, inputs: Mapping[str, InputSpec], name: str) -> onnx.ModelProto:
    """Set dynamic dims of graph inputs from the config; refuse conflicts with fixed dims."""
    graph_inputs = {i.name: i for i in model.graph.input}
    init_names = {i.name for i in model.graph.initializer}
    named_dims: dict[str, tuple[str, int]] = {}  # dim_param -> (first input giving it, its size)
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
            # one name, one size across the inputs ("?" is an exporter's "unknown", not a name;
            # within one input a repeated name is left to ONNX Runtime)
            if dim.HasField("dim_param") and dim.dim_param not in ("", "?"):
                first, size = named_dims.setdefault(dim.dim_param, (input_name, want))
                if size != want and first != input_name:
                    raise InputError(f"{name}: dim '{dim.dim_param}' is {size} in input '{first}' but {want} in "
                                     f"input '{input_name}' (inputs sharing a dim name must agree)")
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


# ------------------------------------------------------------------ atomic saving
def forget_body_shapes(graph: onnx.GraphProto) -> None:
    """Drop the shapes inferred inside control-flow bodies (``If`` / ``Loop`` / ``Scan``,
    nested too): on a pinned model they hold the profiled sizes, and ONNX Runtime refuses
    a branch whose output then has another size ("has shape {4,16} but the computed output
    shape for this run is {2,16}"). Types stay; shapes are optional in ONNX."""
    work = [body for node in graph.node for body in node_bodies(node)]
    while work:
        body = work.pop()
        del body.value_info[:]
        for vi in body.output:
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
        work.extend(inner for node in body.node for inner in node_bodies(node))


def check_writable(target: str | Path, what: str, directory: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder where a
    file is wanted (or the reverse), or a folder we may not create files in (probed
    for real: root ignores permission bits, not read-only mounts or immutable folders).
    A missing parent is fine (it is created on write) when its nearest existing
    ancestor is writable."""
    target = Path(target)
    if len(os.fsencode(target.name)) > 255:
        raise InputError(f"{what} {target}: the file name is longer than 255 bytes")
    if target.is_dir() != directory and target.exists():
        raise InputError(f"{what} {target}: is {'a file, not a folder' if directory else 'a folder, not a file'}")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{what} {target}: {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".adaptopt-probe.", dir=parent)
    except OSError as exc:
        raise InputError(f"{what} {target}: cannot write in {parent}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path in ``target``'s folder; rename it onto ``target`` on success.

    On any exception, KeyboardInterrupt and SIGTERM included (``adaptopt.signals``
    turns it into one), the temp file is removed and ``target`` is untouched. A target
    that cannot be created or replaced is bad input (one line, exit 2), not a crash.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # the temp name must fit the file system's 255-byte limit whatever the target's name
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:100]}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise InputError(f"cannot write {target}: {exc.strerror}") from None
    tmp_path = Path(tmp)
    os.close(fd)
    try:
        yield tmp_path
        os.chmod(tmp_path, _file_mode(target))  # mkstemp makes 0600; the result gets a normal file's mode
        try:
            os.replace(tmp_path, target)
        except OSError as exc:  # e.g. the target is a folder
            raise InputError(f"cannot write {target}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_directory(target: Path, last: str = "manifest.json") -> Iterator[Path]:
    """Yield an empty temp folder next to ``target``; on success its files land in ``target``.

    A new or empty ``target`` is the temp folder renamed, in one step. Into an
    existing folder the new files are renamed one by one, ``last`` (the manifest
    that names the others) at the end. On any exception, interrupts included, the
    temp folder is removed and ``target`` is as it was.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise InputError(f"{target}: exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name[:100]}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if not target.exists():
            os.rename(staging, target)
            return
        for entry in sorted(staging.iterdir(), key=lambda p: p.name == last):
            os.replace(entry, target / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _file_mode(target: Path) -> int:
    """The mode ``target`` has now, else what a new file gets under the process umask."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    try:  # Linux shows it without changing it (os.umask would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_model(model: onnx.ModelProto, destination: str | Path, *, external: bool | None = None) -> None:
    """Write ``model`` atomically to a path, or to stdout for ``-``.

    Models of 2 GiB or more, models whose weights are kept on disk, or
    ``external=True`` put their large tensors in a side file ``<name>.data`` next to
    the model, streamed one tensor at a time; both files are renamed into place only
    once complete. The in-memory ``model`` is not modified. ``destination`` may be
    the file the model was loaded from. A single file of :data:`STREAM_BYTES` or more
    is written piece by piece (``ModelPieces``): the bytes ``SerializeToString`` gives,
    without holding them.
    """
    size = byte_size(model)
    on_disk = uses_external_data(model)
    if str(destination) == "-":
        if size >= TWO_GIB or on_disk:
            raise InputError("a model of 2 GiB or more cannot be written to stdout; give -o PATH")
        if size < STREAM_BYTES or not _piecewise(model):
            sys.stdout.buffer.write(model.SerializeToString())
        else:
            ModelPieces(model).write(sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    target = Path(destination)
    if external is None:
        external = size >= TWO_GIB or on_disk
    if not external:
        with atomic_path(target) as tmp:
            if size < STREAM_BYTES or not _piecewise(model):
                tmp.write_bytes(model.SerializeToString())
            else:
                write_pieces(tmp, ModelPieces(model))
        return
    data_name = target.name + ".data"
    with atomic_path(target.parent / data_name) as tmp_data, atomic_path(target) as tmp_model:
        _write_external(model, tmp_model, tmp_data, data_name)


def _piecewise(model: onnx.ModelProto) -> bool:
    """Whether ModelPieces writes ``model`` byte for byte (it leaves out top-level unknown fields)."""
    return not (has_unknown_fields(model) or has_unknown_fields(model.graph))


def write_pieces(path: Path, pieces: ModelPieces) -> None:
    """Write ``pieces`` to ``path`` piece by piece (never the whole model in memory)."""
    with open(path, "wb") as fh:
        pieces.write(fh)


def _write_external(model: onnx.ModelProto, model_path: Path, data_path: Path, data_name: str) -> None:
    """Stream large tensors to ``data_path`` and write a light model that points at them."""
    light = light_copy(model)
    with open(data_path, "wb") as fh:
        for stub, source in zip(light.graph.initializer, model.graph.initializer):
            _write_tensor(fh, stub, source, data_name)
        for tensor in nested_tensors(light):
            _write_tensor(fh, tensor, tensor, data_name)
    model_path.write_bytes(light.SerializeToString())


def _write_tensor(fh, stub: onnx.TensorProto, source: onnx.TensorProto, data_name: str) -> None:
    """Append ``source``'s payload to ``fh`` and point ``stub`` at it; small tensors stay inline."""
    if source.data_location == onnx.TensorProto.EXTERNAL and not on_disk(source):
        raise InputError(f"tensor '{source.name}' refers to external data '{external_info(source).get('location')}'"
                         " that was never loaded; cannot write it")
    raw = raw_bytes(source)
    if raw is not None and len(raw) >= EXTERNAL_THRESHOLD:
        offset = fh.tell()
        fh.write(raw)
        fh.write(b"\0" * ((-fh.tell()) % 4096))  # page-align the next tensor, so it can be memory-mapped
        set_external(stub, data_name, offset, len(raw))
    elif stub is not source and on_disk(source):
        del stub.external_data[:]
        stub.data_location = onnx.TensorProto.DEFAULT
        stub.raw_data = raw
    elif stub is not source:
        stub.CopyFrom(source)
