"""Whole-model lossy alternatives to the per-subgraph result (used with an accuracy budget).

Per-leaf quantization pays a quantize/dequantize at every leaf boundary, and some
models gain most from one whole-model rewrite — which is what the quantization peers
do. Each lossy pass is tried on the whole (pre-passed, exact-cleaned) model; it is kept
only when it keeps the budget (also at other sizes of dynamic dims) and beats the
current result side by side, and the winner is confirmed against the original by an
independent run. The output is then never slower than our own whole-model quantization.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import onnx

from adaptopt.adapt.assemble import Assembly, check_everywhere, confirmed, timed


def with_whole_model_lossy(ctx, assembly: Assembly, skeleton: onnx.ModelProto, cleaned: onnx.ModelProto,
                           reference: Mapping[str, np.ndarray], budget: float,
                           should_stop: Callable[[], bool] | None = None) -> Assembly:
    """Try each lossy pass on ``cleaned`` (the pre-pass's exact steps on the whole model,
    kept or not: quantizers want them, e.g. an unfused BatchNorm blocks QDQ fusion); keep
    one only when it beats ``assembly``. ``should_stop``: this stage's own time limit
    (default: the run's search deadline)."""
    should_stop = should_stop or ctx.expired
    from adaptopt.graph.external import on_disk
    from adaptopt.passes.base import PassContext, apply_guarded
    if any(on_disk(t) for t in cleaned.graph.initializer):
        return assembly  # weights kept on disk (huge model): a whole-model rewrite would load them all
    pass_ctx = PassContext(target=ctx.config.target, feeds=ctx.feeds, accuracy_budget=budget,
                           seed=ctx.config.policy.seed)
    best, changed = assembly.model, False
    for p in [p for p in ctx.passes if p.guarantee == "lossy"]:
        if should_stop():
            break
        result, error = apply_guarded(p, cleaned, pass_ctx)
        if result is None:
            assembly.events.append({"event": "whole_model", "pass": p.name, "error": error})
            continue
        if not result.modified:
            continue
        candidate = result.model
        validation = check_everywhere(skeleton, candidate, ctx.feeds, reference, ctx.config, budget)
        if not validation.ok:
            assembly.events.append({"event": "whole_model", "pass": p.name, "why": validation.reason, "kept": False})
            continue
        side = timed(ctx, best, candidate)
        assembly.events.append({"event": "whole_model", "pass": p.name, **side.to_dict(),
                                "min_cosine": round(validation.min_cosine, 6), "kept": side.significant()})
        if side.significant():
            best, best_validation, changed = candidate, validation, True
    beat = assembly.side.verified_speedup if assembly.improved else 1.0
    final = confirmed(ctx, assembly, skeleton, best, "whole-model lossy", beat) if changed else None
    if final is None:
        return assembly
    return Assembly(best, True, best_validation, final, {}, assembly.events,
                    f"verified speedup {final.describe()} with a whole-model lossy rewrite; "
                    "it beat the per-subgraph result", {})
