"""Small end-to-end gains (1-3%) count only when they hold with each model timed alone
in a fresh process of its own (verify.apart), as a user runs the model."""

from __future__ import annotations

import math

import onnx
import pytest

from adaptopt.adapt import assemble, verify
from adaptopt.adapt.cache import MeasurementCache
from adaptopt.budget import Deadline
from adaptopt.adapt.verify import ApartPair, SideBySide, apart, apart_slices, load_alone, time_slice
from adaptopt.config import Config, ProfilingConfig, parse_config
from adaptopt.errors import InputError
from adaptopt.examples import build_resnet
from adaptopt.graph.capture import make_inputs

GAIN_2 = math.log(1.02)
CONVNEXT = (0.982, 1.0181, 1.0039, 1.0366, 1.0325, 1.0402, 0.9879, 1.0424)


def pairs(*ratios: float) -> tuple[float, ...]:
    return tuple(math.log(r) for r in ratios)


def timed_pairs(*ratios: float) -> tuple[ApartPair, ...]:
    """What ``verify.apart`` returns for pairs of these speedups (the original at 10 ms)."""
    return tuple(ApartPair(math.log(r), 10.0, 10.0 / r) for r in ratios)


def count_apart(monkeypatch, ratio: float = 1.02) -> list[int]:
    """``assemble.apart`` replaced: it records each batch's size and returns pairs of ``ratio``."""
    calls: list[int] = []

    def fake_apart(original, candidate, feeds, target, n, seconds, max_seconds):
        calls.append(n)
        return timed_pairs(*(ratio,) * n)
    monkeypatch.setattr(assemble, "apart", fake_apart)
    return calls


@pytest.mark.parametrize("candidate, aa, needs", [
    (9.80, 10.02, True),   # 1.020x, A/A 0.2%: beyond the noise, under the 3% floor
    (9.50, 10.02, False),  # 1.053x: above the floor, kept without timing apart
    (9.95, 10.0, True),    # 1.005x: the pairs apart decide (they need a median over 1%)
    (9.80, 10.3, True),    # 1.020x inside a 3% A/A band: the pairs apart decide
    (9.50, 10.3, True),    # 1.053x inside a 6% band
    (10.2, 10.0, False),   # slower: nothing to confirm
])
def test_which_gains_are_timed_apart(candidate, aa, needs):
    assert SideBySide(10.0, candidate, aa, 15).needs_apart() is needs


@pytest.mark.parametrize("ratios, agreed", [
    ((1.02,) * 8, True),
    ((1.02,) * 7 + (0.99,), True),
    # convnext's exact passes, timed apart: 2 of 8 pairs the other way (t = 2.17, p = 0.033 > 0.05 / 3
    # looks): one batch does not settle it, two such batches do (p = 0.004)
    (CONVNEXT, False),
    (CONVNEXT * 2, True),
    ((1.06, 0.95, 1.05, 0.96, 1.04, 0.97, 1.03, 1.02), False),  # median 1.025x, but the pairs scatter: p = 0.29
    ((1.02,) * 2, False),                    # too few pairs to judge
    ((1.005,) * 8, False),                   # every pair agrees, but by less than 1%
    ((), False),
])
def test_a_small_gain_counts_only_when_the_pairs_apart_agree(ratios, agreed):
    side = SideBySide(10.0, 9.8, 10.02, 15, apart=pairs(*ratios))
    assert side.agreed_apart() is agreed
    assert side.significant() is agreed
    assert not side.needs_apart()  # timed once: not again
    data = side.to_dict()["apart"]
    assert data["agreed"] is agreed and len(data["pairs"]) == len(ratios)
    assert ("timed apart" in side.describe()) is bool(ratios)


def test_pairs_apart_decide_a_gain_the_noise_of_one_process_hides():
    assert SideBySide(10.0, 9.8, 10.3, 15, apart=pairs(*(1.05,) * 8)).significant()
    assert not SideBySide(10.0, 9.8, 10.3, 15, apart=pairs(*(1.005,) * 8)).significant()

