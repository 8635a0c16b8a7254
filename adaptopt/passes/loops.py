"""Loop unrolling (compute, exact).

``unroll_loops``: ``Loop`` with a constant trip count ``M`` (1 <= M <= ``MAX_TRIPS``), a
constant-true (or absent) condition and a body whose condition output is always true
-> ``M`` renamed copies of the body; ``Scan`` with a static sequence length likewise
(slices by ``Gather``, outputs by ``Unsqueeze`` + ``Concat``, both directions). Bodies
with nested control flow are left alone. Each iteration of an ONNX Runtime Loop runs
its body as a separate subgraph execution; unrolled, the copies are ordinary nodes that
ORT can fuse and plan memory for.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx

from adaptopt.passes.base import PassContext, default_opset
from adaptopt.passes.edit import GraphEditor, RulePass, attr, has_subgraph

MAX_TRIPS = 64


def _always_true(body: onnx.GraphProto) -> bool:
    """Does the body's condition output always equal true?"""
    cond_in, cond_out = body.input[1].name, body.output[0].name
    name = cond_out
    producers = {o: n for n in body.node for o in n.output}
    inits = {t.name: t for t in body.initializer}
    for _ in range(len(body.node) + 1):
        if name == cond_in:
            return True
        if name in inits:
            return bool(onnx.numpy_helper.to_array(inits[name]).all())
        node = producers.get(name)
        if node is None:
            return False
        if node.op_type == "Identity":
            name = node.input[0]
        elif node.op_type == "Constant":
            value = onnx.numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].name == "value" else None
            return value is not None and bool(value.all())
        else:
            return False
    return False


