"""The robustness corpus: broken inputs every command must refuse, odd models that must work.

Tests import the lists below; each bad case writes its files into a folder and returns
the model path, and ``expect`` is a regex the one-line error must match. To look at
the files themselves:

    python tests/make_bad_models.py OUTDIR
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


@dataclass(frozen=True)
class BadCase:
    name: str
    write: Callable[[Path], Path]
    expect: str  # regex the error line must match


@dataclass(frozen=True)
class OddCase:
    name: str
    build: Callable[[], tuple[onnx.ModelProto, dict[str, np.ndarray]]]


def _vi(name: str, shape, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, inits=(), opset: int = OPSET, **kw) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)


def valid_model() -> onnx.ModelProto:
    """x[1,4] -> MatMul(W) -> Add(b) -> Relu -> Mul -> y: small, valid, splittable."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "a"], ["y"], name="mul")]
    return _model(nodes, [_vi("x", [1, 4])], [_vi("y", [1, 4])], inits)


def write_valid(folder: Path, name: str = "model.onnx") -> Path:
    path = folder / name
    path.write_bytes(valid_model().SerializeToString())
    return path


def _write(folder: Path, data: bytes | onnx.ModelProto, name: str = "model.onnx") -> Path:
    path = folder / name
    path.write_bytes(data if isinstance(data, bytes) else data.SerializeToString())
    return path


# ---------------------------------------------------------------- broken models
def empty_file(d: Path) -> Path:
    return _write(d, b"")


def random_bytes(d: Path) -> Path:
    return _write(d, np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def text_file(d: Path) -> Path:
    return _write(d, b"name: resnet50\nthis is a text file that someone renamed to .onnx\n")


def truncated(d: Path) -> Path:
    data = valid_model().SerializeToString()
    return _write(d, data[: len(data) * 2 // 3])


def cycle(d: Path) -> Path:
    nodes = [helper.make_node("Add", ["x", "c"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["b"], name="second"),
             helper.make_node("Neg", ["b"], ["c"], name="third")]
    return _write(d, _model(nodes, [_vi("x", [2])], [_vi("b", [2])]))


def undefined_tensor(d: Path) -> Path:
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="reader")]
    return _write(d, _model(nodes, [_vi("x", [2])], [_vi("y", [2])]))


def duplicate_producer(d: Path) -> Path:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="one"),
             helper.make_node("Neg", ["x"], ["y"], name="two")]
    return _write(d, _model(nodes, [_vi("x", [2])], [_vi("y", [2])]))


def duplicate_graph_output(d: Path) -> Path:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="one")]
    return _write(d, _model(nodes, [_vi("x", [2])], [_vi("y", [2]), _vi("y", [2])]))


def custom_op(d: Path) -> Path:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Frobnicate", ["r"], ["f"], name="frob", domain="com.acme"),
             helper.make_node("Neg", ["f"], ["y"], name="neg")]
    model = _model(nodes, [_vi("x", [2])], [_vi("y", [2])])
    model.opset_import.append(helper.make_opsetid("com.acme", 1))
    return _write(d, model)


def opset_too_new(d: Path) -> Path:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    return _write(d, _model(nodes, [_vi("x", [2])], [_vi("y", [2])], opset=99))


def external_model(location: str, length: int | None = None, dims: int = 256) -> onnx.ModelProto:
    """x[256] + w[256], w stored externally at ``location``."""
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[dims], data_location=TensorProto.EXTERNAL)
    entries = [("location", location), ("offset", "0")] + ([("length", str(length))] if length is not None else [])
    for key, value in entries:
        w.external_data.add(key=key, value=value)
    nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    return _model(nodes, [_vi("x", [dims])], [_vi("y", [dims])], [w])


def missing_external(d: Path) -> Path:
    return _write(d, external_model("weights.bin"))


def external_absolute(d: Path, target: str = "/etc/hostname") -> Path:
    return _write(d, external_model(target, length=1024))


def external_dotdot(d: Path) -> Path:
    outside = d.parent / f"{d.name}-secret.bin"
    outside.write_bytes(np.ones(256, np.float32).tobytes())
    return _write(d, external_model(f"../{outside.name}", length=1024))


def external_symlink(d: Path) -> Path:
    outside = d.parent / f"{d.name}-outside.bin"
    outside.write_bytes(np.ones(256, np.float32).tobytes())
    (d / "w.bin").symlink_to(outside)
    return _write(d, external_model("w.bin", length=1024))


