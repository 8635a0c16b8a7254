"""Shared fixtures: the example models (built in memory) and helpers to run models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from adaptopt.config import Config, InputSpec, TargetConfig
from adaptopt.examples import build_bert, build_resnet
from adaptopt.runtime import make_session, run

BERT_INPUTS = {
    "input_ids": InputSpec(shape=(1, 32), dtype="int64", values="range", value_range=(0, 2000)),
    "attention_mask": InputSpec(shape=(1, 32), dtype="int64", values="ones"),
}


@pytest.fixture(scope="session")
def resnet_model() -> onnx.ModelProto:
    return build_resnet(image=32, widths=(8, 16), blocks=1, classes=10)


@pytest.fixture(scope="session")
def bert_model() -> onnx.ModelProto:
    return build_bert(vocab=2000, hidden=64, layers=2, heads=4, ffn=128)


@pytest.fixture
def bert_config() -> Config:
    return Config(inputs=dict(BERT_INPUTS))


def run_model(model: onnx.ModelProto, feeds: dict, level: str = "disable") -> dict[str, np.ndarray]:
    """Outputs of ``model`` under ORT (optimizations off, so ORT cannot hide a broken rewrite)."""
    return run(make_session(model, TargetConfig(), level=level), feeds)
