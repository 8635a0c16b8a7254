"""Which models a benchmark runs on, and how each is fed.

A :class:`BenchCase` is a model file plus its inputs in the ``inputs:`` format of
the config (and of ``../shared/models/inputs.yaml``): ``{NAME: {shape, dtype,
values}}``. The same description travels to child processes as JSON and becomes
an adaptopt :class:`~adaptopt.config.Config` on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import yaml

from adaptopt.config import Config, load_config, parse_config, parse_input_shapes
from adaptopt.errors import InputError
from adaptopt.graph.capture import make_inputs

from benchmarks.isolate import REPO

EXAMPLES_DIR = REPO / "models"
SHARED_DIR = REPO.parent / "shared" / "models"
EXAMPLE_INPUTS = {
    # static 1x3x96x96 images in [0, 1): said, so that static quantization is calibrated on them
    "resnet_small": {"input": {"values": "uniform01"}},
    "bert_small": {
        "input_ids": {"shape": [1, 128], "dtype": "int64", "values": {"range": [0, 2000]}},
        "attention_mask": {"shape": [1, 128], "dtype": "int64", "values": "ones"},
    },
}
QUICK_MODELS = ("resnet_small", "bert_small")


@dataclass(frozen=True)
class BenchCase:
    name: str
    path: Path
    inputs: dict = field(default_factory=dict)  # the config's `inputs:` mapping
    group: str = "cli"  # examples | shared | cli

    def config(self, base: str | None = None) -> Config:
        """The base config (built-in defaults when None) with this case's inputs."""
        inputs = parse_config(yaml.safe_dump({"inputs": self.inputs})).inputs if self.inputs else {}
        config = load_config(base)
        return config.replace(inputs={**config.inputs, **inputs})

    def feeds(self, model: onnx.ModelProto, seed: int = 0, base: str | None = None) -> dict[str, np.ndarray]:
        return make_inputs(model, self.config(base), seed=seed)

    def payload(self) -> dict:
        return {"name": self.name, "path": str(self.path), "inputs": self.inputs, "group": self.group}

    @staticmethod
    def from_payload(data: dict) -> "BenchCase":
        return BenchCase(data["name"], Path(data["path"]), data["inputs"], data["group"])


def example_cases() -> list[BenchCase]:
    return [BenchCase(name, EXAMPLES_DIR / f"{name}.onnx", inputs, "examples")
            for name, inputs in EXAMPLE_INPUTS.items() if (EXAMPLES_DIR / f"{name}.onnx").is_file()]


def shared_cases() -> list[BenchCase]:
    """``../shared/models/*.onnx`` with the shapes of its ``inputs.yaml`` (none when absent)."""
    spec_path = SHARED_DIR / "inputs.yaml"
    if not spec_path.is_file():
        return []
    spec = yaml.safe_load(spec_path.read_text()) or {}
    return [BenchCase(path.stem, path, spec.get(path.name, {}), "shared") for path in sorted(SHARED_DIR.glob("*.onnx"))]


def select_cases(models: Sequence[str] | None, input_shapes: Sequence[str], quick: bool) -> list[BenchCase]:
    """The cases named by ``--models`` (paths, known names, or the groups
    ``examples``/``shared``); default: examples + shared (quick: two examples)."""
    known = {c.name: c for c in example_cases() + shared_cases()}
    if not models:
        if quick:
            return [known[n] for n in QUICK_MODELS if n in known]
        return list(known.values())
    shapes = {name: {"shape": list(shape)} for name, shape in parse_input_shapes(list(input_shapes)).items()}
    cases: list[BenchCase] = []
    for item in models:
        if item in ("examples", "shared"):
            cases += [c for c in known.values() if c.group == item]
        elif item in known or Path(item).stem in known and not Path(item).is_file():
            cases.append(known.get(item) or known[Path(item).stem])
        elif Path(item).is_file():
            cases.append(BenchCase(Path(item).stem, Path(item).resolve(), shapes, "cli"))
        else:
            raise InputError(f"--models {item}: no such file and not a known model "
                             f"(known: {', '.join(sorted(known))}, examples, shared)")
    return cases
