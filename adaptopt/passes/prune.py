"""Pruning: dead code and structural channel removal (exact), magnitude pruning (lossy).

- ``eliminate_dead_code``: nodes whose outputs nobody reads, unused optional outputs
  (Dropout mask, BatchNormalization statistics, MaxPool indices) and unused initializers.
- ``prune_zero_channels``: ``Conv``/``Gemm``/``MatMul`` output channels whose weights are
  all zero are constant (their bias, through an elementwise activation); they are cut
  from the producer and from the consumer (``Conv`` group 1, ``Gemm``, ``MatMul``), the
  constant folded into the consumer's bias where that is exact.
- ``prune_channels_magnitude`` (lossy): the same cut for the channels with the smallest
  L1 weight norm, at the largest ratio that keeps the accuracy budget on ``ctx.feeds``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx

from adaptopt.graph.index import subgraph_outer_inputs
from adaptopt.passes.base import PassContext
from adaptopt.passes.edit import GraphEditor, RulePass, attr, has_subgraph, set_attr
from adaptopt.passes.measure import budget_reason

OPTIONAL_OUTPUTS = {"Dropout": 1, "BatchNormalization": 1, "MaxPool": 1, "LSTM": 0, "GRU": 0, "RNN": 0}


def remove_dead_nodes(ed: GraphEditor) -> int:
    """One sweep in reverse topological order with use counts (consumers go first)."""
    uses = Counter()
    for node in ed.nodes:
        uses.update(set(node.input) | (set(subgraph_outer_inputs(node)) if has_subgraph(node) else set()))
    pinned = ed.used_names() - {n for node in ed.nodes for n in node.input}  # outputs, training refs
    dead = []
    for node in reversed(ed.nodes):
        if node.output and not any(o and (uses[o] > 0 or o in pinned) for o in node.output):
            dead.append(node)
            uses.subtract(set(node.input) | (set(subgraph_outer_inputs(node)) if has_subgraph(node) else set()))
    ed.remove(*dead)
    return len(dead)


class EliminateDeadCodePass(RulePass):
    name = "eliminate_dead_code"
    category = "compute"
    guarantee = "exact"
    description = "Remove nodes nobody reads, unused optional outputs and unused initializers"
    no_match: ClassVar[str] = "no dead node, output or initializer"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        count = remove_dead_nodes(ed)
        used = ed.used_names()
        for node in ed.nodes:
            first = OPTIONAL_OUTPUTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if first is None:
                continue
            for i in range(first, len(node.output)):
                if node.output[i] and node.output[i] not in used and any(o in used for o in node.output):
                    ed.forget_type(node.output[i])
                    node.output[i] = ""
                    count += 1
            while len(node.output) > 1 and not node.output[-1]:
                node.output.pop()
        ed.touch()
        listed = {i.name for i in ed.graph.input}  # commit keeps an initializer listed as an input
        count += sum(1 for name in ed.inits if name not in used and name not in listed)
        return count


# ---------------------------------------------------------------- channel pruning
_ACTIVATIONS = {
    "Relu": lambda v, n: np.maximum(v, 0),
    "LeakyRelu": lambda v, n: np.where(v >= 0, v, v * attr(n, "alpha", 0.01)),
    "Tanh": lambda v, n: np.tanh(v),
    "Sigmoid": lambda v, n: 1 / (1 + np.exp(-v)),
    "Identity": lambda v, n: v,
}


@dataclass
class ChannelPair:
    """A producer whose output channels feed one consumer, through activations."""

    producer: onnx.NodeProto
    chain: list[onnx.NodeProto]
    consumer: onnx.NodeProto
    weight: np.ndarray  # producer weight, output channels on axis 0
    bias: np.ndarray  # producer bias per output channel (zeros when absent)


def _out_weight(ed: GraphEditor, node: onnx.NodeProto) -> np.ndarray | None:
    """The producer's weight with output channels on axis 0, or None."""
    w = ed.const(node.input[1]) if len(node.input) > 1 else None
    if w is None or w.dtype != np.float32:
        return None
    if node.op_type == "Conv" and attr(node, "group", 1) == 1 and w.ndim >= 3:
        return w
    if node.op_type == "Gemm" and w.ndim == 2 and not attr(node, "transA", 0):
        return w if attr(node, "transB", 0) else w.T
    if node.op_type == "MatMul" and w.ndim == 2:
        return w.T
    return None


