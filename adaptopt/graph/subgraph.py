"""Standalone subgraph models: a tree node's nodes with its boundary as graph I/O.

Weights are materialised on demand: ``extract`` copies only the initializers the
subgraph uses (in memory, for one session), and ``write_tree`` writes every weight
once into a shared ``weights.bin`` that each subgraph file points into.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from adaptopt.errors import ModelError
from adaptopt.graph.index import GraphIndex, has_type, overridable_initializers
from adaptopt.graph.io import (
    EXTERNAL_THRESHOLD,
    ModelPieces,
    _raw_bytes,
    _set_external,
    atomic_path,
    dynamic_inputs,
    write_pieces,
)
from adaptopt.graph.partition import PartitionTree, Subgraph

MANIFEST_FORMAT = "adaptopt-split"
MANIFEST_VERSION = 1


def _value_info(index: GraphIndex, name: str) -> onnx.ValueInfoProto:
    vi = index.value_info.get(name)
    if vi is None or not has_type(vi):
        raise ModelError(f"tensor '{name}' has no known type; shape inference could not type it")
    out = onnx.ValueInfoProto()
    out.CopyFrom(vi)
    return out


def extract_range(index: GraphIndex, start: int, stop: int, name: str = "subgraph",
                  weight_refs: dict[str, tuple[str, int, int]] | None = None) -> onnx.ModelProto:
    """A standalone model of nodes [start, stop).

    ``weight_refs`` maps initializer names to (file, offset, length) in a shared weights
    file; those initializers are written as external references instead of copied.
    """
    return _range_model(index, start, stop, name, weight_refs or {}, {})


def external_stub(src: TensorProto, ref: tuple[str, int, int]) -> TensorProto:
    """A tensor with ``src``'s name, type and dims whose data is at ``ref`` = (file, offset, length)."""
    tensor = TensorProto(name=src.name, data_type=src.data_type, dims=src.dims)
    _set_external(tensor, *ref)
    return tensor


def _range_model(index: GraphIndex, start: int, stop: int, name: str, weight_refs: Mapping[str, tuple[str, int, int]],
                 stubs: dict[str, TensorProto]) -> onnx.ModelProto:
    """``extract_range``; ``stubs`` caches the external stubs made so far."""
    model, inits = _range_head(index, start, stop, name)
    for n in inits:
        if n in weight_refs and n not in stubs:
            stubs[n] = external_stub(index.initializers[n], weight_refs[n])
    # Filled in place: helper.make_model would copy the whole graph once more (the root
    # holds every node). extend() copies, so the index's own protos are passed as they are.
    graph = model.graph
    graph.node.extend(index.nodes[start:stop])
    graph.initializer.extend(stubs[n] if n in stubs else index.initializers[n] for n in inits)
    graph.value_info.extend(_internal_value_info(index, start, stop))
    return model


def _range_head(index: GraphIndex, start: int, stop: int, name: str) -> tuple[onnx.ModelProto, list[str]]:
    """The model of nodes [start, stop) but its nodes, initializers and value infos; the initializers it uses."""
    inputs, outputs, inits = index.boundary(start, stop)
    src = index.model
    model = onnx.ModelProto(ir_version=src.ir_version, producer_name="adaptopt")
    graph = model.graph
    graph.name = name
    graph.input.extend(_value_info(index, n) for n in inputs)
    # an initializer the user may feed stays one here too: unlisted, passes would fold it
    overridable = overridable_initializers(src)
    graph.input.extend(_value_info(index, n) for n in inits if n in overridable)
    graph.output.extend(_value_info(index, n) for n in outputs)
    model.opset_import.extend(src.opset_import)
    model.functions.extend(src.functions)
    return model, inits


