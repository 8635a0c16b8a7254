"""The whole-model pre-pass: the library's exact passes, in library order, verified.

Some exact rewrites pay off only across subgraph boundaries (a hard-swish fused into
one op lets ONNX Runtime fuse it into the Conv before it and keep the blocked layout
through the next ones), so per-leaf timings cannot see them. Before partitioning,
the exact subgraph passes run once over the whole model; the result is kept only
when it matches the original's outputs (also at other sizes of dynamic dims) and is
faster side by side. The per-leaf search then starts from it, so the policy's lossy
and local rewrites add to — never compete with — our own static baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx

from adaptopt.adapt.assemble import cached_side_by_side, check_everywhere
from adaptopt.adapt.verify import SideBySide
from adaptopt.config import Config
from adaptopt.graph.io import dynamic_inputs


@dataclass
class PrePass:
    model: onnx.ModelProto  # the pinned work model to search from (the input itself when not kept)
    kept: bool
    applied: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    side: SideBySide | None = None
    reason: str = ""

    def to_dict(self) -> dict:
        return {"kept": self.kept, "applied": self.applied, "errors": self.errors, "reason": self.reason,
                "side_by_side": self.side.to_dict() if self.side else None}


def with_signature(model: onnx.ModelProto, skeleton: onnx.ModelProto) -> onnx.ModelProto:
    """``model``'s graph with ``skeleton``'s inputs/outputs (dynamic dims restored)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.input[:]
    out.graph.input.extend(skeleton.graph.input)
    del out.graph.output[:]
    out.graph.output.extend(skeleton.graph.output)
    if dynamic_inputs(skeleton):
        del out.graph.value_info[:]
    return out


def apply_exact_passes(model: onnx.ModelProto, passes: list, config: Config,
                       feeds: Mapping[str, np.ndarray]) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """Each pass in order on the whole model; a pass that fails is skipped and named."""
    from adaptopt.passes.base import PassContext, apply_guarded
    ctx = PassContext(target=config.target, feeds=feeds, accuracy_budget=0.0, seed=config.policy.seed)
    applied, errors = [], []
    for p in passes:
        if p.guarantee != "exact" or p.scope == "model":
            continue
        result, error = apply_guarded(p, model, ctx)
        if result is None:
            errors.append(error)
        elif result.modified:
            model = result.model
            applied.append(p.name)
    return model, applied, errors


def prepass(model: onnx.ModelProto, skeleton: onnx.ModelProto, passes: list, config: Config,
            feeds: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], cache) -> PrePass:
    """``model`` is the pinned work model; the passes run on ``skeleton`` (the user's own
    signature, dynamic dims kept), so nothing they fold can bake in the profiled sizes.
    The kept result is returned pinned again, for the per-leaf search."""
    from adaptopt.api import pinned_copy
    from adaptopt.graph.io import infer_shapes
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(skeleton)
    candidate, applied, errors = apply_exact_passes(infer_shapes(dynamic, "pre-pass"), passes, config, feeds)
    if not applied:
        return PrePass(model, False, applied, errors, reason="no exact pass applies to the whole model")
    signed = with_signature(candidate, skeleton)
    validation = check_everywhere(skeleton, signed, feeds, reference, config, 0.0)
    if not validation.ok:
        return PrePass(model, False, applied, errors, reason=f"changes the outputs: {validation.reason}")
    side = cached_side_by_side(cache, config.target, skeleton, signed, feeds)
    if not side.significant():
        return PrePass(model, False, applied, errors, side,
                       f"not faster beyond the A/A noise (speedup {side.speedup:.3f}x, noise {side.noise:.3f})")
    return PrePass(pinned_copy(signed, config, "pre-pass"), True, applied, errors, side,
                   f"verified speedup {side.speedup:.3f}x")
