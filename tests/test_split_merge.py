"""Split -> merge is the identity: structure checks and numerical round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from adaptopt import api
from adaptopt.cli import cli
from adaptopt.config import Config, InputSpec
from adaptopt.errors import InputError
from adaptopt.graph import merge as merge_mod
from adaptopt.graph.capture import make_inputs
from adaptopt.graph.index import GraphIndex
from adaptopt.graph.io import load_model, save_model
from adaptopt.graph.merge import merge_directory, merge_models
from adaptopt.graph.partition import partition
from adaptopt.graph.subgraph import (
    _keep_original_signature,
    _range_model,
    write_tree,
    write_weights,
)
from adaptopt.runtime import make_session
from tests.conftest import BERT_INPUTS, run_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"


def assert_round_trip(model_path: Path, tmp_path: Path, config: Config, granularity: int = 3) -> dict:
    out = tmp_path / "split"
    result = api.split(model_path, out, config, granularity)
    merged = api.merge(out)
    original = load_model(model_path, config)
    feeds = make_inputs(original, config)
    ref = run_model(original, feeds)
    got = run_model(merged, feeds)
    assert list(ref) == [o.name for o in merged.graph.output]
    for name in ref:
        assert ref[name].shape == got[name].shape
        assert np.max(np.abs(ref[name].astype(np.float64) - got[name]), initial=0.0) <= 1e-6, name
    onnx.checker.check_model(merged)
    return result.manifest


def test_example_round_trip_and_files(tmp_path, resnet_model):
    path = tmp_path / "resnet.onnx"
    save_model(resnet_model, path)
    manifest = assert_round_trip(path, tmp_path, Config(), granularity=3)
    entries = {n["id"]: n for n in manifest["nodes"]}
    assert manifest["root"] == "0" and entries["0"]["parent"] is None
    for entry in manifest["nodes"]:
        for child in entry["children"]:
            assert entries[child]["parent"] == entry["id"]
        sub = onnx.load(str(tmp_path / "split" / entry["file"]))  # external refs resolve in the folder
        onnx.checker.check_model(sub)
        make_session(str(tmp_path / "split" / entry["file"]), Config().target)
        assert {i.name for i in sub.graph.input} == set(entry["boundary_inputs"])
        assert {o.name for o in sub.graph.output} == set(entry["boundary_outputs"])
    leaves = [entries[i] for i in manifest["leaves"]]
    assert sum(e["node_count"] for e in leaves) == len(resnet_model.graph.node)
    # weights are written once: every subgraph file stays small, weights.bin holds them
    weights = (tmp_path / "split" / "weights.bin").stat().st_size
    assert weights >= 0.9 * sum(len(t.raw_data) for t in resnet_model.graph.initializer if len(t.raw_data) >= 1024)
    assert all((tmp_path / "split" / e["file"]).stat().st_size < weights for e in manifest["nodes"])


def test_bert_symbolic_dims_survive(tmp_path, bert_model):
    path = tmp_path / "bert.onnx"
    save_model(bert_model, path)
    # split without shapes: symbolic dims stay symbolic in the merged model
    out = tmp_path / "nosh"
    api.split(path, out, Config(), 2)
    merged = api.merge(out)
    dims = [d.dim_param for d in merged.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    assert_round_trip(path, tmp_path, Config(inputs=dict(BERT_INPUTS)), granularity=3)


def test_leaf_rewritten_in_place_is_merged(tmp_path, resnet_model):
    path = tmp_path / "m.onnx"
    save_model(resnet_model, path)
    out = tmp_path / "split"
    manifest = api.split(path, out, Config(), 2).manifest
    entries = {n["id"]: n for n in manifest["nodes"]}
    leaf_file = out / entries[manifest["leaves"][0]]["file"]
    last = onnx.load(str(out / entries[manifest["leaves"][-1]]["file"]))
    taken = next(o for n in last.graph.node for o in n.output if o not in {x.name for x in last.graph.output})
    leaf = onnx.load(str(leaf_file))
    # rewrite: insert an Identity on the first output, via a name internal to another leaf
    first_out = leaf.graph.output[0].name
    producer = next(n for n in leaf.graph.node if first_out in n.output)
    producer.output[list(producer.output).index(first_out)] = taken
    leaf.graph.node.append(helper.make_node("Identity", [taken], [first_out], name="inserted"))
    onnx.save(leaf, str(leaf_file))
    merged = api.merge(out)
    feeds = make_inputs(resnet_model, Config())
    ref, got = run_model(resnet_model, feeds), run_model(merged, feeds)
    np.testing.assert_allclose(ref["logits"], got["logits"], atol=1e-6)
    assert len(merged.graph.node) == len(resnet_model.graph.node) + 1


def test_merge_refuses_changed_boundary(tmp_path, resnet_model):
    path = tmp_path / "m.onnx"
    save_model(resnet_model, path)
    out = tmp_path / "split"
    manifest = api.split(path, out, Config(), 1).manifest
    leaf_file = out / next(n["file"] for n in manifest["nodes"] if n["id"] == manifest["leaves"][0])
    leaf = onnx.load(str(leaf_file))
    leaf.graph.output[0].name = "renamed"
    onnx.save(leaf, str(leaf_file))
    result = CliRunner().invoke(cli, ["merge", str(out), "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2
    assert "boundary" in result.output and not (tmp_path / "x.onnx").exists()


def _control_flow_model() -> onnx.ModelProto:
    """If + Loop whose bodies read outer-scope tensors; plus a plain prefix/suffix."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    then_g = helper.make_graph([helper.make_node("Add", ["h", "w"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [4])])
    else_g = helper.make_graph([helper.make_node("Sub", ["h", "w"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [4])])
    body = helper.make_graph(
        [helper.make_node("Mul", ["acc_in", "scale"], ["acc_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [4])])
    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["branch"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Abs", ["branch"], ["scale"]),
        helper.make_node("Loop", ["trips", "true", "branch"], ["looped"], body=body),
        helper.make_node("Tanh", ["looped"], ["t1"]),
        helper.make_node("Add", ["t1", "h"], ["y"]),
    ]
    inits = [w, numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(3, np.int64), "trips"), numpy_helper.from_array(np.array(True), "true")]
    graph = helper.make_graph(nodes, "cf", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_control_flow_is_atomic_and_round_trips(tmp_path):
    model = _control_flow_model()
    onnx.checker.check_model(model)
    index = GraphIndex.build(model)
    loop_pos = next(i for i, n in enumerate(index.nodes) if n.op_type == "Loop")
    scale_pos = next(i for i, n in enumerate(index.nodes) if "scale" in n.output)
    assert "scale" in index.node_inputs[loop_pos]  # outer-scope read counted as an input
    if_pos = next(i for i, n in enumerate(index.nodes) if n.op_type == "If")
    assert {"h", "w"} <= set(index.node_inputs[if_pos])
    path = tmp_path / "cf.onnx"
    save_model(model, path)
    for depth in (1, 2, 3):
        tree = partition(index, depth, 1)
        for leaf in tree.leaves():
            # a leaf that holds the Loop also receives 'scale' as a boundary input or computes it
            if leaf.start <= loop_pos < leaf.stop and not leaf.start <= scale_pos < leaf.stop:
                assert "scale" in leaf.boundary_inputs
        cfg = Config(granularity=Config().granularity.__class__(min_nodes=1, initial_granularity=depth))
        sub = tmp_path / f"d{depth}"
        sub.mkdir()
        assert_round_trip(path, sub, cfg, granularity=depth)


def test_external_data_in_and_out(tmp_path, resnet_model):
    src = tmp_path / "ext" / "model.onnx"
    save_model(resnet_model, src, external=True)
    data_size = (tmp_path / "ext" / "model.onnx.data").stat().st_size
    assert data_size > 20_000 and src.stat().st_size < data_size / 2
    assert_round_trip(src, tmp_path, Config(), granularity=2)
    merged = api.merge(tmp_path / "split")
    out = tmp_path / "out" / "merged.onnx"
    save_model(merged, out, external=True)
    reloaded = load_model(out)
    feeds = make_inputs(resnet_model, Config())
    np.testing.assert_array_equal(run_model(reloaded, feeds)["logits"], run_model(resnet_model, feeds)["logits"])


@pytest.mark.parametrize("name", sorted(p.name for p in SHARED.glob("*.onnx")) if SHARED.is_dir() else [])
def test_shared_models_round_trip(tmp_path, name):
    spec = yaml.safe_load((SHARED / "inputs.yaml").read_text())[name]
    inputs = {}
    for key, value in spec.items():
        values = value["values"]
        rng = tuple(values["range"]) if isinstance(values, dict) else None
        inputs[key] = InputSpec(shape=tuple(value["shape"]), dtype=value["dtype"],
                                values="range" if rng else values, value_range=rng)
    assert_round_trip(SHARED / name, tmp_path, Config(inputs=inputs), granularity=3)


def test_partition_is_iterative_on_a_long_chain():
    n = 20_000
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"n{i}") for i in range(n)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    tree = partition(GraphIndex.build(model), 12, 4)
    leaves = tree.leaves()
    assert len(leaves) == 2**12
    assert [leaf.start for leaf in leaves] == sorted(leaf.start for leaf in leaves)
    assert leaves[-1].stop == n and all(a.stop == b.start for a, b in zip(leaves, leaves[1:]))


def test_cut_prefers_narrow_boundaries():
    """Two wide blocks joined by one tensor: the cut falls on the single crossing tensor."""
    nodes = []
    for block, (src, dst) in enumerate((("x", "mid"), ("mid", "y"))):
        branches = [f"b{block}_{k}" for k in range(4)]
        nodes += [helper.make_node("Relu", [src], [b], name=f"r{block}{k}") for k, b in enumerate(branches)]
        nodes.append(helper.make_node("Sum", branches, [dst], name=f"sum{block}"))
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [8]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph(nodes, "g", vi[:1], vi[1:]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model = onnx.shape_inference.infer_shapes(model)
    tree = partition(GraphIndex.build(model), 1, 2)
    left, right = (tree.nodes["0.0"], tree.nodes["0.1"])
    assert left.boundary_outputs == ("mid",) and right.boundary_inputs == ("mid",)


# ------------------------------------------------------------------ random DAGs
_BINARY = ("Add", "Mul", "Sub", "Max")
_UNARY = ("Relu", "Neg", "Tanh", "Abs", "Sigmoid")


@st.composite
def random_dags(draw):
    n_inputs = draw(st.integers(1, 3))
    tensors = [f"in{i}" for i in range(n_inputs)]
    nodes = []
    for i in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(("unary", "binary", "matmul", "transpose")))
        a = draw(st.sampled_from(tensors))
        out = f"t{i}"
        if kind == "unary":
            nodes.append(helper.make_node(draw(st.sampled_from(_UNARY)), [a], [out], name=f"n{i}"))
        elif kind == "binary":
            b = draw(st.sampled_from(tensors))
            nodes.append(helper.make_node(draw(st.sampled_from(_BINARY)), [a, b], [out], name=f"n{i}"))
        elif kind == "matmul":
            nodes.append(helper.make_node("MatMul", [a, "w"], [out], name=f"n{i}"))
        else:
            nodes.append(helper.make_node("Transpose", [a], [out], name=f"n{i}", perm=[1, 0]))
        tensors.append(out)
    consumed = {x for n in nodes for x in n.input}
    outputs = [t for t in tensors[n_inputs:] if t not in consumed] + draw(
        st.lists(st.sampled_from(tensors[n_inputs:]), max_size=3, unique=True))
    order = draw(st.permutations(range(len(nodes))))  # stored out of topological order
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 3])
    w = numpy_helper.from_array(np.linspace(-1, 1, 9, dtype=np.float32).reshape(3, 3), "w")
    graph = helper.make_graph([nodes[i] for i in order], "rand", [vi(f"in{i}") for i in range(n_inputs)],
                              [vi(o) for o in dict.fromkeys(outputs)], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), draw(st.integers(0, 5)), \
        draw(st.integers(1, 4))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_dags())
def test_random_dag_split_merge_identity(tmp_path_factory, case):
    model, depth, min_nodes = case
    tmp = tmp_path_factory.mktemp("dag")
    path = tmp / "m.onnx"
    save_model(model, path)
    cfg = Config()
    cfg = cfg.with_section("granularity", min_nodes=min_nodes, initial_granularity=depth)
    api.split(path, tmp / "s", cfg, depth)
    merged = api.merge(tmp / "s")
    feeds = make_inputs(model, Config(inputs={f"in{i}": InputSpec(values="normal") for i in range(3)
                                              if any(x.name == f"in{i}" for x in model.graph.input)}))
    ref, got = run_model(model, feeds), run_model(merged, feeds)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-6, rtol=0)
    manifest = json.loads((tmp / "s" / "manifest.json").read_text())
    assert sum(n["node_count"] for n in manifest["nodes"] if n["id"] in manifest["leaves"]) == len(model.graph.node)


