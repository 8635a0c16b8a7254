"""Property: every exact pass keeps what a random graph computes, its boundary and validity."""

from __future__ import annotations

import onnx
import pytest
from hypothesis import HealthCheck, given, settings

from adaptopt.passes.base import PassContext, boundary_names
from adaptopt.passes.registry import all_passes
from adaptopt.runtime import make_session
from adaptopt.validate import compare
from tests.test_passes_support import CPU, outputs, random_dags, random_feeds

EXACT = [p for p in all_passes() if p.guarantee == "exact"]


@pytest.mark.parametrize("pass_", EXACT, ids=[p.name for p in EXACT])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=random_dags())
def test_exact_pass_keeps_outputs_on_random_graphs(pass_, model):
    snapshot = model.SerializeToString()
    feeds = random_feeds(model)
    result = pass_.apply(model, PassContext(target=CPU, feeds=feeds))
    assert model.SerializeToString() == snapshot
    if not result.modified:
        assert result.model is model and result.changes["reason"]
        return
    assert boundary_names(result.model) == boundary_names(model)
    onnx.checker.check_model(result.model)
    make_session(result.model, CPU, level="all")
    verdict = compare(outputs(model, feeds), outputs(result.model, feeds), exact_tolerance=1e-4)
    assert verdict.ok, (pass_.name, verdict.reason)