def external_too_short(d: Path) -> Path:
    """The model declares 256 floats (1024 bytes); the file holds 100 bytes."""
    (d / "w.bin").write_bytes(b"\0" * 100)
    return _write(d, external_model("w.bin"))


def external_huge_declared(d: Path) -> Path:
    """A tensor declaring 2^40 floats backed by a 1 KiB file: refused before any allocation."""
    (d / "w.bin").write_bytes(b"\0" * 1024)
    return _write(d, external_model("w.bin", length=1024, dims=2**40))


def nested_if_model(depth: int) -> onnx.ModelProto:
    """``depth`` levels of graphs (the main graph is 1): If inside If ... (the innermost reads outer x)."""
    def leaf(out: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("Identity", ["x"], [out])], f"g_{out}", [], [_vi(out, [2])])
    body = leaf("y0")
    for level in range(1, depth - 1):
        node = helper.make_node("If", ["c"], [f"y{level}"], then_branch=body, else_branch=leaf(f"e{level}"))
        body = helper.make_graph([node], f"b{level}", [], [_vi(f"y{level}", [2])])
    top = helper.make_node("If", ["c"], ["y"], name="top", then_branch=body, else_branch=leaf("e0"))
    return _model([top], [_vi("c", [], TensorProto.BOOL), _vi("x", [2])], [_vi("y", [2])])


def deep_nesting(d: Path) -> Path:
    return _write(d, nested_if_model(20))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def nested_bytes(depth: int) -> bytes:
    """A ModelProto serialized by hand with ``depth`` nested If graphs (protobuf refuses to build it)."""
    graph = _field(1, _field(1, b"x") + _field(2, b"y") + _field(4, b"Identity")) + _field(2, b"g")
    for _ in range(depth):
        attr = _field(1, b"then_branch") + _field(6, graph) + _varint(20 << 3) + _varint(5)
        node = _field(1, b"c") + _field(2, b"y") + _field(4, b"If") + _field(5, attr)
        graph = _field(1, node) + _field(2, b"g")
    opset = _varint(2 << 3) + _varint(OPSET)  # OperatorSetIdProto.version
    return _varint(1 << 3) + _varint(8) + _field(8, opset) + _field(7, graph)


def deeper_than_protobuf(d: Path) -> Path:
    return _write(d, nested_bytes(60))


NOT_A_MODEL = r"not a valid ONNX model|empty"
BAD_MODELS: list[BadCase] = [
    BadCase("empty", empty_file, r"empty"),
    BadCase("random_bytes", random_bytes, NOT_A_MODEL),
    BadCase("text_file", text_file, NOT_A_MODEL),
    BadCase("truncated", truncated, NOT_A_MODEL),
    BadCase("cycle", cycle, r"cycle"),
    BadCase("undefined_tensor", undefined_tensor, r"'ghost'.*(no node|defines)"),
    BadCase("duplicate_producer", duplicate_producer, r"'y' is produced by two nodes"),
    BadCase("duplicate_graph_output", duplicate_graph_output, r"graph output 'y' is listed twice"),
    BadCase("custom_op", custom_op, r"com\.acme.*Frobnicate|Frobnicate.*com\.acme"),
    BadCase("opset_too_new", opset_too_new, r"opset 99"),
    BadCase("missing_external", missing_external, r"external data file 'weights\.bin'.*not found"),
    BadCase("external_absolute", external_absolute, r"absolute"),
    BadCase("external_dotdot", external_dotdot, r"'\.\.'"),
    BadCase("external_symlink", external_symlink, r"outside the model's folder"),
    BadCase("external_too_short", external_too_short, r"beyond the end|declares"),
    BadCase("external_huge_declared", external_huge_declared, r"declares \d+ bytes"),
    BadCase("deep_nesting", deep_nesting, r"nested more than 16 levels"),
    BadCase("deeper_than_protobuf", deeper_than_protobuf, r"nested more than protobuf's 100-level limit"),
]