def test_cli_split_merge_stdin_stdout(tmp_path, resnet_model):
    data = resnet_model.SerializeToString()
    runner = CliRunner()
    result = runner.invoke(cli, ["split", "-", "-o", str(tmp_path / "s"), "--granularity", "2"], input=data)
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["merge", str(tmp_path / "s"), "-o", "-"])
    assert result.exit_code == 0
    merged = onnx.load_model_from_string(result.stdout_bytes)
    assert len(merged.graph.node) == len(resnet_model.graph.node)


def test_unknown_config_key_exits_2(tmp_path, resnet_model):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("granularity:\n  initial_granularty: 2\n")
    path = tmp_path / "m.onnx"
    save_model(resnet_model, path)
    before = path.read_bytes()
    result = CliRunner().invoke(cli, ["split", str(path), "-o", str(tmp_path / "s"), "--config", str(cfg)])
    assert result.exit_code == 2
    assert "initial_granularty" in result.output and "c.yaml:2" in result.output
    assert not (tmp_path / "s").exists() and path.read_bytes() == before


# ------------------------------------------------------------------ memory-bounded writing and merging (issue 2)
def test_subgraph_files_hold_the_bytes_of_the_built_models(tmp_path, bert_model):
    """write_tree streams each file from the index; the bytes are those of the models it used to build."""
    save_model(bert_model, tmp_path / "m.onnx")
    config = Config(inputs=dict(BERT_INPUTS))
    tree = api.build_tree(load_model(tmp_path / "m.onnx", config), config, 3)
    write_tree(tree, tmp_path / "s")
    refs = write_weights(tree.index, tmp_path)
    for sub in tree.nodes.values():
        model = _range_model(tree.index, sub.start, sub.stop, f"sg_{sub.id}", refs, {})
        if sub.id == tree.root:
            _keep_original_signature(model, tree.index.model, frozenset())
        assert (tmp_path / "s" / f"sg_{sub.id}.onnx").read_bytes() == model.SerializeToString()