def _range_pieces(index: GraphIndex, start: int, stop: int, name: str, weight_refs: Mapping[str, tuple[str, int, int]],
                  stubs: dict[str, bytes], sizes: _Sizes, value_info: bool = True,
                  also: Sequence[str] = ()) -> ModelPieces:
    """``_range_model`` as pieces: written, the same bytes, but no node, weight or value info is
    copied (the root file holds every node). ``stubs`` caches serialized external stubs, which
    a tree's files share; ``sizes`` the serialized sizes of nodes and value infos, which are the
    same in every file. Without ``value_info`` the file has none (a root file on a dynamic
    signature). ``.model`` is the head, which the caller may still edit."""
    model, inits = _range_head(index, start, stop, name)
    inits = inits + [n for n in also if n not in inits]  # initializers read by no node of the range
    for n in inits:
        if n in weight_refs and n not in stubs:
            stubs[n] = external_stub(index.initializers[n], weight_refs[n]).SerializeToString()
    return ModelPieces(model, node=_Span(index.nodes, start, stop, sizes.nodes),
                       initializer=[stubs[n] if n in stubs else index.initializers[n] for n in inits],
                       value_info=_internal_value_info(index, start, stop, sizes.value_infos) if value_info else [])


class _Sizes:
    """Serialized sizes of an index's nodes (by position) and value infos (by tensor id, -1: none),
    counted once for all the files of a tree."""

    def __init__(self, index: GraphIndex) -> None:
        self.nodes = np.fromiter((node.ByteSize() for node in index.nodes), dtype=np.int32, count=len(index))
        t = index.tables
        self.value_infos = np.full(len(t.tensor_names), -1, dtype=np.int32)
        ids = np.unique(t.write_tensor[index.written_typed()]).tolist()
        for i, vi in zip(ids, index.value_info.by_ids(ids)):
            self.value_infos[i] = vi.ByteSize()


class _Span(Sequence):
    """``nodes[start:stop]`` without a list of them (``sizes``: every node's serialized size)."""

    def __init__(self, nodes: Sequence, start: int, stop: int, sizes: np.ndarray) -> None:
        self.nodes, self.start, self.stop, self.sizes = nodes, start, stop, sizes

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.nodes[self.start + i]

    def __iter__(self):
        return self.nodes.span(self.start, self.stop)

    def payload_sizes(self) -> np.ndarray:
        return self.sizes[self.start:self.stop]


def _internal_value_info(index: GraphIndex, start: int, stop: int,
                         sizes: np.ndarray | None = None) -> Sequence[onnx.ValueInfoProto]:
    """Typed value infos of the tensors written and only read inside [start, stop), by name
    (a sequence whose protos are looked up on access: the root's holds every tensor)."""
    t = index.tables
    a, b = t.write_offsets[start], t.write_offsets[stop]
    ids = t.write_tensor[a:b][(t.write_leaves_at[a:b] < stop) & index.written_typed()[a:b]]
    return _Lookup(index.value_info, t.tensor_names, ids[np.argsort(t.name_rank[ids])], sizes)


class _Lookup(Sequence):
    """``[protos[names[i]] for i in ids]`` without the list (``sizes``: serialized size by id)."""

    def __init__(self, protos, names: list[str], ids: np.ndarray, sizes: np.ndarray | None = None) -> None:
        self.protos, self.names, self.ids, self.sizes = protos, names, ids, sizes

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int):
        return self.protos[self.names[self.ids[k]]]

    def __iter__(self):
        return self.protos.by_ids(self.ids.tolist())

    def payload_sizes(self) -> np.ndarray | None:
        return None if self.sizes is None else self.sizes[self.ids]


def extract(index: GraphIndex, sub: Subgraph) -> onnx.ModelProto:
    return extract_range(index, sub.start, sub.stop, name=f"sg_{sub.id}")


