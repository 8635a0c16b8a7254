"""Cleanups every optimizer has (all exact).

- ``fold_constants``: nodes whose inputs are all constant (and ``Shape``/``Size`` of a
  tensor with a static shape) are evaluated once with ONNX Runtime and replaced by
  initializers; ``Constant`` nodes become initializers. Outputs that would grow the
  model (larger than ``MAX_FOLD_BYTES`` and than their inputs) stay computed.
- ``eliminate_identity``: ``Identity``, inference ``Dropout``, ``Cast`` to the same type,
  identity ``Transpose``, single-input ``Concat``/``Sum``, and shape ops whose static
  output shape equals their input's -> removed.
- ``eliminate_common_subexpressions``: identical nodes (same op, attributes, inputs) and
  identical constants (same dtype, shape, bytes) -> one.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from adaptopt.config import TargetConfig
from adaptopt.graph.index import NONDETERMINISTIC
from adaptopt.passes.base import PassContext
from adaptopt.passes.edit import GraphEditor, RulePass, attr, has_subgraph

# Q/DQ pairs are the quantization format itself: folding DQ(weight) would undo it.
NEVER_FOLD = NONDETERMINISTIC | {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
MAX_FOLD_BYTES = 1 << 22


def _is_default(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


class FoldConstantsPass(RulePass):
    name = "fold_constants"
    category = "memory"
    guarantee = "exact"
    description = "Evaluate constant subexpressions (and Shape of static tensors) once; Constant -> initializer"
    no_match: ClassVar[str] = "no node has only constant inputs"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        known: dict[str, np.ndarray] = {}
        foldable: list[onnx.NodeProto] = []
        for node in ed.nodes:
            value = self._static_value(ed, node, known)
            if value is not None:
                known[node.output[0]] = value
                foldable.append(node)
            elif self._foldable(ed, node, known):
                foldable.append(node)
                known.update({o: None for o in node.output})
        if not foldable:
            return 0
        values = _evaluate(ed, [n for n in foldable if n.output[0] not in known or known[n.output[0]] is None], known)
        if values is None:
            return 0
        known.update(values)
        return self._replace(ed, foldable, known)

    @staticmethod
    def _static_value(ed: GraphEditor, node: onnx.NodeProto, known: dict) -> np.ndarray | None:
        """Constant nodes, and Shape/Size of a tensor whose shape is static."""
        if not _is_default(node) or ed.is_output(node.output[0]):
            return None
        if node.op_type == "Constant":
            return ed.const(node.output[0])
        if node.op_type not in ("Shape", "Size") or node.input[0] in known:
            return None
        shape = ed.shape(node.input[0])
        if shape is None:
            return None
        if node.op_type == "Size":
            return np.array(int(np.prod(shape)), np.int64)
        start, end = attr(node, "start", 0), attr(node, "end", None)
        return np.array(shape[start:end], np.int64)

    @staticmethod
    def _foldable(ed: GraphEditor, node: onnx.NodeProto, known: dict) -> bool:
        if (not _is_default(node) or node.op_type in NEVER_FOLD or has_subgraph(node) or not node.input
                or any(ed.is_output(o) for o in node.output)):
            return False
        return all(not name or name in known or ed.is_const(name) for name in node.input)

    def _replace(self, ed: GraphEditor, foldable: list[onnx.NodeProto], known: dict) -> int:
        """Materialize the folded tensors that non-folded nodes read; drop the rest."""
        folded = {id(n) for n in foldable}
        needed: set[str] = set()
        for node in ed.nodes:
            if id(node) not in folded:
                needed.update(n for n in node.input if n in known)
        # an output that would blow up the model stays computed by its node
        for node in reversed(foldable):  # consumers first, so an unfolded node's inputs get checked
            if node.op_type != "Constant" and any(o in needed for o in node.output) and self._too_big(ed, node, known):
                folded.discard(id(node))
                needed.update(n for n in node.input if n in known)
        kept = [n for n in foldable if id(n) in folded]
        for node in kept:
            for out in node.output:
                if out in needed:
                    ed.inits[out] = numpy_helper.from_array(np.asarray(known[out]), out)
        ed.remove(*kept)
        return len(kept)

    @staticmethod
    def _too_big(ed: GraphEditor, node: onnx.NodeProto, known: dict) -> bool:
        size = sum(np.asarray(known[o]).nbytes for o in node.output if known.get(o) is not None)
        inputs = sum(np.asarray(known[n]).nbytes if n in known and known[n] is not None else
                     (ed.const(n).nbytes if ed.is_const(n) else 0) for n in node.input if n)
        return size > MAX_FOLD_BYTES and size > inputs


def _evaluate(ed: GraphEditor, nodes: list[onnx.NodeProto], known: dict) -> dict[str, np.ndarray] | None:
    """Run the foldable nodes once in ONNX Runtime (optimizations off); None if ORT refuses."""
    if not nodes:
        return {}
    from adaptopt.runtime import make_session, ort_errors, run

    produced = {o for n in nodes for o in n.output if o}
    inputs = {n for node in nodes for n in node.input if n and n not in produced}
    inits = [numpy_helper.from_array(np.asarray(known[n]) if known.get(n) is not None else ed.const(n), n)
             for n in sorted(inputs)]
    outputs = [onnx.ValueInfoProto(name=o) for o in sorted(produced)]
    graph = helper.make_graph(list(nodes), "fold", [], outputs, initializer=inits)
    probe = helper.make_model(graph, opset_imports=list(ed.model.opset_import))
    probe.ir_version = ed.model.ir_version
    try:
        session = make_session(probe, TargetConfig(execution_providers=("CPUExecutionProvider",)), level="disable")
        return run(session, {}, [o.name for o in outputs])
    except ort_errors():
        return None


# ---------------------------------------------------------------- identity elimination
_SHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand"})


class EliminateIdentityPass(RulePass):
    name = "eliminate_identity"
    category = "compute"
    guarantee = "exact"
    description = "Remove Identity, inference Dropout, same-type Cast, identity Transpose and no-op shape ops"
    no_match: ClassVar[str] = "no identity-like node"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        count = 0
        for node in list(ed.nodes):
            if _is_default(node) and self._is_identity(ed, node) and ed.bypass(node, node.input[0], node.output[0]):
                count += 1
        return count

    @staticmethod
    def _is_identity(ed: GraphEditor, node: onnx.NodeProto) -> bool:
        op = node.op_type
        if not node.input or not node.input[0]:
            return False
        if op == "Identity":
            return True
        if op == "Dropout":
            mode = ed.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(False)
            mask_used = len(node.output) > 1 and node.output[1] and (ed.consumers(node.output[1])
                                                                      or ed.is_output(node.output[1]))
            return mode is not None and not bool(mode) and not mask_used
        if op == "Cast":
            return ed.elem_type(node.input[0]) == attr(node, "to")
        if op == "Transpose":
            perm = attr(node, "perm")
            return perm is not None and list(perm) == list(range(len(perm)))
        if op in ("Concat", "Sum", "Max", "Min", "Mean") and len(node.input) == 1:
            return True
        if op in _SHAPE_OPS:
            before, after = ed.shape(node.input[0]), ed.shape(node.output[0])
            return before is not None and before == after
        return False


# ---------------------------------------------------------------- CSE
class CommonSubexpressionPass(RulePass):
    name = "eliminate_common_subexpressions"
    category = "compute"
    guarantee = "exact"
    description = "Merge identical nodes (same op, attributes, inputs) and identical constants"
    no_match: ClassVar[str] = "no duplicate node or constant"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        return self._dedupe_constants(ed) + self._dedupe_nodes(ed)

    @staticmethod
    def _dedupe_constants(ed: GraphEditor) -> int:
        first: dict[bytes, str] = {}
        count = 0
        names = [n for n in ed.inits if n not in ed.overridable]  # a weight the user may feed is no duplicate
        names += [n.output[0] for n in ed.nodes if n.op_type == "Constant" and _is_default(n)]
        for name in names:
            value = ed.const(name)
            if value is None or value.dtype == object:
                continue
            digest = hashlib.blake2b(repr((value.dtype.str, value.shape)).encode() + value.tobytes(),
                                     digest_size=20).digest()
            keep = first.setdefault(digest, name)
            if keep == name or ed.is_output(name) or not ed.consumers(name):
                continue
            ed.replace_uses(name, keep)
            count += 1
        return count

    @staticmethod
    def _dedupe_nodes(ed: GraphEditor) -> int:
        seen: dict[tuple, onnx.NodeProto] = {}
        count = 0
        ed.nodes = _sorted(ed)
        for node in list(ed.nodes):
            if (node.op_type in NONDETERMINISTIC or has_subgraph(node) or not node.output
                    or (node.op_type == "Constant" and _is_default(node))):
                continue
            key = (node.domain, node.op_type, tuple(node.input), tuple(bool(o) for o in node.output),
                   tuple(sorted(a.SerializeToString() for a in node.attribute)))
            kept = seen.setdefault(key, node)
            if kept is node or any(ed.is_output(o) for o in node.output):
                continue
            ed.remove(node)
            for old, new in zip(node.output, kept.output):
                if old:
                    ed.replace_uses(old, new)
            count += 1
        return count


def _sorted(ed: GraphEditor) -> list[onnx.NodeProto]:
    from adaptopt.passes.edit import toposort
    return toposort(ed.nodes, set(ed.graph_inputs) | set(ed.inits))
