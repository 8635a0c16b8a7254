"""The array-based range queries (issue 2's speed work) answer exactly what the plain loops did.

Pinned leaf ranges were recorded with the per-node-loop implementation they replaced;
the reference functions below are that implementation, kept as an oracle.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from adaptopt import api
from adaptopt.config import Config
from adaptopt.graph.index import GraphIndex, subgraph_outer_inputs
from adaptopt.graph.io import load_model, save_model
from adaptopt.graph.partition import crossing_costs, partition
from tests.conftest import BERT_INPUTS

RESNET_LEAVES = [(0, 4), (4, 11), (11, 15), (15, 19), (19, 25)]
RESNET_LOADED_LEAVES = [(0, 4), (4, 10), (10, 14), (14, 19), (19, 25)]  # shape inference gives sizes
BERT_LEAVES = [(0, 22), (22, 58), (58, 89), (89, 118), (118, 129), (129, 142), (142, 151), (151, 158)]


def leaf_ranges(tree) -> list[tuple[int, int]]:
    return [(leaf.start, leaf.stop) for leaf in tree.leaves()]


def test_example_leaves_are_pinned(resnet_model, bert_model, tmp_path):
    assert leaf_ranges(partition(GraphIndex.build(resnet_model), 3, 4)) == RESNET_LEAVES
    assert leaf_ranges(partition(GraphIndex.build(bert_model), 3, 4)) == BERT_LEAVES
    for model, config, expected in ((resnet_model, Config(), RESNET_LOADED_LEAVES),
                                    (bert_model, Config(inputs=dict(BERT_INPUTS)), BERT_LEAVES)):
        save_model(model, tmp_path / "m.onnx")
        assert leaf_ranges(api.build_tree(load_model(tmp_path / "m.onnx", config), config, 3)) == expected


# ---------------------------------------------------------------- oracle: the former loops
def producers_and_consumers(index: GraphIndex) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Tensor -> writing position, tensor -> reading positions (topological order), by looping
    over the nodes: the dicts the index kept before its tables."""
    producer, consumers = {}, {}
    for pos, (node, inputs) in enumerate(zip(index.nodes, index.node_inputs)):
        producer.update((o, pos) for o in node.output if o)
        for name in inputs:
            consumers.setdefault(name, []).append(pos)
    return producer, consumers


def reference_boundary(index: GraphIndex, start: int, stop: int):
    producer, consumers = producers_and_consumers(index)
    inputs, inits, seen = [], [], set()
    for pos in range(start, stop):
        for name in index.node_inputs[pos]:
            if name in seen:
                continue
            seen.add(name)
            p = producer.get(name)
            if p is not None and start <= p < stop:
                continue
            (inits if (p is None and name in index.initializers) else inputs).append(name)
    outputs = [o for pos in range(start, stop) for o in index.nodes[pos].output if o and (
        o in index.graph_outputs or any(c >= stop for c in consumers.get(o, ())))]
    return inputs, outputs, inits


def reference_crossing_costs(index: GraphIndex, start: int, stop: int):
    _, consumers = producers_and_consumers(index)
    counts, sizes = np.zeros(stop - start, np.int64), np.zeros(stop - start, np.float64)
    for pos in range(start, stop):
        for out in index.nodes[pos].output:
            last = max((c for c in consumers.get(out, ()) if c < stop), default=None) if out else None
            if last is not None and last > pos:
                size = index.tensor_bytes(out)
                counts[pos + 1 - start:last + 1 - start] += 1
                sizes[pos + 1 - start:last + 1 - start] += 4096.0 if size is None else size
    return counts, sizes


@st.composite
def dags(draw):
    """Multi-output nodes, repeated reads, graph outputs also read inside, shared weights, some sizes unknown."""
    tensors, nodes, value_info = ["x", "y"], [], []
    for i in range(draw(st.integers(1, 40))):
        reads = draw(st.lists(st.sampled_from(tensors + ["w"]), min_size=1, max_size=3))
        outs = [f"t{i}_{k}" for k in range(draw(st.integers(1, 2)))]
        nodes.append(helper.make_node("Custom", reads, outs, domain="test", name=f"n{i}", k=i % 3))
        for o in outs:
            if draw(st.booleans()):
                value_info.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, [draw(st.integers(1, 9)), 4]))
        tensors += outs
    produced = tensors[2:]
    outputs = draw(st.lists(st.sampled_from(produced), min_size=1, max_size=4, unique=True))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in "xy"],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              initializer=[numpy_helper.from_array(np.ones(3, np.float32), "w")],
                              value_info=value_info)
    index = GraphIndex.build(helper.make_model(graph))
    start = draw(st.integers(0, len(index) - 1))
    return index, start, draw(st.integers(start + 1, len(index)))


def reference_views(model: onnx.ModelProto) -> dict:
    """What GraphIndex.build kept as Python objects before the tables (nodes in stored order)."""
    graph = model.graph
    node_inputs = [tuple(n for n in list(node.input) + subgraph_outer_inputs(node) if n) for node in graph.node]
    producer, consumers = {}, {}
    for pos, (node, inputs) in enumerate(zip(graph.node, node_inputs)):
        producer.update((o, pos) for o in node.output if o)
        for name in inputs:
            consumers.setdefault(name, []).append(pos)
    return {"node_inputs": node_inputs, "producer": producer, "consumers": consumers,
            "initializers": {t.name: t for t in graph.initializer},
            "value_info": {vi.name: vi for vi in list(graph.input) + list(graph.value_info) + list(graph.output)}}


