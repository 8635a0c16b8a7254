"""Structural checks that run before the ONNX checker, with one clear line per problem.

The ONNX checker names a cycle "nodes must be topologically sorted" and accepts an
opset that no runtime implements; these checks say what is wrong instead:

- nesting: control-flow bodies (If/Loop/Scan graphs inside graphs) may nest at most
  :data:`MAX_GRAPH_DEPTH` levels; deeper models are refused before any recursive
  C++ code (checker, shape inference) walks them. Protobuf itself refuses messages
  nested more than 100 levels (about 31 graph levels) at parse time.
- opsets: the ONNX / ONNX-ML opsets a model imports must be ones the installed ONNX
  Runtime implements.
- operators: every op must be one ONNX or ONNX Runtime defines, or a model-local
  function (custom-op libraries cannot be registered, so ORT could never run it).
- names: invalid UTF-8 or control characters (a newline would break one-line errors).
- graph names: graph inputs/outputs listed twice, outputs nothing defines, tensors
  produced twice, tensors read but never defined, and cycles; nodes stored out of
  order (valid ONNX allows no such thing, but exporters write it) are sorted, and
  nodes that repeat an earlier node's name in the same graph are renamed (the ONNX IR
  wants node names unique per graph and onnxruntime refuses the model otherwise, but
  a node name is for diagnostics only: renaming changes nothing the model computes).
"""

from __future__ import annotations

import functools

import onnx

from adaptopt.errors import InputError
from adaptopt.graph.index import sort_topologically

MAX_GRAPH_DEPTH = 16
_ONNX_DOMAINS = {"": "", "ai.onnx": "", "ai.onnx.ml": "ai.onnx.ml"}