# (name, YAML text, regex the error must match); each is used with a valid model.
BAD_CONFIGS: list[tuple[str, str, str]] = [
    ("unknown_key", "granularity:\n  initial_granularity: 2\n  mergeing_threshold: 0.5\n",
     r"unknown config key 'granularity\.mergeing_threshold'"),
    ("unknown_section", "targett:\n  device: cpu\n", r"unknown config key 'targett'"),
    ("wrong_type", "granularity:\n  min_nodes: four\n", r"granularity\.min_nodes.*must be"),
    ("wrong_type_list", "target:\n  execution_providers: CPUExecutionProvider\n", r"execution_providers.*must be"),
    ("impossible_thresholds", "granularity:\n  performance_threshold: 0.8\n  merging_threshold: 0.2\n",
     r"merging_threshold.*performance_threshold"),
    ("not_yaml", "granularity: [unclosed\n", r"not valid YAML"),
    ("not_a_mapping", "- just\n- a list\n", r"must be a mapping"),
]


# ---------------------------------------------------------------- odd but valid models
def _feeds(**arrays) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in arrays.items()}


def _chain(ops=("Relu", "Neg", "Abs", "Sigmoid", "Neg", "Relu")):
    nodes, prev = [], "x"
    for i, op in enumerate(ops):
        nodes.append(helper.make_node(op, [prev], [f"t{i}"], name=f"n{i}"))
        prev = f"t{i}"
    return nodes, prev


def odd_unsorted():
    nodes, last = _chain()
    nodes = nodes[::-1]
    model = _model(nodes, [_vi("x", [2, 3])], [_vi(last, [2, 3])])
    return model, _feeds(x=np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3))


def odd_opset7():
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 10, "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Relu", ["m"], ["r"], name="relu"),
             helper.make_node("Sigmoid", ["r"], ["s"], name="sig"),
             helper.make_node("Add", ["s", "r"], ["y"], name="add")]
    # IR version 3: initializers must also be graph inputs
    model = _model(nodes, [_vi("x", [2, 3]), _vi("W", [3, 4])], [_vi("y", [2, 4])], [w], opset=7, ir_version=3)
    return model, _feeds(x=np.ones((2, 3), np.float32))


def odd_initializers_as_inputs():
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 3)).astype(np.float32), f"W{i}") for i in range(3)]
    nodes, prev = [], "x"
    for i in range(3):
        nodes += [helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Tanh", [f"m{i}"], [f"t{i}"], name=f"tanh{i}")]
        prev = f"t{i}"
    inputs = [_vi("x", [1, 3])] + [_vi(f"W{i}", [3, 3]) for i in range(3)]
    return _model(nodes, inputs, [_vi(prev, [1, 3])], inits), _feeds(x=np.ones((1, 3), np.float32))


def odd_unused():
    nodes, last = _chain()
    unused = numpy_helper.from_array(np.ones(300, np.float32), "never_read")
    model = _model(nodes, [_vi("x", [2, 3]), _vi("spare", [4])], [_vi(last, [2, 3])], [unused])
    return model, _feeds(x=np.ones((2, 3), np.float32), spare=np.zeros(4, np.float32))


def odd_zero_sized():
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    empty = numpy_helper.from_array(np.zeros((0,), np.float32), "nothing")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Relu", ["m"], ["r"], name="relu"),
             helper.make_node("Neg", ["r"], ["n"], name="neg"),
             helper.make_node("Concat", ["n", "r"], ["y"], name="cat", axis=0),
             helper.make_node("Concat", ["z", "nothing"], ["z2"], name="cat0", axis=0),
             helper.make_node("Abs", ["z2"], ["z3"], name="abs")]
    model = _model(nodes, [_vi("x", [0, 4]), _vi("z", [2])], [_vi("y", [0, 3]), _vi("z3", [2])], [w, empty])
    return model, _feeds(x=np.ones((0, 4), np.float32), z=np.array([-1, 2], np.float32))


def odd_nan_inf():
    w = numpy_helper.from_array(np.array([np.nan, np.inf, -np.inf, 1.0], np.float32), "w")
    nodes = [helper.make_node("Add", ["x", "w"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "w"], ["m"], name="mul"),
             helper.make_node("Neg", ["m"], ["y"], name="neg")]
    return _model(nodes, [_vi("x", [4])], [_vi("y", [4])], [w]), _feeds(x=np.ones(4, np.float32))


