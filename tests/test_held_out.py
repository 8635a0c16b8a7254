"""An accuracy budget must hold beyond the one reference input: lossy candidates are also
checked on held-out draws of the configured inputs (adapt/assemble.check_everywhere)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from adaptopt.adapt.assemble import HELD_OUT_DRAWS, check_everywhere
from adaptopt.config import Config
from adaptopt.graph.capture import make_inputs
from adaptopt.runtime import make_session, run
from adaptopt.validate import cosine


def _identity_and_look_alike() -> tuple[onnx.ModelProto, onnx.ModelProto, Config]:
    """y = x, and a candidate y = Min(x, x_ref) that equals it exactly on the reference
    input x_ref only (seed 0 of the config's draws) and is far off on any other input."""
    config = Config()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 256])
    original = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                                 opset_imports=[helper.make_opsetid("", 17)])
    x_ref = make_inputs(original, config)["x"]
    candidate = helper.make_model(
        helper.make_graph([helper.make_node("Min", ["x", "x_ref"], ["y"])], "g", [x], [y],
                          [numpy_helper.from_array(x_ref, "x_ref")]),
        opset_imports=[helper.make_opsetid("", 17)])
    return original, candidate, config


def test_a_lossy_candidate_that_only_fits_the_reference_input_is_refused():
    original, candidate, config = _identity_and_look_alike()
    feeds = make_inputs(original, config)
    reference = run(make_session(original, config.target), feeds)
    verdict = check_everywhere(original, candidate, feeds, reference, config, budget=0.999)
    assert not verdict.ok and f"on held-out input 1 of {HELD_OUT_DRAWS}" in verdict.reason


def test_the_accuracy_reported_is_the_worst_of_the_draws():
    original, _, config = _identity_and_look_alike()
    feeds = make_inputs(original, config)
    reference = run(make_session(original, config.target), feeds)
    # y = x + 0.3 x^3: exact on no input, its cosine depends on the draw
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 256])
    noisy = helper.make_model(helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["xx"]), helper.make_node("Mul", ["xx", "x"], ["xxx"]),
         helper.make_node("Mul", ["xxx", "eps"], ["d"]), helper.make_node("Add", ["x", "d"], ["y"])], "g", [x], [y],
        [numpy_helper.from_array(np.array(0.3, np.float32), "eps")]), opset_imports=[helper.make_opsetid("", 17)])
    draws = [feeds] + [make_inputs(original, config, seed=s) for s in range(1, HELD_OUT_DRAWS + 1)]
    cosines = [cosine(run(make_session(original, config.target), d)["y"], run(make_session(noisy, config.target), d)["y"])
               for d in draws]
    assert min(cosines) < cosines[0]  # a held-out draw is worse than the reference input here
    verdict = check_everywhere(original, noisy, feeds, reference, config, budget=0.9)
    assert verdict.ok and verdict.min_cosine == pytest.approx(min(cosines), abs=1e-9)


def test_real_inputs_from_a_file_get_no_generated_draws(tmp_path):
    original, candidate, config = _identity_and_look_alike()
    feeds = make_inputs(original, config)
    np.savez(tmp_path / "x.npz", **feeds)
    config = config.replace(inputs_file=str(tmp_path / "x.npz"))
    reference = run(make_session(original, config.target), feeds)
    assert check_everywhere(original, candidate, feeds, reference, config, budget=0.999).ok
