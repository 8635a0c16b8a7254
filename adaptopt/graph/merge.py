"""Reassemble one model from leaf subgraphs.

The skeleton (the original model, or the root file of a split) gives the graph's
inputs, outputs, name and metadata; the leaves, in topological order, give the nodes.
Initializers are deduplicated by name and content; names internal to a leaf (not on
its boundary) that collide with another leaf's are renamed, so a leaf rewritten by a
pass can introduce any names it likes. Opset imports and custom domains are unioned;
the default-domain opset must agree, because raising it would change the meaning of
ops in the other leaves. On a skeleton with dynamic input dims the merged model has no
value infos: the leaves' were inferred at the sizes they were profiled at, and ONNX
Runtime would hold the model to them (a ``Shape`` folded to the profiled size).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from pathlib import Path

import onnx
from onnx import helper

from adaptopt.errors import InputError
from adaptopt.graph.external import (
    EXTERNAL_THRESHOLD,
    copy_fields,
    external_info,
    stat_identity,
    tensor_nbytes,
)
from adaptopt.graph.index import has_type
from adaptopt.graph.io import (
    attach_external_data,
    check_model,
    dynamic_inputs,
    forget_body_shapes,
    length_field,
    parse_model,
)
from adaptopt.graph.subgraph import MANIFEST_FORMAT


def merge_models(skeleton: onnx.ModelProto, leaves: Iterable[onnx.ModelProto]) -> onnx.ModelProto:
    """One model from ``leaves`` (in topological order) with ``skeleton``'s signature.

    Fills a single ModelProto in place (no intermediate copies), and ``leaves`` may be
    a generator: each leaf is read, copied in and can be dropped before the next.
    """
    model, value_info = _merge(skeleton, ((leaf, {}) for leaf in leaves), _Weights())
    _add_value_info(model, value_info)
    return model


def _add_value_info(model: onnx.ModelProto, value_info: bytes) -> None:
    """Append the serialized ``GraphProto.value_info`` fields ``value_info`` to the model's graph."""
    model.MergeFromString(length_field(7, value_info))


def _merge(skeleton: onnx.ModelProto, leaves: Iterable[tuple[onnx.ModelProto, dict[int, _Ref]]],
           weights: _Weights) -> tuple[onnx.ModelProto, bytes]:
    """``merge_models`` of (leaf, :func:`_leaf_refs`) pairs, but its value infos are returned as
    serialized graph fields, for :func:`_add_value_info` (a fifth of the merged graph's memory,
    which the checker never reads), and weights read from a data file may stay there until
    ``weights.fill`` (:class:`_Weights`). No value info is kept on a dynamic signature."""
    model = onnx.ModelProto()
    graph = model.graph
    keep_value_info = not dynamic_inputs(skeleton)
    io_names = {t.name for t in skeleton.graph.input} | {t.name for t in skeleton.graph.output}
    taken: set[str] = {i.name for i in skeleton.graph.input}
    # a rewritten leaf may compute a tensor under a weight's old name (ORT's quantizer turns a
    # Conv bias `b` into DequantizeLinear(...) -> `b`) while other leaves, or the skeleton's
    # initializers, still define `b`: such node outputs are renamed, never defined twice
    reserved = {t.name for t in skeleton.graph.initializer}
    node_names: set[str] = set()
    name_counters: dict[str, int] = {}
    initializers: dict[str, onnx.TensorProto] = {}
    value_info: set[str] = set()
    value_info_fields = bytearray()
    opsets: dict[str, int] = {}
    functions: dict[tuple[str, str], onnx.FunctionProto] = {(f.domain, f.name): f for f in skeleton.functions}
    _union_opsets(opsets, skeleton, "the original model")
    ir_version = skeleton.ir_version
    for i, (leaf, refs) in enumerate(leaves):
        g = leaf.graph
        ir_version = max(ir_version, leaf.ir_version)
        boundary = {t.name for t in g.input} | {t.name for t in g.output}
        renames = _internal_renames(g, boundary, taken, initializers, f"l{i}", weights, reserved)
        for position, tensor in enumerate(g.initializer):
            name = renames.get(tensor.name, tensor.name)
            if name not in initializers:
                copy = graph.initializer.add()
                weights.copy_in(copy, tensor, refs.get(position), name)
                copy.name = name
                initializers[name] = copy
        for node in g.node:
            new = graph.node.add()
            new.CopyFrom(node)
            _rename_node_io(new, renames)
            new.name = _unique(new.name or new.op_type, node_names, name_counters)
            node_names.add(new.name)
            taken.update(o for o in new.output if o)
        typed = (list(g.input) + list(g.output) + list(g.value_info)) if keep_value_info else []
        for vi in typed:
            name = renames.get(vi.name, vi.name)
            if name not in value_info and name not in initializers and name not in io_names and has_type(vi):
                if name != vi.name:
                    renamed = onnx.ValueInfoProto()
                    renamed.CopyFrom(vi)
                    renamed.name = name
                    vi = renamed
                value_info_fields += length_field(13, vi.SerializeToString())  # GraphProto.value_info
                value_info.add(name)
        _union_opsets(opsets, leaf, f"leaf {i}")
        for f in leaf.functions:
            functions.setdefault((f.domain, f.name), f)
    graph.name, graph.doc_string = skeleton.graph.name, skeleton.graph.doc_string
    graph.input.extend(skeleton.graph.input)
    graph.output.extend(skeleton.graph.output)
    graph.initializer.extend(t for t in skeleton.graph.initializer if t.name not in initializers)
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(opsets.items()))
    model.ir_version = ir_version
    for field_name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field_name, getattr(skeleton, field_name))
    model.metadata_props.extend(skeleton.metadata_props)
    model.functions.extend(functions.values())
    if not keep_value_info:  # leaves are pinned: their control-flow bodies hold the profiled sizes
        forget_body_shapes(graph)
    _keep_used_initializers(model)
    return model, bytes(value_info_fields)