def odd_sequence_optional_string():
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2])
    opt_type = helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))
    words = helper.make_tensor("words", TensorProto.STRING, [2], [b"hello", b"world"])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("SequenceConstruct", ["r", "x"], ["s"], name="seq"),
             helper.make_node("SequenceAt", ["s", "one"], ["picked"], name="at"),
             helper.make_node("Optional", ["picked"], ["o"], name="opt"),
             helper.make_node("OptionalGetElement", ["o"], ["got"], name="get"),
             helper.make_node("Add", ["got", "r"], ["y"], name="add"),
             helper.make_node("Identity", ["words"], ["text"], name="text_id")]
    one = numpy_helper.from_array(np.array(1, np.int64), "one")
    model = _model(nodes, [_vi("x", [2])], [_vi("y", [2]), _vi("text", [2], TensorProto.STRING)], [one, words])
    model.graph.value_info.extend([seq, helper.make_value_info("o", opt_type)])
    return model, _feeds(x=np.array([-1.0, 2.0], np.float32))


def odd_control_flow():
    then_g = helper.make_graph([helper.make_node("Relu", ["r"], ["t_out"])], "then", [], [_vi("t_out", [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["r"], ["e_out"])], "else", [], [_vi("e_out", [2])])
    body = helper.make_graph(
        [helper.make_node("Add", ["acc", "r"], ["acc_out"]), helper.make_node("Identity", ["cond"], ["cond_out"])],
        "body", [_vi("i", [], TensorProto.INT64), _vi("cond", [], TensorProto.BOOL), _vi("acc", [2])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("acc_out", [2])])
    trips = numpy_helper.from_array(np.array(3, np.int64), "trips")
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("ReduceSum", ["r"], ["total"], name="sum", keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"], name="gt"),
             helper.make_node("If", ["positive"], ["branch"], name="if", then_branch=then_g, else_branch=else_g),
             helper.make_node("Loop", ["trips", "", "branch"], ["looped"], name="loop", body=body),
             helper.make_node("Mul", ["looped", "x"], ["y"], name="mul")]
    zero = numpy_helper.from_array(np.array(0, np.float32), "zero")
    model = _model(nodes, [_vi("x", [2])], [_vi("y", [2])], [trips, zero])
    return model, _feeds(x=np.array([0.5, -2.0], np.float32))


ODD_MODELS: list[OddCase] = [
    OddCase("unsorted_nodes", odd_unsorted),
    OddCase("opset7_ir3", odd_opset7),
    OddCase("initializers_as_inputs", odd_initializers_as_inputs),
    OddCase("unused_inputs_initializers", odd_unused),
    OddCase("zero_sized", odd_zero_sized),
    OddCase("nan_inf_weights", odd_nan_inf),
    OddCase("sequence_optional_string", odd_sequence_optional_string),
    OddCase("control_flow", odd_control_flow),
]


def write_split_folder(folder: Path, model_file: Path) -> Path:
    """A folder ``adaptopt merge`` accepts, whose root and only leaf is ``model_file``."""
    inputs: list[str] = []
    outputs: list[str] = []
    try:
        model = onnx.load_model_from_string(model_file.read_bytes())
        inits = {t.name for t in model.graph.initializer}
        inputs = [i.name for i in model.graph.input if i.name not in inits]
        outputs = [o.name for o in model.graph.output]
    except (DecodeError, ValueError):  # the corpus holds files protobuf cannot parse; listed all the same
        pass
    entry = {"id": "0", "parent": None, "children": [], "depth": 0, "node_count": 0, "node_names": [],
             "boundary_inputs": inputs, "boundary_outputs": outputs, "file": model_file.name, "content_hash": ""}
    manifest = {"format": "adaptopt-split", "version": 1, "source": "", "root": "0", "weights": "weights.bin",
                "node_count": 0, "leaves": ["0"], "nodes": [entry]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def main(out: str) -> None:
    root = Path(out)
    for case in BAD_MODELS:
        folder = root / "bad" / case.name
        folder.mkdir(parents=True, exist_ok=True)
        case.write(folder)
    for name, text, _ in BAD_CONFIGS:
        (root / "configs").mkdir(parents=True, exist_ok=True)
        (root / "configs" / f"{name}.yaml").write_text(text)
    for case in ODD_MODELS:
        (root / "odd").mkdir(parents=True, exist_ok=True)
        model, _ = case.build()
        (root / "odd" / f"{case.name}.onnx").write_bytes(model.SerializeToString())
    print(f"wrote {len(BAD_MODELS)} bad models, {len(BAD_CONFIGS)} bad configs, {len(ODD_MODELS)} odd models to {root}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bad_models")
