"""The optimize loop of DESIGN.md: partition, capture, search per leaf, adapt, merge, verify.

Nothing here decides how a subgraph is rewritten or timed; it sequences the stages
and keeps the promise: the written model is never slower or less accurate than the
input unless ``allow_slower`` says so — when nothing helps, the original is returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import onnx

from adaptopt.adapt.assemble import Base, assemble, finalize, gate_apart, other_size_check, with_model_passes
from adaptopt.adapt.whole_model import with_whole_model_lossy
from adaptopt.adapt.prepass import inferred_copy, prepass, with_signature
from adaptopt.adapt.cache import MeasurementCache, target_fingerprint, target_stamp
from adaptopt.adapt.granularity import adapt_round, search_leaves
from adaptopt.adapt.session import (
    RunContext,
    make_classifier,
    make_measurer,
    select_passes,
    split_by_scope,
    withhold_calibrated,
)
from adaptopt.budget import Deadline
from adaptopt.config import Config
from adaptopt.graph.capture import capture, make_inputs, unconfigured_inputs
from adaptopt.graph.index import GraphIndex
from adaptopt.graph.io import dynamic_inputs
from adaptopt.graph.partition import PartitionTree, partition
from adaptopt.policy.prior import stamp_target, starting_table
from adaptopt.profile.calibrate import resolve_cache_dir
from adaptopt.policy.search import QSettings, RewardWeights

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class OptimizeOptions:
    passes: tuple[str, ...] | None = None  # a fixed sequence for the whole model (no policy)
    accuracy_budget: float | None = None  # overrides config.accuracy.budget
    seed: int | None = None
    budget_s: float | None = None
    qtable: str | None = None
    allow_slower: bool = False
    progress: Progress | None = None
    log: Callable[[str], None] | None = None


@dataclass
class OptimizeResult:
    model: onnx.ModelProto
    improved: bool
    speedup: float
    latency_ms: dict
    accuracy: dict
    report: dict
    tree: PartitionTree | None = None
    leaf_models: dict[str, onnx.ModelProto] = field(default_factory=dict)

    @property
    def gated_speedup(self) -> float:
        """What ``--require-speedup`` holds on: the verified speedup (timed apart when those
        pairs agreed); for a model kept by ``--allow-slower`` whose pairs apart did not agree,
        the lower of it and their median."""
        apart = self.report["result"].get("apart") or {}
        if not self.improved or apart.get("agreed") or apart.get("speedup") is None:
            return self.speedup
        return min(self.speedup, apart["speedup"])


class StageClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stage: str | None = None
        self._t0 = time.monotonic()

    def stage(self, name: str) -> None:
        now = time.monotonic()
        if self._stage is not None:
            self.seconds[self._stage] = round(self.seconds.get(self._stage, 0.0) + now - self._t0, 3)
        self._stage, self._t0 = name, now


def q_settings(config: Config, epochs: int | None = None) -> QSettings:
    p = config.policy
    return QSettings(epochs=p.RL_training_epochs if epochs is None else epochs, learning_rate=p.learning_rate,
                     discount=p.discount, epsilon_start=p.epsilon_start, epsilon_end=p.epsilon_end,
                     max_sequence=p.max_sequence, weights=RewardWeights(p.bandwidth_weight, p.failure_penalty),
                     optimistic_init=p.optimistic_init)


PREPASS_SHARE = 0.4


def optimize_model(model: onnx.ModelProto, skeleton: onnx.ModelProto, config: Config,
                   options: OptimizeOptions = OptimizeOptions()) -> OptimizeResult:
    """Optimize ``model`` (dims pinned) and return a model with ``skeleton``'s signature."""
    clock = StageClock()
    say = options.log or (lambda message: None)
    budget = config.accuracy.budget if options.accuracy_budget is None else options.accuracy_budget
    seed = config.policy.seed if options.seed is None else options.seed
    budget_s = config.budget.seconds if options.budget_s is None else options.budget_s
    # the search gets 75% of the budget, the rest is kept for merge + verification; with an
    # accuracy budget the search gets 60% and the whole-model lossy stage runs until 85%
    # (one int8 rewrite of the whole model is often the largest win: a slow pre-pass on a
    # big model must not leave it no time)
    deadline = Deadline((0.6 if budget > 0 else 0.75) * budget_s)
    # the pre-pass starts no pass after PREPASS_SHARE of the search's time: on a 440 MB encoder
    # each judged step took 20-40 s, and the pre-pass used all of it (no leaf was searched)
    prepass_deadline = Deadline(PREPASS_SHARE * deadline.seconds)
    lossy_deadline = Deadline(0.85 * budget_s)
    run_deadline = Deadline(budget_s)  # timing apart runs a second or third batch only within it

    # the Q-table is read before any measuring: a bad --policy file fails in a second, not after the pre-pass
    table_path = options.qtable or config.policy.qtable
    stamp = target_stamp(config.target)
    table, table_origin = starting_table(table_path, config.target.device, config.policy.prior, stamp)

    clock.stage("capture")
    feeds = make_inputs(model, config)
    outputs = [o.name for o in model.graph.output]
    reference = {k: v for k, v in capture(model, feeds, outputs, config.target).items() if k in outputs}
    if options.passes:
        return _fixed_sequence(model, skeleton, config, options, feeds, reference, budget, clock)

    clock.stage("pre-pass")
    cache = MeasurementCache(resolve_cache_dir(config.policy.cache_dir), target_fingerprint(config.target))
    unusable_at_start = cache.unusable  # the CLI has said it (warn_if_cache_unusable)
    pre = prepass(model, skeleton, select_passes(config, None, 0.0), config, feeds, reference, cache,
                  prepass_deadline, settle_until=deadline)
    say(pre.progress_line())
    work = with_signature(pre.model, skeleton)
    base = Base(work, pre.side, f"whole-model exact passes: {pre.reason}") if pre.kept else None

    clock.stage("calibrate")
    index = GraphIndex.build(pre.model)
    ctx, machine = prepare_run(pre.model, index, feeds, config, budget, deadline, cache=cache)
    ctx.run_deadline = run_deadline
    other_feeds, other_runs = other_size_check(skeleton, feeds, config)
    ctx.use_other_sizes(work, other_feeds)
    dynamic = bool(dynamic_inputs(skeleton))
    other_sizes = "checked" if other_runs else "static model" if not dynamic else \
        "not checked: the original runs at no other size of its dynamic dims that was tried"
    if dynamic and not other_runs:
        say(f"other sizes {other_sizes}; rewrites are checked at the configured shapes only")
    clock.stage("partition")
    tree = partition(index, config.granularity.initial_granularity, config.granularity.min_nodes)
    leaves = tree.leaves()
    say(f"{len(index)} nodes in {len(leaves)} leaves; {len(ctx.passes)} subgraph passes, "
        f"{len(ctx.model_passes)} model-level; budget {budget_s:.0f}s")
    for name, why in ctx.withheld.items():
        say(f"warning: {name} not tried: it {why} (configure their values: or inputs_file, "
            f"or name it in passes.enabled)")

    clock.stage("policy")
    if "another target" in table_origin:
        say(f"Q-table {table_origin}")
    settings = q_settings(config)
    ctx.progress = options.progress
    if ctx.expired():  # the pre-pass used the search's time: not even the leaves' baselines are measured
        say("time budget spent before the subgraph search: no leaf is searched")
        plans = {}
    else:
        plans = {p.env.leaf_id: p
                 for p in search_leaves(ctx, [ctx.env_for(s) for s in leaves], table, settings, seed)}

    clock.stage("granularity")
    history: list[dict] = []
    adapt_settings = q_settings(config, epochs=max(2, settings.epochs // 2))
    for round_no in range(config.granularity.max_rounds):
        if ctx.expired():
            history.append({"action": "stop", "reason": "time budget spent", "round": round_no})
            break
        changes = adapt_round(ctx, tree, plans, table, adapt_settings, seed, config.granularity)
        history.extend(dict(change, round=round_no) for change in changes)
        if not any(c["kept"] for c in changes):
            break

    clock.stage("merge + verify")
    assembly = assemble(ctx, tree, plans, skeleton, reference, budget, options.allow_slower, say, base)
    if budget > 0:
        assembly = with_whole_model_lossy(ctx, assembly, skeleton, pre.cleaned or skeleton, reference, budget,
                                          lossy_deadline.expired)
    assembly = with_model_passes(ctx, assembly, skeleton)
    assembly = gate_apart(ctx, assembly, skeleton, base, reference, options.allow_slower)
    clock.stage("counters")
    counters, unmeasured = leaf_counters(ctx, plans, assembly.accepted)
    ctx.measurer.close()
    clock.stage("done")
    measurements = sum(p.env.measurements for p in plans.values())
    table.meta.update({"last_model": model.graph.name, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
    stamp_target(table, stamp)
    if table_path:
        table.save(table_path)
    from adaptopt.report.optimize import build_report
    report = build_report(model, config, machine, tree, plans, history, assembly, clock.seconds, budget, seed,
                          measurements, ctx.cache.hits, counters)
    report["prepass"] = pre.to_dict()
    report["settings"]["policy_start"] = table_origin
    report["settings"]["other_sizes"] = other_sizes
    if ctx.withheld:
        report["settings"]["passes_withheld"] = dict(ctx.withheld)
    if unmeasured:
        report["counters_skipped"] = {"leaves": unmeasured, "reason": "time budget spent before their counters ran"}
    note_assumed_inputs(model, config, budget, assembly.improved, report, say)
    note_cache_trouble(ctx.cache, unusable_at_start, report, say)
    return finalize(assembly, report, tree)


def note_cache_trouble(cache: MeasurementCache, unusable_at_start: str | None, report: dict,
                       say: Callable[[str], None]) -> None:
    """A measurement cache that stopped taking entries during the run (the disk filled up, the
    folder went away) is named in the report (``cache_unusable``) and, when it happened
    mid-run, in a warning: this run's measurements are not kept, so a rerun measures again
    and the same-seed promise of identical output needs the cache."""
    if cache.unusable is None:
        return
    report["cache_unusable"] = cache.unusable
    if cache.unusable != unusable_at_start:
        say(f"warning: {cache.unusable}")


def note_assumed_inputs(model: onnx.ModelProto, config: Config, budget: float, improved: bool, report: dict,
                        say: Callable[[str], None]) -> None:
    """With an accuracy budget, say which inputs were generated because nothing was configured
    (floats uniform in [0, 1), integers 0 or 1): the cosine is checked there. (Sweeps: an int8
    MatMul model kept 0.99995 on [0, 1) inputs and 0.68 on standard-normal ones; a T5-style
    encoder checked on token ids 0 and 1 kept 0.9999, and 0.998-0.9989 on ids in [0, 100).)
    Report ``settings.inputs_assumed``."""
    assumed = unconfigured_inputs(model, config) if budget > 0 else {}
    if not assumed:
        return
    floats = [name for name, fill in assumed.items() if fill == "uniform01"]
    integers = [name for name, fill in assumed.items() if fill != "uniform01"]
    report["settings"]["inputs_assumed"] = {"inputs": floats, "values": "uniform01",
                                            **({"integer_inputs": integers, "integer_values": "0 or 1"}
                                               if integers else {})}
    if improved:
        filled = ([f"{', '.join(floats)} filled uniform in [0, 1)"] if floats else []) + \
                 ([f"{', '.join(integers)} filled with 0 or 1"] if integers else [])
        say(f"warning: the accuracy budget was checked on generated inputs: {'; '.join(filled)} (no values: in "
            "the config); on other values the cosine can be lower: configure the inputs' values (token ids: "
            "values: {range: [0, vocab]}) or give real ones (inputs_file)")


def leaf_counters(ctx: RunContext, plans: dict, accepted: dict) -> tuple[dict[str, dict], list[str]]:
    """HAL readings around one timed loop of each leaf, and of its rewrite when kept (report only).

    They inform the report, not the output, so they stop when the time budget is spent
    (an ``ncu`` replay takes seconds per leaf); the leaves left unmeasured are returned.
    """
    from adaptopt.profile.runner import measure
    out: dict[str, dict] = {}
    unmeasured: list[str] = []
    for sid, plan in plans.items():
        if ctx.expired():
            unmeasured.append(sid)
            continue
        env = plan.env
        if not env.evaluate(()).valid:  # the leaf alone does not run (e.g. no nodes): nothing to read
            continue
        out[sid] = {"original": measure(*env.runnable(env.model), ctx.config).counters}
        if sid in accepted:
            out[sid]["optimized"] = measure(*env.runnable(env.step(accepted[sid]).model), ctx.config).counters
    return out, unmeasured


def prepare_run(model: onnx.ModelProto, index: GraphIndex, feeds: dict, config: Config, budget: float,
                deadline: Deadline | None = None, cache: MeasurementCache | None = None):
    """The shared state of a run: machine calibration, passes, measurement cache, per-node times."""
    from adaptopt.profile.calibrate import machine_profile
    machine = machine_profile(config.target, config.policy.cache_dir)
    assumed = unconfigured_inputs(model, config) if budget > 0 else {}
    passes, withheld = withhold_calibrated(select_passes(config, None, budget), config, assumed)
    leaf_passes, model_passes = split_by_scope(passes)
    if cache is None:
        cache = MeasurementCache(resolve_cache_dir(config.policy.cache_dir), target_fingerprint(config.target))
    deadline = deadline or Deadline(None)
    ctx = RunContext(config, index, feeds, leaf_passes, cache, make_measurer(config),
                     make_classifier(machine), budget, model_passes=model_passes, deadline=deadline)
    ctx.values.update(feeds)
    ctx.withheld = withheld
    ctx.node_times_ms = _node_times(model, feeds, config, cache)
    return ctx, machine


def _node_times(model: onnx.ModelProto, feeds, config: Config, cache: MeasurementCache) -> dict[str, float]:
    """Per-node times of the whole model from ORT's profiler (weights for subdivision), cached."""
    if not config.profiling.per_node:
        return {}
    from adaptopt.adapt.environment import model_digest
    from adaptopt.profile.runner import measure
    key = cache.key(model_digest(model), (), kind="node-times")
    entry = cache.get(key, node_times_ms=dict)
    if entry is None:
        measurement = measure(model, feeds, config, counters=False, per_node=True)
        entry = {"node_times_ms": dict(measurement.node_times_ms or {})}
        cache.put(key, **entry)
    return dict(entry["node_times_ms"])


def _fixed_sequence(model, skeleton, config, options, feeds, reference, budget, clock) -> OptimizeResult:
    """``--passes a,b,c``: the static baseline, applied to the whole model and verified.

    Like the pre-pass, the passes run on the user's own signature (dynamic dims kept), so
    nothing they fold can bake in the profiled sizes, and the result keeps that signature."""
    from adaptopt.adapt.assemble import verify_candidate
    from adaptopt.passes.base import PassContext, apply_guarded
    clock.stage("passes")
    ctx = PassContext(target=config.target, feeds=feeds, accuracy_budget=budget, seed=config.policy.seed)
    passes = select_passes(config, options.passes, budget)
    candidate, steps = inferred_copy(skeleton, "--passes"), []
    for p in passes:
        # a pass that fails on this model (ORT's quantizer on an empty batch, say) is skipped and
        # reported, as in the search, not an internal error of the run
        result, error = apply_guarded(p, candidate, ctx)
        steps.append({"name": p.name, "modified": bool(result and result.modified),
                      "changes": result.changes if result else {}, **({"error": error} if error else {})})
        if error and options.log:
            options.log(f"warning: {error}; the pass is skipped")
        candidate = result.model if result else candidate
    candidate = with_signature(candidate, skeleton)
    lossy = any(p.guarantee == "lossy" for p in passes)
    clock.stage("verify")
    if any(step["modified"] for step in steps):
        assembly = verify_candidate(model, skeleton, candidate, feeds, reference, config, budget if lossy else 0.0,
                                    options.allow_slower)
    else:  # nothing to verify or keep, --allow-slower or not
        from adaptopt.adapt.assemble import original_written
        failed = [step["name"] for step in steps if "error" in step]
        assembly = original_written(skeleton, feeds, config, "no pass of the sequence changed the model"
                                    + (f" ({', '.join(failed)} failed: see the report)" if failed else ""))
    clock.stage("done")
    from adaptopt.report.optimize import fixed_sequence_report
    report = fixed_sequence_report(model, config, list(options.passes), steps, assembly, clock.seconds, budget)
    note_assumed_inputs(model, config, budget if lossy else 0.0, assembly.improved, report,
                        options.log or (lambda message: None))
    return finalize(assembly, report, None)

