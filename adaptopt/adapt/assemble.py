"""Merge the chosen leaf rewrites and keep the promise: never slower, never less accurate.

A leaf's rewrite is kept only when a fresh interleaved run of the leaf (original,
rewrite and an A/A pair) confirms its gain beyond the noise. The merged model must then (1) match the original's outputs (exact tolerance,
or the cosine budget when a lossy rewrite is in it), (2) keep working at other sizes
of its dynamic dims when it has any, and (3) beat the original side by side by more
than the A/A noise. Failing (1) or (2) drops lossy leaves first, then everything;
failing (3) drops the rewrite with the smallest measured gain and tries again, a few
times, before falling back to the original model.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Mapping

import numpy as np
import onnx

from adaptopt.adapt.environment import model_digest
from adaptopt.adapt.verify import (
    APART_LOOKS, APART_MAX_S, MIN_APART_GAIN, MIN_MODEL_GAIN, ApartPair, SideBySide, apart, interleaved_medians,
    side_by_side, with_pairs, worth_another_look,
)
from adaptopt.budget import Deadline
from adaptopt.config import Config, InputSpec
from adaptopt.graph.capture import model_inputs
from adaptopt.graph.io import dynamic_inputs
from adaptopt.graph.merge import merge_models
from adaptopt.graph.partition import PartitionTree
from adaptopt.graph.subgraph import extract_range
from adaptopt.runtime import make_session, ort_error_line, ort_errors, run
from adaptopt.validate import Validation, compare

MAX_SPEED_ROLLBACKS = 3
MIN_LEAF_GAIN = 0.02  # log-speedup a leaf must show beyond its noise to be a candidate


@dataclass
class Assembly:
    model: onnx.ModelProto
    improved: bool
    validation: Validation
    side: SideBySide | None
    accepted: dict[str, tuple[str, ...]] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    message: str = ""
    leaf_models: dict[str, onnx.ModelProto] = field(default_factory=dict)


def leaf_gain(plan) -> float:
    r = plan.result
    if not r.sequence or not r.outcome.valid:
        return 0.0
    return math.log(r.baseline.time_ms / r.outcome.time_ms)


def is_candidate(plan) -> bool:
    """Worth confirming: the search measured a gain (the confirmation run judges the noise)."""
    return leaf_gain(plan) > MIN_LEAF_GAIN


def confirm_leaf(ctx, plan) -> SideBySide:
    """Time the leaf's original and its chosen rewrite again, interleaved, with an A/A pair.

    The search keeps the fastest of many noisy measurements, which is biased low (the
    winner's curse); a fresh side-by-side run is an unbiased check of that choice.
    """
    env = plan.env
    original, feeds = env.runnable(env.model)
    candidate, _ = env.runnable(env.step(plan.result.sequence).model)
    return timed(ctx, original, candidate, feeds, rounds=10, apart_in_budget=True, floor=MIN_LEAF_GAIN)


@dataclass(frozen=True)
class Base:
    """What the output is when no leaf rewrite survives: the original, or the verified pre-pass model."""

    model: onnx.ModelProto
    side: SideBySide | None = None  # its verified timing against the original (None: it is the original)
    message: str = ""


def assemble(ctx, tree: PartitionTree, plans: dict, skeleton: onnx.ModelProto, reference: Mapping[str, np.ndarray],
             budget: float, allow_slower: bool, say: Callable[[str], None], base: Base | None = None) -> Assembly:
    """Merge the confirmed leaf rewrites and verify them (the loop then tries whole-model
    alternatives and model-level passes on the result)."""
    base = base or Base(skeleton)
    return _assemble_leaves(ctx, tree, plans, skeleton, reference, budget, allow_slower, say, base)


def with_model_passes(ctx, assembly: Assembly, skeleton: onnx.ModelProto) -> Assembly:
    """Try each model-level pass (session options in metadata) on the chosen model, side by side.

    Each is kept only when faster than the model without it beyond the A/A noise; the
    result is then timed against the original once more, independently (a winner picked
    among several tries must be confirmed by a run that did not pick it), so the
    reported speedup is always original vs final.
    """
    from adaptopt.passes.base import PassContext, applies_guarded
    model, changed = assembly.model, False
    pass_ctx = PassContext(target=ctx.config.target)
    for p in ctx.model_passes:
        if ctx.expired():
            break
        ok, error = applies_guarded(p, model, pass_ctx)
        if error:
            assembly.events.append({"event": "model_pass", "pass": p.name, "error": error})
        if not ok:
            continue
        candidate = p.apply(model, pass_ctx).model
        side = timed(ctx, model, candidate)
        assembly.events.append({"event": "model_pass", "pass": p.name, **side.to_dict(), "kept": side.significant()})
        if side.significant():
            model, changed = candidate, True
    final = confirmed(ctx, assembly, skeleton, model, "final") if changed else None
    if final is None:
        return assembly
    from adaptopt.runtime import model_session_config
    return Assembly(model, True, assembly.validation, final, assembly.accepted, assembly.events,
                    f"verified speedup {final.describe()} with the session options "
                    f"{model_session_config(model)} in the model's ort_config: ONNX Runtime does not read these "
                    "from the model, set them on your SessionOptions", assembly.leaf_models)


def confirmed(ctx, assembly: Assembly, skeleton: onnx.ModelProto, model: onnx.ModelProto, attempt: str,
              beat: float = 1.0) -> SideBySide | None:
    """``model`` (picked among several tries) against the original once more, in a run that
    did not pick it, recorded in ``assembly.events``; the timing when it is faster beyond
    the noise and than ``beat`` (a verified speedup), else None."""
    final = timed(ctx, skeleton, model, rounds=20, purpose=":confirm")
    kept = final.significant() and final.verified_speedup > beat
    assembly.events.append({"event": "side_by_side", "attempt": attempt, **final.to_dict(), "kept": kept})
    return final if kept else None


NO_LEAF_KEPT = "no subgraph rewrite was confirmed faster and passed the end-to-end checks"


def _assemble_leaves(ctx, tree: PartitionTree, plans: dict, skeleton: onnx.ModelProto,
                     reference: Mapping[str, np.ndarray], budget: float, allow_slower: bool,
                     say: Callable[[str], None], base: Base) -> Assembly:
    accepted = {}
    events: list[dict] = []
    for sid in sorted(plans):
        if not is_candidate(plans[sid]):
            continue
        check = confirm_leaf(ctx, plans[sid])
        events.append({"event": "confirm_leaf", "leaf": sid, "sequence": list(plans[sid].result.sequence),
                       **check.to_dict(), "kept": check.significant(MIN_LEAF_GAIN)})
        if check.significant(MIN_LEAF_GAIN):
            accepted[sid] = plans[sid].result.sequence
    if not accepted:  # (the leaves are not even extracted: unsearched, their tensors may be untyped)
        return _fallback(base, skeleton, ctx, reference, events, NO_LEAF_KEPT)
    leaves = tree.leaves()
    originals = {s.id: extract_range(ctx.index, s.start, s.stop, name=f"sg_{s.id}") for s in leaves}

    def build(chosen: dict[str, tuple[str, ...]]) -> tuple[onnx.ModelProto, dict[str, onnx.ModelProto]]:
        models = {s.id: (plans[s.id].env.step(chosen[s.id]).model if s.id in chosen else originals[s.id])
                  for s in leaves}
        return merge_for(skeleton, [models[s.id] for s in leaves]), models

    def lossy(chosen) -> bool:
        return any(plans[sid].env.is_lossy(seq) for sid, seq in chosen.items())

    # (1) + (2) accuracy, at the configured shapes and at other sizes of dynamic dims
    def check(chosen) -> tuple[Validation, onnx.ModelProto, dict]:
        model, models = build(chosen)
        tolerance = budget if lossy(chosen) else 0.0
        return check_everywhere(skeleton, model, ctx.feeds, reference, ctx.config, tolerance), model, models

    validation, candidate, models = check(accepted)
    if not validation.ok:
        events.append({"event": "rollback", "why": validation.reason, "leaves": "searching for the culprits"})
        say(f"end-to-end check failed ({validation.reason[:200]}); keeping only rewrites that pass together")
        order = sorted(accepted, key=lambda sid: (-leaf_gain(plans[sid]), sid))
        accepted, dropped = accurate_subset(order, accepted, lambda chosen: check(chosen)[0].ok)
        events.append({"event": "rollback", "why": "fails the end-to-end check", "leaves": dropped})
        if accepted:
            validation, candidate, models = check(accepted)
    if not accepted:
        return _fallback(base, skeleton, ctx, reference, events, NO_LEAF_KEPT)
    # (3) speed, side by side
    for attempt in range(MAX_SPEED_ROLLBACKS + 1):
        side = timed(ctx, skeleton, candidate)
        events.append({"event": "side_by_side", "attempt": attempt, **side.to_dict()})
        if side.significant() or allow_slower:
            return Assembly(candidate, True, validation, side, dict(accepted), events,
                            kept_message(side, side.significant()), models)
        if len(accepted) <= 1 or attempt == MAX_SPEED_ROLLBACKS:
            break
        weakest = min(accepted, key=lambda sid: (leaf_gain(plans[sid]), sid))
        events.append({"event": "rollback", "why": f"end-to-end speedup {side.speedup:.3f}x not above noise",
                       "leaves": [weakest]})
        del accepted[weakest]
        validation, candidate, models = check(accepted)
        if not validation.ok:
            break
    return _fallback(base, skeleton, ctx, reference, events, "the merged subgraph rewrites were not faster end to "
                     "end (beyond the A/A noise)")


def accurate_subset(order: list[str], accepted: dict, passes_check: Callable[[dict], bool]) -> tuple[dict, list]:
    """Add rewrites one at a time (best first), keeping each only while the whole model passes."""
    kept: dict = {}
    dropped = []
    for sid in order:
        trial = {**kept, sid: accepted[sid]}
        if passes_check(trial):
            kept = trial
        else:
            dropped.append(sid)
    return kept, dropped


def merge_for(skeleton: onnx.ModelProto, leaf_models: list[onnx.ModelProto]) -> onnx.ModelProto:
    merged = merge_models(skeleton, leaf_models)
    if dynamic_inputs(skeleton):  # static shapes inferred at the pinned sizes must not constrain other sizes
        del merged.graph.value_info[:]
    return merged


def _fallback(base: Base, skeleton, ctx, reference, events, why: str) -> Assembly:
    """No leaf rewrite survived: the verified pre-pass model if there is one, else the original."""
    if base.side is not None:
        validation = check_outputs(base.model, ctx.feeds, reference, ctx.config, 0.0)
        return Assembly(base.model, True, validation, base.side, {}, events,
                        f"{base.message}; {why}, so only the whole-model exact passes are applied")
    return original_written(skeleton, ctx.feeds, ctx.config, why, events)


def original_written(skeleton: onnx.ModelProto, feeds: Mapping[str, np.ndarray], config: Config, why: str,
                     events: list | None = None) -> Assembly:
    """The input itself is the output: its latency, and no difference (run again at level
    "all" against the reference, it showed ORT's own optimizations, 3e-6 on an encoder, as
    if they were ours)."""
    median = interleaved_medians({"original": skeleton}, feeds, config.target, rounds=5)["original"]
    side = SideBySide(median, median, median, 5)
    validation = Validation(True, "exact", config.accuracy.exact_tolerance, 0.0, 0.0, 1.0)
    return Assembly(skeleton, False, validation, side, {}, events or [], f"{why}; the output is the original model")


def check_outputs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                  config: Config, budget: float) -> Validation:
    try:
        outputs = run(make_session(model, config.target, level="all"), feeds)
    except ort_errors() as exc:
        return Validation(False, "exact", 0.0, math.inf, math.inf, 0.0, f"onnxruntime: {ort_error_line(exc)}")
    return compare(reference, outputs, config.accuracy.exact_tolerance, budget)


def other_shape_candidates(skeleton: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
                           ) -> Iterator[dict[str, np.ndarray]]:
    """Feeds at other sizes of the dynamic dims, to try in order (:func:`_sized_candidates`)."""
    for _moved_names, candidate in _sized_candidates(skeleton, feeds):
        yield candidate


def _sized_candidates(skeleton: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
                      ) -> Iterator[tuple[frozenset[str], dict[str, np.ndarray]]]:
    """(the named dims moved, feeds): every dim moved (1 -> 2, n -> n // 2), then each named
    dim alone, then every dim one larger, then each two named dims one larger together.
    Dims tied by arithmetic break the first: a KV-cache decoder's mask is past + seq long,
    and past 0 / seq 8 / mask 8 became 1 / 4 / 4, which the original refuses; moving
    ``batch`` alone still runs, and past and mask one larger together (0 / 8 / 8 -> 1 / 8 / 9)."""
    dynamic = dynamic_inputs(skeleton)
    if not dynamic:
        return
    inputs = [vi for vi in model_inputs(skeleton) if vi.name in dynamic]
    names = list(dict.fromkeys(d.dim_param for vi in inputs for d in vi.type.tensor_type.shape.dim if d.dim_param))
    every = frozenset(names)
    yield every, _moved(inputs, feeds, lambda name: True)
    if len(names) < 2:
        return
    for name in names:
        yield frozenset({name}), _moved(inputs, feeds, lambda dim_name, name=name: dim_name == name)
    yield every, _moved(inputs, feeds, lambda name: True, grow=True)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            pair = frozenset({first, second})
            yield pair, _moved(inputs, feeds, lambda dim_name, pair=pair: dim_name in pair, grow=True)


def _moved(inputs: list, feeds: Mapping[str, np.ndarray], moves: Callable[[str], bool],
           grow: bool = False) -> dict[str, np.ndarray]:
    """``feeds`` with the dynamic dims that ``moves(dim_param)`` at another size (unnamed ones
    move with every dim): one larger when ``grow``, else 1 -> 2 and n -> n // 2; each value
    tiled/cropped from the reference feed, so its range stays."""
    out = dict(feeds)
    for vi in inputs:
        value = feeds[vi.name]
        dims = vi.type.tensor_type.shape.dim
        shape = []
        for i, d in enumerate(value.shape):
            fixed = i < len(dims) and dims[i].HasField("dim_value") and dims[i].dim_value > 0
            moving = not fixed and moves(dims[i].dim_param if i < len(dims) else "")
            other = d + 1 if grow else 2 if d == 1 else max(1, d // 2)
            shape.append(other if moving else d)
        if value.size == 0:  # an empty feed (a zero-length past, say) has no values to tile
            out[vi.name] = np.zeros(shape, value.dtype)
            continue
        idx = tuple(np.arange(n) % max(value.shape[i], 1) for i, n in enumerate(shape))
        out[vi.name] = value[np.ix_(*idx)] if value.ndim else value
    return out


def other_size_check(skeleton: onnx.ModelProto, feeds: Mapping[str, np.ndarray], config: Config
                     ) -> tuple[dict | None, bool]:
    """The first other-size feeds rewrites are checked at (leaves are captured at them), and
    whether the original runs there (False: no size tried works, and only the configured
    shapes are checked)."""
    sizes = _other_shape_references(skeleton, feeds, config)
    return (sizes[0][0] if sizes else None), bool(sizes)


_per_run: dict = {}  # (what, model digest, feeds digest, target) -> the value: the last run's only


def _remembered(what: str, skeleton: onnx.ModelProto, feeds: Mapping[str, np.ndarray], config: Config,
                compute: Callable[[], object]):
    """``compute()`` once per run: a run checks many candidates against the same original,
    which is run on the extra feeds once. Remembered by content, and only the last run's,
    so no user model stays alive in a module global after a run."""
    key = (what, model_digest(skeleton), _feeds_digest(feeds), config.target)
    if key not in _per_run:
        if any(k[1:] != key[1:] for k in _per_run):
            _per_run.clear()
        _per_run[key] = compute()
    return _per_run[key]


def _other_shape_references(skeleton: onnx.ModelProto, feeds: Mapping[str, np.ndarray], config: Config
                            ) -> list[tuple[dict, dict]]:
    """(other-size feeds, the original's outputs on them) for sizes the original runs at,
    together moving every named dynamic dim (a size that moves no dim not yet moved is not
    tried); empty when the model is static or runs at no size tried. A GPT-2 decoder step
    optimized at past 0 was checked with only its batch moved: a fold of the causal mask
    baked in seq and past, and the written model ran at no other seq or past."""
    def compute():
        sizes, covered, session = [], frozenset(), None
        for moved, candidate in _sized_candidates(skeleton, feeds):
            if sizes and moved <= covered:
                continue
            try:
                session = session or make_session(skeleton, config.target, level="all")
                sizes.append((candidate, run(session, candidate)))
            except ort_errors():
                continue
            covered |= moved
        return sizes
    return _remembered("other sizes", skeleton, feeds, config, compute)


def _feeds_digest(feeds: Mapping[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(feeds):
        value = np.ascontiguousarray(feeds[name])
        h.update(repr((name, value.dtype.str, value.shape)).encode())
        h.update(value.tobytes())
    return h.hexdigest()


HELD_OUT_DRAWS = 3  # fresh seeded inputs (seeds 1..3) that a lossy candidate must also pass


def check_everywhere(skeleton: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                     reference: Mapping[str, np.ndarray], config: Config, budget: float = 0.0) -> Validation:
    """Outputs at the configured shapes, then (with an accuracy ``budget``) on held-out
    draws, then at other sizes of the dynamic dims.

    A lossy model passed on the one reference input and missed its budget on fresh inputs
    from the same distribution (a Whisper-style encoder: 0.99951 on the reference, 0.9975
    on 4 of 30 fresh draws): the budget must hold on ``HELD_OUT_DRAWS`` more, and the
    result reported is the worst of them. Exact rewrites are checked on the reference
    inputs only (they compute the same function; one more session per step on a big model).
    """
    result = check_outputs(candidate, feeds, reference, config, budget)
    if not result.ok:
        return result
    if budget > 0:
        for i, (draw, expected) in enumerate(_held_out_reference(skeleton, feeds, config)):
            held = check_outputs(candidate, draw, expected, config, budget)
            if not held.ok:
                return replace(held, reason=f"on held-out input {i + 1} of {HELD_OUT_DRAWS}: {held.reason}")
            result = held if held.min_cosine < result.min_cosine else result
    other = check_other_shapes(skeleton, candidate, feeds, config, budget)
    return result if other.ok else other


def _held_out_reference(skeleton: onnx.ModelProto, feeds: Mapping[str, np.ndarray], config: Config) -> list:
    """Fresh seeded inputs of the configured shapes and fills (not the reference input, not the
    calibration draws) with the original's outputs on them; none with ``inputs_file`` (real
    inputs: a generated draw would not be one)."""
    if config.inputs_file:
        return []

    def compute():
        from adaptopt.graph.capture import make_inputs
        session = make_session(skeleton, config.target, level="all")
        pinned = config.replace(inputs={name: replace(config.inputs.get(name, InputSpec()), shape=value.shape)
                                        for name, value in feeds.items()})
        draws = [make_inputs(skeleton, pinned, seed=seed) for seed in range(1, HELD_OUT_DRAWS + 1)]
        return [(draw, run(session, draw)) for draw in draws]
    return _remembered("held out", skeleton, feeds, config, compute)


def check_other_shapes(skeleton: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                       config: Config, budget: float = 0.0) -> Validation:
    """A rewrite must not specialise a dynamic model to the profiled shapes (same tolerance
    or budget), at each size of :func:`_other_shape_references`."""
    result = Validation(True, "exact", 0.0, 0.0, 0.0, 1.0)  # static, or the original runs at no other size
    for alt, reference in _other_shape_references(skeleton, feeds, config):
        result = check_outputs(candidate, alt, reference, config, budget)
        if not result.ok:
            return Validation(False, result.mode, result.threshold, result.max_abs_diff, result.max_relative_diff,
                              result.min_cosine, f"at other input sizes: {result.reason}")
    return result


def cached_side_by_side(cache, config: Config, original: onnx.ModelProto, candidate: onnx.ModelProto,
                        feeds: Mapping[str, np.ndarray], rounds: int = 15, purpose: str = "",
                        settle_gains: bool = True, max_seconds: float = 60.0,
                        more_until: Deadline | None = None, apart_in_budget: bool = False,
                        floor: float = MIN_MODEL_GAIN, apart_from: float = 1.0) -> SideBySide:
    """Side-by-side timing, cached by both models' digests (same seed + cache => same decision).

    A different ``purpose`` is a separate, independent measurement of the same pair
    (a confirmation must not read back the run it confirms). ``settle_gains``: see
    :func:`steady_side_by_side` (off for callers that only ask whether it is slower); with
    it, a gain of 1-3% is also timed apart (:func:`settle_small_gain`; ``more_until``: see
    :func:`timed_apart`; ``apart_from``: a speedup under 1 down to which it is timed apart too)."""
    target = config.target
    key = cache.key(pair_key(original, candidate, feeds), (), kind=f"side-by-side{purpose}")
    entry = cache.get(key, original_ms=(int, float), candidate_ms=(int, float), aa_ms=(int, float), rounds=int)
    kind = apart_kind(config.profiling)
    if entry is not None:
        pairs = entry.get("apart")
        ms = entry.get("apart_ms")
        side = SideBySide(entry["original_ms"], entry["candidate_ms"], entry["aa_ms"], entry["rounds"],
                          apart=tuple(pairs) if isinstance(pairs, list) else None,
                          apart_ms=tuple(ms) if isinstance(ms, list) and len(ms) == 2 else None)
        if side.apart is not None and entry.get("apart_kind") != kind:
            # pairs timed apart another way (other pairs or seconds, one process after the other:
            # 5-6x noisier, or without their latencies), written by an earlier version: time them again
            side = replace(side, apart=None, apart_ms=None)
        elif side.apart is not None or not (settle_gains and side.needs_apart(floor, apart_from)):
            return side
    else:
        side = steady_side_by_side(original, candidate, feeds, target, rounds, settle_gains=settle_gains,
                                   max_seconds=max_seconds)
    if settle_gains:
        side = settle_small_gain(side, cache, config, original, candidate, feeds, more_until, apart_in_budget, floor,
                                 apart_from)
    cache.put(key, original_ms=side.original_ms, candidate_ms=side.candidate_ms, aa_ms=side.aa_ms, rounds=side.rounds,
              apart=None if side.apart is None else list(side.apart),
              apart_ms=None if side.apart_ms is None else list(side.apart_ms), apart_kind=kind)
    return side


def timed_apart(cache, config: Config, original: onnx.ModelProto, candidate: onnx.ModelProto,
                feeds: Mapping[str, np.ndarray], more_until: Deadline | None = None,
                in_budget: bool = False) -> tuple[ApartPair, ...] | None:
    """:func:`verify.apart` with the config's pairs and seconds, another batch while the
    pairs lean to a gain without settling it (up to ``APART_LOOKS``, ``APART_MAX_S`` in
    all); cached by both models' digests when ``cache`` is given. None when
    ``profiling.apart_pairs`` is 0.

    ``more_until`` (the run's ``--budget``): the first batch always runs (without it no
    gain is confirmed), later batches only before it expires and within what it leaves;
    ``in_budget`` (a leaf's confirmation, the one caller that sets it): the first batch too
    (none when it has expired: not confirmed), and another batch only while the median pair
    gains over ``MIN_APART_GAIN``. Not cached when the budget cut it short."""
    profiling = config.profiling
    if not profiling.apart_pairs:
        return None
    key = cache.key(pair_key(original, candidate, feeds), (), kind=apart_kind(profiling)) if cache is not None else None
    entry = cache.get(key, pairs=list) if key else None
    if entry is not None and all(isinstance(p, list) and len(p) == 3 for p in entry["pairs"]):
        return tuple(ApartPair(*p) for p in entry["pairs"])
    pairs: tuple[ApartPair, ...] = ()
    cut = False  # the budget, not the verdict, ended the batches: a longer run must time them again
    # a leaf's gain is one leaf's: looking again at any median gain took roberta's 4 leaves
    # 64 pairs in a run of 256 s (make bench); the pre-pass and the written model look again at any
    lean = MIN_APART_GAIN if in_budget else 0.0
    deadline = time.perf_counter() + APART_MAX_S
    for look in range(APART_LOOKS):  # another batch while the pairs lean to a gain but do not settle it
        left = deadline - time.perf_counter()
        if (look or in_budget) and more_until is not None and more_until.remaining() < left:
            left, cut = more_until.remaining(), True
        if left <= 0:
            break
        pairs += apart(original, candidate, feeds, config.target, profiling.apart_pairs, profiling.apart_seconds,
                       max_seconds=left)
        if not worth_another_look([p.ratio for p in pairs], lean):
            cut = False
            break
    if key and not cut:
        cache.put(key, pairs=[p.to_list() for p in pairs])
    return pairs


def apart_kind(profiling) -> str:
    """The cache kind of pairs timed apart: their number, their seconds and the method
    ("turns": the two processes take turns in slices; pairs timed one process after the
    other were 5-6x noisier and are not read back as these; "-ms": with both models'
    latencies, which a verified speedup timed apart reports)."""
    return f"apart{profiling.apart_pairs}x{profiling.apart_seconds:g}s-turns-ms"


def settle_small_gain(side: SideBySide, cache, config: Config, original: onnx.ModelProto,
                      candidate: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                      more_until: Deadline | None = None, apart_in_budget: bool = False,
                      floor: float = MIN_MODEL_GAIN, apart_from: float = 1.0) -> SideBySide:
    """``side`` with its pairs timed apart when its gain is one of 1-3%, or inside the noise
    (:meth:`SideBySide.needs_apart`; down to ``apart_from`` when that is under 1)."""
    if not side.needs_apart(floor, apart_from):
        return side
    return with_pairs(side, timed_apart(cache, config, original, candidate, feeds, more_until, apart_in_budget))


def gate_apart(ctx, assembly: Assembly, skeleton: onnx.ModelProto, base: Base | None,
               reference: Mapping[str, np.ndarray], allow_slower: bool) -> Assembly:
    """The model to be written must be faster timed apart too (:func:`verify.apart`: each
    model alone in fresh processes, as a user runs it), else the verified pre-pass model
    (when it is faster apart), else the original. In one process the merged convnext
    measured 1.059x against the original, timed apart 1.007x: interleaved sessions share
    caches and a thread pool, and that favoured some rewrites by 3-5%."""
    if not assembly.improved or allow_slower or not ctx.config.profiling.apart_pairs:
        return assembly
    events = list(assembly.events)
    tries = [("result", assembly)]
    if base is not None and base.side is not None and base.model is not assembly.model:
        tries.append(("pre-pass", None))
    first = None
    for label, candidate in tries:
        if candidate is None:
            candidate = _fallback(base, skeleton, ctx, reference, [], "")
        side = with_pairs(candidate.side, timed_apart(ctx.cache, ctx.config, skeleton, candidate.model, ctx.feeds,
                                                      ctx.run_deadline))
        first = first or side
        events.append({"event": "timed_apart", "candidate": label, **side.to_dict()["apart"]})
        if side.agreed_apart():
            message = candidate.message.replace(candidate.side.describe(), side.describe()) if label == "result" \
                else f"{base.message.replace(base.side.describe(), side.describe())}; the result ({first.describe()}) " \
                     "was not confirmed timed apart, so only the whole-model exact passes are applied"
            return replace(candidate, side=side, events=events, message=message)
    few = len(first.apart) < 3
    return _fallback(Base(skeleton), skeleton, ctx, reference, events,
                     f"faster side by side in one process but not confirmed timed apart, in fresh processes as a "
                     f"user runs it ({first.describe()}"
                     + ("; too few pairs fit in the time cap: lower profiling.apart_seconds)" if few else ")"))


def pair_key(original: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> str:
    """What a timing of ``original`` against ``candidate`` on ``feeds`` is cached under: both
    models' digests and the feeds' shapes and dtypes (a model with dynamic dims keeps its
    digest at every --input-shape, and a batch-32 timing must not answer for batch 1)."""
    shapes = ",".join(f"{name}:{value.dtype}{list(value.shape)}" for name, value in sorted(feeds.items()))
    return f"{model_digest(original)}>{model_digest(candidate)}@{shapes}"


def timed(ctx, original: onnx.ModelProto, candidate: onnx.ModelProto,
          feeds: Mapping[str, np.ndarray] | None = None, rounds: int = 15, purpose: str = "",
          apart_in_budget: bool = False, floor: float = MIN_MODEL_GAIN) -> SideBySide:
    """``apart_in_budget``: even the first batch timed apart runs only within ``--budget`` (a
    leaf's confirmation: not confirmed, the leaf is not kept; on a 440 MB encoder the
    merge + verify stage, five leaves each timed apart in 8 pairs, took 230 s after the
    budget was spent). ``floor``: the gain the caller
    keeps without timing apart (a leaf's is ``MIN_LEAF_GAIN``: a leaf at 2.6% was timed
    apart, then kept on its one-process gain whatever the pairs said)."""
    return cached_side_by_side(ctx.cache, ctx.config, original, candidate,
                               ctx.feeds if feeds is None else feeds, rounds, purpose,
                               max_seconds=verify_seconds(ctx.run_deadline), more_until=ctx.run_deadline,
                               apart_in_budget=apart_in_budget, floor=floor)


MAX_VERIFY_S = 60.0  # one side-by-side timing after the search, at most
MIN_VERIFY_S = 10.0  # ...and at least, even past --budget: every verdict needs its rounds (>= 3)


def verify_seconds(run_deadline: Deadline | None) -> float:
    """How long one side-by-side timing after the search may take: ``MAX_VERIFY_S``, or
    what ``--budget`` leaves, but never less than ``MIN_VERIFY_S`` (a 440 MB encoder at
    80 ms a run spent 60 s per timing, several of them after its budget was spent)."""
    left = math.inf if run_deadline is None else run_deadline.remaining()
    return max(MIN_VERIFY_S, min(MAX_VERIFY_S, left))


MAX_AA_NOISE = 0.1  # an A/A gap above this (log ratio) means the machine was disturbed


def steady_side_by_side(original, candidate, feeds, target, rounds: int = 15, retries: int = 2,
                        settle_gains: bool = True, max_seconds: float = 60.0) -> SideBySide:
    """Side by side, re-timed with more rounds while the A/A pair disagrees implausibly (a
    disturbed run: replaced) or (``settle_gains``) the result is inconclusive (a gain the
    A/A noise hides: the longer run is pooled with it, so the verdict rests on all rounds)."""
    side = side_by_side(original, candidate, feeds, target, rounds=rounds, max_seconds=max_seconds)
    for attempt in range(retries):
        disturbed = side.noise > MAX_AA_NOISE
        if not disturbed and not (settle_gains and side.inconclusive()):
            break
        side = side_by_side(original, candidate, feeds, target, rounds=rounds * (attempt + 2), max_seconds=max_seconds,
                            earlier=None if disturbed else side)
    return side


def verify_candidate(model, skeleton, candidate, feeds, reference, config, budget, allow_slower) -> Assembly:
    """The fixed-sequence path: one whole-model candidate, same checks, no per-leaf rollback."""
    validation = check_everywhere(skeleton, candidate, feeds, reference, config, budget)
    if not validation.ok:
        return Assembly(skeleton, False, validation, None, {}, [{"event": "rejected", "why": validation.reason}],
                        f"the pass sequence changed the outputs ({validation.reason}); the output is the original")
    side = steady_side_by_side(skeleton, candidate, feeds, config.target)
    if side.significant() or side.needs_apart():
        side = with_pairs(side, timed_apart(None, config, skeleton, candidate, feeds))
    events = [{"event": "side_by_side", **side.to_dict()}]
    faster = side.significant() and (side.apart is None or side.agreed_apart())
    if faster or allow_slower:
        return Assembly(candidate, True, validation, side, {}, events, kept_message(side, faster))
    return Assembly(skeleton, False, validation, side, {}, events,
                    f"the pass sequence was not faster ({side.describe()}); "
                    "the output is the original (use --allow-slower to keep it)")


def kept_message(side: SideBySide, faster: bool) -> str:
    """What a kept result says: verified faster, or kept only because --allow-slower asks
    (a 0.754x model was written as a 'verified speedup 0.754x')."""
    if faster:
        return f"verified speedup {side.describe()}"
    return f"kept as --allow-slower asks, not verified faster: {side.describe()}"


def headline(assembly: Assembly) -> tuple[float, float | None, float | None]:
    """(speedup, original ms, output ms) a run reports: the written model's verified timing
    (:attr:`SideBySide.verified_speedup`); 1.0 and the original's latency twice when the
    original is written."""
    side = assembly.side
    if side is None:
        return 1.0, None, None
    original_ms, candidate_ms = side.verified_ms
    if not assembly.improved:
        return 1.0, original_ms, original_ms
    return side.verified_speedup, original_ms, candidate_ms


def finalize(assembly: Assembly, report: dict, tree: PartitionTree | None):
    from adaptopt.adapt.loop import OptimizeResult
    speedup, original_ms, output_ms = headline(assembly)
    latency = {"original": original_ms, "optimized": output_ms}
    accuracy = {"max_abs_diff": assembly.validation.max_abs_diff, "min_cosine": assembly.validation.min_cosine}
    return OptimizeResult(assembly.model, assembly.improved, speedup, latency, accuracy, report, tree,
                          assembly.leaf_models)