@settings(max_examples=60, deadline=None)
@given(dags())
def test_derived_views_match_the_former_dicts(case):
    index, _, _ = case
    ref = reference_views(index.model)
    assert index.node_inputs == ref["node_inputs"]
    assert producers_and_consumers(index) == (ref["producer"], ref["consumers"])  # stored order is topological here
    for name in ("initializers", "value_info"):  # same keys, order, values and length as the dicts
        view, expected = getattr(index, name), ref[name]
        assert list(view) == list(expected) and len(view) == len(expected)
        assert all(view[k] == v and k in view for k, v in expected.items())
        assert "no such tensor" not in view and view.get("no such tensor") is None


def test_stored_out_of_order_nodes_are_indexed_in_topological_order():
    nodes = [helper.make_node("Relu", ["a"], ["b"], name="second"), helper.make_node("Neg", ["x"], ["a"], name="first"),
             helper.make_node("Abs", ["b"], ["y"], name="third")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    index = GraphIndex.build(helper.make_model(graph))
    assert [n.name for n in index.nodes] == ["first", "second", "third"] == list(index.node_names(0, 3))
    assert [n.name for n in index.nodes[1:]] == ["second", "third"] and index.nodes[-1].name == "third"
    assert index.node_inputs == [("x",), ("a",), ("b",)]
    assert index.boundary(1, 3) == (["a"], ["y"], [])


def test_name_views_follow_assignment_and_deletion():
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("x", "a", "y")]
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["a"], name="n0"), helper.make_node("Abs", ["a"], ["y"])],
                              "g", vi[:1], vi[2:], value_info=[vi[1], helper.make_tensor_value_info("stale", 1, [1])])
    view = GraphIndex.build(helper.make_model(graph)).value_info
    assert list(view) == ["x", "a", "stale", "y"] and len(view) == 4  # "stale": no node reads or writes it
    typed = helper.make_tensor_value_info("a", TensorProto.FLOAT, [3])
    view["a"] = typed
    view["new"] = helper.make_tensor_value_info("new", TensorProto.FLOAT, [1])
    assert view["a"] is typed and list(view) == ["x", "a", "stale", "y", "new"] and len(view) == 5
    del view["x"], view["stale"], view["new"]
    assert list(view) == ["a", "y"] and len(view) == 2 and "x" not in view
    with pytest.raises(KeyError):
        del view["x"]


@settings(max_examples=150, deadline=None)
@given(dags())
def test_range_queries_match_the_loops(case):
    index, start, stop = case
    assert index.boundary(start, stop) == reference_boundary(index, start, stop)
    counts, sizes = crossing_costs(index, start, stop)
    ref_counts, ref_sizes = reference_crossing_costs(index, start, stop)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_array_equal(sizes, ref_sizes)
    assert counts.dtype == np.int64 and sizes.dtype == np.float64
    assert index.node_names(start, stop) == tuple(n.name for n in index.nodes[start:stop])


def test_typing_a_tensor_later_updates_cut_sizes():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"), helper.make_node("Relu", ["a"], ["b"], name="r1"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("x", "y")]
    index = GraphIndex.build(helper.make_model(helper.make_graph(nodes, "g", vi[:1], vi[1:])))
    assert crossing_costs(index, 0, 3)[1].tolist() == [0.0, 4096.0, 8192.0]  # a, b untyped: 4096 each
    index.set_value_info("a", helper.make_tensor_value_info("a", TensorProto.FLOAT, [2]))
    assert crossing_costs(index, 0, 3)[1].tolist() == [0.0, 8.0, 4104.0]
    index.value_info["b"] = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])  # a direct addition
    assert crossing_costs(index, 0, 3)[1].tolist() == [0.0, 8.0, 12.0]


# ---------------------------------------------------------------- content hash contract
def block(prefix: str, alpha: float = 0.5, weight: float = 1.0, width: int = 4) -> tuple[list, list]:
    """Relu -> LeakyRelu(alpha) -> Mul(weight) over ``in`` -> ``out``; node names carry the prefix."""
    nodes = [helper.make_node("Relu", ["in"], ["r"], name=f"{prefix}relu"),
             helper.make_node("LeakyRelu", ["r"], ["l"], name=f"{prefix}leaky", alpha=alpha),
             helper.make_node("Mul", ["l", "w"], ["out"], name=f"{prefix}mul")]
    return nodes, [numpy_helper.from_array(np.full(width, weight, np.float32), "w")]


def block_hash(lead: int, **kwargs) -> str:
    """Hash of the block's range inside a model with ``lead`` unrelated nodes before it."""
    nodes, inits = block(f"m{lead}_", **kwargs)
    width = kwargs.get("width", 4)
    pre = [helper.make_node("Neg", ["x"], [f"p{i}"], name=f"pre{i}") for i in range(lead)]
    graph = helper.make_graph(pre + [helper.make_node("Identity", ["x"], ["in"], name="id")] + nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [width])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [width])
                               for o in ["out"] + [f"p{i}" for i in range(lead)]], initializer=inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    index = GraphIndex.build(model)
    start = next(i for i, n in enumerate(index.nodes) if n.op_type == "Relu")
    return index.content_hash(start, start + 3)


def test_equal_subgraphs_of_two_models_hash_equal():
    assert block_hash(0) == block_hash(5)  # other positions, other node names, same computation


@pytest.mark.parametrize("change", [{"alpha": 0.25}, {"weight": 2.0}, {"width": 8}])
def test_hash_follows_attributes_weights_and_types(change):
    assert block_hash(0, **change) != block_hash(0)
