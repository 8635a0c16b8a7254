"""Running a model on the pass context's feeds, for passes that check themselves
(lossy passes choosing the strongest setting within the accuracy budget)."""

from __future__ import annotations

import numpy as np
import onnx

from adaptopt.passes.base import PassContext


def outputs_of(model: onnx.ModelProto, ctx: PassContext) -> dict[str, np.ndarray] | None:
    """Outputs of ``model`` on ``ctx.feeds`` (ORT, optimizations off); None when it cannot run."""
    from adaptopt.runtime import make_session, ort_errors, run
    if ctx.feeds is None:
        return None
    try:
        return run(make_session(model, ctx.target, level="disable"), ctx.feeds)
    except ort_errors():
        return None


def budget_reason(original: onnx.ModelProto, candidate: onnx.ModelProto, ctx: PassContext) -> str:
    """'' when ``candidate`` keeps ``ctx.accuracy_budget`` against ``original`` on
    ``ctx.feeds`` (or when there are no feeds to judge by); else why not."""
    from adaptopt.validate import compare
    if ctx.feeds is None:
        return ""
    ref, got = outputs_of(original, ctx), outputs_of(candidate, ctx)
    if ref is None or got is None:
        return "the rewritten model does not run in ONNX Runtime"
    verdict = compare(ref, got, budget=ctx.accuracy_budget)
    return "" if verdict.ok else f"outside the accuracy budget: {verdict.reason}"