def _split_with_shared_weight(tmp_path: Path) -> tuple[Path, dict]:
    """A chain whose 1 KiB weight "scale" every leaf reads, split into 8 leaves."""
    from benchmarks.split import chain_model
    save_model(chain_model(200, width=256), tmp_path / "src.onnx")
    out = tmp_path / "split"
    manifest = api.split(tmp_path / "src.onnx", out, Config().with_section("granularity", min_nodes=1), 3).manifest
    return out, {n["id"]: out / n["file"] for n in manifest["nodes"]} | {"leaves": manifest["leaves"]}


def _inline(tensor: onnx.TensorProto, folder: Path) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    with open(folder / info["location"], "rb") as fh:
        fh.seek(int(info["offset"]))
        data = fh.read(int(info["length"]))
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT
    tensor.raw_data = data


def test_merge_reading_weights_late_gives_what_merge_models_gives(tmp_path):
    """Weights left in weights.bin until the checker ran: same model as merging fully loaded leaves,
    also where a rewritten leaf holds a shared weight inline, or changed under the same name."""
    out, files = _split_with_shared_weight(tmp_path)
    leaves = files["leaves"]
    for position, factor in ((1, 3.0), (2, 1.0)):  # leaf 1 changes "scale" (renamed), leaf 2 holds it inline
        leaf = onnx.load(str(files[leaves[position]]), load_external_data=False)
        scale = next(t for t in leaf.graph.initializer if t.name == "scale")
        _inline(scale, out)
        scale.raw_data = (np.frombuffer(scale.raw_data, np.float32) * factor).tobytes()
        files[leaves[position]].write_bytes(leaf.SerializeToString())  # its other weights stay in weights.bin
    merged = merge_directory(out)
    assert sorted(t.name for t in merged.graph.initializer if t.name.startswith("scale")) == ["scale", "scale__l1"]
    skeleton = onnx.load(str(files["0"]), load_external_data=False)
    loaded = [onnx.load(str(files[sid])) for sid in leaves]  # onnx's loader: every weight inline
    reference = merge_models(skeleton, loaded)
    assert merged.SerializeToString() == reference.SerializeToString()


