"""Gradient accumulation (hybrid): training graphs only.

``gradient_accumulation`` works on ONNX training graphs (``ModelProto.training_info``
whose algorithm ends in an ``ai.onnx.preview.training`` optimizer: Adagrad, Momentum,
Adam). Each gradient ``G`` feeding the optimizer is summed into a new state initializer
``A`` (``A' = A + G``), the optimizer sees ``A' / k``, and its outputs (weights, moments)
and ``A`` are committed only every ``k``-th call (``Where`` on a step counter that is
state too). With a mean loss, ``k`` micro-batches of size ``b`` then make the same
update as one batch of ``k * b``, in the memory of one micro-batch. The inference graph
(the boundary) is untouched. Inference models, and ORT training graphs that already
accumulate (``InPlaceAccumulatorV2``), are reported as not applicable with the reason.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from adaptopt.passes.base import Applicability, Pass, PassContext, no, yes

TRAINING_DOMAIN = "ai.onnx.preview.training"
OPTIMIZERS = {"Adagrad": 3, "Momentum": 3, "Adam": 4}  # inputs per tensor after R and T


def _optimizers(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.domain == TRAINING_DOMAIN and n.op_type in OPTIMIZERS]


class GradientAccumulationPass(Pass):
    name = "gradient_accumulation"
    category = "hybrid"
    guarantee = "exact"
    description = "Training graphs: sum gradients over k calls, apply the optimizer every k-th (k micro-batches)"
    search_space: ClassVar[dict] = {"steps": (2, 4, 8)}
    scope = "model"  # training_info belongs to the whole model
    steps = 4

    def check(self, model: onnx.ModelProto, ctx: PassContext) -> Applicability:
        ops = {(n.domain, n.op_type) for n in model.graph.node}
        found = [o for info in model.training_info for o in _optimizers(info.algorithm)]
        if found:
            if any(t.name.startswith(self.name + "/") for t in model.graph.initializer):
                return no("the training graph already accumulates gradients (adaptopt)")
            return yes(f"{len(found)} optimizer step(s) in training_info")
        if any(op.startswith("InPlaceAccumulator") for _, op in ops):
            return no("ORT training graph: gradients already accumulate through InPlaceAccumulatorV2")
        if any(op.endswith("Grad") or op == "Gradient" for _, op in ops):
            return no("gradient graph without an optimizer step in training_info: nothing to accumulate into")
        return no("inference graph: no training_info, gradient or optimizer ops")

    def transform(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict]:
        inits = {t.name: t for t in model.graph.initializer}
        count = 0
        for info in model.training_info:
            if _optimizers(info.algorithm):
                count += self._accumulate(model, info, inits)
        if count and not any(i.domain == TRAINING_DOMAIN for i in model.opset_import):
            model.opset_import.append(helper.make_opsetid(TRAINING_DOMAIN, 1))
        return model, {"rewrites": count, "steps": self.steps}

    def _accumulate(self, model: onnx.ModelProto, info: onnx.TrainingInfoProto, inits: dict) -> int:
        alg = info.algorithm
        p = f"{self.name}/"
        step = p + "step"
        model.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), step))
        prelude = [
            helper.make_node("Constant", [], [p + "one"], value=numpy_helper.from_array(np.array(1, np.int64))),
            helper.make_node("Constant", [], [p + "k"], value=numpy_helper.from_array(np.array(self.steps, np.int64))),
            helper.make_node("Constant", [], [p + "zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
            helper.make_node("Add", [step, p + "one"], [p + "next"]),
            helper.make_node("Mod", [p + "next", p + "k"], [p + "phase"]),
            helper.make_node("Equal", [p + "phase", p + "zero"], [p + "commit"]),
            helper.make_node("Where", [p + "commit", p + "zero", p + "next"], [p + "step_new"]),
        ]
        new_outputs = [helper.make_tensor_value_info(p + "step_new", onnx.TensorProto.INT64, [])]
        bindings = [(step, p + "step_new")]
        nodes, count = [], 0
        for node in list(alg.node):
            if node.domain != TRAINING_DOMAIN or node.op_type not in OPTIMIZERS:
                nodes.append(node)
                continue
            n = (len(node.input) - 2) // OPTIMIZERS[node.op_type]
            weights, grads = list(node.input[2:2 + n]), list(node.input[2 + n:2 + 2 * n])
            states = weights + list(node.input[2 + 2 * n:])
            for i, (w, g) in enumerate(zip(weights, grads)):
                if w not in inits:
                    continue
                ref = numpy_helper.to_array(inits[w])
                acc, tag = f"{p}acc_{count}", f"{p}g{count}_"
                model.graph.initializer.append(numpy_helper.from_array(np.zeros_like(ref), acc))
                nodes += [
                    helper.make_node("Add", [acc, g], [tag + "sum"]),
                    helper.make_node("Constant", [], [tag + "k"],
                                     value=numpy_helper.from_array(np.array(self.steps, ref.dtype))),
                    helper.make_node("Div", [tag + "sum", tag + "k"], [tag + "mean"]),
                    helper.make_node("Constant", [], [tag + "zero"], value=numpy_helper.from_array(np.zeros((), ref.dtype))),
                    helper.make_node("Where", [p + "commit", tag + "zero", tag + "sum"], [tag + "acc_new"]),
                ]
                node.input[2 + n + i] = tag + "mean"
                new_outputs.append(helper.make_tensor_value_info(tag + "acc_new", inits[w].data_type, list(ref.shape)))
                bindings.append((acc, tag + "acc_new"))
                count += 1
            nodes.append(node)
            for j, (out, state) in enumerate(zip(list(node.output), states)):
                if out:
                    node.output[j] = f"{p}{out}_candidate"
                    nodes.append(helper.make_node("Where", [p + "commit", node.output[j], state], [out]))
        del alg.node[:]
        alg.node.extend(prelude + nodes)
        for i, node in enumerate(alg.node):
            node.name = node.name or f"{p}{node.op_type}_{i}"
        alg.output.extend(new_outputs)
        for key, value in bindings:
            info.update_binding.add(key=key, value=value)
        return count
