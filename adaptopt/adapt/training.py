"""Training a Q-table on a set of models: ``adaptopt policy train`` and the built-in prior.

Each model is partitioned as ``optimize`` partitions it, and Q-learning runs over
all of its leaves in the real environment (rewrite, validate, time on this target);
one table accumulates across the models. Nothing is written back to the models: the
product is the table, which ``optimize --policy FILE`` then starts from, so a new
model of a known kind skips the passes that lost on its look-alikes (the table's
back-off, ``policy/qtable.py``) and pays fewer measurements.

The built-in prior (``policy/prior_cpu.json``) is this training run on
:data:`adaptopt.examples.TRAINING_CORPUS`, generated models that are neither the
bundled examples nor any model of the benchmarks (``make prior`` rebuilds it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import onnx

from adaptopt.adapt.loop import prepare_run, q_settings
from adaptopt.config import Config
from adaptopt.errors import about_model
from adaptopt.graph.capture import make_inputs
from adaptopt.graph.index import GraphIndex
from adaptopt.graph.partition import partition
from adaptopt.policy.qtable import QTable
from adaptopt.policy.search import q_learning


@dataclass(frozen=True)
class TrainingModel:
    name: str
    model: onnx.ModelProto  # dims pinned, shapes inferred
    config: Config  # its inputs


def train(models: Iterable[TrainingModel], table: QTable, accuracy_budget: float, seed: int = 0,
          say: Callable[[str], None] = lambda _m: None) -> list[dict]:
    """Q-learning over every leaf of every model into ``table``; one summary row per model."""
    rows = []
    for item in models:
        started = time.perf_counter()
        config = item.config
        with about_model(item.name):
            index = GraphIndex.build(item.model)
            feeds = make_inputs(item.model, config)
            ctx, _machine = prepare_run(item.model, index, feeds, config, accuracy_budget)
            try:
                tree = partition(index, config.granularity.initial_granularity, config.granularity.min_nodes)
                envs = [ctx.env_for(leaf) for leaf in tree.leaves()]
                results = q_learning(envs, table, q_settings(config), seed)
            finally:
                ctx.measurer.close()
        base = sum(r.baseline.time_ms for r in results)
        best = sum(r.outcome.time_ms for r in results)
        row = {"model": item.name, "leaves": len(results), "measurements": sum(r.measurements for r in results),
               "leaf_speedup_during_search": round(base / best, 4) if best > 0 else None,
               "seconds": round(time.perf_counter() - started, 1)}
        say(f"{item.name}: {row['leaves']} leaves, {row['measurements']} measurements, "
            f"leaf speedup {row['leaf_speedup_during_search']}x during search, {row['seconds']} s")
        rows.append(row)
    trained = list(table.meta.get("trained_on", []))
    table.meta.update({"trained_on": trained + [r["model"] for r in rows], "accuracy_budget": accuracy_budget,
                       "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return rows
