"""Everything one optimize run shares: inputs, captured activations, measurer, cache, passes.

Building a :class:`SubgraphEnv` for any range of the graph goes through here, so the
initial leaves, subdivided children and merged pairs are all measured the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import onnx

from adaptopt.adapt.cache import MeasurementCache
from adaptopt.budget import Deadline
from adaptopt.adapt.environment import Features, ModelMemory, SubgraphEnv
from adaptopt.config import Config
from adaptopt.errors import InputError
from adaptopt.graph.capture import capture
from adaptopt.graph.index import GraphIndex
from adaptopt.graph.partition import Subgraph
from adaptopt.graph.subgraph import extract_range, fill_missing_types
from adaptopt.runtime import make_session, run


def run_on_target(model: onnx.ModelProto | bytes, feeds: Mapping[str, np.ndarray], config: Config) -> dict:
    """Outputs of ``model`` as users run it (ORT_ENABLE_ALL on the configured providers)."""
    if isinstance(model, bytes):
        model = onnx.load_model_from_string(model)
    return run(make_session(model, config.target, level="all"), feeds)


def time_on_target(model: onnx.ModelProto | bytes, feeds: Mapping[str, np.ndarray], config: Config):
    from adaptopt.profile.runner import time_model
    if isinstance(model, bytes):
        model = onnx.load_model_from_string(model)
    return time_model(model, dict(feeds), config.target, config.profiling, level="all")


def time_pair_on_target(baseline: onnx.ModelProto | bytes, candidate: onnx.ModelProto | bytes,
                        feeds: Mapping[str, np.ndarray], config: Config):
    """``candidate`` timed against ``baseline`` round by round (``verify.paired_timing``)."""
    from adaptopt.adapt.verify import paired_timing
    models = [onnx.load_model_from_string(m) if isinstance(m, bytes) else m for m in (baseline, candidate)]
    return paired_timing(models[0], models[1], dict(feeds), config.target,
                         max_seconds=2 * config.profiling.max_time_s)


class InProcessMeasurer:
    """Runs and times subgraphs in this process (one session each, shared thread pool)."""

    def __init__(self, config: Config):
        self.config = config

    def run(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_on_target(model, feeds, self.config)

    def time(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]):
        return time_on_target(model, feeds, self.config)

    def time_pair(self, baseline: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Mapping[str, np.ndarray]):
        return time_pair_on_target(baseline, candidate, feeds, self.config)

    def close(self) -> None:
        pass


class IsolatedMeasurer:
    """Runs and times subgraphs in one persistent worker process (``adaptopt.isolation``).

    A segfault, abort or hang in an execution provider or custom op raises
    ``WorkerFailure`` for that one call (a hang after ``profiling.timeout_s``); the
    environment records it as a failed step and the run goes on. The run's time
    budget is not applied here: it is checked between episodes, so a measurement is
    never cut short and mistaken for a property of the subgraph.
    """

    def __init__(self, config: Config):
        from adaptopt.graph.external import kept_files, trust_kept_files
        from adaptopt.isolation import Worker
        self.config = config
        # weights kept on disk reach the worker as the same checked files (never re-read unchecked)
        self.worker = Worker(initializer=trust_kept_files, initargs=(kept_files(),), name="adaptopt-measure")

    def _call(self, fn, *models_then_feeds):
        *models, feeds = models_then_feeds
        return self.worker.call(fn, *(m.SerializeToString() for m in models), dict(feeds), self.config,
                                timeout=self.config.profiling.timeout_s)

    def run(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._call(run_on_target, model, feeds)

    def time(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]):
        return self._call(time_on_target, model, feeds)

    def time_pair(self, baseline: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Mapping[str, np.ndarray]):
        return self._call(time_pair_on_target, baseline, candidate, feeds)

    def close(self) -> None:
        self.worker.close()


def make_measurer(config: Config):
    return IsolatedMeasurer(config) if config.profiling.isolate else InProcessMeasurer(config)


def select_passes(config: Config, names: tuple[str, ...] | None, budget: float) -> list:
    """Enabled passes in library order; lossy ones only with a budget > 0; opt-in ones only
    when ``passes.enabled`` names them."""
    from adaptopt.passes.registry import all_passes, get_pass
    if names:
        return [get_pass(n) for n in names]
    library = all_passes()
    known = {p.name for p in library}
    for name in tuple(config.passes.enabled) + tuple(config.passes.disabled):
        if name not in known:
            raise InputError(f"{config.source}: passes: unknown pass '{name}' (see 'adaptopt passes')")
    def wanted(p) -> bool:
        if p.name in config.passes.disabled:
            return False
        if config.passes.enabled:
            return p.name in config.passes.enabled
        return not getattr(p, "opt_in", False)  # (test doubles need not declare it)

    chosen = [p for p in library if wanted(p)]
    return [p for p in chosen if p.guarantee == "exact" or budget > 0]


def withhold_calibrated(passes: list, config: Config, assumed: Mapping[str, str]) -> tuple[list, dict[str, str]]:
    """``passes`` less the calibrated ones (static quantization) when some input's values are
    ``assumed`` (nobody configured them: ``capture.unconfigured_inputs``), unless
    ``passes.enabled`` names them; and why each one left was withheld.

    Ranges calibrated on generated inputs fit those inputs only. A Whisper-like encoder
    quantized on the assumed [0, 1) inputs kept cosine 0.9997 there and 0.35-0.66 on signed,
    log-mel-like ones: a broken model, checked as accurate. Dynamic quantization measures its
    ranges at run time and is not withheld."""
    if not assumed:
        return list(passes), {}
    named = set(config.passes.enabled)
    withheld = {p.name: f"calibrates on the inputs' values, and none are configured for {', '.join(sorted(assumed))}"
                for p in passes if getattr(p, "calibrated", False) and p.name not in named}
    return [p for p in passes if p.name not in withheld], withheld


def split_by_scope(passes: list) -> tuple[list, list]:
    """(passes searched per subgraph, passes decided once on the merged model)."""
    return [p for p in passes if p.scope != "model"], [p for p in passes if p.scope == "model"]


@dataclass
class RunContext:
    config: Config
    index: GraphIndex
    feeds: dict[str, np.ndarray]
    passes: list
    cache: MeasurementCache
    measurer: object
    classify: Callable[[onnx.ModelProto, Mapping[str, np.ndarray], float], Features]
    accuracy_budget: float
    values: dict[str, np.ndarray] = field(default_factory=dict)
    model_passes: list = field(default_factory=list)
    progress: Callable[[str, int, int], None] | None = None
    deadline: Deadline = field(default_factory=lambda: Deadline(None))  # the search's share of --budget
    run_deadline: Deadline = field(default_factory=lambda: Deadline(None))  # the whole --budget (timing apart)
    node_times_ms: dict[str, float] = field(default_factory=dict)
    # the work model with the user's dynamic dims and feeds at other sizes of them: leaf
    # rewrites are also checked there (None: the model has no dynamic dims)
    other_model: onnx.ModelProto | None = None
    other_inputs: dict[str, np.ndarray] | None = None
    other_values: dict[str, np.ndarray] | None = None
    memory: ModelMemory = field(default_factory=ModelMemory)  # rewritten leaf models kept, all leaves together
    withheld: dict[str, str] = field(default_factory=dict)  # pass name -> why it is not searched (withhold_calibrated)

    def expired(self) -> bool:
        return self.deadline.expired()

    def ensure_captured(self, names: list[str]) -> None:
        """Record any boundary tensors not captured yet (one extra reference run)."""
        missing = [n for n in dict.fromkeys(names) if n not in self.values and n not in self.index.initializers]
        if missing:
            self.values.update(capture(self.index.model, self.feeds, missing, self.config.target))

    def use_other_sizes(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None) -> None:
        """Check leaf rewrites at ``feeds`` too (other sizes of the dynamic dims) on ``model``,
        the work model with the user's signature; nothing to do when ``feeds`` is None."""
        if feeds is not None:
            self.other_model, self.other_inputs, self.other_values = model, dict(feeds), dict(feeds)

    def _other_boundary(self, sub: Subgraph) -> tuple[dict, dict] | tuple[None, None]:
        if self.other_model is None:
            return None, None
        names = list(sub.boundary_inputs) + list(sub.boundary_outputs)
        missing = [n for n in dict.fromkeys(names) if n not in self.other_values and n not in self.index.initializers]
        if missing:
            try:
                self.other_values.update(capture(self.other_model, self.other_inputs, missing, self.config.target))
            except InputError:  # the model itself does not run at the other sizes: nothing to keep working there
                self.other_model = self.other_values = None
                return None, None
        return ({n: self.other_values[n] for n in sub.boundary_inputs},
                {n: self.other_values[n] for n in sub.boundary_outputs})

    def env_for(self, sub: Subgraph) -> SubgraphEnv:
        from adaptopt.passes.base import PassContext
        names = list(sub.boundary_inputs) + list(sub.boundary_outputs)
        self.ensure_captured(names)
        fill_missing_types(self.index, names, self.feeds)
        model = materialize_weights(extract_range(self.index, sub.start, sub.stop, name=f"sg_{sub.id}"))
        unread = [n for n in names if n not in self.values and n not in self.index.initializers]
        feeds = {n: self.values[n] for n in sub.boundary_inputs if n in self.values}
        reference = {n: self.values[n] for n in sub.boundary_outputs if n in self.values}
        ctx = PassContext(target=self.config.target, feeds=feeds, accuracy_budget=self.accuracy_budget,
                          seed=self.config.policy.seed)
        op_times: dict[str, float] = {}
        for offset, name in enumerate(sub.node_names):
            if name in self.node_times_ms:
                op_type = self.index.nodes[sub.start + offset].op_type
                op_times[op_type] = op_times.get(op_type, 0.0) + self.node_times_ms[name]
        other_feeds, other_reference = self._other_boundary(sub)
        env = SubgraphEnv(sub.id, model, sub.content_hash, feeds, reference, self.passes, ctx, self.measurer,
                          self.cache, self.config.accuracy.__class__(self.config.accuracy.exact_tolerance,
                                                                     self.accuracy_budget),
                          self.classify, op_times or None, other_feeds, other_reference, memory=self.memory)
        fixed = self.index.constant_tensors()
        env.constants = {n: v for n, v in feeds.items() if n in fixed and isinstance(v, np.ndarray)}
        not_tensors = [n for n in names if n in self.values and not isinstance(self.values[n], np.ndarray)]
        if unread:  # a boundary tensor numpy cannot hold (capture.NO_NUMPY_TYPES): the leaf stays as it is
            env.blocked = f"boundary tensor '{unread[0]}' has a type numpy cannot hold: not run alone"
        elif not_tensors:  # a sequence or optional value: validation compares arrays
            env.blocked = f"boundary value '{not_tensors[0]}' is not a tensor (a sequence or optional): not run alone"
        return env


