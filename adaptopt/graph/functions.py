"""Model-local functions, inlined for the work model.

A model may call functions it defines itself (``model.functions``: an exporter's MLP or
attention block). ONNX Runtime inlines them when it loads the model, so the calls cost
nothing, but a rewrite pass sees only the call: a sweep's model of two MLP calls was one
leaf of three nodes that no pass could touch, int8 included. The work model is inlined;
when nothing is kept the user's model is written as given, functions and all.
"""

from __future__ import annotations

from typing import Callable

import onnx


def inlined(model: onnx.ModelProto, say: Callable[[str], None] = lambda message: None) -> onnx.ModelProto:
    """``model`` with its local functions inlined (the same object when it has none, or
    when onnx's inliner refuses it: then the run says so and works on the calls)."""
    if not model.functions:
        return model
    import onnx.inliner
    try:
        out = onnx.inliner.inline_local_functions(model)
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        say(f"model-local functions not inlined ({first[:200]}): rewrites cannot reach inside them")
        return model
    return out