def fill_missing_types(index: GraphIndex, names: Iterable[str], feeds: Mapping[str, np.ndarray] | None = None) -> None:
    """Type boundary tensors that ONNX shape inference could not (custom ops, ...).

    ONNX Runtime types every output of a session it can build, so the missing
    tensors are added as untyped graph outputs of a copy and read back from ORT.
    ORT reports an unknown rank as ``[]``; those ranks are learnt from one run on
    ``feeds`` (the values themselves are not kept).
    """
    missing = index.missing_types(list(dict.fromkeys(names)))
    if not missing:
        return
    from adaptopt.config import TargetConfig
    from adaptopt.runtime import make_session, ort_error_line, ort_errors, run

    probe = onnx.ModelProto()
    probe.CopyFrom(index.model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in missing)
    try:
        session = make_session(probe, TargetConfig(), level="disable")
        unranked = [o.name for o in session.get_outputs() if o.name in missing and not o.shape]
        values = run(session, feeds, unranked) if unranked and feeds is not None else {}
    except ort_errors() as exc:
        raise ModelError(f"cannot type tensors {missing[:3]}: onnxruntime cannot run the model "
                         f"({ort_error_line(exc)})") from None
    for out in session.get_outputs():
        if out.name not in missing:
            continue
        shape = out.shape
        if not shape:
            if out.name not in values:
                raise ModelError(f"the rank of tensor '{out.name}' is unknown until the model runs: give the "
                                 "input shapes (config inputs: or --input-shape) so adaptopt can run it once")
            shape = [None] * values[out.name].ndim
        index.set_value_info(out.name, _ort_value_info(out.name, out.type, shape))


_ORT_TYPES = {
    "tensor(float)": TensorProto.FLOAT, "tensor(float16)": TensorProto.FLOAT16, "tensor(double)": TensorProto.DOUBLE,
    "tensor(bfloat16)": TensorProto.BFLOAT16, "tensor(int64)": TensorProto.INT64, "tensor(int32)": TensorProto.INT32,
    "tensor(int16)": TensorProto.INT16, "tensor(int8)": TensorProto.INT8, "tensor(uint8)": TensorProto.UINT8,
    "tensor(uint16)": TensorProto.UINT16, "tensor(uint32)": TensorProto.UINT32, "tensor(uint64)": TensorProto.UINT64,
    "tensor(bool)": TensorProto.BOOL, "tensor(string)": TensorProto.STRING,
}


def _ort_value_info(name: str, ort_type: str, shape) -> onnx.ValueInfoProto:
    if ort_type not in _ORT_TYPES:
        raise ModelError(f"tensor '{name}' has type {ort_type}, which adaptopt cannot place on a subgraph boundary")
    dims = None if shape is None else [d if isinstance(d, int) else (d or None) for d in shape]
    return helper.make_tensor_value_info(name, _ORT_TYPES[ort_type], dims)


# ---------------------------------------------------------------- writing a tree
def write_weights(index: GraphIndex, directory: Path, file_name: str = "weights.bin") -> dict[str, tuple[str, int, int]]:
    """Write every large initializer once; return name -> (file, offset, length)."""
    refs: dict[str, tuple[str, int, int]] = {}
    with atomic_path(directory / file_name) as tmp, open(tmp, "wb") as fh:
        for name, tensor in index.initializers.items():
            raw = _raw_bytes(tensor)
            if raw is None or len(raw) < EXTERNAL_THRESHOLD:
                continue
            offset = fh.tell()
            fh.write(raw)
            fh.write(b"\0" * ((-fh.tell()) % 4096))
            refs[name] = (file_name, offset, len(raw))
    return refs