def node_bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a control-flow node holds (If branches, Loop and Scan bodies)."""
    if not node.attribute:  # most nodes: skip the attribute scan (100k-node graphs are walked thrice)
        return []
    bodies = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    bodies += [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
    return bodies


def graph_depth(graph: onnx.GraphProto, limit: int = MAX_GRAPH_DEPTH) -> int:
    """Deepest nesting of graphs under ``graph`` (1 = no control flow); stops once past ``limit``."""
    deepest = 1
    work = [(graph, 1)]
    while work:
        current, depth = work.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        for node in current.node:
            work.extend((body, depth + 1) for body in node_bodies(node))
    return deepest


def check_nesting(model: onnx.ModelProto, name: str) -> None:
    depth = graph_depth(model.graph)
    if depth > MAX_GRAPH_DEPTH:
        raise InputError(f"{name}: control-flow graphs are nested more than {MAX_GRAPH_DEPTH} levels deep; "
                         "adaptopt refuses such models")


@functools.lru_cache(maxsize=1)
def supported_opsets() -> dict[str, int]:
    """Highest ONNX / ONNX-ML opset the installed ONNX Runtime implements (ONNX's when ORT is absent)."""
    try:
        from onnxruntime.capi import _pybind_state as C
        schemas, source = C.get_all_operator_schema(), "onnxruntime"
    except ImportError:
        schemas, source = onnx.defs.get_all_schemas_with_history(), "onnx"
    best: dict[str, int] = {"": 0, "ai.onnx.ml": 0}
    for schema in schemas:
        domain = _ONNX_DOMAINS.get(schema.domain)
        if domain is not None:
            best[domain] = max(best[domain], schema.since_version)
    best["source"] = source  # type: ignore[assignment]
    return best


def check_opsets(model: onnx.ModelProto, name: str) -> None:
    supported = supported_opsets()
    for opset in model.opset_import:
        domain = _ONNX_DOMAINS.get(opset.domain)
        if domain is None:
            continue
        if opset.version < 1 or opset.version > supported[domain]:
            label = "default (ai.onnx)" if domain == "" else domain
            raise InputError(f"{name}: the model imports {label} opset {opset.version}, which the installed "
                             f"{supported['source']} does not support (supported: 1 to {supported[domain]})")


def check_graph_names(model: onnx.ModelProto, name: str) -> None:
    """Refuse duplicate graph inputs/outputs and outputs that nothing defines; sort nodes.

    Raises InputError naming the tensor or node for cycles, undefined inputs and
    tensors produced twice. Nodes stored out of topological order are reordered
    and repeated node names made unique, in place (the model's meaning does not change).
    """
    graph = model.graph
    rename_duplicate_nodes(graph)
    _refuse_duplicates([i.name for i in graph.input], f"{name}: graph input")
    _refuse_duplicates([o.name for o in graph.output], f"{name}: graph output")
    try:
        sort_topologically(graph)
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None
    defined = {o for node in graph.node for o in node.output if o} | {i.name for i in graph.input}
    defined |= {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    for out in graph.output:
        if out.name not in defined:
            raise InputError(f"{name}: graph output '{out.name}' is not produced by any node, input or initializer")


def rename_duplicate_nodes(graph: onnx.GraphProto) -> None:
    """Give a node that repeats an earlier node's name in its graph (control-flow bodies
    included, each its own namespace) the name ``NAME_k``; the first keeps its name.

    The ONNX checker accepts such models and onnxruntime refuses them ("two nodes with same
    node name"), yet a node name only labels the node: renaming it is how the model gets
    run. Unnamed nodes stay unnamed (any number of them is allowed).
    """
    work = [graph]
    while work:
        current = work.pop()
        names = [node.name for node in current.node if node.name]
        if len(set(names)) != len(names):
            _rename_repeats(current, set(names))
        for node in current.node:
            work.extend(node_bodies(node))


def _rename_repeats(graph: onnx.GraphProto, taken: set[str]) -> None:
    """Rename repeats in file order, skipping every name already in ``graph`` (a node may
    already be called ``NAME_1``), so no new clash is made."""
    seen: set[str] = set()
    counts: dict[str, int] = {}
    for node in graph.node:
        if not node.name or node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name
        candidate = base
        while candidate in taken:
            counts[base] = counts.get(base, 0) + 1
            candidate = f"{base}_{counts[base]}"
        node.name = candidate
        taken.add(candidate)
        seen.add(candidate)


def check_names_are_text(model: onnx.ModelProto, name: str) -> None:
    """Names must be printable text.

    Protobuf hands invalid UTF-8 in ONNX's proto2 strings back as bytes, and a
    newline inside a name would break every one-line message that quotes it.
    """
    graph = model.graph
    texts = [item.name for item in (graph, *graph.input, *graph.output, *graph.value_info, *graph.initializer)]
    work = [graph]
    while work:
        for node in work.pop().node:
            texts += [node.name, node.op_type, node.domain, *node.input, *node.output]
            work.extend(node_bodies(node))
    for text in texts:
        if isinstance(text, bytes):
            raise InputError(f"{name}: the name {text[:40]!r} is not valid UTF-8 text")
        if not text.isprintable():
            raise InputError(f"{name}: the name {text[:40]!r} contains control characters")


def _refuse_duplicates(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for item in names:
        if item in seen:
            raise InputError(f"{what} '{item}' is listed twice")
        seen.add(item)


@functools.lru_cache(maxsize=1)
def known_operators() -> frozenset[tuple[str, str]]:
    """(domain, op_type) of every operator ONNX or the installed ONNX Runtime defines."""
    known = {(_ONNX_DOMAINS.get(s.domain, s.domain), s.name) for s in onnx.defs.get_all_schemas_with_history()}
    try:
        from onnxruntime.capi import _pybind_state as C
        known |= {(_ONNX_DOMAINS.get(s.domain, s.domain), s.name) for s in C.get_all_operator_schema()}
    except ImportError:
        pass
    return frozenset(known)


def check_operators(model: onnx.ModelProto, name: str) -> None:
    """Refuse ops that neither ONNX, ONNX Runtime nor the model's own functions define.

    adaptopt runs every subgraph in ONNX Runtime, which cannot run such a node.
    """
    known = known_operators() | {(f.domain, f.name) for f in model.functions}
    work = [model.graph]
    while work:
        graph = work.pop()
        for node in graph.node:
            key = (_ONNX_DOMAINS.get(node.domain, node.domain), node.op_type)
            if key not in known:
                domain = node.domain or "ai.onnx"
                raise InputError(f"{name}: node '{node.name}' uses operator {domain}::{node.op_type}, which neither "
                                 "ONNX nor onnxruntime implements and the model does not define")
            work.extend(node_bodies(node))