def test_pairs_apart_that_agree_outweigh_one_process_and_are_the_verified_speedup():
    """A user runs the model alone: when the pairs apart agree, they are what is reported
    (speedup and latencies), whatever one process said (roberta's pre-pass: 1.094x there in
    one run, 0.972x in the next)."""
    side = verify.with_pairs(SideBySide(10.0, 10.2, 10.0, 15), timed_pairs(*(1.05,) * 8))
    assert side.significant() and side.verified_speedup == pytest.approx(1.05)
    assert side.verified_ms == pytest.approx((10.0, 10.0 / 1.05))
    assert side.describe() == ("1.050x timed apart in 8 pairs of processes (agreed; 0.980x in one process, "
                               "A/A noise 0.000)")
    assert side.to_dict()["apart"]["optimized_ms"] == pytest.approx(10.0 / 1.05, abs=1e-4)
    # the latencies agree with the speedup even when each model's median over the pairs does
    # not (a 0.05 ms model: pairs at 1.10x, medians 0.0546 and 0.0590 ms)
    flipping = verify.with_pairs(SideBySide(10.0, 9.9, 10.0, 15), (ApartPair(math.log(1.1), 0.0546, 0.0590),) * 8)
    assert flipping.verified_ms == pytest.approx((0.0546, 0.0546 / 1.1))
    unsure = verify.with_pairs(SideBySide(10.0, 9.8, 10.0, 15), timed_pairs(*(1.005,) * 8))
    assert not unsure.significant() and unsure.verified_speedup == pytest.approx(10.0 / 9.8)
    assert unsure.verified_ms == (10.0, 9.8)


def test_zero_pairs_turns_timing_apart_off(monkeypatch):
    monkeypatch.setattr(assemble, "apart", lambda *a, **k: pytest.fail("timed apart with apart_pairs 0"))
    side = SideBySide(10.0, 9.8, 10.02, 15)
    config = Config(profiling=ProfilingConfig(apart_pairs=0))
    assert assemble.settle_small_gain(side, None, config, None, None, {}) is side
    assert assemble.timed_apart(None, config, None, None, {}) is None
    assert not side.significant()


def test_pairs_apart_run_each_model_in_its_own_process(monkeypatch):
    model = build_resnet(image=16, widths=(4,), blocks=1, classes=3)
    config = Config()
    feeds = make_inputs(model, config)
    monkeypatch.setattr(verify, "_ALONE", {})
    load_alone(model, feeds, config.target)
    assert time_slice(0.01, warm_seconds=0.0) > 0.0
    timed = apart(model, model, feeds, config.target, pairs=5, seconds=0.01)
    assert len(timed) == 5 and all(math.isfinite(p.ratio) and p.original_ms > 0 and p.candidate_ms > 0 for p in timed)


@pytest.mark.parametrize("seconds, slices", [(0.0, 4), (0.01, 4), (0.5, 6), (0.6, 6), (0.61, 8), (2.0, 20)])
def test_a_pair_alternates_an_even_number_of_slices(seconds, slices):
    """Each model leads as often as the other, and a pair has at least 4 slices."""
    assert apart_slices(seconds) == slices


def test_the_pair_never_runs_both_models_at_once(monkeypatch):
    """The two processes take turns, the order alternating slice by slice and pair by pair;
    a pair's ratio is the median of its slices' ratios (one disturbed slice does not move it)."""
    calls = []
    times = iter([10.0, 9.0, 9.0, 10.0, 10.0, 9.0, 9.0, 50.0] + [10.0, 10.0] * 4)

    class FakeWorker:
        def __init__(self, name, **_):
            self.name = name.split()[-1]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def start(self):
            return self

        def call(self, fn, *args, **kwargs):
            calls.append((self.name, fn.__name__))
            return next(times) if fn is time_slice else None

    import adaptopt.isolation
    monkeypatch.setattr(adaptopt.isolation, "Worker", FakeWorker)
    ratios = apart(None, None, {}, Config().target, pairs=2, seconds=0.4)
    timed = [name for name, fn in calls if fn == "time_slice"]
    assert timed == ["original", "candidate", "candidate", "original"] * 2 + \
        ["candidate", "original", "original", "candidate"] * 2
    assert ratios[0].ratio == pytest.approx(math.log(10 / 9)) and ratios[1].ratio == pytest.approx(0.0)
    assert ratios[0][1:] == (10.0, 9.0) and ratios[1][1:] == (10.0, 10.0)  # each model's median slice