def write_tree(tree: PartitionTree, directory: str | Path, source: str = "",
               feeds: Mapping[str, np.ndarray] | None = None, signature: onnx.ModelProto | None = None) -> dict:
    """Write one ONNX file per tree node plus ``manifest.json``; return the manifest.

    The root file is the whole model, and ``merge`` takes the merged model's inputs and
    outputs from it: it gets ``signature``'s (the user's model as given, dynamic dims kept:
    a full model or :func:`adaptopt.graph.io.signature_model`), else those of the tree's
    model, whose dims may be pinned to the profiled sizes. On a dynamic signature the root file has no value
    infos, which were inferred at the pinned sizes and would constrain it at others. The
    other files keep the tree's (pinned) boundary shapes: each is profiled at those sizes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index = tree.index
    signature = index.model if signature is None else signature
    root_value_info = not dynamic_inputs(signature)
    fill_missing_types(index, [n for s in tree.nodes.values() for n in s.boundary_inputs + s.boundary_outputs], feeds)
    refs = write_weights(index, directory)
    # a graph output that is an initializer (a constant the model returns) is read by no node:
    # the root file must hold it, or the merged model has no value for that output
    output_weights = [o.name for o in index.model.graph.output if o.name in index.initializers]
    stubs: dict[str, bytes] = {}  # each weight's external stub is made once, not once per file
    sizes = _Sizes(index)
    entries = []
    for sub in sorted(tree.nodes.values(), key=lambda s: (s.depth, s.start)):
        file_name = f"sg_{sub.id}.onnx"
        root = sub.id == tree.root
        pieces = _range_pieces(index, sub.start, sub.stop, f"sg_{sub.id}", refs, stubs, sizes,
                               value_info=root_value_info or not root, also=output_weights if root else ())
        if root:
            _keep_original_signature(pieces.model, signature, overridable_initializers(index.model))
        with atomic_path(directory / file_name) as tmp:
            write_pieces(tmp, pieces)
        entries.append(manifest_entry(sub, file_name))
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "source": source, "root": tree.root,
        "weights": "weights.bin", "node_count": len(index),
        "leaves": [s.id for s in tree.leaves()], "nodes": entries,
    }
    with atomic_path(directory / "manifest.json") as tmp, open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=1)  # streamed: the text of every node name is never all in memory
    return manifest


def manifest_entry(sub: Subgraph, file_name: str) -> dict:
    return {
        "id": sub.id, "parent": sub.parent, "children": list(sub.children), "depth": sub.depth,
        "node_count": sub.node_count, "node_names": list(sub.node_names),
        "boundary_inputs": list(sub.boundary_inputs), "boundary_outputs": list(sub.boundary_outputs),
        "file": file_name, "content_hash": sub.content_hash,
    }


def _keep_original_signature(model: onnx.ModelProto, original: onnx.ModelProto, overridable: frozenset[str]) -> None:
    """The root file is the whole model: keep ``original``'s exact inputs, outputs and metadata.

    ``original`` may be a signature model, which has no initializers; the ``overridable``
    initializers (those the user may feed), which ``model``'s head lists as inputs
    (:func:`_range_head`), stay listed after them, else a merge drops them."""
    weights = {t.name for t in original.graph.initializer} | overridable
    listed = [i for i in model.graph.input if i.name in overridable]
    del model.graph.input[:]
    model.graph.input.extend(i for i in original.graph.input if i.name not in weights)
    model.graph.input.extend(listed)
    del model.graph.output[:]
    model.graph.output.extend(original.graph.output)
    model.graph.name = original.graph.name
    model.graph.doc_string = original.graph.doc_string
    model.producer_name, model.producer_version = original.producer_name, original.producer_version
    model.domain, model.model_version, model.doc_string = original.domain, original.model_version, original.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)


def embed_constants(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                    constants: Mapping[str, np.ndarray]) -> tuple[onnx.ModelProto, Mapping[str, np.ndarray]]:
    """A copy of ``model`` whose inputs named in ``constants`` are initializers of those
    values, and ``feeds`` without them (``model`` and ``feeds`` themselves when none is an input)."""
    names = [i.name for i in model.graph.input if i.name in constants]
    if not names:
        return model, feeds
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [i for i in out.graph.input if i.name not in constants]
    del out.graph.input[:]
    out.graph.input.extend(kept)
    out.graph.initializer.extend(numpy_helper.from_array(np.asarray(constants[n]), n) for n in names)
    return out, {k: v for k, v in feeds.items() if k not in constants}
