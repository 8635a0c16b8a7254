"""Library entry points. They return result objects; they never print or exit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from adaptopt.config import Config
from adaptopt.graph.capture import make_inputs
from adaptopt.graph.index import GraphIndex
from adaptopt.graph.io import dynamic_inputs, load_model, save_model
from adaptopt.graph.merge import merge_directory
from adaptopt.graph.partition import PartitionTree, partition
from adaptopt.graph.subgraph import write_tree


@dataclass(frozen=True)
class SplitResult:
    tree: PartitionTree
    manifest: dict
    directory: Path


def build_tree(model: onnx.ModelProto, config: Config, granularity: int | None = None) -> PartitionTree:
    """Partition ``model`` into a tree of convex subgraphs (no files written)."""
    depth = config.granularity.initial_granularity if granularity is None else granularity
    return partition(GraphIndex.build(model), depth, config.granularity.min_nodes)


def try_make_inputs(model: onnx.ModelProto, config: Config) -> dict | None:
    """Reference inputs when the config (or the model's static shapes) allows, else None."""
    if dynamic_inputs(model) and not config.inputs and not config.inputs_file:
        return None
    return make_inputs(model, config)


def split(source: str | Path, directory: str | Path, config: Config | None = None,
          granularity: int | None = None) -> SplitResult:
    """Split a model into one standalone ONNX file per tree node plus ``manifest.json``."""
    config = config or Config()
    model = load_model(source, config)
    tree = build_tree(model, config, granularity)
    manifest = write_tree(tree, directory, source=str(source), feeds=try_make_inputs(model, config))
    return SplitResult(tree, manifest, Path(directory))


def merge(directory: str | Path, destination: str | Path | None = None) -> onnx.ModelProto:
    """Rebuild one model from a split folder; write it when ``destination`` is given."""
    model = merge_directory(directory)
    if destination is not None:
        save_model(model, destination)
    return model


# ---------------------------------------------------------------- profile (issue 3)


# ---------------------------------------------------------------- passes (issue 4)


# ---------------------------------------------------------------- optimize (issue 5)