def test_the_pairs_apart_are_cached_with_the_side_by_side(tmp_path, monkeypatch):
    """Same seed and cache, same decision: a rerun reads the pairs back instead of timing again."""
    model = build_resnet(image=16, widths=(4,), blocks=1, classes=3)
    config = Config(profiling=ProfilingConfig(apart_pairs=5))
    gray = SideBySide(10.0, 9.8, 10.02, 15)
    monkeypatch.setattr(assemble, "steady_side_by_side", lambda *a, **k: gray)
    calls = count_apart(monkeypatch)
    first = assemble.cached_side_by_side(MeasurementCache(tmp_path, "fp"), config, model, model, {})
    again = assemble.cached_side_by_side(MeasurementCache(tmp_path, "fp"), config, model, model, {})
    assert calls == [5]
    assert first.significant() and again.significant()
    assert again.apart == pytest.approx(first.apart)
    # a step that only asks "slower?" is never timed apart
    assemble.cached_side_by_side(MeasurementCache(tmp_path, "fp"), config, model, model, {}, purpose=":step",
                                 settle_gains=False)
    assert calls == [5]


@pytest.mark.parametrize("key, value", [("apart_pairs", 3), ("apart_pairs", -1), ("apart_pairs", 101),
                                        ("apart_pairs", "many"), ("apart_seconds", -1), ("apart_seconds", 11),
                                        ("apart_seconds", ".nan")])
def test_apart_settings_are_checked(key, value):
    """apart_seconds is capped at 10: a pair then takes ~40 s, so ~3 pairs fit in verify.APART_MAX_S."""
    with pytest.raises(InputError, match=key):
        parse_config(f"profiling:\n  {key}: {value}\n")


def test_timings_are_cached_per_input_shape_and_apart_setting():
    """A model with dynamic dims keeps its digest at every --input-shape: a batch-32 timing must
    not answer for batch 1, nor pairs of 0.05 s for pairs of 2 s."""
    import numpy as np
    model = build_resnet(image=16, widths=(4,), blocks=1, classes=3)
    one = {"x": np.zeros((1, 3, 16, 16), np.float32)}
    many = {"x": np.zeros((32, 3, 16, 16), np.float32)}
    assert assemble.pair_key(model, model, one) != assemble.pair_key(model, model, many)
    cache = MeasurementCache(None, "fp")
    for seconds in (0.05, 2.0):
        config = Config(profiling=ProfilingConfig(apart_pairs=5, apart_seconds=seconds))
        key = cache.key(assemble.pair_key(model, model, one), (), kind=assemble.apart_kind(config.profiling))
        cache.put(key, pairs=[p.to_list() for p in timed_pairs(*(1.2,) * 5)])
        assert assemble.timed_apart(cache, config, model, model, one) == timed_pairs(*(1.2,) * 5)


def test_cached_pairs_without_latencies_are_timed_again(monkeypatch):
    """Pairs cached as bare ratios (as before pairs carried latencies; that cache kind is no
    longer read, and a malformed entry under this one is not trusted) are timed again."""
    model = build_resnet(image=16, widths=(4,), blocks=1, classes=3)
    config = Config(profiling=ProfilingConfig(apart_pairs=5))
    cache = MeasurementCache(None, "fp")
    key = cache.key(assemble.pair_key(model, model, {}), (), kind=assemble.apart_kind(config.profiling))
    cache.put(key, pairs=[math.log(1.2)] * 5)
    calls = count_apart(monkeypatch, 1.05)
    assert assemble.timed_apart(cache, config, model, model, {}) == timed_pairs(*(1.05,) * 5)
    assert calls == [5]