def test_weights_file_replaced_during_merge_is_refused(tmp_path, monkeypatch):
    out, _ = _split_with_shared_weight(tmp_path)
    real = merge_mod.check_model

    def replace_meanwhile(model, name):
        real(model, name)
        data = (out / "weights.bin").read_bytes()
        (out / "weights.bin").unlink()
        (out / "weights.bin").write_bytes(data[::-1])

    monkeypatch.setattr(merge_mod, "check_model", replace_meanwhile)
    with pytest.raises(InputError, match="changed while the leaves were merged"):
        merge_directory(out)


# ------------------------------------------------------------------ dynamic dims: split and merged at pinned sizes
def _dynamic_mlp(dims: list, seed: int = 0) -> onnx.ModelProto:
    """A 6-layer MLP on input ``x`` of shape ``dims`` (last dim 16, the others symbolic) whose
    output reshapes the last dim to 4x4 with a shape read at run time (Shape -> Slice -> Concat):
    a merged model that kept the shapes inferred at the pinned sizes fails or folds that shape."""
    rng = np.random.default_rng(seed)
    inits, nodes, prev = [], [], "x"
    for i in range(6):
        inits += [numpy_helper.from_array((rng.standard_normal((16, 16)) / 4).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) / 4, f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"])]
        prev = f"r{i}"
    lead = len(dims) - 1
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("zero", [0]), ("lead", [lead]), ("tail", [4, 4]))]
    nodes += [helper.make_node("Shape", [prev], ["shape"]),
              helper.make_node("Slice", ["shape", "zero", "lead"], ["outer"]),
              helper.make_node("Concat", ["outer", "tail"], ["target"], axis=0),
              helper.make_node("Reshape", [prev, "target"], ["y"])]
    graph = helper.make_graph(nodes, "dynamic_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims[:-1] + [4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


DYNAMIC_CASES = [(["batch", 16], (4, 16), [(3, 16), (1, 16), (7, 16)]),
                 (["batch", "sequence", 16], (2, 8, 16), [(3, 5, 16), (1, 8, 16), (2, 11, 16)])]


def _assert_runs_like(original: onnx.ModelProto, merged: onnx.ModelProto, shapes) -> None:
    """``merged`` gives ``original``'s outputs (within 1e-5) at every shape of ``shapes``, with
    ORT's optimizations off and on (on, ORT would fold a Shape to a pinned value info)."""
    rng = np.random.default_rng(1)
    for shape in shapes:
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        ref = run_model(original, feeds)
        for level in ("disable", "all"):
            got = run_model(merged, feeds, level=level)
            assert got["y"].shape == ref["y"].shape == tuple(shape[:-1]) + (4, 4)
            np.testing.assert_allclose(got["y"], ref["y"], atol=1e-5, err_msg=f"{shape} {level}")


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


@pytest.mark.parametrize("dims,pinned,others", DYNAMIC_CASES)
def test_split_at_pinned_shape_merges_with_dynamic_signature(tmp_path, dims, pinned, others):
    """Split at the config's sizes, merged back: the model's own signature, usable at any size."""
    original = _dynamic_mlp(dims)
    save_model(original, tmp_path / "m.onnx")
    config = Config(inputs={"x": InputSpec(shape=pinned)}).with_section("granularity", min_nodes=1)
    manifest = api.split(tmp_path / "m.onnx", tmp_path / "split", config, 3).manifest
    assert len(manifest["leaves"]) > 2
    leaf = onnx.load(str(tmp_path / "split" / f"sg_{manifest['leaves'][0]}.onnx"))
    assert _dims(leaf.graph.input[0]) == list(pinned)  # the leaves are cut (and profiled) at the pinned sizes
    merged = api.merge(tmp_path / "split", tmp_path / "merged.onnx")
    assert _dims(merged.graph.input[0]) == dims and _dims(merged.graph.output[0]) == dims[:-1] + [4, 4]
    assert len(merged.graph.value_info) == 0  # inferred at the pinned sizes: dropped
    _assert_runs_like(original, onnx.load(str(tmp_path / "merged.onnx")), [pinned, *others])
    # the root file is the whole model on the same signature
    root = onnx.load(str(tmp_path / "split" / f"sg_{manifest['root']}.onnx"))
    assert _dims(root.graph.input[0]) == dims and len(root.graph.value_info) == 0
    _assert_runs_like(original, root, [pinned, others[0]])


@pytest.mark.parametrize("from_stdin", [False, True])
def test_cli_split_merge_keeps_dynamic_dims(tmp_path, from_stdin):
    """From a file or from stdin, the signature is the model's own, taken before it is pinned."""
    original = _dynamic_mlp(["batch", 16])
    save_model(original, tmp_path / "m.onnx")
    runner = CliRunner()
    source = "-" if from_stdin else str(tmp_path / "m.onnx")
    result = runner.invoke(cli, ["split", source, "-o", str(tmp_path / "s"), "--input-shape", "x=4x16",
                                 "--granularity", "2"], input=(tmp_path / "m.onnx").read_bytes())
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["merge", str(tmp_path / "s"), "-o", str(tmp_path / "merged.onnx")])
    assert result.exit_code == 0, result.output
    merged = onnx.load(str(tmp_path / "merged.onnx"))
    assert _dims(merged.graph.input[0]) == ["batch", 16]
    _assert_runs_like(original, merged, [(4, 16), (3, 16)])


