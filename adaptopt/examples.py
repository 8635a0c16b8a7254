"""Builders for the bundled example models, shaped the way real exporters leave them.

``models/make_models.py`` writes them to ``models/``; tests call the builders
directly. Weights are seeded random (He-scaled so activations stay finite).

- ``resnet``: Conv (no bias) + unfused BatchNormalization + Relu, residual Add,
  MaxPool, GlobalAveragePool, Flatten, Gemm head; an Identity and a Dropout left
  behind as older exporters do.
- ``bert``: word + position embeddings (position ids built in-graph from Shape /
  Range), decomposed LayerNorm (ReduceMean/Sub/Pow/Sqrt/Div), MatMul+Add
  projections, Reshape/Transpose heads, MatMul/Div/Add-mask/Softmax attention,
  decomposed exact GELU (Div/Erf/Add/Mul/Mul), pooler Gather+Gemm+Tanh; batch and
  sequence dims are dynamic.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from adaptopt.runtime import BUILT_MODEL_IR

OPSET = 17


class GraphBuilder:
    """Small helper: unique names, initializers, nodes."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.counter = 0

    def name(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def constant_node(self, base: str, array: np.ndarray) -> str:
        """A `Constant` node, as torch exporters emit for small literals."""
        out = self.name(base)
        self.nodes.append(helper.make_node("Constant", [], [out], name=self.name("Constant"),
                                           value=numpy_helper.from_array(np.asarray(array), out + "_v")))
        return out

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(f"{op_type.lower()}_out") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def weight(self, base: str, shape: tuple[int, ...], fan_in: int, gain: float = 2.0) -> str:
        std = np.sqrt(gain / max(fan_in, 1))
        return self.const(base, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def model(self, inputs, outputs, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="adaptopt.examples")
        model.ir_version = BUILT_MODEL_IR
        return model


# ---------------------------------------------------------------------- ResNet
def _conv_bn_relu(b: GraphBuilder, x: str, cin: int, cout: int, k: int, stride: int, relu: bool = True) -> str:
    w = b.weight("conv.weight", (cout, cin, k, k), cin * k * k)
    y = b.op("Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
    scale = b.const("bn.weight", b.rng.uniform(0.5, 1.5, cout).astype(np.float32))
    bias = b.const("bn.bias", b.rng.uniform(-0.1, 0.1, cout).astype(np.float32))
    mean = b.const("bn.running_mean", b.rng.uniform(-0.2, 0.2, cout).astype(np.float32))
    var = b.const("bn.running_var", b.rng.uniform(0.5, 2.0, cout).astype(np.float32))
    y = b.op("BatchNormalization", [y, scale, bias, mean, var], epsilon=1e-5)
    return b.op("Relu", [y]) if relu else y


def _basic_block(b: GraphBuilder, x: str, cin: int, cout: int, stride: int) -> str:
    y = _conv_bn_relu(b, x, cin, cout, 3, stride)
    y = _conv_bn_relu(b, y, cout, cout, 3, 1, relu=False)
    shortcut = x if (cin == cout and stride == 1) else _conv_bn_relu(b, x, cin, cout, 1, stride, relu=False)
    return b.op("Relu", [b.op("Add", [y, shortcut])])


def build_resnet(image: int = 96, widths: tuple[int, ...] = (32, 64, 128), blocks: int = 2,
                 classes: int = 100, seed: int = 0) -> onnx.ModelProto:
    b = GraphBuilder(seed)
    x = _conv_bn_relu(b, "input", 3, widths[0], 3, 2)
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = widths[0]
    for stage, cout in enumerate(widths):
        for i in range(blocks):
            x = _basic_block(b, x, cin, cout, 2 if (i == 0 and stage > 0) else 1)
            cin = cout
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Identity", [x])
    x = b.op("Flatten", [x], axis=1)
    x = b.op("Dropout", [x])
    w = b.weight("fc.weight", (classes, cin), cin, gain=1.0)
    bias = b.const("fc.bias", np.zeros(classes, np.float32) + 0.01)
    b.nodes.append(helper.make_node("Gemm", [x, w, bias], ["logits"], name="fc", transB=1))
    return b.model([helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, image, image])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], "resnet_small")


# ---------------------------------------------------------------------- BERT
def _layer_norm(b: GraphBuilder, x: str, hidden: int) -> str:
    mean = b.op("ReduceMean", [x], axes=[-1], keepdims=1)
    d = b.op("Sub", [x, mean])
    sq = b.op("Pow", [d, b.constant_node("two", np.array(2.0, np.float32))])
    var = b.op("ReduceMean", [sq], axes=[-1], keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [var, b.constant_node("eps", np.array(1e-12, np.float32))])])
    y = b.op("Div", [d, std])
    gamma = b.const("LayerNorm.weight", b.rng.uniform(0.8, 1.2, hidden).astype(np.float32))
    beta = b.const("LayerNorm.bias", b.rng.uniform(-0.05, 0.05, hidden).astype(np.float32))
    return b.op("Add", [b.op("Mul", [y, gamma]), beta])


