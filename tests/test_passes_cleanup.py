"""Cleanups: constant folding, identity / dead code / CSE elimination, redundant chains."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from adaptopt.passes.cleanup import MAX_FOLD_BYTES
from tests.test_passes_support import (
    assert_noop,
    assert_rewrites,
    const,
    feeds_for,
    make_model,
    outputs,
    prepared,
    random_feeds,
    rng_array,
    tensor,
)


def _plain_model():
    """x -> Relu -> y: nothing for any cleanup to do."""
    return make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [2, 3])], [tensor("y", [2, 3])])


def test_fold_constants_folds_constant_chains_and_shapes(bert_model, bert_config):
    model = prepared(bert_model, bert_config)
    result = assert_rewrites("fold_constants", model, feeds_for(model, bert_config),
                             {"Constant": -34, "Shape": -1, "Range": -1})
    assert not any(n.op_type == "Constant" for n in result.model.graph.node)


def test_fold_constants_keeps_outputs_that_would_grow_the_model():
    big = int(np.sqrt(MAX_FOLD_BYTES // 4)) + 8
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["zeros"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("Neg", ["small"], ["neg"]),
             helper.make_node("Add", ["x", "neg"], ["y"]),
             helper.make_node("ReduceSum", ["zeros"], ["total"], keepdims=0),
             helper.make_node("Add", ["y", "total"], ["z"])]
    model = make_model(nodes, [tensor("x", [4])], [tensor("z", [4])],
                       [const("shape", np.array([big, big], np.int64)), const("small", rng_array([4]))])
    result = assert_rewrites("fold_constants", model, random_feeds(model))
    sizes = [np.prod(t.dims) * 4 for t in result.model.graph.initializer]
    assert max(sizes) < MAX_FOLD_BYTES  # the big ConstantOfShape output was folded only through its sum
    assert not any(n.op_type == "Neg" for n in result.model.graph.node)


def test_fold_constants_is_a_noop_without_constants():
    assert "constant" in assert_noop("fold_constants", _plain_model())


def test_eliminate_identity_removes_identity_dropout_and_same_type_cast(resnet_model):
    model = prepared(resnet_model)
    assert_rewrites("eliminate_identity", model, feeds_for(model), {"Identity": -1, "Dropout": -1})
    nodes = [helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["a"], ["b"], perm=[0, 1]),
             helper.make_node("Identity", ["b"], ["y"])]  # y is a graph output: its name must survive
    model = make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])])
    result = assert_rewrites("eliminate_identity", model, random_feeds(model), {"Cast": -1, "Transpose": -1})
    assert [o.name for o in result.model.graph.output] == ["y"]


def test_eliminate_identity_keeps_an_identity_between_input_and_output():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [tensor("x", [2])], [tensor("y", [2])])
    assert_noop("eliminate_identity", model)


def test_cse_merges_duplicate_nodes_and_constants():
    nodes = [helper.make_node("Mul", ["x", "c1"], ["a"]), helper.make_node("Mul", ["x", "c2"], ["b"]),
             helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("Add", ["ra", "rb"], ["y"])]
    value = rng_array([3])
    model = make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])], [const("c1", value), const("c2", value)])
    result = assert_rewrites("eliminate_common_subexpressions", model, random_feeds(model), {"Mul": -1, "Relu": -1})
    assert len(result.model.graph.initializer) == 1


def test_cse_is_a_noop_without_duplicates():
    assert_noop("eliminate_common_subexpressions", _plain_model())


def test_dead_code_removes_unread_nodes_outputs_and_initializers():
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["dead1"]),
             helper.make_node("Exp", ["dead1"], ["dead2"]),
             helper.make_node("Dropout", ["x"], ["d", "mask"]), helper.make_node("Add", ["y", "d"], ["z"])]
    model = make_model(nodes, [tensor("x", [2, 3])], [tensor("z", [2, 3])], [const("unused", rng_array([5]))])
    result = assert_rewrites("eliminate_dead_code", model, random_feeds(model), {"Neg": -1, "Exp": -1})
    assert not result.model.graph.initializer
    assert list(next(n for n in result.model.graph.node if n.op_type == "Dropout").output) == ["d"]


def test_dead_code_is_a_noop_on_a_live_graph(resnet_model):
    assert_noop("eliminate_dead_code", prepared(resnet_model))


def test_simplify_chains_collapses_cast_reshape_and_transpose_chains():
    nodes = [helper.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["d"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["f", "s1"], ["r1"]),
             helper.make_node("Unsqueeze", ["r1", "ax"], ["r2"]),
             helper.make_node("Transpose", ["r2"], ["t1"], perm=[1, 0, 2]),
             helper.make_node("Transpose", ["t1"], ["t2"], perm=[2, 0, 1]),
             helper.make_node("Transpose", ["t2"], ["y"], perm=[0, 2, 1])]
    model = make_model(nodes, [tensor("x", [2, 3, 4])], [tensor("y", None)],
                       [const("s1", np.array([6, 4], np.int64)), const("ax", np.array([0], np.int64))])
    result = assert_rewrites("simplify_chains", model, random_feeds(model))
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Cast") == 0 and ops.count("Reshape") + ops.count("Unsqueeze") == 1
    assert ops.count("Transpose") == 1


def test_simplify_chains_keeps_lossy_cast_pairs():
    nodes = [helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT32),
             helper.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT)]
    model = make_model(nodes, [tensor("x", [4])], [tensor("y", [4])])
    assert_noop("simplify_chains", model)
    assert onnx.checker.check_model(model) is None


def _head_split_model() -> onnx.ModelProto:
    """x [batch, seq, 8] -> MatMul -> Reshape to [batch, seq, 2, 4] with the target built as
    exporters build it, from Shape/Gather of the MatMul's output; Relu; the same again
    from the Relu's output (the batch and seq dims read from two other tensors), and the
    head count (dim 2, static) read back from the reshaped tensor."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"])]
    for k, src in enumerate(["h", "r0"]):
        nodes += [helper.make_node("Shape", [src], [f"s{k}"]),
                  helper.make_node("Gather", [f"s{k}", "i0"], [f"b{k}"]),
                  helper.make_node("Gather", [f"s{k}", "i1"], [f"q{k}"]),
                  helper.make_node("Unsqueeze", [f"b{k}", "ax"], [f"ub{k}"]),
                  helper.make_node("Unsqueeze", [f"q{k}", "ax"], [f"uq{k}"]),
                  helper.make_node("Concat", [f"ub{k}", f"uq{k}", "heads"], [f"t{k}"], axis=0),
                  helper.make_node("Reshape", [src if k == 0 else "h", f"t{k}"], [f"v{k}"]),
                  helper.make_node("Relu", [f"v{k}"], [f"r{k}"] if k == 0 else ["y0"])]
    nodes += [helper.make_node("Shape", ["r0"], ["s2"]), helper.make_node("Gather", ["s2", "i2"], ["g"]),
              helper.make_node("Cast", ["g"], ["gf"], to=TensorProto.FLOAT),
              helper.make_node("Mul", ["y0", "gf"], ["y"])]
    # r0 is [batch, seq, 2, 4]: reshaping "h" with r0's batch and seq reads them from a 4-D tensor
    inits = [const("w", rng_array([8, 8])), const("i0", np.array(0, np.int64)), const("i1", np.array(1, np.int64)),
             const("i2", np.array(2, np.int64)), const("ax", np.array([0], np.int64)),
             const("heads", np.array([2, 4], np.int64))]
    return make_model(nodes, [tensor("x", ["batch", "seq", 8])], [tensor("y", ["batch", "seq", 2, 4])], inits)


