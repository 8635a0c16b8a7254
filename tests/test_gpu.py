"""GPU paths: CUDA execution provider, NVML sampling, Nsight Compute, float16 on a GPU target.

These run where onnxruntime-gpu can really place work on an NVIDIA GPU (``make
install-gpu``) and skip with the reason everywhere else, CI included. A CUDA
provider that is listed but cannot load its libraries counts as absent: ORT would
silently run the session on the CPU, and the test would prove nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from adaptopt import api
from adaptopt.config import Config, ProfilingConfig, TargetConfig, load_config
from adaptopt.graph.capture import make_inputs
from adaptopt.graph.io import check_model, save_model
from adaptopt.hal import ncu, nvml
from adaptopt.report.schema import check_profile, profile_dict
from adaptopt.runtime import make_session, provider_problem, run
from adaptopt.validate import compare
from tests.conftest import BERT_INPUTS

CUDA = ("CUDAExecutionProvider",)
GPU_YAML = Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml"
FAST_PROFILING = ProfilingConfig(warmup=3, iterations=10, min_time_s=0.0, max_time_s=0.5,
                                 counters=("nvml", "rusage", "analytic"), per_node=True)


def _cuda_missing() -> str | None:
    """Why the CUDA EP cannot run here (None when it really runs a session on the GPU):
    the same probe that drops an unusable provider from a run."""
    return provider_problem("CUDAExecutionProvider", TargetConfig(execution_providers=CUDA, device="cuda"))


needs_cuda = pytest.mark.skipif("_cuda_missing() is not None", reason="no usable CUDA execution provider")
pytestmark = pytest.mark.gpu


def _gpu_config(tmp_path: Path, **inputs) -> Config:
    config = load_config(GPU_YAML)
    config = config.replace(profiling=FAST_PROFILING, inputs=inputs)
    return config.with_section("policy", RL_training_epochs=2, max_sequence=2, cache_dir=str(tmp_path / "cache"))


def test_gpu_module_skips_with_a_reason_without_cuda():
    reason = _cuda_missing()
    if reason is None:
        pytest.skip("CUDA works here: the tests below run")
    assert reason == "not in this onnxruntime build" or reason.startswith("cannot start"), reason


@needs_cuda
def test_cuda_session_runs_on_the_gpu_and_matches_cpu(resnet_model):
    feeds = make_inputs(resnet_model, Config())
    gpu_session = make_session(resnet_model, TargetConfig(execution_providers=CUDA, device="cuda"))
    assert gpu_session.get_providers()[0] == "CUDAExecutionProvider"
    cpu = run(make_session(resnet_model, TargetConfig()), feeds)
    gpu = run(gpu_session, feeds)
    validation = compare(cpu, gpu, 1e-3, 0.0)  # cuDNN may pick TF32 / other algorithms: 1e-3 relative
    assert validation.ok, validation.reason


@needs_cuda
def test_profile_on_the_gpu_reads_nvml_counters(resnet_model, tmp_path):
    path = tmp_path / "resnet.onnx"
    save_model(resnet_model, path)
    report = api.profile(path, _gpu_config(tmp_path), granularity=1)
    data = profile_dict(report)
    assert check_profile(data) == []
    assert data["target"]["device"] in ("cuda", "gpu")
    assert data["whole_model"]["latency_ms"] > 0
    counters = data["whole_model"]["counters"]
    if nvml.NvmlBackend().availability().available:
        assert counters["sm_clock"]["measured"] and counters["sm_clock"]["value"] > 0, counters["sm_clock"]
        assert counters["power"]["value"] is None or counters["power"]["value"] > 0
    else:  # no NVML here (nvidia-ml-py or the driver library missing): the report says so, with the reason
        backend = next(b for b in data["backends"] if b["name"] == "nvml")
        assert not backend["available"] and backend["reason"] and "sm_clock" not in counters
    for sub in data["subgraphs"]:
        assert sub["latency_ms"] > 0


@needs_cuda
def test_optimize_on_the_gpu_keeps_outputs_within_the_budget(bert_model, tmp_path):
    path = tmp_path / "bert.onnx"
    save_model(bert_model, path)
    config = _gpu_config(tmp_path, **BERT_INPUTS)
    result = api.optimize(path, config, accuracy_budget=0.999, seed=0, budget_s=240)
    check_model(result.model)
    feeds = make_inputs(bert_model, config)
    target = TargetConfig(execution_providers=CUDA, device="cuda")
    before = run(make_session(bert_model, target), feeds)
    after = run(make_session(result.model, target), feeds)
    assert compare(before, after, 1e-4, 0.999).ok
    assert result.speedup > 1.0 if result.improved else result.speedup == 1.0  # never a slower model


@needs_cuda
def test_fp16_pass_applies_on_a_gpu_target_and_stays_close(bert_model, tmp_path):
    config = _gpu_config(tmp_path, **BERT_INPUTS).with_section("accuracy", budget=0.999)
    result = api.apply_passes(bert_model, ["mixed_precision_fp16"], config)
    assert result.results[0][1].modified
    halves = [t for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert halves, "no weight became float16"
    assert result.validation.min_cosine >= 0.999, result.validation.reason


@needs_cuda
@pytest.mark.skipif(shutil.which("ncu") is None, reason="Nsight Compute (ncu) not on PATH")
def test_ncu_reads_kernel_metrics_of_a_cuda_run(resnet_model):
    feeds = make_inputs(resnet_model, Config())
    readings = ncu.profile(resnet_model, feeds, list(CUDA))
    assert readings["kernels"].value and readings["kernels"].value > 0, readings
    dram = readings["dram_throughput"]
    assert dram.value is not None and 0.0 <= dram.value <= 100.0, dram
    assert np.isfinite(readings["l2_hit_rate"].value)