def test_folder_without_signature_still_merges_pinned(tmp_path):
    """A folder written as before (root file on the pinned work model) merges as it did."""
    original = _dynamic_mlp(["batch", 16])
    save_model(original, tmp_path / "m.onnx")
    config = Config(inputs={"x": InputSpec(shape=(4, 16))}).with_section("granularity", min_nodes=1)
    tree = api.build_tree(load_model(tmp_path / "m.onnx", config), config, 2)
    write_tree(tree, tmp_path / "s")
    merged = merge_directory(tmp_path / "s")
    assert _dims(merged.graph.input[0]) == [4, 16] and len(merged.graph.value_info) > 0
    _assert_runs_like(original, merged, [(4, 16)])


def test_static_signature_keeps_value_info(tmp_path, resnet_model):
    """Only a dynamic signature drops the leaves' value infos."""
    save_model(resnet_model, tmp_path / "m.onnx")
    api.split(tmp_path / "m.onnx", tmp_path / "s", Config(), 2)
    merged = api.merge(tmp_path / "s")
    assert len(merged.graph.value_info) > 0


@pytest.mark.parametrize("dims,pinned,others", DYNAMIC_CASES[:1])
def test_keep_subgraphs_merges_with_dynamic_signature(tmp_path, dims, pinned, others):
    """``optimize --keep-subgraphs DIR`` then ``merge DIR``: the user's signature, as the optimized model has."""
    from adaptopt.config import ProfilingConfig
    original = _dynamic_mlp(dims)
    save_model(original, tmp_path / "m.onnx")
    config = Config(inputs={"x": InputSpec(shape=pinned)},
                    granularity=Config().granularity.__class__(initial_granularity=1, min_nodes=3, max_rounds=1),
                    profiling=ProfilingConfig(warmup=1, iterations=5, min_time_s=0.0, max_time_s=0.2,
                                              apart_pairs=5, apart_seconds=0.02),
                    policy=Config().policy.__class__(RL_training_epochs=2, max_sequence=2,
                                                     cache_dir=str(tmp_path / "cache")))
    result = api.optimize(tmp_path / "m.onnx", config, keep_subgraphs=tmp_path / "kept")
    assert _dims(result.model.graph.input[0]) == dims
    merged = api.merge(tmp_path / "kept")
    assert _dims(merged.graph.input[0]) == dims and _dims(merged.graph.output[0]) == dims[:-1] + [4, 4]
    assert len(merged.graph.value_info) == 0
    _assert_runs_like(original, merged, [pinned, *others])