def test_the_report_shows_the_pairs_apart():
    from adaptopt.report.optimize import render_markdown
    side = SideBySide(10.0, 9.8, 10.02, 15, apart=pairs(*(1.02,) * 7, 0.99))
    result = {"message": f"verified speedup {side.describe()}", "speedup": 1.02,
              "latency_ms": {"original": 10.0, "optimized": 9.8}, "aa_noise": 0.002,
              "apart": side.to_dict()["apart"], "accuracy": {"max_abs_diff": 0.0, "min_cosine": 1.0}}
    text = render_markdown({"model": {"name": "m"}, "result": result})
    assert "1.020x timed apart in 8 pairs of processes (agreed; 1.020x in one process" in text
    assert "Timed apart (each model alone in a fresh process, 8 pairs): 1.02x" in text
    assert "0.99x: agreed." in text


@pytest.mark.parametrize("t, df, p", [(1.895, 7, 0.05), (2.365, 7, 0.025), (6.314, 1, 0.05), (1.645, 10**5, 0.05),
                                      (0.0, 4, 0.5)])
def test_t_upper_tail_matches_the_tables(t, df, p):
    assert verify.t_upper_tail(t, df) == pytest.approx(p, abs=5e-4)


def _gate(monkeypatch, ratios: dict, allow_slower: bool = False):
    """gate_apart on a result (1.25x in one process) over a pre-pass base (1.05x), with the
    pairs apart of each candidate given by ``ratios`` (keyed "result" / "base")."""
    from types import SimpleNamespace

    from adaptopt.adapt.assemble import Assembly, Base, gate_apart
    from adaptopt.validate import Validation
    original = build_resnet(image=16, widths=(4,), blocks=1, classes=3)
    result_model, base_model = onnx.ModelProto(), onnx.ModelProto()
    result_model.CopyFrom(original)
    base_model.CopyFrom(original)
    result_model.graph.name, base_model.graph.name = "result", "base"
    config = Config(profiling=ProfilingConfig(apart_pairs=5))
    feeds = make_inputs(original, config)
    ctx = SimpleNamespace(config=config, cache=MeasurementCache(None, "fp"), feeds=feeds, run_deadline=None)
    monkeypatch.setattr(assemble, "apart", lambda o, c, *a, **k: timed_pairs(*(ratios[c.graph.name],) * 5))
    side = SideBySide(10.0, 8.0, 10.0, 15)
    ok = Validation(True, "exact", 0.0, 0.0, 0.0, 1.0)
    assembly = Assembly(result_model, True, ok, side, {}, [], f"verified speedup {side.describe()}")
    base_side = SideBySide(10.0, 9.5, 10.0, 15)
    base = Base(base_model, base_side, f"whole-model exact passes: verified speedup {base_side.describe()}")
    from adaptopt.runtime import make_session, run
    reference = run(make_session(original, config.target), feeds)
    return gate_apart(ctx, assembly, original, base, reference, allow_slower)


def test_the_written_model_must_be_faster_timed_apart_too(monkeypatch):
    kept = _gate(monkeypatch, {"result": 1.2, "base": 1.05})
    assert kept.improved and kept.model.graph.name == "result"
    assert kept.side.agreed_apart() and "1.200x timed apart in 5 pairs" in kept.message
    assert [e["candidate"] for e in kept.events if e["event"] == "timed_apart"] == ["result"]

    fallback = _gate(monkeypatch, {"result": 0.99, "base": 1.05})
    assert fallback.improved and fallback.model.graph.name == "base"
    assert "the result (1.250x (A/A noise 0.000), 0.990x timed apart in 5 pairs of processes (not confirmed)) " \
           "was not confirmed timed apart" in fallback.message
    assert "1.050x timed apart in 5 pairs of processes (agreed; 1.053x in one process" in fallback.message
    assert [e["agreed"] for e in fallback.events if e["event"] == "timed_apart"] == [False, True]

    original = _gate(monkeypatch, {"result": 1.005, "base": 0.98})
    assert not original.improved and original.model.graph.name != "result"
    assert "but not confirmed timed apart" in original.message and "the output is the original" in original.message

    told = _gate(monkeypatch, {"result": 0.9, "base": 0.9}, allow_slower=True)
    assert told.model.graph.name == "result" and told.side.apart is None


