"""Buffer allocation strategies (memory, exact): ORT session settings carried in the model.

Each variant writes ONNX Runtime session options into the model's ``ort_config``
metadata (``{"session_options": {...}}``, ORT's own format), applied by
:func:`adaptopt.runtime.make_session`. The graph is untouched, so outputs are
bit-identical.

Opt-in (``passes: {enabled: [...]}`` or ``--passes``): ONNX Runtime itself, even with
``ORT_LOAD_CONFIG_FROM_MODEL=1``, reads only the thread counts, ``execution_mode``,
``graph_optimization_level`` and ``enable_profiling`` from that metadata
(``InferenceSessionUtils::ParseSessionOptionsFromModelProto`` ignores every other key),
so the arena and memory-pattern settings take effect only where the caller sets them
on its ``SessionOptions``. A gain measured with them is one a plain ORT user loading the
model would not see, so the default search never counts it; a run that keeps one says
which options to set.

- ``buffers_no_arena``: ``enable_cpu_mem_arena = false`` (large activations come straight
  from the allocator instead of a growing arena; lower resident memory).
- ``buffers_no_pattern``: ``enable_mem_pattern = false`` (no pre-planned block per run).
- ``buffers_low_memory``: both off, buffer reuse kept on.

``execution_mode = ORT_PARALLEL`` is not offered: adaptopt runs every session on one
process-wide pool with a single inter-op thread, so parallel mode cannot run branches
concurrently here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import onnx

from adaptopt.passes.base import Applicability, Pass, PassContext, no, yes
from adaptopt.runtime import ORT_CONFIG_KEY, model_session_config


class BufferPass(Pass):
    """Write one set of session options into the model's ``ort_config`` metadata."""

    category = "memory"
    guarantee = "exact"
    scope = "model"  # merging subgraphs keeps only the original model's metadata
    opt_in = True  # ORT does not read these options from the model: see the module docstring

    def __init__(self, name: str, options: Mapping[str, object], description: str):
        self.name = name
        self.options = dict(options)
        self.description = description

    def check(self, model: onnx.ModelProto, ctx: PassContext) -> Applicability:
        if "CPUExecutionProvider" not in ctx.target.execution_providers and "enable_cpu_mem_arena" in self.options:
            return no("the CPU arena setting has no effect without the CPU execution provider")
        current = model_session_config(model)
        if all(current.get(k) == v for k, v in self.options.items()):
            return no(f"the model already carries {self.options}")
        return yes(f"sets {self.options}")

    def transform(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict]:
        options = {**model_session_config(model), **self.options}
        props = [p for p in model.metadata_props if p.key != ORT_CONFIG_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(props)
        model.metadata_props.add(key=ORT_CONFIG_KEY, value=json.dumps({"session_options": options}, sort_keys=True))
        return model, {"rewrites": 1, "session_options": options}


BUFFER_PASSES = (
    BufferPass("buffers_no_arena", {"enable_cpu_mem_arena": False},
               "opt-in; ORT session setting in the model (set it on SessionOptions too): CPU memory arena off"),
    BufferPass("buffers_no_pattern", {"enable_mem_pattern": False},
               "opt-in; ORT session setting in the model (set it on SessionOptions too): memory pattern off"),
    BufferPass("buffers_low_memory", {"enable_cpu_mem_arena": False, "enable_mem_pattern": False,
                                      "enable_mem_reuse": True},
               "opt-in; ORT session settings in the model (set them on SessionOptions too): arena and memory pattern off"),
)