def test_kept_rewritten_leaves_merge_with_dynamic_signature(tmp_path):
    """The files ``--keep-subgraphs`` writes, with leaves rewritten at the pinned sizes (MatMul+Add
    fused into Gemm, pinned leaf inputs): merged on the user's signature, they run at other sizes."""
    from types import SimpleNamespace

    from adaptopt.graph.subgraph import extract
    original = _dynamic_mlp(["batch", 16])
    save_model(original, tmp_path / "m.onnx")
    config = Config(inputs={"x": InputSpec(shape=(4, 16))}).with_section("granularity", min_nodes=1)
    skeleton = load_model(tmp_path / "m.onnx", infer=False)
    tree = api.build_tree(load_model(tmp_path / "m.onnx", config), config, 2)
    rewrites = {leaf.id: api.apply_passes(extract(tree.index, leaf), ["fuse_matmul_add"], config).model
                for leaf in tree.leaves()}
    assert sum(n.op_type == "Gemm" for m in rewrites.values() for n in m.graph.node) >= 4
    api.write_optimized_tree(SimpleNamespace(tree=tree, leaf_models=rewrites), tmp_path / "kept", "m.onnx",
                             signature=skeleton)
    merged = api.merge(tmp_path / "kept")
    assert sum(n.op_type == "Gemm" for n in merged.graph.node) >= 4
    assert _dims(merged.graph.input[0]) == ["batch", 16] and len(merged.graph.value_info) == 0
    _assert_runs_like(original, merged, [(4, 16), (3, 16), (9, 16)])