MATERIALIZE_LIMIT = 1 << 30  # a leaf whose on-disk weights are smaller is given real tensors


def materialize_weights(model: onnx.ModelProto, limit: int = MATERIALIZE_LIMIT) -> onnx.ModelProto:
    """Load a subgraph's weights kept on disk (huge models) into it when they are modest.

    Passes read weight values; a leaf of a huge model usually holds a small part of
    its weights. A leaf over ``limit`` keeps its on-disk references: sessions
    memory-map them, and passes that need the values fail on it (recorded, reverted).
    """
    from adaptopt.graph.external import on_disk, raw_bytes, tensor_nbytes
    heavy = [t for t in model.graph.initializer if on_disk(t)]
    if not heavy or sum(tensor_nbytes(t) or 0 for t in heavy) > limit:
        return model
    for tensor in heavy:
        data = raw_bytes(tensor)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = data
    return model


def make_classifier(machine) -> Callable[[onnx.ModelProto, Mapping[str, np.ndarray], float], Features]:
    """Bound class, roofline performance and bytes of a (rewritten) subgraph from its measured time."""
    from adaptopt.profile.classify import classify
    from adaptopt.profile.cost_model import estimate

    def classify_model(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], median_ms: float) -> Features:
        cost = estimate(model, {k: tuple(v.shape) for k, v in feeds.items()})
        verdict = classify(cost, median_ms, machine)
        return Features(verdict.bound, verdict.performance, float(cost.bytes))

    return classify_model