def _linear(b: GraphBuilder, x: str, fin: int, fout: int, base: str) -> str:
    w = b.weight(f"{base}.weight", (fin, fout), fin, gain=1.0)
    bias = b.const(f"{base}.bias", b.rng.uniform(-0.02, 0.02, fout).astype(np.float32))
    return b.op("Add", [b.op("MatMul", [x, w]), bias])


def _gelu(b: GraphBuilder, x: str) -> str:
    e = b.op("Erf", [b.op("Div", [x, b.constant_node("sqrt2", np.array(np.sqrt(2.0), np.float32))])])
    y = b.op("Mul", [x, b.op("Add", [e, b.constant_node("one", np.array(1.0, np.float32))])])
    return b.op("Mul", [y, b.constant_node("half", np.array(0.5, np.float32))])


def _split_heads(b: GraphBuilder, x: str, heads: int, head_dim: int, perm: list[int]) -> str:
    shape = b.constant_node("shape", np.array([0, 0, heads, head_dim], np.int64))
    return b.op("Transpose", [b.op("Reshape", [x, shape])], perm=perm)


def _attention(b: GraphBuilder, x: str, mask_add: str, hidden: int, heads: int) -> str:
    head_dim = hidden // heads
    q = _split_heads(b, _linear(b, x, hidden, hidden, "attention.self.query"), heads, head_dim, [0, 2, 1, 3])
    k = _split_heads(b, _linear(b, x, hidden, hidden, "attention.self.key"), heads, head_dim, [0, 2, 3, 1])
    v = _split_heads(b, _linear(b, x, hidden, hidden, "attention.self.value"), heads, head_dim, [0, 2, 1, 3])
    scores = b.op("Div", [b.op("MatMul", [q, k]), b.constant_node("scale", np.array(np.sqrt(head_dim), np.float32))])
    probs = b.op("Softmax", [b.op("Add", [scores, mask_add])], axis=-1)
    ctx = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, b.constant_node("shape", np.array([0, 0, hidden], np.int64))])
    return _linear(b, ctx, hidden, hidden, "attention.output.dense")