def _out_bias(ed: GraphEditor, node: onnx.NodeProto, channels: int) -> np.ndarray | None:
    if len(node.input) < 3 or not node.input[2]:
        return np.zeros(channels, np.float32)
    b = ed.const(node.input[2])
    if b is None:
        return None
    if node.op_type == "Gemm":
        b = b * attr(node, "beta", 1.0)
        if b.size not in (1, channels) or b.ndim > 2 or (b.ndim == 2 and b.shape[0] != 1):
            return None
        return np.broadcast_to(b.reshape(-1), (channels,)).astype(np.float32)
    return b.astype(np.float32) if b.shape == (channels,) else None


def _in_weight_axis(ed: GraphEditor, node: onnx.NodeProto, tensor: str) -> int | None:
    """Axis of the consumer's weight indexed by the incoming channel, or None."""
    w = ed.const(node.input[1]) if len(node.input) > 1 else None
    if w is None or node.input[0] != tensor or tensor in node.input[1:]:
        return None
    if node.op_type == "Conv" and attr(node, "group", 1) == 1:
        return 1
    if node.op_type == "Gemm" and w.ndim == 2 and not attr(node, "transA", 0):
        return 1 if attr(node, "transB", 0) else 0
    if node.op_type == "MatMul" and w.ndim == 2:
        return 0
    return None


def channel_pairs(ed: GraphEditor) -> list[ChannelPair]:
    pairs = []
    for node in ed.nodes:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        weight = _out_weight(ed, node)
        if weight is None or (node.op_type == "Gemm" and attr(node, "alpha", 1.0) != 1.0):
            continue
        bias = _out_bias(ed, node, weight.shape[0])
        chain, tensor = [], node.output[0]
        nxt = ed.sole_consumer(tensor)
        while nxt is not None and nxt.op_type in _ACTIVATIONS and nxt.domain in ("", "ai.onnx"):
            chain.append(nxt)
            tensor = nxt.output[0]
            nxt = ed.sole_consumer(tensor)
        if bias is None or nxt is None or _in_weight_axis(ed, nxt, tensor) is None:
            continue
        if node.op_type == "Conv" and nxt.op_type != "Conv" or node.op_type != "Conv" and nxt.op_type == "Conv":
            continue  # the channel axis must be the same on both sides
        pairs.append(ChannelPair(node, chain, nxt, weight, bias))
    return pairs


def _channel_values(pair: ChannelPair, values: np.ndarray) -> np.ndarray:
    for node in pair.chain:
        values = _ACTIVATIONS[node.op_type](values, node)
    return values.astype(np.float32)