@pytest.mark.parametrize("batches, calls, agreed", [
    ([CONVNEXT, CONVNEXT], 2, True),                 # leaning after one batch, settled by the second
    ([(0.995,) * 5 + (1.02,) * 3], 1, False),        # the median pair loses: no second look
    ([(1.005,) * 5 + (0.99,) * 3] * 3, 3, False),    # the median pair gains < 1%: looked at again, never agreed
    ([(1.06, 0.95, 1.05, 0.96, 1.04, 0.97, 1.03, 1.02)] * 3, 3, False),  # still scattered after 3 looks
    ([(1.05,) * 7 + (1.04,)], 1, True),
])
def test_pairs_apart_that_lean_to_a_gain_get_another_batch(monkeypatch, batches, calls, agreed):
    """(The pre-pass and the model to be written: any median gain is looked at again.)"""
    model = build_resnet(image=16, widths=(4,), blocks=1, classes=3)
    config = Config(profiling=ProfilingConfig(apart_pairs=8))
    made = []

    def fake_apart(original, candidate, feeds, target, n, seconds, max_seconds):
        made.append(max_seconds)
        return timed_pairs(*batches[len(made) - 1])
    monkeypatch.setattr(assemble, "apart", fake_apart)
    got = assemble.timed_apart(None, config, model, model, {})
    assert len(made) == calls and len(got) == 8 * calls
    assert all(0 < s <= verify.APART_MAX_S for s in made)
    assert verify.apart_agrees([p.ratio for p in got]) is agreed


def test_a_leaf_looks_again_only_for_a_median_over_one_percent(monkeypatch):
    """A leaf's confirmation (timed within the budget) is one leaf's gain: a batch whose median
    pair gains under 1% ends it; over 1%, it is looked at again."""
    model = build_resnet(image=16, widths=(4,), blocks=1, classes=3)
    config = Config(profiling=ProfilingConfig(apart_pairs=8))
    for batch, calls in (((1.005,) * 5 + (0.99,) * 3, 1), (CONVNEXT, 2)):
        made = []
        monkeypatch.setattr(assemble, "apart", lambda *a, **k: made.append(1) or timed_pairs(*batch))
        assemble.timed_apart(None, config, model, model, {}, more_until=Deadline(600), in_budget=True)
        assert len(made) == calls


def test_weights_kept_on_disk_are_timed_apart_and_folded(tmp_path, monkeypatch):
    """The timing workers read weights kept on disk (models of 2 GiB or more) through the same
    checked files as the measure worker, and a pass reads such a weight's value from its file."""
    from adaptopt.graph import external
    from adaptopt.graph.io import load_model, save_model
    from adaptopt.passes.edit import GraphEditor
    monkeypatch.setattr(external, "KEEP_ON_DISK_BYTES", 1)  # treat this small model as huge
    path = tmp_path / "ext" / "m.onnx"
    save_model(build_resnet(image=16, widths=(16,), blocks=1, classes=3), path, external=True)
    config = Config()
    model = load_model(path, config)
    heavy = [t for t in model.graph.initializer if external.on_disk(t)]
    assert heavy, "the weights should be kept on disk"
    assert GraphEditor(model, "test").const(heavy[0].name).shape == tuple(heavy[0].dims)
    feeds = make_inputs(model, config)
    assert len(apart(model, model, feeds, config.target, pairs=5, seconds=0.01)) == 5