def test_split_refuses_bad_file_in_one_line(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x07not a model")
    result = CliRunner().invoke(cli, ["split", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "s"),
                                      "--input-shape", "x=4x16"])
    assert result.exit_code == 2 and "bad.onnx" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("rewritten", [0, 1])
def test_a_leaf_computing_a_weight_under_its_old_name_merges_without_a_duplicate(rewritten):
    """ORT's quantizer turns a Conv bias initializer `b` into DequantizeLinear(...) -> `b`. When
    another leaf (before or after it) still reads the original `b`, the merged graph must
    not define `b` twice (it did: 'Duplicate definition of name', and every lossy leaf of
    such a model was rolled back)."""
    from onnx import TensorProto, helper, numpy_helper
    from adaptopt.graph.index import GraphIndex
    from adaptopt.graph.partition import partition
    from adaptopt.graph.subgraph import extract
    from adaptopt.validate import compare
    b = np.arange(4, dtype=np.float32) + 1
    nodes = [helper.make_node("Add", ["x", "b"], ["h"], name="add"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "b"], ["y"], name="mul")]
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                                                [numpy_helper.from_array(b, "b")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model = onnx.shape_inference.infer_shapes(model)
    index = GraphIndex.build(model)
    leaves = [extract(index, leaf) for leaf in partition(index, 1, 1).leaves()]
    assert len(leaves) == 2 and all(any(t.name == "b" for t in leaf.graph.initializer) for leaf in leaves)
    leaf = leaves[rewritten]  # `b` becomes a node output computed from a new weight
    del leaf.graph.initializer[:]
    leaf.graph.initializer.append(numpy_helper.from_array(b * 2, "b_half"))
    leaf.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    leaf.graph.node.insert(0, helper.make_node("Mul", ["b_half", "half"], ["b"], name="dequant"))
    merged = merge_models(model, leaves)
    onnx.checker.check_model(merged)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    assert compare(run_model(model, feeds), run_model(merged, feeds), 1e-6).ok


def test_an_initializer_returned_as_a_graph_output_round_trips(tmp_path):
    """A constant the model returns (an initializer listed as a graph output) is read by no
    node: the root file did not hold it, and merge refused the folder (exit 2)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])
    nodes = []
    last = "x"
    for i in range(8):
        nodes.append(helper.make_node("Mul", [last, "k"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"]))
        last = f"r{i}"
    const = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "const_out")
    k = numpy_helper.from_array(np.array(1.1, np.float32), "k")
    outputs = [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["batch", 16]),
               helper.make_tensor_value_info("const_out", TensorProto.FLOAT, [2, 3]),
               helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])]  # a passthrough too
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outputs, [const, k]),
                              opset_imports=[helper.make_opsetid("", 17)])
    save_model(model, tmp_path / "m.onnx")
    config = Config(inputs={"x": InputSpec(shape=(3, 16))})
    assert_round_trip(tmp_path / "m.onnx", tmp_path, config, granularity=2)
