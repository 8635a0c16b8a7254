"""External data: unsafe locations refused before any file is opened; sizes checked first;
nesting bounded; weights of huge models stay on disk and are streamed, never copied."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from adaptopt import api
from adaptopt.config import Config, TargetConfig
from adaptopt.errors import InputError
from adaptopt.examples import build_resnet
from adaptopt.graph import external, io
from adaptopt.graph.checks import MAX_GRAPH_DEPTH, graph_depth
from adaptopt.graph.io import load_model, save_model
from adaptopt.graph.merge import merge_directory
from adaptopt.runtime import make_session, run
from tests.conftest import run_model
from tests.make_bad_models import (
    ODD_MODELS,
    external_absolute,
    external_dotdot,
    external_huge_declared,
    external_model,
    external_symlink,
    external_too_short,
    nested_bytes,
    nested_if_model,
    valid_model,
)

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _opened.append(str(Path(args[0] if not isinstance(args[0], bytes) else args[0].decode()).resolve()))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one records only inside opened_files()


class opened_files:
    """Every file Python opens (builtins.open, io.open, os.open) inside the block."""

    def __enter__(self) -> list[str]:
        global _opened
        _opened = []
        return _opened

    def __exit__(self, *exc) -> None:
        global _opened
        _opened = None


@pytest.mark.parametrize("make,expect", [
    (external_absolute, "is absolute"),
    (external_dotdot, "contains '..'"),
    (external_symlink, "resolves outside the model's folder"),
])
def test_unsafe_location_is_refused_before_any_data_file_is_opened(tmp_path, make, expect):
    folder = tmp_path / "model"
    folder.mkdir()
    path = make(folder)
    with opened_files() as opened, pytest.raises(InputError, match=expect):
        load_model(path)
    assert [p for p in opened if p.startswith(str(tmp_path.resolve()))] == [str(path.resolve())]  # the model only


def test_absolute_location_of_a_real_file_outside(tmp_path):
    target = Path("/etc/hostname") if Path("/etc/hostname").is_file() else Path(sys.executable)
    path = external_absolute(tmp_path, str(target))
    with opened_files() as opened, pytest.raises(InputError, match="absolute"):
        load_model(path)
    assert str(target.resolve()) not in opened


@pytest.mark.parametrize("make,expect", [(external_too_short, "declares 1024 bytes but its external data holds 100"),
                                         (external_huge_declared, "declares 4398046511104 bytes")])
def test_declared_size_is_checked_before_reading(tmp_path, make, expect):
    path = make(tmp_path)
    with opened_files() as opened, pytest.raises(InputError, match=expect):
        load_model(path)
    assert str((tmp_path / "w.bin").resolve()) not in opened  # only stat()ed, never read


def test_symlink_inside_the_folder_is_allowed(tmp_path):
    values = np.arange(256, dtype=np.float32)
    (tmp_path / "real.bin").write_bytes(values.tobytes())
    (tmp_path / "w.bin").symlink_to(tmp_path / "real.bin")
    path = tmp_path / "m.onnx"
    path.write_bytes(external_model("w.bin", length=1024).SerializeToString())
    model = load_model(path)
    out = run_model(model, {"x": np.ones(256, np.float32)})["y"]
    np.testing.assert_array_equal(out, values + 1)


def test_range_beyond_the_end_and_bad_offsets(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\0" * 1024)
    model = external_model("w.bin", length=1024)
    model.graph.initializer[0].external_data[1].value = "512"  # offset 512 + 1024 bytes > 1024
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match="beyond the end"):
        load_model(tmp_path / "m.onnx")
    model.graph.initializer[0].external_data[1].value = "many"
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match="non-numeric"):
        load_model(tmp_path / "m.onnx")


def test_nesting_is_bounded(tmp_path):
    assert graph_depth(nested_if_model(MAX_GRAPH_DEPTH).graph) == MAX_GRAPH_DEPTH
    ok = tmp_path / "ok.onnx"
    ok.write_bytes(nested_if_model(MAX_GRAPH_DEPTH).SerializeToString())
    load_model(ok)  # the documented depth itself is accepted
    deep = tmp_path / "deep.onnx"
    deep.write_bytes(nested_if_model(MAX_GRAPH_DEPTH + 1).SerializeToString())
    with pytest.raises(InputError, match=f"nested more than {MAX_GRAPH_DEPTH} levels"):
        load_model(deep)
    deeper = tmp_path / "deeper.onnx"
    deeper.write_bytes(nested_bytes(500))  # far past protobuf's own limit: refused, not a crash
    with pytest.raises(InputError, match="100-level limit"):
        load_model(deeper)


# ---------------------------------------------------------------- weights kept on disk
def _external_chain(folder: Path, count: int = 4, length: int = 4096) -> tuple[Path, dict]:
    """x + w0 -> Relu -> + w1 -> ... with every weight in one side file."""
    rng = np.random.default_rng(3)
    weights = {f"w{i}": rng.standard_normal(length).astype(np.float32) for i in range(count)}
    nodes, prev = [], "x"
    for i in range(count):
        nodes += [onnx.helper.make_node("Add", [prev, f"w{i}"], [f"a{i}"], name=f"add{i}"),
                  onnx.helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        prev = f"r{i}"
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()]
    graph = onnx.helper.make_graph(nodes, "chain", [onnx.helper.make_tensor_value_info("x", 1, [length])],
                                   [onnx.helper.make_tensor_value_info(prev, 1, [length])], initializer=inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    path = folder / "chain.onnx"
    save_model(model, path, external=True)
    return path, {"x": rng.standard_normal(length).astype(np.float32)}


@pytest.fixture
def keep_on_disk(monkeypatch):
    monkeypatch.setattr(external, "KEEP_ON_DISK_BYTES", 0)


def test_weights_stay_on_disk_through_split_and_merge(tmp_path, keep_on_disk):
    path, feeds = _external_chain(tmp_path)
    model = load_model(path)
    assert all(external.on_disk(t) and not t.raw_data for t in model.graph.initializer)
    reference = run_model(load_model_inline(path), feeds)
    config = Config().with_section("granularity", min_nodes=1)
    api.split(path, tmp_path / "split", config, 2)
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "split").glob("*.onnx")}
    assert max(sizes.values()) < 4096  # no subgraph file holds a weight
    assert (tmp_path / "split" / "weights.bin").stat().st_size >= 4 * 4 * 4096  # each weight once
    merged = merge_directory(tmp_path / "split")
    assert all(external.on_disk(t) for t in merged.graph.initializer)
    save_model(merged, tmp_path / "out" / "merged.onnx")
    got = run_model(load_model_inline(tmp_path / "out" / "merged.onnx"), feeds)
    np.testing.assert_array_equal(got["r3"], reference["r3"])


def load_model_inline(path: Path) -> onnx.ModelProto:
    model = onnx.load_model(str(path))  # onnx's own loader, weights inline, for ORT from bytes
    return model


def test_saving_over_the_source_of_on_disk_weights(tmp_path, keep_on_disk):
    path, feeds = _external_chain(tmp_path)
    reference = run_model(load_model_inline(path), feeds)
    model = load_model(path)
    save_model(model, path)  # -o equal to the input: reads every weight before the rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.onnx", "chain.onnx.data"]
    got = run_model(load_model_inline(path), feeds)
    np.testing.assert_array_equal(got["r3"], reference["r3"])
    with pytest.raises(InputError, match="replaced or changed since the model was loaded"):
        external.raw_bytes(model.graph.initializer[0])  # stale offsets are never read


def test_forged_basepath_is_never_read(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\1" * 1024)
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[256])
    external.set_external(tensor, "secret.bin", 0, 1024, base=str(tmp_path))
    with opened_files() as opened, pytest.raises(InputError, match="not loaded through adaptopt"):
        external.raw_bytes(tensor)
    assert str(secret.resolve()) not in opened
    model = external_model("secret.bin", length=1024)
    with pytest.raises(InputError, match="never loaded"):
        save_model(model, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_weights_inside_control_flow_bodies_on_disk(tmp_path, keep_on_disk):
    """A large weight inside an If branch and a large Constant: streamed out and back like the rest."""
    big = np.linspace(-1, 1, 1024, dtype=np.float32)
    then_g = onnx.helper.make_graph([onnx.helper.make_node("Add", ["r", "bw"], ["t_out"])], "then", [],
                                    [onnx.helper.make_tensor_value_info("t_out", 1, [1024])],
                                    initializer=[onnx.numpy_helper.from_array(big, "bw")])
    else_g = onnx.helper.make_graph([onnx.helper.make_node("Neg", ["r"], ["e_out"])], "else", [],
                                    [onnx.helper.make_tensor_value_info("e_out", 1, [1024])])
    nodes = [onnx.helper.make_node("Constant", [], ["k"], value=onnx.numpy_helper.from_array(big * 2, "kv")),
             onnx.helper.make_node("Add", ["x", "k"], ["r"], name="add"),
             onnx.helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
             onnx.helper.make_node("Relu", ["y"], ["z"], name="relu")]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", 1, [1024]),
                                                onnx.helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                                   [onnx.helper.make_tensor_value_info("z", 1, [1024])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    path = tmp_path / "cf.onnx"
    save_model(model, path, external=True)
    assert (tmp_path / "cf.onnx.data").stat().st_size >= 2 * 4096 and path.stat().st_size < 4096
    feeds = {"x": big[::-1].copy(), "c": np.array(True)}
    api.split(path, tmp_path / "split", Config().with_section("granularity", min_nodes=1), 2)
    save_model(merge_directory(tmp_path / "split"), tmp_path / "merged.onnx")
    np.testing.assert_array_equal(run_model(load_model_inline(tmp_path / "merged.onnx"), feeds)["z"],
                                  run_model(model, feeds)["z"])


@pytest.mark.parametrize("dims,expect", [([2**62, 4], "declares 73786976294838206464 bytes"),
                                         ([-1, 256], "negative dims")])
def test_dims_cannot_overflow_or_go_negative(tmp_path, dims, expect):
    (tmp_path / "w.bin").write_bytes(b"")
    model = external_model("w.bin", length=0)
    del model.graph.initializer[0].dims[:]
    model.graph.initializer[0].dims.extend(dims)  # 2^64 bytes wraps to 0 in int64 arithmetic
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match=expect):
        load_model(tmp_path / "m.onnx")


def test_a_single_file_of_2gib_is_refused_unread(tmp_path):
    path = tmp_path / "huge.onnx"
    with open(path, "wb") as fh:
        fh.truncate(2**31)  # sparse: no disk used
    with opened_files() as opened, pytest.raises(InputError, match="cannot hold 2 GiB"):
        load_model(path)
    assert str(path.resolve()) not in opened


def test_sessions_over_on_disk_weights_use_memory_maps(tmp_path, keep_on_disk):
    path, feeds = _external_chain(tmp_path)
    model = load_model(path)
    maps = external.mapped_initializers(model)
    assert sorted(maps) == ["w0", "w1", "w2", "w3"] and all(isinstance(a, np.memmap) for a in maps.values())
    # make_session serves them from the maps itself: no weight is copied into the model bytes
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer if t.name in maps)
    got = run(make_session(model, TargetConfig(), level="disable"), feeds)
    np.testing.assert_array_equal(got["r3"], run_model(load_model_inline(path), feeds)["r3"])


def test_overlapping_ranges_cannot_multiply_memory(tmp_path):
    """Many tensors reading the same bytes: each range is valid, the sum is refused before reading."""
    (tmp_path / "w.bin").write_bytes(b"\0" * 1024)
    model = external_model("w.bin", length=1024)
    for i in range(1, 50):
        copy = model.graph.initializer.add()
        copy.CopyFrom(model.graph.initializer[0])
        copy.name = f"w{i}"
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    with opened_files() as opened, pytest.raises(InputError, match="overlap: tensors declare 51200 bytes"):
        load_model(tmp_path / "m.onnx")
    assert str((tmp_path / "w.bin").resolve()) not in opened


# ---------------------------------------------------------------- whole-model memory (issue 2)
# Light copies are written piece by piece, big files are parsed a block at a time, and the
# large raw weights of a file are read after the checker and shape inference: each of these
# must give exactly what the whole-model code they replaced gave.
def _heavy_model(defect: str | None = None, pad: int = 0) -> onnx.ModelProto:
    """A valid model plus an unused 2400-byte weight ``h`` (with ``defect``) and ``pad`` more floats."""
    model = valid_model()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(600, np.float32), "h"))
    if pad:
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.arange(pad, dtype=np.float32), "pad"))
    h = model.graph.initializer[-2 if pad else -1]
    if defect == "two_fields":
        h.float_data.extend([1.0] * 600)
    elif defect == "no_type":
        h.ClearField("data_type")
    elif defect == "undefined_type":
        h.data_type = TensorProto.UNDEFINED
    elif defect == "zero_elements":
        del h.dims[:]
        h.dims.append(0)
    elif defect == "wrong_field":
        h.ClearField("raw_data")
        h.data_type = TensorProto.INT64
        h.float_data.extend([1.0] * 600)
    elif defect == "string_raw":
        h.data_type = TensorProto.STRING
    return model


def _models() -> list[onnx.ModelProto]:
    with_function = _heavy_model()
    with_function.metadata_props.add(key="k", value="v")
    with_function.doc_string, with_function.graph.doc_string = "model doc", "graph doc"
    with_function.functions.append(onnx.helper.make_function(
        "local", "Twice", ["a"], ["b"], [onnx.helper.make_node("Add", ["a", "a"], ["b"])],
        [onnx.helper.make_opsetid("", 17)]))
    return [with_function, *(case.build()[0] for case in ODD_MODELS), build_resnet(image=32, widths=(8,), blocks=1)]


def _reference_light(model: onnx.ModelProto) -> onnx.ModelProto:
    return external.light_copy(model, "stub.bin")


def _reference_probe(model: onnx.ModelProto) -> onnx.ModelProto:
    """The former io._inference_copy: heavy initializers become typed graph inputs, and
    overridable ones (listed as inputs, IR >= 4) are left out."""
    from adaptopt.graph.index import overridable_initializers
    probe = external.light_copy(model)
    hidden = overridable_initializers(model)
    heavy = [t for t in probe.graph.initializer if t.data_location == TensorProto.EXTERNAL and t.name not in hidden]
    keep = [t for t in probe.graph.initializer if t.data_location != TensorProto.EXTERNAL and t.name not in hidden]
    listed = {i.name for i in probe.graph.input}
    probe.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in heavy if t.name not in listed)
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(keep)
    return probe


def test_pieces_write_the_bytes_serialization_gives():
    for model in _models():
        pieces = external.ModelPieces(model)
        assert pieces.to_bytes() == model.SerializeToString() and pieces.size() == model.ByteSize()
        assert external.byte_size(model) == model.ByteSize()
        assert external.light_pieces(model, "stub.bin").to_bytes() == _reference_light(model).SerializeToString()
        light = _reference_light(model)
        del light.graph.value_info[:]
        assert external.light_pieces(model, "stub.bin", value_info=False).to_bytes() == light.SerializeToString()
        assert external.inference_pieces(model).to_bytes() == _reference_probe(model).SerializeToString()


def test_light_pieces_keep_the_graph_when_a_function_holds_a_tensor_on_disk():
    """The light copy then rebuilds the model head (to point the function's tensor at the
    stub); the main graph's nodes and value infos still come from the model itself."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["h"]), onnx.helper.make_node("Neg", ["h"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        value_info=[onnx.helper.make_tensor_value_info("h", TensorProto.FLOAT, [2])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("local", 1)])
    value = numpy_helper.from_array(np.ones(2, np.float32), "c")
    value.ClearField("raw_data")
    value.data_location = TensorProto.EXTERNAL
    value.external_data.add(key="location", value="weights.bin")
    value.external_data.add(key="length", value="8")
    model.functions.append(onnx.helper.make_function(
        "local", "Shift", ["a"], ["b"], [onnx.helper.make_node("Constant", [], ["k"], value=value),
                                         onnx.helper.make_node("Add", ["a", "k"], ["b"])],
        [onnx.helper.make_opsetid("", 17)]))
    light = onnx.load_from_string(external.light_pieces(model, "stub.bin").to_bytes())
    assert light.graph == model.graph  # nodes and value infos kept (they were dropped)
    stub = {e.key: e.value for e in light.functions[0].node[0].attribute[0].t.external_data}
    assert stub["location"] == "stub.bin"
    io.check_model(model)  # which reads the light copy: the valid model passes