_Ref = tuple[Path, int, int]  # a main-graph initializer's data: resolved file, offset, length


class _Weights:
    """Merged initializers whose raw data stays in the split folder's data file until :meth:`fill`.

    Only tensors a leaf read from a data file, whose data is raw bytes of a numeric type
    matching their dims: one is copied in without its data and reads as stored externally,
    which the ONNX checker's light copy stubs exactly as the whole tensor (and a whole
    such tensor passes the checker's tensor check). Comparisons read the data back.
    """

    def __init__(self) -> None:
        self.pending: dict[str, _Ref] = {}  # merged name -> where its data is
        self.files: dict[Path, tuple[int, int, int, int]] = {}  # identity when first read

    def copy_in(self, copy: onnx.TensorProto, tensor: onnx.TensorProto, ref: _Ref | None, name: str) -> None:
        if ref is None or not _raw_only(tensor, ref[2]):
            copy.CopyFrom(tensor)
            return
        copy_fields(tensor, copy, skip=("raw_data",))
        copy.data_location = onnx.TensorProto.EXTERNAL
        self.pending[name] = ref
        if ref[0] not in self.files:
            self.files[ref[0]] = stat_identity(ref[0].stat())

    def whole(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """``tensor``, or a copy of it with its data when that is still pending."""
        if tensor.name not in self.pending or tensor.data_location != onnx.TensorProto.EXTERNAL:
            return tensor
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        with open(self.pending[tensor.name][0], "rb") as fh:
            self._restore(copy, fh)
        return copy

    def fill(self, model: onnx.ModelProto, what: str) -> None:
        """Give every pending tensor of ``model`` its data back, reading each file in order."""
        todo = sorted((self.pending[t.name][0], self.pending[t.name][1], t) for t in model.graph.initializer
                      if t.name in self.pending and t.data_location == onnx.TensorProto.EXTERNAL)
        try:
            for file, group in itertools.groupby(todo, key=lambda item: item[0]):
                with open(file, "rb") as fh:
                    if stat_identity(os.fstat(fh.fileno())) != self.files[file]:
                        raise InputError(f"{what}: {file} changed while the leaves were merged")
                    for _, _, tensor in group:
                        self._restore(tensor, fh)
        except OSError as exc:
            raise InputError(f"{what}: cannot read weights again: {exc.strerror}") from None

    def _restore(self, tensor: onnx.TensorProto, fh) -> None:
        _, offset, length = self.pending[tensor.name]
        fh.seek(offset)
        data = fh.read(length)
        if len(data) != length:
            raise InputError(f"tensor '{tensor.name}': its data file was truncated while the leaves were merged")
        tensor.data_location = onnx.TensorProto.DEFAULT  # as attach_external_data leaves a loaded tensor
        tensor.raw_data = data


_DATA_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _raw_only(tensor: onnx.TensorProto, length: int) -> bool:
    """Loaded data (raw bytes only) of a numeric type whose dims need exactly ``length`` bytes."""
    return (length >= EXTERNAL_THRESHOLD and tensor.data_location != onnx.TensorProto.EXTERNAL
            and tensor_nbytes(tensor) == length and not any(len(getattr(tensor, f)) for f in _DATA_FIELDS))


def _leaf_refs(leaf: onnx.ModelProto, directory: Path) -> dict[int, _Ref]:
    """Before its data is attached: where each main-graph initializer stored externally reads from
    (resolved as ``attach_external_data`` resolves and checks it)."""
    refs = {}
    base = directory.resolve()
    for position, tensor in enumerate(leaf.graph.initializer):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = external_info(tensor)
        try:
            refs[position] = ((base / info["location"]).resolve(), int(info.get("offset") or 0), int(info["length"]))
        except (KeyError, ValueError, OSError):
            continue  # attach_external_data refuses it, or it stays unloaded
    return refs


def _union_opsets(opsets: dict[str, int], model: onnx.ModelProto, what: str) -> None:
    for op in model.opset_import:
        domain = "" if op.domain == "ai.onnx" else op.domain
        if domain == "" and "" in opsets and opsets[""] != op.version:
            raise InputError(f"{what} imports default opset {op.version} but the model uses {opsets['']}; "
                             "leaves must keep the model's opset")
        opsets[domain] = max(opsets.get(domain, 0), op.version)


def _internal_renames(g: onnx.GraphProto, boundary: set[str], taken: set[str],
                      initializers: dict[str, onnx.TensorProto], tag: str, weights: _Weights,
                      reserved: set[str] = frozenset()) -> dict[str, str]:
    """New names for a leaf's internal tensors that would clash in the merged graph: node
    outputs already defined (by earlier leaves, as initializers, or under a name in
    ``reserved``, the original weights' names), and initializers whose name another
    tensor holds."""
    renames: dict[str, str] = {}
    produced = [o for n in g.node for o in n.output if o and o not in boundary]
    for name in produced:
        if name in taken or name in initializers or name in reserved:
            renames[name] = _unique(f"{name}__{tag}", taken | set(initializers) | reserved)
            taken.add(renames[name])
    for tensor in g.initializer:
        other = initializers.get(tensor.name)
        if tensor.name in boundary:
            continue
        if (other is not None and not _same_tensor(weights.whole(other), tensor)) or tensor.name in taken:
            renames[tensor.name] = _unique(f"{tensor.name}__{tag}", taken | set(initializers))
    return renames


def _same_tensor(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    if a.data_type != b.data_type or list(a.dims) != list(b.dims):
        return False
    strip_a, strip_b = onnx.TensorProto(), onnx.TensorProto()
    strip_a.CopyFrom(a)
    strip_b.CopyFrom(b)
    strip_a.name = strip_b.name = ""
    return strip_a.SerializeToString() == strip_b.SerializeToString()


def _rename_node_io(node: onnx.NodeProto, renames: dict[str, str]) -> None:
    if not renames:
        return
    for i, name in enumerate(node.input):
        if name in renames:
            node.input[i] = renames[name]
    for i, name in enumerate(node.output):
        if name in renames:
            node.output[i] = renames[name]
    _rename_in_bodies(node, renames)


def _rename_in_bodies(node: onnx.NodeProto, renames: dict[str, str]) -> None:
    """Outer-scope reads inside control-flow bodies follow the renames too."""
    work = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    work += [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
    while work:
        body = work.pop()
        local = {i.name for i in body.input} | {i.name for i in body.initializer} | \
                {o for n in body.node for o in n.output}
        for inner in body.node:
            for i, name in enumerate(inner.input):
                if name in renames and name not in local:
                    inner.input[i] = renames[name]
            work += [a.g for a in inner.attribute if a.type == onnx.AttributeProto.GRAPH]
            work += [g for a in inner.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]


def _unique(base: str, taken: set[str], counters: dict[str, int] | None = None) -> str:
    """``base``, or ``base_N`` with the first free N. With ``counters`` (kept by the caller for
    one ``taken`` set) the search resumes where it stopped, so naming many nodes after one
    base stays linear."""
    if base not in taken:
        return base
    i = counters.get(base, 1) if counters is not None else 1
    while f"{base}_{i}" in taken:
        i += 1
    if counters is not None:
        counters[base] = i + 1
    return f"{base}_{i}"


def _keep_used_initializers(model: onnx.ModelProto) -> None:
    from adaptopt.graph.index import subgraph_outer_inputs
    used = {n for node in model.graph.node for n in list(node.input) + subgraph_outer_inputs(node)}
    used |= {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


# ---------------------------------------------------------------- from a split folder
def load_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise InputError(f"{directory}: no manifest.json (not a folder written by 'adaptopt split')")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path}: not an adaptopt split manifest (format '{MANIFEST_FORMAT}' expected)")
    for key in ("root", "leaves", "nodes"):
        if key not in manifest:
            raise InputError(f"{path}: manifest has no '{key}'")
    nodes, leaves = manifest["nodes"], manifest["leaves"]
    well_formed = (isinstance(manifest["root"], str) and isinstance(leaves, list) and isinstance(nodes, list)
                   and all(isinstance(s, str) for s in leaves)
                   and all(isinstance(n, dict) and isinstance(n.get("id"), str) and isinstance(n.get("file"), str)
                           and all(isinstance(n.get(k, []), list) for k in ("boundary_inputs", "boundary_outputs"))
                           for n in nodes))
    if not well_formed:
        raise InputError(f"{path}: manifest 'root', 'leaves' or 'nodes' do not have the shape 'adaptopt split' writes")
    return manifest


def merge_directory(directory: str | Path) -> onnx.ModelProto:
    """Rebuild a model from the leaves named in ``DIR/manifest.json``."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    files = {n["id"]: n["file"] for n in manifest["nodes"]}
    # what the leaf checks read; not every tree node's node names (a 100k-node tree lists each name 7 times)
    expected = {n["id"]: {k: n[k] for k in ("file", "boundary_inputs", "boundary_outputs") if k in n}
                for n in manifest["nodes"]}
    root, leaf_ids = manifest["root"], manifest["leaves"]
    del manifest
    missing = [sid for sid in [root, *leaf_ids] if sid not in files]
    if missing:
        raise InputError(f"{directory}/manifest.json: tree node(s) {missing} have no entry")
    skeleton = _signature(_load_file(directory, files[root], load_weights=False))
    graph_inputs = {i.name for i in skeleton.graph.input}

    def leaves():  # one leaf in memory at a time
        for sid in leaf_ids:
            leaf, refs = _load_file(directory, files[sid], load_weights=True)
            _check_leaf_boundary(leaf, expected[sid], sid, graph_inputs)
            yield leaf, refs

    weights = _Weights()
    model, value_info = _merge(skeleton, leaves(), weights)
    del skeleton
    # The checker reads a light copy: it needs neither the weights nor the value infos,
    # which join the merged graph after it (their names come from leaves whose names
    # were checked when parsed, so the name check has nothing to add).
    what = f"merged model from {directory}"
    check_model(model, what)
    weights.fill(model, what)
    _add_value_info(model, value_info)
    return model


def _signature(root: onnx.ModelProto) -> onnx.ModelProto:
    """What ``merge_models`` reads from the skeleton: the root file without its nodes and value
    infos (it holds every node), so those are not kept in memory while the leaves are merged."""
    skeleton = onnx.ModelProto()
    copy_fields(root, skeleton, skip=("graph",))
    copy_fields(root.graph, skeleton.graph, skip=("node", "value_info"))
    return skeleton


def _load_file(directory: Path, name: str, load_weights: bool):
    """The parsed file; with ``load_weights``, (model with its data attached, :func:`_leaf_refs`)."""
    path = directory / name
    if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file() \
            or directory.resolve() not in path.resolve().parents:
        raise InputError(f"{directory}: subgraph file '{name}' named in the manifest is missing or outside the folder")
    model, _ = parse_model(path)
    if not load_weights:
        return model
    refs = _leaf_refs(model, directory)
    attach_external_data(model, directory, str(path))
    return model, refs


def _check_leaf_boundary(leaf: onnx.ModelProto, entry: dict, sid: str, graph_inputs: set[str]) -> None:
    """A (possibly rewritten) leaf must still produce its boundary outputs and read nothing new."""
    ins = {i.name for i in leaf.graph.input} - {t.name for t in leaf.graph.initializer}
    outs = {o.name for o in leaf.graph.output}
    lost = set(entry.get("boundary_outputs", [])) - outs
    unknown = ins - set(entry.get("boundary_inputs", [])) - graph_inputs
    if lost or unknown:
        what = f"no longer outputs {sorted(lost)[:3]}" if lost else f"reads unknown inputs {sorted(unknown)[:3]}"
        raise InputError(f"leaf {sid} ({entry['file']}) {what}; a rewritten leaf must keep its boundary names")