class UnrollLoopsPass(RulePass):
    name = "unroll_loops"
    category = "compute"
    guarantee = "exact"
    description = f"Unroll Loop/Scan with a static trip count (<= {MAX_TRIPS}) into plain nodes"
    no_match: ClassVar[str] = f"no Loop/Scan with a static trip count <= {MAX_TRIPS} and a flat body"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        count = 0
        for node in list(ed.nodes):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Loop" and self._unroll_loop(ed, node) or node.op_type == "Scan" and default_opset(ed.model) >= 9 and self._unroll_scan(ed, node):
                count += 1
        return count

    # ---------------------------------------------------------------- Loop
    def _unroll_loop(self, ed: GraphEditor, loop: onnx.NodeProto) -> bool:
        body = attr(loop, "body")
        trips = ed.const(loop.input[0]) if loop.input[0] else None
        cond = ed.const(loop.input[1]) if len(loop.input) > 1 and loop.input[1] else np.array(True)
        if (trips is None or trips.size != 1 or not 1 <= int(trips.reshape(-1)[0]) <= MAX_TRIPS or cond is None
                or not bool(cond.all()) or any(has_subgraph(n) for n in body.node) or not _always_true(body)):
            return False
        trips = int(trips.reshape(-1)[0])
        carried = list(loop.input[2:])
        n_carried = len(carried)
        scans: list[list[str]] = [[] for _ in body.output[1 + n_carried:]]
        shared = self._body_constants(ed, body)
        true = ed.add_const(np.array(True), "loop_cond")
        for i in range(trips):
            mapping = dict(shared)
            mapping[body.input[0].name] = ed.add_const(np.array(i, np.int64), "loop_iter")
            mapping[body.input[1].name] = true
            mapping.update({b.name: c for b, c in zip(body.input[2:], carried)})
            self._copy_body(ed, body, mapping, f"it{i}")
            carried = [mapping.get(o.name, o.name) for o in body.output[1:1 + n_carried]]
            for k, o in enumerate(body.output[1 + n_carried:]):
                scans[k].append(mapping.get(o.name, o.name))
        ed.remove(loop)
        for value, out in zip(carried, loop.output[:n_carried]):
            if out:
                ed.add_node("Identity", [value], [out], base="loop_out")
        for values, out in zip(scans, loop.output[n_carried:]):
            if out:
                self._stack(ed, values, out, axis=0)
        return True

    @staticmethod
    def _body_constants(ed: GraphEditor, body: onnx.GraphProto) -> dict[str, str]:
        mapping = {}
        for t in body.initializer:
            mapping[t.name] = ed.add_const(onnx.numpy_helper.to_array(t), t.name)
        return mapping

    @staticmethod
    def _copy_body(ed: GraphEditor, body: onnx.GraphProto, mapping: dict[str, str], tag: str) -> None:
        for node in body.node:
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.name = ed.fresh(f"{tag}_{node.name or node.op_type}")
            for j, name in enumerate(new.input):
                new.input[j] = mapping.get(name, name)  # names not in the body: outer scope
            for j, name in enumerate(new.output):
                if name:
                    mapping[name] = new.output[j] = ed.fresh(f"{tag}_{name}")
            ed.nodes.append(new)
        ed.touch()

    @staticmethod
    def _stack(ed: GraphEditor, values: list[str], out: str, axis: int) -> None:
        parts = []
        for value in values:
            if default_opset(ed.model) >= 13:
                axes = ed.add_const(np.array([axis], np.int64), "scan_axes")
                parts.append(ed.add_node("Unsqueeze", [value, axes], base="scan_unsqueeze").output[0])
            else:
                parts.append(ed.add_node("Unsqueeze", [value], base="scan_unsqueeze", axes=[axis]).output[0])
        ed.add_node("Concat", parts, [out], base="scan_concat", axis=axis)

    # ---------------------------------------------------------------- Scan
    def _unroll_scan(self, ed: GraphEditor, scan: onnx.NodeProto) -> bool:
        body = attr(scan, "body")
        n_scan = attr(scan, "num_scan_inputs")
        n_state = len(scan.input) - n_scan
        scan_inputs = list(scan.input[n_state:])
        shapes = [ed.shape(x) for x in scan_inputs]
        if any(s is None for s in shapes) or any(has_subgraph(n) for n in body.node):
            return False
        in_axes = [a % len(s) for a, s in zip(attr(scan, "scan_input_axes", [0] * n_scan), shapes)]
        in_dirs = attr(scan, "scan_input_directions", [0] * n_scan)
        lengths = {s[a] for s, a in zip(shapes, in_axes)}
        n_out = len(body.output) - n_state
        out_axes = attr(scan, "scan_output_axes", [0] * n_out)
        out_dirs = attr(scan, "scan_output_directions", [0] * n_out)
        if len(lengths) != 1 or not 1 <= next(iter(lengths)) <= MAX_TRIPS or any(a < 0 for a in out_axes):
            return False
        steps = next(iter(lengths))
        state = list(scan.input[:n_state])
        outs: list[list[str]] = [[] for _ in range(n_out)]
        shared = self._body_constants(ed, body)
        for i in range(steps):
            mapping = dict(shared)
            mapping.update({b.name: s for b, s in zip(body.input[:n_state], state)})
            for b, x, axis, direction in zip(body.input[n_state:], scan_inputs, in_axes, in_dirs):
                index = ed.add_const(np.array(steps - 1 - i if direction else i, np.int64), "scan_index")
                mapping[b.name] = ed.add_node("Gather", [x, index], base="scan_slice", axis=axis).output[0]
            self._copy_body(ed, body, mapping, f"step{i}")
            state = [mapping.get(o.name, o.name) for o in body.output[:n_state]]
            for k, o in enumerate(body.output[n_state:]):
                outs[k].append(mapping.get(o.name, o.name))
        ed.remove(scan)
        for value, out in zip(state, scan.output[:n_state]):
            if out:
                ed.add_node("Identity", [value], [out], base="scan_state")
        for values, out, axis, direction in zip(outs, scan.output[n_state:], out_axes, out_dirs):
            if out:
                self._stack(ed, values[::-1] if direction else values, out, axis)
        return True