def _reference_infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """The former io.infer_shapes: in-memory inference of the probe, nodes and types copied back."""
    probe = _reference_probe(model)
    inferred = onnx.shape_inference.infer_shapes(probe, check_type=False, strict_mode=False)
    if not io._long_vectors(inferred.graph):
        inferred = onnx.shape_inference.infer_shapes(probe, check_type=False, strict_mode=False, data_prop=True)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(inferred.graph.node)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    for o, typed in zip(out.graph.output, inferred.graph.output):
        o.type.CopyFrom(typed.type)
    return out


def test_shape_inference_through_files_gives_what_it_gave_in_memory():
    for model in _models():  # control flow: the bodies gain value infos, so those nodes change
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        assert io.infer_shapes(copy).SerializeToString() == _reference_infer(model).SerializeToString()


@pytest.mark.parametrize("defect", ["two_fields", "no_type", "undefined_type", "zero_elements", "wrong_field",
                                    "string_raw"])
def test_light_checker_refuses_heavy_weights_as_the_checker_does(tmp_path, monkeypatch, defect):
    model = _heavy_model(defect)
    with pytest.raises(onnx.checker.ValidationError) as whole:
        onnx.checker.check_model(model)
    expected = f"<model>: ONNX checker failed: {io._checker_reason(whole.value)}"
    with pytest.raises(InputError) as light:
        io.check_model(model, structure=False)
    assert str(light.value) == expected
    for block in (1 << 40, 1024):  # and through load_model, whole or read in blocks (this file is larger)
        monkeypatch.setattr(io, "BLOCK_BYTES", block)
        path = tmp_path / "m.onnx"
        path.write_bytes(_heavy_model(defect, pad=1000).SerializeToString())
        with pytest.raises(InputError) as loaded:
            load_model(path)
        assert str(loaded.value) == expected.replace("<model>", str(path))