@pytest.mark.parametrize("speedup, agreed, wanted, code", [
    (2.27, True, "2.5", 3), (2.27, True, "2.0", 0),  # agreed apart: the verified speedup is the pairs'
    # kept by --allow-slower with pairs apart that did not agree (3.16x in one process, 2.27x
    # apart): the gate holds on the lower of the two
    (3.16, False, "2.5", 3), (3.16, False, "2.0", 0),
])
def test_require_speedup_holds_on_the_speedup_timed_apart_too(tmp_path, monkeypatch, speedup, agreed, wanted, code):
    from click.testing import CliRunner

    from adaptopt import api
    from adaptopt.adapt.loop import OptimizeResult
    from adaptopt.cli import cli
    from adaptopt.graph.io import save_model
    model = build_resnet(image=16, widths=(4,), blocks=1, classes=3)
    save_model(model, tmp_path / "m.onnx")
    report = {"result": {"message": "verified", "apart": {"speedup": 2.27, "pairs": [2.27] * 5, "agreed": agreed}}}
    fake = OptimizeResult(model=model, report=report, speedup=speedup, improved=True,
                          latency_ms={"original": 3.16, "optimized": 1.0}, accuracy={})
    monkeypatch.setattr(api, "optimize", lambda *a, **k: fake)
    done = CliRunner().invoke(cli, ["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"),
                                    "--require-speedup", wanted])
    assert done.exit_code == code, done.output
    if code:
        assert f"verified speedup 2.270x is below --require-speedup {wanted}" in done.output


def test_a_spent_budget_stops_timing_apart_after_the_first_batch(monkeypatch):
    """--budget bounds the second and third batches (a 5 s budget took 18.9 s when they ran
    anyway); the first always runs, or no small gain could ever be confirmed."""
    model = build_resnet(image=16, widths=(4,), blocks=1, classes=3)
    config = Config(profiling=ProfilingConfig(apart_pairs=8))
    made = []

    def fake_apart(original, candidate, feeds, target, n, seconds, max_seconds):
        made.append(max_seconds)
        return timed_pairs(*CONVNEXT)  # leaning to a gain: another batch would be worth it
    monkeypatch.setattr(assemble, "apart", fake_apart)
    assert len(assemble.timed_apart(None, config, model, model, {}, Deadline(0))) == 8 and len(made) == 1
    made.clear()
    assemble.timed_apart(None, config, model, model, {}, Deadline(7.0))
    assert len(made) == 2 and made[1] <= 7.0  # the second batch gets what the budget leaves


def test_timings_after_the_search_shrink_to_what_the_budget_leaves():
    assert assemble.verify_seconds(None) == assemble.MAX_VERIFY_S
    assert assemble.verify_seconds(Deadline(25.0)) == pytest.approx(25.0, abs=0.5)
    assert assemble.verify_seconds(Deadline(0)) == assemble.MIN_VERIFY_S  # spent: still enough rounds for a verdict


def test_a_leaf_confirmation_is_not_timed_apart_once_the_budget_is_spent(monkeypatch):
    model = build_resnet(image=16, widths=(4,), blocks=1, classes=3)
    config = Config(profiling=ProfilingConfig(apart_pairs=8))
    monkeypatch.setattr(assemble, "apart", lambda *a, **k: pytest.fail("timed apart past the budget"))
    cache = MeasurementCache(None, "fp")
    assert assemble.timed_apart(cache, config, model, model, {}, Deadline(0), in_budget=True) == ()
    monkeypatch.setattr(assemble, "apart", lambda *a, **k: timed_pairs(*CONVNEXT))  # a longer run times them
    assert len(assemble.timed_apart(cache, config, model, model, {}, Deadline(60), in_budget=True)) >= 8


def test_a_leaf_gain_above_the_leaf_floor_is_not_timed_apart():
    """A leaf is kept at MIN_LEAF_GAIN (2%): between 2% and 3% its pairs were timed apart and
    then ignored (the report showed a kept leaf 'not confirmed' apart)."""
    side = SideBySide(10.0, 10.0 / 1.026, 10.0, 10)  # 2.6%, noise 0
    assert side.needs_apart() and not side.needs_apart(assemble.MIN_LEAF_GAIN)
    assert side.significant(assemble.MIN_LEAF_GAIN)


