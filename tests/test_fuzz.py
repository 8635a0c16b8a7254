"""Bounded fuzzing: mutated models either load and partition, or fail with one InputError line.

Mutations of valid serialized models: byte flips, truncations, byte insertions, and
field edits on the parsed proto (op types, tensor names, dims, types, opsets,
attributes, dropped or duplicated nodes). Derandomized so CI is reproducible; set
ADAPTOPT_FUZZ_EXAMPLES to fuzz longer locally.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptopt import api
from adaptopt.cli import cli
from adaptopt.config import Config
from adaptopt.errors import InputError
from adaptopt.graph.io import load_model
from tests.make_bad_models import odd_control_flow, odd_opset7, odd_zero_sized, valid_model

EXAMPLES = int(os.environ.get("ADAPTOPT_FUZZ_EXAMPLES", "60"))
SEEDS = {"mlp": valid_model(), "control_flow": odd_control_flow()[0], "opset7": odd_opset7()[0],
         "zero_sized": odd_zero_sized()[0]}
SEED_BYTES = {name: model.SerializeToString() for name, model in SEEDS.items()}
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="ADAPTOPT_FUZZ_RANDOM" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def byte_mutations(draw) -> bytes:
    data = bytearray(SEED_BYTES[draw(st.sampled_from(sorted(SEED_BYTES)))])
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "splice"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "insert":
        pos = draw(st.integers(0, len(data)))
        data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    else:  # a run of bytes from elsewhere in the file, written over this position
        start, pos = draw(st.integers(0, len(data) - 1)), draw(st.integers(0, len(data) - 1))
        chunk = data[start:start + draw(st.integers(1, 32))]
        data[pos:pos + len(chunk)] = chunk
    return bytes(data)


NAMES = st.sampled_from(["x", "y", "W", "b", "m", "a", "r", "t0", "ghost", "", "positive", "trips"])


def _edit_node(model: onnx.ModelProto, draw) -> None:
    node = model.graph.node[draw(st.integers(0, len(model.graph.node) - 1))]
    what = draw(st.sampled_from(["op", "input", "output", "domain", "attr", "drop", "duplicate"]))
    if what == "op":
        node.op_type = draw(st.sampled_from(["Relu", "Conv", "If", "Loop", "Reshape", "NoSuchOp", "", "Add"]))
    elif what == "input" and node.input:
        node.input[draw(st.integers(0, len(node.input) - 1))] = draw(NAMES)
    elif what == "output" and node.output:
        node.output[draw(st.integers(0, len(node.output) - 1))] = draw(NAMES)
    elif what == "domain":
        node.domain = draw(st.sampled_from(["com.microsoft", "ai.onnx.ml", "com.acme", "ai.onnx"]))
    elif what == "attr":
        node.attribute.add(name=draw(st.sampled_from(["axis", "then_branch", "body", "to"])),
                           type=draw(st.sampled_from([1, 2, 5, 7])), i=draw(st.integers(-3, 3)))
    elif what == "drop":
        model.graph.node.remove(node)
    else:
        model.graph.node.add().CopyFrom(node)


def _edit_value(model: onnx.ModelProto, draw) -> None:
    graph = model.graph
    what = draw(st.sampled_from(["dims", "elem_type", "opset", "ir", "output_name", "init_name", "raw"]))
    if what == "dims" and graph.initializer:
        tensor = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        tensor.dims.append(draw(st.integers(-2, 7)))
    elif what == "elem_type" and graph.input:
        graph.input[0].type.tensor_type.elem_type = draw(st.integers(0, 25))
    elif what == "opset":
        model.opset_import[0].version = draw(st.integers(-1, 40))
    elif what == "ir":
        model.ir_version = draw(st.integers(0, 20))
    elif what == "output_name" and graph.output:
        graph.output[0].name = draw(NAMES)
    elif what == "init_name" and graph.initializer:
        graph.initializer[0].name = draw(NAMES)
    elif what == "raw" and graph.initializer:
        graph.initializer[0].raw_data = draw(st.binary(max_size=64))


@st.composite
def field_edits(draw) -> bytes:
    model = onnx.ModelProto()
    model.CopyFrom(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 3))):
        (_edit_node if draw(st.booleans()) and model.graph.node else _edit_value)(model, draw)
    return model.SerializeToString()


def load_and_partition(data: bytes) -> None:
    """Load + partition ``data``: success, or an InputError with a one-line message."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed.onnx"
        path.write_bytes(data)
        try:
            model = load_model(path, Config())
            tree = api.build_tree(model, Config().with_section("granularity", min_nodes=1), 2)
            assert sum(leaf.node_count for leaf in tree.leaves()) == len(model.graph.node)
        except InputError as exc:
            assert str(exc) and "\n" not in str(exc), repr(exc)
        result = CliRunner().invoke(cli, ["split", str(path), "-o", str(Path(tmp) / "split")])
        assert result.exit_code in (0, 2), (result.exit_code, result.stderr)
        assert result.exit_code == 0 or len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("name", sorted(SEED_BYTES))
def test_seeds_are_valid(name):
    load_and_partition(SEED_BYTES[name])


@FUZZ
@given(byte_mutations())
def test_byte_mutations(data):
    load_and_partition(data)


@FUZZ
@given(field_edits())
def test_field_edits(data):
    load_and_partition(data)