def test_share_input_dims_reads_dynamic_dims_from_the_input_once():
    model = _head_split_model()
    feeds = random_feeds(model)
    result = assert_rewrites("share_input_dims", model, feeds)
    ops = [n.op_type for n in result.model.graph.node]
    # one Shape (of x), one Gather per dim, one Concat for the two equal reshape targets;
    # the static head count became a constant
    assert ops.count("Shape") == 1 and ops.count("Gather") == 2 and ops.count("Concat") == 1, ops
    shape = next(n for n in result.model.graph.node if n.op_type == "Shape")
    assert shape.input[0] == "x"
    # the same outputs at another batch and sequence length
    other = {"x": rng_array([3, 5, 8], seed=4)}
    np.testing.assert_array_equal(outputs(model, other)["y"], outputs(result.model, other)["y"])


def test_share_input_dims_leaves_dims_the_inputs_do_not_carry():
    # NonZero's count is a dim no input has: its Gather(Shape) stays
    nodes = [helper.make_node("NonZero", ["x"], ["nz"]), helper.make_node("Shape", ["nz"], ["s"]),
             helper.make_node("Gather", ["s", "i"], ["y"])]
    model = make_model(nodes, [tensor("x", ["n"])], [tensor("y", [])], [const("i", np.array(1, np.int64))])
    assert_noop("share_input_dims", model)


def test_share_input_dims_assumes_no_broadcast_equal():
    # n and m broadcast together: either may be 1, so Add's dim is neither input's
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Shape", ["s"], ["sh"]),
             helper.make_node("Gather", ["sh", "i"], ["y"])]
    model = make_model(nodes, [tensor("a", ["n"]), tensor("b", ["m"])], [tensor("y", [])],
                       [const("i", np.array(0, np.int64))])
    assert_noop("share_input_dims", model)
