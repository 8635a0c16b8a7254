"""The variants: each tool turns the original model file into a new one.

Runs in a child process (:mod:`benchmarks.isolate`); peers are imported here and
nowhere else. :func:`produce` times only the tool call (imports excluded), then
checks that the written model loads and runs in ONNX Runtime, so a broken output
fails here, in the child, and never reaches the timing process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import onnx

from adaptopt.config import TargetConfig
from adaptopt.runtime import make_session, ort_error_line, ort_errors, run, session_options

from benchmarks.cases import BenchCase

CALIBRATION_SEEDS = range(1, 9)  # 8 seeded inputs for static quantization; seed 0 is the evaluation input
BUDGET_COSINE = 0.999


class ToolFailed(RuntimeError):
    """A tool finished but its result is unusable (one line)."""


def produce(payload: dict) -> dict:
    """Child entry: run tool ``payload['tool']`` on the case; write ``payload['dest']``."""
    case = BenchCase.from_payload(payload["case"])
    dest = Path(payload["dest"])
    tool = TOOLS[payload["tool"]]
    start = time.perf_counter()
    extra = tool(case, dest, payload) or {}
    tool_s = time.perf_counter() - start
    _check_runs(case, dest, payload.get("config"))
    return {"tool_s": tool_s, **extra}


def _check_runs(case: BenchCase, dest: Path, base_config: str | None) -> None:
    if not dest.is_file():
        raise ToolFailed("the tool wrote no model")
    model = onnx.load(str(dest))
    try:
        run(make_session(model, TargetConfig(), level="all"), case.feeds(model, base=base_config))
    except ort_errors() as exc:
        raise ToolFailed(f"the written model does not run: {ort_error_line(exc)}") from None


def _shapes(case: BenchCase) -> dict[str, list[int]]:
    return {name: list(spec["shape"]) for name, spec in case.inputs.items() if spec.get("shape")}


def ort_offline(case: BenchCase, dest: Path, payload: dict) -> None:
    """ORT_ENABLE_EXTENDED, saved with ``optimized_model_filepath`` (portable across CPUs)."""
    so = session_options(TargetConfig(), level="extended")
    so.optimized_model_filepath = str(dest)
    make_session(str(case.path), TargetConfig(), sess_options=so)


def onnxsim_tool(case: BenchCase, dest: Path, payload: dict) -> None:
    import onnxsim
    model, ok = onnxsim.simplify(onnx.load(str(case.path)), overwrite_input_shapes=_shapes(case) or None)
    if not ok:
        raise ToolFailed("onnxsim: the simplified model failed onnxsim's own check")
    onnx.save(model, str(dest))


def onnxslim_tool(case: BenchCase, dest: Path, payload: dict) -> None:
    import onnxslim
    shapes = [f"{name}:{','.join(str(d) for d in shape)}" for name, shape in _shapes(case).items()]
    model = onnxslim.slim(str(case.path), input_shapes=shapes or None)
    onnx.save(model, str(dest))


def onnxoptimizer_tool(case: BenchCase, dest: Path, payload: dict) -> None:
    import onnxoptimizer
    onnx.save(onnxoptimizer.optimize(onnx.load(str(case.path))), str(dest))


def ort_transformers(case: BenchCase, dest: Path, payload: dict) -> dict:
    """``onnxruntime.transformers.optimizer.optimize_model`` (heads/hidden auto-detected).

    ``opt_level=0`` (fusions only): at its default level the optimizer first calls
    ``optimize_by_onnxruntime``, which imports torch (ORT 1.32) and so fails without it;
    the ORT graph optimizations it would add run at session creation anyway.
    """
    from onnxruntime.transformers.optimizer import optimize_model
    optimized = optimize_model(str(case.path), model_type=payload["model_type"], num_heads=0, hidden_size=0,
                               opt_level=0)
    optimized.save_model_to_file(str(dest))
    return {"fused_ops": {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}}


def _prepared(case: BenchCase, dest: Path, min_opset: int = 0) -> Path:
    """ORT's recommended quantization pre-processing (shape inference + graph
    optimization, which also turns Constant weights into initializers, without which
    the quantizer refuses Conv). Symbolic shape inference is skipped: it fails on the
    PP-OCR models. ``min_opset``: upgrade older models first (per-channel QDQ needs 13)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    source = case.path
    model = onnx.load(str(source))
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    if opset < min_opset:
        source = dest.with_name(dest.stem + f".opset{min_opset}.onnx")
        onnx.save(onnx.version_converter.convert_version(model, min_opset), str(source))
    prepared = dest.with_name(dest.stem + ".pre.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    return prepared


def quant_dynamic(case: BenchCase, dest: Path, payload: dict) -> None:
    """Whole-model ``quantize_dynamic`` with its defaults (int8 weights): the lossy reference."""
    from onnxruntime.quantization import quantize_dynamic
    quantize_dynamic(str(_prepared(case, dest)), str(dest))


def quant_dynamic_matmul(case: BenchCase, dest: Path, payload: dict) -> None:
    from onnxruntime.quantization import quantize_dynamic
    quantize_dynamic(str(_prepared(case, dest)), str(dest), op_types_to_quantize=["MatMul"])


def quant_static_qdq(case: BenchCase, dest: Path, payload: dict) -> None:
    """Whole-model static QDQ: u8 activations, s8 per-channel weights, 8 seeded calibration inputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    original = onnx.load(str(case.path))
    feeds = [case.feeds(original, seed=s, base=payload.get("config")) for s in CALIBRATION_SEEDS]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(feeds)

        def get_next(self):
            return next(self._items, None)

    quantize_static(str(_prepared(case, dest, min_opset=13)), str(dest), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)


def adaptopt_tool(case: BenchCase, dest: Path, payload: dict) -> dict:
    """``adaptopt.api.optimize`` at the given accuracy budget, default config unless ``--config``."""
    from adaptopt import api
    from adaptopt.graph.io import save_model
    result = api.optimize(str(case.path), case.config(payload.get("config")),
                          accuracy_budget=payload["accuracy_budget"], seed=0)
    save_model(result.model, dest)
    return {"report": _small(result.report)}


def _small(report) -> object:
    """The report when small enough for the results file, else its ``result`` entry and keys."""
    import json
    if len(json.dumps(report, default=str)) < 20_000 or not isinstance(report, dict):
        return report
    return {"result": report.get("result"), "keys": sorted(report), "note": "full report over 20 kB, trimmed"}


TOOLS: dict[str, Callable] = {
    "ort_offline": ort_offline, "onnxsim": onnxsim_tool, "onnxslim": onnxslim_tool,
    "onnxoptimizer": onnxoptimizer_tool, "ort_transformers": ort_transformers,
    "quant_dynamic": quant_dynamic, "quant_dynamic_matmul": quant_dynamic_matmul,
    "quant_static_qdq": quant_static_qdq, "adaptopt": adaptopt_tool,
}