def test_pairs_timed_apart_another_way_are_timed_again(tmp_path, monkeypatch):
    """A cache written before the pairs took turns (or with other pairs/seconds) holds pairs
    5-6x noisier: the side-by-side timing is read back, its pairs apart are timed again."""
    model = build_resnet(image=16, widths=(4,), blocks=1, classes=3)
    config = Config(profiling=ProfilingConfig(apart_pairs=5))
    cache = MeasurementCache(tmp_path, "fp")
    key = cache.key(assemble.pair_key(model, model, {}), (), kind="side-by-side")
    cache.put(key, original_ms=10.0, candidate_ms=9.8, aa_ms=10.02, rounds=15, apart=list(pairs(*(0.99,) * 8)))
    monkeypatch.setattr(assemble, "steady_side_by_side", lambda *a, **k: pytest.fail("re-timed in one process"))
    calls = count_apart(monkeypatch)
    side = assemble.cached_side_by_side(cache, config, model, model, {})
    assert calls == [5] and side.agreed_apart() and side.candidate_ms == 9.8
    again = assemble.cached_side_by_side(MeasurementCache(tmp_path, "fp"), config, model, model, {})
    assert calls == [5] and again.apart == pytest.approx(side.apart)  # this time the kind matches: read back


@pytest.mark.parametrize("slice_pair_s, kept", [(0.37, 6), (1.2, 2), (0.55, 6), (0.8, 4), (30.0, 2)])
def test_a_slow_model_gets_fewer_slices(slice_pair_s, kept):
    """At apart_seconds 0.5 a pair's nominal time is 2.2 s (6 slices of 0.083 s, each warmed
    0.1 s, for two models): two slices taking 0.37 s fit all 6, 1.2 s (a model slower than a
    slice) only 2."""
    assert verify.slices_that_fit(6, slice_pair_s, 0.5) == kept


def test_the_summary_reports_the_verified_speedup_and_its_latencies():
    """A result kept on pairs apart that agreed reports their speedup and latencies, and what
    one process measured beside them."""
    from adaptopt.adapt.assemble import Assembly, finalize
    from adaptopt.report.optimize import _result
    from adaptopt.validate import Validation
    side = verify.with_pairs(SideBySide(10.0, 9.9, 10.0, 15), timed_pairs(*(1.05,) * 8))
    assembly = Assembly(onnx.ModelProto(), True, Validation(True, "exact", 0.0, 0.0, 0.0, 1.0), side)
    result = finalize(assembly, {}, None)
    assert result.speedup == pytest.approx(1.05)
    assert result.latency_ms == pytest.approx({"original": 10.0, "optimized": 10.0 / 1.05})
    data = _result(assembly)
    assert data["speedup"] == pytest.approx(1.05) and data["speedup_in_process"] == pytest.approx(1.0101, abs=1e-4)
    assert data["latency_ms"]["optimized"] == pytest.approx(10.0 / 1.05, abs=1e-4)
    assert data["verified_by"] == "timed apart"


def test_a_cached_timing_that_needs_pairs_apart_gets_them(tmp_path, monkeypatch):
    """A side-by-side entry read back without pairs is timed apart when its caller's band
    asks for it (a pre-pass at 0.97x in one process: ``apart_from`` 0.95), not otherwise."""
    model = build_resnet(image=16, widths=(4,), blocks=1, classes=3)
    config = Config(profiling=ProfilingConfig(apart_pairs=5))
    cache = MeasurementCache(tmp_path, "fp")
    key = cache.key(assemble.pair_key(model, model, {}), (), kind="side-by-side")
    cache.put(key, original_ms=9.7, candidate_ms=10.0, aa_ms=9.7, rounds=15, apart=None,
              apart_kind=assemble.apart_kind(config.profiling))
    monkeypatch.setattr(assemble, "steady_side_by_side", lambda *a, **k: pytest.fail("re-timed in one process"))
    calls = count_apart(monkeypatch, 1.05)
    assert not assemble.cached_side_by_side(cache, config, model, model, {}).significant() and calls == []
    side = assemble.cached_side_by_side(cache, config, model, model, {}, apart_from=0.95)
    assert calls == [5] and side.agreed_apart() and side.verified_speedup == pytest.approx(1.05)