def _absorbs_constants(ed: GraphEditor, consumer: onnx.NodeProto) -> bool:
    """Can the consumer fold a constant input channel into its bias exactly?"""
    if consumer.op_type == "Conv":
        pads = attr(consumer, "pads", None)
        auto = attr(consumer, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        return auto in ("NOTSET", "VALID") and not any(pads or [])
    return consumer.op_type == "Gemm" and attr(consumer, "alpha", 1.0) == 1.0


def cut_channels(ed: GraphEditor, pair: ChannelPair, drop: np.ndarray, values: np.ndarray) -> bool:
    """Remove channels ``drop`` (bool mask) whose activation value is the constant ``values``."""
    consumer, producer = pair.consumer, pair.producer
    if drop.all() or not drop.any():
        return False
    if np.any(values[drop] != 0) and not _absorbs_constants(ed, consumer):
        return False
    keep = ~drop
    axis = _in_weight_axis(ed, consumer, (pair.chain[-1] if pair.chain else producer).output[0])
    w2 = ed.const(consumer.input[1])
    if np.any(values[drop] != 0):
        per_out = np.moveaxis(w2, axis, -1)[..., drop] @ values[drop]
        per_out = per_out.reshape(per_out.shape[0], -1).sum(axis=1) if per_out.ndim > 1 else per_out
        has_bias = len(consumer.input) > 2 and bool(consumer.input[2])
        old = ed.const(consumer.input[2]) if has_bias else None
        if has_bias and old is None:
            return False  # a bias computed or fed at run time (overridable) has no value to add to
        if consumer.op_type == "Gemm":
            old = np.zeros(per_out.shape, np.float32) if old is None else old * attr(consumer, "beta", 1.0)
            set_attr(consumer, "beta", 1.0)
        elif old is None:
            old = np.zeros(per_out.shape, np.float32)
        new_bias = (old + per_out).astype(np.float32)
        if len(consumer.input) < 3:
            consumer.input.append("")
        ed.private_const(consumer, 2, new_bias, "pruned_bias")
    ed.private_const(consumer, 1, np.compress(keep, w2, axis=axis), "pruned_weight")
    w = ed.const(producer.input[1])
    out_axis = {"Conv": 0, "MatMul": 1, "Gemm": 0 if attr(producer, "transB", 0) else 1}[producer.op_type]
    ed.private_const(producer, 1, np.compress(keep, w, axis=out_axis), "pruned_weight")
    if len(producer.input) > 2 and producer.input[2]:
        b = ed.const(producer.input[2])
        if b.size > 1:
            ed.private_const(producer, 2, np.compress(keep, b, axis=b.ndim - 1), "pruned_bias")
    for node in [producer] + pair.chain:
        ed.forget_type(node.output[0])
    return True


class PruneZeroChannelsPass(RulePass):
    name = "prune_zero_channels"
    category = "compute"
    guarantee = "exact"
    description = "Cut output channels with all-zero weights from Conv/Gemm/MatMul and their consumer"
    no_match: ClassVar[str] = "no Conv/Gemm/MatMul output channel with all-zero weights feeding a prunable consumer"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        count = 0
        for pair in channel_pairs(ed):
            flat = pair.weight.reshape(pair.weight.shape[0], -1)
            drop = ~flat.any(axis=1)
            if cut_channels(ed, pair, drop, _channel_values(pair, pair.bias)):
                count += 1
        return count


class PruneMagnitudePass(RulePass):
    name = "prune_channels_magnitude"
    category = "compute"
    guarantee = "lossy"
    description = "Cut the lowest-L1 output channels of Conv/Gemm/MatMul pairs, largest ratio within the budget"
    search_space: ClassVar[dict] = {"ratio": (0.5, 0.25, 0.125, 0.0625)}
    no_match: ClassVar[str] = "no Conv/Gemm/MatMul pair whose channels can be cut within the budget"

    def rewrite(self, ed: GraphEditor, ctx: PassContext) -> int:
        ratios = self.search_space["ratio"] if ctx.feeds is not None else self.search_space["ratio"][-1:]
        for ratio in ratios:
            trial = onnx.ModelProto()
            trial.CopyFrom(ed.commit())
            trial_ed = GraphEditor(trial, self.name)
            count = self._cut(trial_ed, ratio)
            if count and not budget_reason(ed.model, trial_ed.commit(), ctx):
                return self._cut(ed, ratio)
        return 0

    @staticmethod
    def _cut(ed: GraphEditor, ratio: float) -> int:
        count = 0
        for pair in channel_pairs(ed):
            norms = np.abs(pair.weight.reshape(pair.weight.shape[0], -1)).sum(axis=1)
            n_drop = int(len(norms) * ratio)
            if n_drop < 1:
                continue
            drop = np.zeros(len(norms), bool)
            drop[np.argsort(norms, kind="stable")[:n_drop]] = True
            if cut_channels(ed, pair, drop, _channel_values(pair, pair.bias)):
                count += 1
        return count