def build_bert(vocab: int = 4000, hidden: int = 256, layers: int = 4, heads: int = 4, ffn: int = 1024,
               max_positions: int = 512, seed: int = 0) -> onnx.ModelProto:
    b = GraphBuilder(seed)
    word = b.const("embeddings.word_embeddings.weight", (b.rng.standard_normal((vocab, hidden)) * 0.5).astype(np.float32))
    pos = b.const("embeddings.position_embeddings.weight",
                  (b.rng.standard_normal((max_positions, hidden)) * 0.1).astype(np.float32))
    # position ids from the sequence length, as exporters build them
    seq_len = b.op("Gather", [b.op("Shape", ["input_ids"]), b.constant_node("one_idx", np.array(1, np.int64))], axis=0)
    positions = b.op("Range", [b.constant_node("zero", np.array(0, np.int64)), seq_len,
                               b.constant_node("step", np.array(1, np.int64))])
    positions = b.op("Unsqueeze", [positions, b.constant_node("axes0", np.array([0], np.int64))])
    x = b.op("Add", [b.op("Gather", [word, "input_ids"], axis=0), b.op("Gather", [pos, positions], axis=0)])
    x = _layer_norm(b, x, hidden)
    # additive mask: (1 - mask) * -10000, broadcast over heads and query positions
    mask = b.op("Unsqueeze", ["attention_mask", b.constant_node("axes12", np.array([1, 2], np.int64))])
    mask = b.op("Cast", [mask], to=TensorProto.FLOAT)
    mask = b.op("Sub", [b.constant_node("one_f", np.array(1.0, np.float32)), mask])
    mask_add = b.op("Mul", [mask, b.constant_node("neg", np.array(-10000.0, np.float32))])
    for _layer in range(layers):
        attn = _attention(b, x, mask_add, hidden, heads)
        x = _layer_norm(b, b.op("Add", [attn, x]), hidden)
        h = _gelu(b, _linear(b, x, hidden, ffn, "intermediate.dense"))
        h = _linear(b, h, ffn, hidden, "output.dense")
        x = _layer_norm(b, b.op("Add", [h, x]), hidden)
    b.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="last_hidden_state_identity"))
    first = b.op("Gather", ["last_hidden_state", b.constant_node("first", np.array(0, np.int64))], axis=1)
    wp = b.weight("pooler.dense.weight", (hidden, hidden), hidden, gain=1.0)
    bp = b.const("pooler.dense.bias", np.zeros(hidden, np.float32))
    pooled = b.op("Gemm", [first, wp, bp], transB=1)
    b.nodes.append(helper.make_node("Tanh", [pooled], ["pooler_output"], name="pooler_tanh"))
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden]),
               helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch", hidden])]
    return b.model(inputs, outputs, "bert_small")


EXAMPLES = {"resnet_small": build_resnet, "bert_small": build_bert}


def bert_inputs(sequence: int, vocab: int) -> dict:
    """Input specs of a ``build_bert`` model: token ids in [0, vocab), an all-ones mask."""
    from adaptopt.config import InputSpec
    return {"input_ids": InputSpec((1, sequence), "int64", "range", (0, vocab)),
            "attention_mask": InputSpec((1, sequence), "int64", "ones")}


# Generated models the built-in policy prior is trained on (``make prior``): other sizes,
# widths and seeds than the bundled examples, so neither they nor any benchmark model is
# ever in its training set. (name, builder, keyword arguments, input specs or None)
TRAINING_CORPUS = (
    ("resnet_w16_i64", build_resnet, {"image": 64, "widths": (16, 32), "blocks": 1, "classes": 10, "seed": 1}, None),
    ("resnet_w24_i48", build_resnet, {"image": 48, "widths": (24, 48, 96), "blocks": 1, "classes": 20, "seed": 2},
     None),
    ("bert_h128_l2", build_bert, {"vocab": 1000, "hidden": 128, "layers": 2, "heads": 2, "ffn": 512, "seed": 3},
     bert_inputs(64, 1000)),
    ("bert_h192_l2", build_bert, {"vocab": 1000, "hidden": 192, "layers": 2, "heads": 3, "ffn": 768, "seed": 4},
     bert_inputs(96, 1000)),
    ("resnet_w8_i32", build_resnet, {"image": 32, "widths": (8, 16, 32), "blocks": 2, "classes": 10, "seed": 5},
     None),
    ("resnet_w48_i80", build_resnet, {"image": 80, "widths": (48, 96), "blocks": 1, "classes": 50, "seed": 6},
     None),
    ("bert_h64_l3", build_bert, {"vocab": 500, "hidden": 64, "layers": 3, "heads": 4, "ffn": 256, "seed": 7},
     bert_inputs(32, 500)),
    ("bert_h320_l1", build_bert, {"vocab": 1000, "hidden": 320, "layers": 1, "heads": 5, "ffn": 1280, "seed": 8},
     bert_inputs(48, 1000)),
)
