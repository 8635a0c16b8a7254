"""The real environment of one subgraph: rewrite, validate against captured outputs, time.

Implements :class:`adaptopt.policy.search.Environment`. A pass sequence is applied
to the original subgraph (prefixes are memoised, so ``(a, b)`` reuses ``(a,)``),
the result is run on the subgraph's captured boundary inputs and compared with the
captured boundary outputs (exact tolerance, or the cosine budget once a lossy pass
is in the sequence), then timed on the target. A rewrite that raises, fails the
checker or changes outputs is an invalid outcome — the reverted step the policy is
penalised for — never an exception out of the loop.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

import numpy as np
import onnx

from adaptopt.adapt.cache import MeasurementCache
from adaptopt.config import AccuracyConfig
from adaptopt.graph.subgraph import embed_constants
from adaptopt.passes.base import applies_guarded
from adaptopt.policy.search import Outcome
from adaptopt.policy.state import State, encode
from adaptopt.validate import Validation, compare


class Measurer(Protocol):
    def run(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of ``model`` on the target (raises on failure)."""

    def time(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> "TimingLike":
        """Median (and spread) of the model's latency on the target."""

    def time_pair(self, baseline: onnx.ModelProto, candidate: onnx.ModelProto,
                  feeds: Mapping[str, np.ndarray]) -> float:
        """``candidate``'s latency as a share of ``baseline``'s, timed interleaved round by round."""


class TimingLike(Protocol):
    median_ms: float
    spread_ms: float


@dataclass(frozen=True)
class Features:
    """What the classifier says about a (rewritten) subgraph."""

    bound: str
    performance: float | None
    bytes: float


Classifier = Callable[[onnx.ModelProto, Mapping[str, np.ndarray], float], Features]


def model_digest(model: onnx.ModelProto) -> str:
    return hashlib.blake2b(model.SerializeToString(deterministic=True), digest_size=16).hexdigest()


@dataclass
class Step:
    model: onnx.ModelProto | None
    error: str = ""
    lossy: bool = False


class ModelMemory:
    """The rewritten subgraph models kept in memory, across every environment sharing it.

    Each rewritten model holds a copy of its leaf's weights. Capped per leaf (eight models),
    the eight leaves of a 211 MB encoder (about 26 MB each) could hold 1.7 GB between them
    while the search visited them in turn; one byte budget for all of them (a run shares
    one) drops the least recently used first, and always keeps the newest. With it and
    sessions that drop their model bytes, that encoder's run peaked at 4.0 GB, not 5.4 GB.
    A dropped model is rebuilt by replaying its passes, which are deterministic.
    """

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self._held: OrderedDict[tuple[int, tuple[str, ...]], tuple["SubgraphEnv", int]] = OrderedDict()
        self.bytes = 0

    def used(self, env: "SubgraphEnv", sequence: tuple[str, ...]) -> None:
        key = (id(env), sequence)
        if key in self._held:
            self._held.move_to_end(key)

    def add(self, env: "SubgraphEnv", sequence: tuple[str, ...], model: onnx.ModelProto) -> None:
        size = model.ByteSize()
        self._held[(id(env), sequence)] = (env, size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._held) > 1:
            (_, old), (owner, old_size) = self._held.popitem(last=False)
            self.bytes -= old_size
            owner._steps.pop(old, None)

    def forget(self, env: "SubgraphEnv", sequence: tuple[str, ...]) -> None:
        held = self._held.pop((id(env), sequence), None)
        if held is not None:
            self.bytes -= held[1]


@dataclass
class SubgraphEnv:
    leaf_id: str
    model: onnx.ModelProto
    content_hash: str
    feeds: Mapping[str, np.ndarray]
    reference: Mapping[str, np.ndarray]
    passes: list  # adaptopt.passes.base.Pass instances (enabled, in library order)
    context: object  # adaptopt.passes.base.PassContext
    measurer: Measurer
    cache: MeasurementCache
    accuracy: AccuracyConfig
    classify: Classifier
    op_times_ms: dict[str, float] | None = None
    # the boundary at other sizes of the model's dynamic dims (None: the model has none).
    # A leaf is pinned to the profiled sizes, so a pass can bake them in (fold a Shape,
    # write a Reshape target); such a rewrite is invalid here, not only at the final check.
    other_feeds: Mapping[str, np.ndarray] | None = None
    other_reference: Mapping[str, np.ndarray] | None = None
    _steps: dict[tuple[str, ...], Step] = field(default_factory=dict)
    _outcomes: dict[tuple[str, ...], Outcome] = field(default_factory=dict)
    _features: dict[tuple[str, ...], Features] = field(default_factory=dict)
    _validations: dict[tuple[str, ...], Validation] = field(default_factory=dict)
    _actions: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    _first_of_graph: dict[str, tuple[str, ...]] = field(default_factory=dict)  # graph key -> sequence measured
    noise: float = 0.0  # relative noise band of this subgraph's timing loop (A/A)
    _other_sizes_usable: bool | None = None
    pass_errors: list[str] = field(default_factory=list)
    blocked: str = ""  # why this subgraph cannot be run alone ("" when it can): every outcome is invalid
    # boundary inputs the whole model fixes (an Identity tying two weights, a Constant): the
    # leaf is run and timed with them as initializers, as ONNX Runtime sees them in the model
    constants: Mapping[str, np.ndarray] = field(default_factory=dict)

    max_cached_models: int = 8  # rewritten models of this leaf kept in memory...
    memory: ModelMemory = field(default_factory=ModelMemory)  # ...within the byte budget a run shares

    def __post_init__(self) -> None:
        self._steps[()] = Step(self.model)
        self._by_name = {p.name: p for p in self.passes}
        self._op_types = [n.op_type for n in self.model.graph.node]

    # ------------------------------------------------------------ Environment API
    @property
    def measurements(self) -> int:
        """Distinct rewritten graphs this search asked for (what it paid, cache hits included):
        sequences that reach a graph already measured (a pass with nothing left to do, passes whose
        rewrites come out byte-identical in either order) are free."""
        return len(self._first_of_graph)

    def category(self, action: str) -> str:
        return self._by_name[action].category

    def actions(self, sequence: tuple[str, ...]) -> list[str]:
        if sequence not in self._actions:
            step = self.step(sequence)
            names = []
            if step.model is not None and self.evaluate(()).valid:  # an original that cannot run is kept as is
                for p in self.passes:
                    if p.name in sequence:
                        continue
                    ok, error = applies_guarded(p, step.model, self.context)
                    if ok:
                        names.append(p.name)
                    elif error and error not in self.pass_errors:  # a check that fails is that pass's failure
                        self.pass_errors.append(error)
            self._actions[sequence] = names
        return self._actions[sequence]

    def state(self, sequence: tuple[str, ...]) -> State:
        features = self.features(sequence)
        last = sequence[-1] if sequence else "none"
        return encode(len(self.model.graph.node), features.bound, self._op_types, features.performance, last,
                      self.op_times_ms)

    def evaluate(self, sequence: tuple[str, ...]) -> Outcome:
        if self.blocked:
            return Outcome(math.inf, False, 0.0, self.blocked)
        if sequence in self._outcomes:
            return self._outcomes[sequence]
        graph = self._graph_key(sequence)
        same = self._first_of_graph.setdefault(graph, sequence)
        if same != sequence:  # the same graph as a sequence already measured: same outcome
            self._outcomes[sequence] = self._outcomes[same]
            for known in (self._features, self._validations):
                if same in known:
                    known[sequence] = known[same]
            return self._outcomes[sequence]
        kind = "subgraph" if self.other_feeds is None else "subgraph+other-sizes+open"
        key = self.cache.key(self.content_hash, sequence,
                             kind=kind + ("+constants" if self.constants else "") + "+paired")
        entry = self.cache.get(key, time_ms=(int, float), valid=bool)
        if entry is not None:
            time_ms = entry["time_ms"]
            if entry.get("ratio") is not None:  # timed against the original: as a share of its time
                time_ms = self.evaluate(()).time_ms * entry["ratio"]
            outcome = Outcome(time_ms, entry["valid"], entry.get("bytes", 0.0), entry.get("reason", ""))
            self.noise = max(self.noise, entry.get("noise") or 0.0)
        else:
            outcome = self._measure(sequence)
            ratio = None
            if sequence and outcome.valid and self._paired():
                ratio = outcome.time_ms / self.evaluate(()).time_ms
            self.cache.put_outcome(key, outcome, leaf=self.leaf_id, noise=self.noise if not sequence else None,
                                   ratio=ratio)
        self._outcomes[sequence] = outcome
        return outcome

    # ------------------------------------------------------------ internals
    def _graph_key(self, sequence: tuple[str, ...]) -> str:
        """Digest of the graph ``sequence`` produces (a failed rewrite is its own key), and
        whether a lossy pass is in it (the same graph is validated against another budget)."""
        step = self.step(sequence)
        if step.model is None:
            return f"failed:{'/'.join(sequence)}"
        return f"{model_digest(step.model)}:{'lossy' if step.lossy else 'exact'}"

    def step(self, sequence: tuple[str, ...]) -> Step:
        """The model after ``sequence``; model None when a pass failed.

        Memoised by prefix, but only the ``max_cached_models`` most recent rewritten
        models of this leaf stay in memory, within the byte budget of :attr:`memory` (each
        holds a copy of the leaf's weights: a 128 MB model's peak RSS went from 2.5 to 2.1 GB
        with a byte cap); an evicted one is rebuilt by replaying its passes, which are
        deterministic.
        """
        if sequence in self._steps:
            self._steps[sequence] = self._steps.pop(sequence)  # most recently used last
            self.memory.used(self, sequence)
            return self._steps[sequence]
        parent = self.step(sequence[:-1])
        name = sequence[-1]
        if parent.model is None:
            result = Step(None, parent.error, parent.lossy)
        else:
            result = self._apply(parent, name)
        self._steps[sequence] = result
        if result.model is not None:
            held = [seq for seq, st in self._steps.items() if seq and st.model is not None]  # oldest first
            for seq in held[:max(0, len(held) - self.max_cached_models)]:
                del self._steps[seq]
                self.memory.forget(self, seq)
            self.memory.add(self, sequence, result.model)
        return result

    def _apply(self, parent: Step, name: str) -> Step:
        """A failing pass is a measured outcome: reverted, penalised, listed in ``pass_errors``."""
        from adaptopt.passes.base import apply_guarded
        p = self._by_name[name]
        res, error = apply_guarded(p, parent.model, self.context)
        if res is None:
            self.pass_errors.append(error)
            return Step(None, error)
        return Step(res.model, "", parent.lossy or p.guarantee == "lossy")

    def _measure(self, sequence: tuple[str, ...]) -> Outcome:
        from adaptopt.isolation import WorkerFailure
        from adaptopt.runtime import ort_error_line, ort_errors
        step = self.step(sequence)
        if step.model is None:
            return Outcome(math.inf, False, 0.0, step.error)
        model, feeds = self.runnable(step.model)
        try:
            outputs = self.measurer.run(model, feeds)
        except ort_errors() as exc:
            return Outcome(math.inf, False, 0.0, f"onnxruntime: {ort_error_line(exc)}")
        except WorkerFailure as failure:  # crash / hang / error in the isolated worker
            self.pass_errors.append(f"{'/'.join(sequence) or 'original'}: {failure}")
            return Outcome(math.inf, False, 0.0, str(failure))
        budget = self.accuracy.budget if step.lossy else 0.0
        validation = compare(self.reference, outputs, self.accuracy.exact_tolerance, budget)
        self._validations[sequence] = validation
        if not validation.ok:
            return Outcome(math.inf, False, 0.0, validation.reason)
        why = self._fails_at_other_sizes(step.model, budget) if sequence else ""
        if why:
            return Outcome(math.inf, False, 0.0, why)
        try:
            if sequence and self._paired():
                base_model, _ = self.runnable(self.model)
                time_ms = self.evaluate(()).time_ms * self.measurer.time_pair(base_model, model, feeds)
            else:
                timing = self.measurer.time(model, feeds)
                time_ms = timing.median_ms
                if not sequence:
                    self.noise = max(self.noise, timing.spread_ms / max(timing.median_ms, 1e-9))
        except WorkerFailure as failure:
            self.pass_errors.append(f"{'/'.join(sequence) or 'original'}: {failure}")
            return Outcome(math.inf, False, 0.0, str(failure))
        features = self.classify(step.model, self.feeds, time_ms)
        self._features[sequence] = features
        return Outcome(time_ms, True, features.bytes)

    def _paired(self) -> bool:
        """Whether a rewrite is timed against the original, interleaved (``measurer.time_pair``),
        as its share of the original's time: whenever the original ran. Timed alone at its own
        time, a rewrite was compared with an original timed once at the start, and drift read
        as gains (numbers: ``verify.paired_timing``)."""
        base = self.evaluate(())
        return base.valid and math.isfinite(base.time_ms) and base.time_ms > 0

    def _fails_at_other_sizes(self, model: onnx.ModelProto, budget: float) -> str:
        """Why ``model`` does not match the original at the other sizes ("" when it does,
        or when there is nothing to check: no dynamic dims, or the original leaf itself
        cannot run with its varying dims open, which is checked once)."""
        if self.other_feeds is None:
            return ""
        return self._run_at_other_sizes(model, budget) if self._opens() else ""

    def _run_at_other_sizes(self, model: onnx.ModelProto, budget: float) -> str:
        from adaptopt.isolation import WorkerFailure
        from adaptopt.runtime import ort_error_line, ort_errors
        relaxed = open_varying_dims(model, [(self.feeds, self.other_feeds), (self.reference, self.other_reference)])
        relaxed, other_feeds = embed_constants(relaxed, self.other_feeds, self.constants)
        try:
            outputs = self.measurer.run(relaxed, other_feeds)
        except ort_errors() as exc:
            return f"fails at other sizes of the dynamic dims: onnxruntime: {ort_error_line(exc)}"
        except WorkerFailure as failure:
            return f"fails at other sizes of the dynamic dims: {failure}"
        check = compare(self.other_reference, outputs, self.accuracy.exact_tolerance, budget)
        return "" if check.ok else f"fails at other sizes of the dynamic dims: {check.reason}"

    def runnable(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, Mapping[str, np.ndarray]]:
        """``model`` (a rewrite of this subgraph) and the captured boundary feeds as they are
        run and timed, which is as ONNX Runtime sees that part of the written model:
        :attr:`constants` still among its inputs become initializers, and on a model with
        dynamic dims the leaf's dims that follow them are opened again.

        Both changed what ONNX Runtime fuses at load. Fed as inputs, tied weights were not
        folded; pinned to static shapes, MatMul+Add became Gemm with Reshapes, where the
        written (dynamic) convnext gets MatMul+BiasGelu: its leaves gained 7.5-10% alone from
        ``fuse_attention``, which gained ~2% in the model."""
        if self.other_feeds is not None and self._opens():
            model = open_varying_dims(model, [(self.feeds, self.other_feeds), (self.reference, self.other_reference)])
        return embed_constants(model, self.feeds, self.constants)

    def _opens(self) -> bool:
        """Whether this leaf runs with its varying dims open (checked once, on the original)."""
        if self._other_sizes_usable is None:
            self._other_sizes_usable = not self._run_at_other_sizes(self.model, 0.0)
        return self._other_sizes_usable

    def features(self, sequence: tuple[str, ...]) -> Features:
        if sequence not in self._features:
            outcome = self.evaluate(sequence)
            step = self.step(sequence)
            if outcome.valid and step.model is not None:
                self._features[sequence] = self.classify(step.model, self.feeds, outcome.time_ms)
            else:
                self._features[sequence] = Features("unknown", None, 0.0)
        return self._features[sequence]

    def validation(self, sequence: tuple[str, ...]) -> Validation | None:
        return self._validations.get(sequence)

    def is_lossy(self, sequence: tuple[str, ...]) -> bool:
        return self.step(sequence).lossy


def open_varying_dims(model: onnx.ModelProto, pairs) -> onnx.ModelProto:
    """A copy of ``model`` whose boundary dims that differ between the two value sets of
    ``pairs`` ((profiled, other) for the inputs, then for the outputs) are symbolic, and
    with no inner value infos (they hold the profiled sizes)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for infos in (out.graph.input, out.graph.output):
        for vi in infos:
            pair = next(((a[vi.name], b[vi.name]) for a, b in pairs if vi.name in a and vi.name in b), None)
            if pair is None or not vi.type.HasField("tensor_type"):
                continue
            for i, dim in enumerate(vi.type.tensor_type.shape.dim):
                if i < pair[0].ndim and i < pair[1].ndim and pair[0].shape[i] != pair[1].shape[i]:
                    dim.dim_param = f"{vi.name}_dim{i}"
    del out.graph.value_info[:]
    return out

