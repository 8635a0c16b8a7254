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
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import onnx
from google.protobuf.message import DecodeError

from adaptopt.config import Config, InputSpec
from adaptopt.errors import InputError
from adaptopt.graph.checks import (check_graph_names, check_names_are_text, check_nesting, check_operators,
                                   check_opsets)
from adaptopt.graph.external import (  # noqa: F401 - re-exported for the graph modules
    EXTERNAL_THRESHOLD, TWO_GIB, all_tensors, attach_external_data, byte_size, check_external_data, external_info,
    light_copy, nested_tensors, on_disk, raw_bytes, set_external, tensor_nbytes, uses_external_data)

DATA_PROP_MAX_LENGTH = 1 << 16  # ONNX data propagation costs ~200 bytes per element

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
    data, path = read_model_bytes_or_path(source)
    name = name or ("<stdin>" if path is None else str(path))
    if data is not None and not data:
        raise InputError(f"{name}: empty input, not an ONNX model")
    if path is not None and path.stat().st_size >= TWO_GIB:
        raise InputError(f"{name}: a single ONNX file cannot hold 2 GiB or more (protobuf's limit); "
                         "store the weights as external data")
    try:
        if path is not None:
            data = path.read_bytes()
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except DecodeError as exc:
        raise InputError(f"{name}: not a valid ONNX model ({_decode_reason(exc)})") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read: {exc.strerror}") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{name}: not a valid ONNX model (no graph: empty or not a model file)")
    check_nesting(model, name)
    check_names_are_text(model, name)
    return model, path


def _decode_reason(exc: DecodeError) -> str:
    if "MaxDepth" in str(exc):
        return "messages nested more than protobuf's 100-level limit"
    return "protobuf parse error: corrupt, truncated or not a model file"


def load_model(source: str | Path, config: Config | None = None, *, infer: bool = True) -> onnx.ModelProto:
    """Load, check, shape-infer and pin a model.

    External data is loaded into memory, or kept on disk when its files hold 2 GiB
    or more (``graph/external.py``).
    """
    model, path = parse_model(source)
    name = "<stdin>" if path is None else str(path)
    check_opsets(model, name)
    check_operators(model, name)
    check_graph_names(model, name)  # before any weight is read: refusing is cheap
    attach_external_data(model, path.parent if path is not None else Path.cwd(), name)
    check_model(model, name, structure=False)
    # IR < 4 requires every initializer to be a graph input too; subgraphs and merged
    # models list only real inputs, which IR 4 allows with the same meaning.
    model.ir_version = max(model.ir_version, 4)
    if config is not None and config.inputs:
        model = pin_input_shapes(model, config.inputs, name)
    if infer:
        model = infer_shapes(model, name)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def check_model(model: onnx.ModelProto, name: str = "<model>", *, structure: bool = True) -> None:
    """The structural checks of ``graph/checks.py``, then the ONNX checker.

    The structural checks sort nodes stored out of topological order in place.
    Models over 2 GiB or with external data are checked as a light copy whose
    weights point at an empty stub file (the checker looks at dims and types only).
    """
    if structure:
        check_nesting(model, name)
        check_names_are_text(model, name)
        check_opsets(model, name)
        check_operators(model, name)
        check_graph_names(model, name)
    try:
        if byte_size(model) < TWO_GIB and not uses_external_data(model):
            onnx.checker.check_model(model)
            return
        with tempfile.TemporaryDirectory(prefix="adaptopt-check-") as tmp:
            (Path(tmp) / "stub.bin").touch()
            light = light_copy(model, stub_location="stub.bin")
            for tensor in nested_tensors(light):  # weights inside bodies and Constant nodes
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    set_external(tensor, "stub.bin", 0, max(tensor_nbytes(tensor) or 0, 0))
            (Path(tmp) / "model.onnx").write_bytes(light.SerializeToString())
            onnx.checker.check_model(str(Path(tmp) / "model.onnx"))
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
    """
    probe = _inference_copy(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, check_type=False, strict_mode=False)
        if not _long_vectors(inferred):
            inferred = onnx.shape_inference.infer_shapes(probe, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError, ValueError) as exc:  # ValueError: bad types
        raise InputError(f"{name}: shape inference failed: {_first_line(exc)}") from None
    del model.graph.node[:]
    model.graph.node.extend(inferred.graph.node)  # control-flow bodies carry their own value_info
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    for out, typed in zip(model.graph.output, inferred.graph.output):
        out.type.CopyFrom(typed.type)
    return model


def _long_vectors(model: onnx.ModelProto) -> bool:
    graph = model.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else ()
        if len(dims) == 1 and dims[0].dim_value > DATA_PROP_MAX_LENGTH:
            return True
    return False


def _inference_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    probe = light_copy(model)
    heavy = [t for t in probe.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not heavy:
        return probe
    keep = [t for t in probe.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    listed = {i.name for i in probe.graph.input}
    probe.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in heavy if t.name not in listed)
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(keep)
    return probe


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


# ------------------------------------------------------------------ atomic saving
@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path in ``target``'s folder; rename it onto ``target`` on success.

    On any exception, KeyboardInterrupt and SIGTERM included (``adaptopt.signals``
    turns it into one), the temp file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp_path = Path(tmp)
    os.close(fd)
    try:
        yield tmp_path
        os.chmod(tmp_path, _file_mode(target))  # mkstemp makes 0600; the result gets a normal file's mode
        os.replace(tmp_path, target)
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
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
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
    the file the model was loaded from.
    """
    size = byte_size(model)
    on_disk = uses_external_data(model)
    if str(destination) == "-":
        if size >= TWO_GIB or on_disk:
            raise InputError("a model of 2 GiB or more cannot be written to stdout; give -o PATH")
        sys.stdout.buffer.write(model.SerializeToString())
        sys.stdout.buffer.flush()
        return
    target = Path(destination)
    if external is None:
        external = size >= TWO_GIB or on_disk
    if not external:
        with atomic_path(target) as tmp:
            tmp.write_bytes(model.SerializeToString())
        return
    data_name = target.name + ".data"
    with atomic_path(target.parent / data_name) as tmp_data, atomic_path(target) as tmp_model:
        _write_external(model, tmp_model, tmp_data, data_name)


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