def test_block_parse_and_late_weights_give_the_whole_parse(tmp_path, monkeypatch):
    paths = []
    for i, model in enumerate(_models() + [_heavy_model(pad=5000)]):
        paths.append(tmp_path / f"m{i}.onnx")
        paths[-1].write_bytes(model.SerializeToString())
    whole = {p: io.parse_model(p)[0].SerializeToString() for p in paths}
    loaded = {p: load_model(p).SerializeToString() for p in paths}
    monkeypatch.setattr(io, "BLOCK_BYTES", 512)
    for p in paths:
        model, _, deferred = io._parse(p, None, defer=True)
        assert deferred is None or all(model.graph.initializer[i].data_location == TensorProto.EXTERNAL
                                       for i in deferred.positions)
        assert io.parse_model(p)[0].SerializeToString() == whole[p]
        assert load_model(p).SerializeToString() == loaded[p]
    assert io._parse(paths[-1], None, defer=True)[2] is not None  # the padded weight did wait


def test_block_parse_refuses_what_the_whole_parse_refuses(tmp_path, monkeypatch):
    data = _heavy_model(pad=5000).SerializeToString()
    cases = {"truncated": data[:len(data) // 2], "cut_in_a_length": data[:3],
             "flipped": data[:100] + b"\xff" + data[101:], **{f"nested_{d}": nested_bytes(d) for d in range(28, 36)}}
    errors = {}
    for block in (1 << 40, 256):
        monkeypatch.setattr(io, "BLOCK_BYTES", block)
        for name, payload in cases.items():
            path = tmp_path / f"{name}.onnx"
            path.write_bytes(payload)
            try:
                io.parse_model(path)
                errors.setdefault(name, []).append("parsed")
            except InputError as exc:
                errors.setdefault(name, []).append(str(exc))
    assert all(whole == block for whole, block in errors.values()), errors
    # protobuf's depth limit is crossed in that range: the block reader counts depth as one parse does
    assert "16 levels" in errors["nested_28"][0] and "100-level limit" in errors["nested_35"][0]


def test_a_file_changed_while_loading_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(_heavy_model(pad=5000).SerializeToString())
    monkeypatch.setattr(io, "BLOCK_BYTES", 1024)
    real = io.infer_shapes

    def rewrite_meanwhile(model, name):
        path.write_bytes(_heavy_model(pad=6000).SerializeToString())
        return real(model, name)

    monkeypatch.setattr(io, "infer_shapes", rewrite_meanwhile)
    with pytest.raises(InputError, match="changed while it was being loaded"):
        load_model(path)
