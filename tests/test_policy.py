"""The tabular policy on synthetic environments with known rewards (no ONNX Runtime)."""

from __future__ import annotations

import itertools
import math

import pytest
from click.testing import CliRunner

from adaptopt.errors import InputError
from adaptopt.policy.qtable import QTable, epsilon_at, q_update
from adaptopt.policy.search import (
    Outcome,
    QSettings,
    RewardWeights,
    greedy_search,
    heuristic,
    oracle,
    q_learning,
    random_search,
    reward,
)
from adaptopt.policy.state import (
    STOP,
    State,
    dominant_family,
    encode,
    performance_bucket,
    size_bucket,
)


class SyntheticEnv:
    """Known multiplicative effects per pass, order-dependent where ``synergy`` says so.

    Time of a sequence = base * product of each pass's factor, where a pass's factor
    depends on whether its prerequisite ran before it. 'broken' always fails validation.
    """

    # listed worst-first, so an agent that just takes the first action does badly
    FACTORS = {"broken": 0.5, "layout": 1.02, "quant": 1.05, "fold": 0.9, "fuse": 0.8}
    CATEGORY = {"fold": "compute", "fuse": "compute", "quant": "compute", "layout": "memory", "broken": "compute"}

    def __init__(self, family: str = "conv", synergy: bool = True):
        self.family = family
        self.synergy = synergy
        self.measured: set[tuple[str, ...]] = set()

    def actions(self, seq):
        return [a for a in self.FACTORS if a not in seq]

    def time(self, seq) -> float:
        t = 10.0
        for i, a in enumerate(seq):
            factor = self.FACTORS[a]
            if self.synergy and a == "quant" and "fuse" in seq[:i]:
                factor = 0.5  # quantization pays off only after fusion
            t *= factor
        return t

    def evaluate(self, seq):
        self.measured.add(tuple(seq))
        valid = "broken" not in seq
        return Outcome(self.time(seq), valid, 0.0, "" if valid else "outputs differ")

    def state(self, seq):
        return State("m", "compute", self.family, "p1", seq[-1] if seq else "none")

    def category(self, action):
        return self.CATEGORY[action]

    @property
    def measurements(self):
        return len(self.measured)


def best_possible(env: SyntheticEnv, max_len: int) -> float:
    best = env.time(())
    for n in range(1, max_len + 1):
        for seq in itertools.permutations([a for a in env.FACTORS if a != "broken"], n):
            best = min(best, env.time(seq))
    return best


def test_q_update_is_the_bellman_step():
    assert q_update(0.0, 1.0, 2.0, 0.5, 0.9) == pytest.approx(0.5 * (1.0 + 0.9 * 2.0))
    assert q_update(1.0, 0.0, 0.0, 1.0, 0.0) == 0.0
    assert epsilon_at(0, 5, 0.9, 0.1) == 0.9 and epsilon_at(4, 5, 0.9, 0.1) == pytest.approx(0.1)


def test_reward_terms():
    before, after = Outcome(10.0, True, 100.0), Outcome(5.0, True, 50.0)
    assert reward(before, after, RewardWeights(0.0, 1.0)) == pytest.approx(math.log(2))
    assert reward(before, after, RewardWeights(0.1, 1.0)) == pytest.approx(math.log(2) - 0.1 * math.log(0.5))
    assert reward(before, Outcome(1.0, False), RewardWeights(0.0, 3.0)) == -3.0


def test_q_learning_converges_to_best_sequence():
    env = SyntheticEnv()
    table = QTable()
    settings = QSettings(epochs=60, learning_rate=0.5, discount=0.95, epsilon_start=1.0, epsilon_end=0.0,
                         max_sequence=3)
    [result] = q_learning([env], table, settings, seed=1)
    assert result.outcome.time_ms == pytest.approx(best_possible(env, 3))
    assert result.sequence[:2] == ("fuse", "quant") or set(result.sequence) == {"fold", "fuse", "quant"}
    assert "broken" not in result.sequence
    # the greedy policy itself (not just the best-seen fallback) learnt the order
    assert result.decisions[-1]["chosen_by"] == "greedy rollout"
    assert table.q(env.state(()).key, "broken") < 0  # failing pass learnt as bad


def test_learning_curve_improves():
    env = SyntheticEnv()
    settings = QSettings(epochs=40, epsilon_start=1.0, epsilon_end=0.0, max_sequence=3)
    [result] = q_learning([env], QTable(), settings, seed=3)
    first, last = result.curve[:10], result.curve[-10:]
    assert sum(last) / len(last) > sum(first) / len(first)


class TwoQuantizersEnv(SyntheticEnv):
    """Two first passes that both win big and exclude each other; the one listed first wins less."""

    FACTORS = {"static": 0.6, "noop": 1.0, "dynamic": 0.45}
    CATEGORY = {"static": "compute", "noop": "memory", "dynamic": "compute"}

    def actions(self, seq):
        return [a for a in self.FACTORS if a not in seq and not ({a, *seq} >= {"static", "dynamic"})]


def test_first_step_tries_every_pass_before_exploiting_one():
    """Without it, the first big win (static) is exploited forever and the bigger one never tried."""
    settings = QSettings(epochs=3, epsilon_start=0.0, epsilon_end=0.0, max_sequence=2, optimistic_init=0.1)
    env = TwoQuantizersEnv()
    [result] = q_learning([env], QTable(), settings, seed=0)
    assert result.sequence[0] == "dynamic"
    firsts = [d["action"] for d in result.decisions if d.get("state", "").endswith("|none")]
    assert firsts == ["static", "noop", "dynamic"]
    # a table that already knows every first pass (from a look-alike) goes straight to the best
    warm_env = TwoQuantizersEnv()
    [warm] = q_learning([warm_env], _trained(), settings, seed=0)
    assert warm.sequence[0] == "dynamic" and warm_env.measurements < env.measurements


def _trained() -> QTable:
    table = QTable()
    q_learning([TwoQuantizersEnv()], table, QSettings(epochs=3, epsilon_start=0.0, epsilon_end=0.0, max_sequence=2),
               seed=0)
    return table


class SynergyEnv(SyntheticEnv):
    """quant wins alone (0.7x) and more after fuse (0.45x); fuse alone barely (0.95x)."""

    FACTORS = {"quant": 0.7, "fuse": 0.95}
    CATEGORY = {"quant": "compute", "fuse": "compute"}

    def time(self, seq) -> float:
        t = 10.0
        for i, a in enumerate(seq):
            t *= 0.45 if a == "quant" and "fuse" in seq[:i] else self.FACTORS[a]
        return t


def test_the_pick_is_tried_behind_a_first_pass_that_won_alone():
    from adaptopt.policy.search import _prefixed_picks
    env = SynergyEnv()
    root = env.state(()).key
    table = QTable()
    table.update(root, "quant", math.log(1 / 0.7), None, (), 1.0, 0.9)
    table.update(root, "fuse", math.log(1 / 0.95), None, (), 1.0, 0.9)
    pick = (("quant",), env.evaluate(("quant",)), "greedy rollout", ("quant",))
    [(best, out, why, _)] = _prefixed_picks([env], [pick], table, 2, lambda: False)
    assert best == ("fuse", "quant") and out.time_ms == pytest.approx(4.5 * 0.95)
    assert why == "the pick behind a first pass that won alone"
    [(best, *_)] = _prefixed_picks([SynergyEnv()], [pick], table, 1, lambda: False)  # too long: not tried
    assert best == ("quant",)


def test_warm_start_needs_fewer_measurements():
    settings = QSettings(epochs=40, epsilon_start=1.0, epsilon_end=0.0, max_sequence=3)
    table = QTable()
    q_learning([SyntheticEnv()], table, settings, seed=0)
    warm_env, cold_env = SyntheticEnv(), SyntheticEnv()
    few = QSettings(epochs=2, epsilon_start=0.0, epsilon_end=0.0, max_sequence=3)
    [warm] = q_learning([warm_env], table, few, seed=0)
    [cold] = q_learning([cold_env], QTable(), few, seed=0)
    assert warm.outcome.time_ms == pytest.approx(best_possible(warm_env, 3))
    assert warm_env.measurements < 10
    assert cold.outcome.time_ms > warm.outcome.time_ms  # a cold greedy agent does not find it in 2 epochs


def test_qtable_file_round_trip(tmp_path):
    table = QTable()
    table.update("a|b", "fuse", 1.0, "a|c", ["stop"], 0.5, 0.9)
    table.update("a|b", STOP, 0.0, None, (), 0.5, 0.9)
    path = tmp_path / "q.json"
    table.save(path)
    loaded = QTable.load(path)
    assert loaded.values == table.values and loaded.visits == table.visits
    assert loaded.rows()[0] == {"state": "a|b", "action": "fuse", "q": 0.5, "visits": 1}


@pytest.mark.parametrize("content", ["not json", '{"format": "other"}',
                                     '{"format": "adaptopt-qtable", "version": 99}',
                                     '{"format": "adaptopt-qtable", "version": 1, "values": {"s": {"a": "x"}}}'])
def test_bad_qtable_is_input_error(tmp_path, content):
    path = tmp_path / "q.json"
    path.write_text(content)
    with pytest.raises(InputError):
        QTable.load(path)


def test_baselines_on_synthetic_env():
    env_oracle = SyntheticEnv()
    best = oracle(env_oracle, 3)
    assert best.outcome.time_ms == pytest.approx(best_possible(env_oracle, 3))
    greedy = greedy_search(SyntheticEnv(), 3)
    assert greedy.outcome.time_ms <= 10.0 * 0.8  # takes 'fuse' first
    rnd = random_search(SyntheticEnv(), budget=10, max_sequence=3, seed=0)
    assert rnd.measurements <= 11 and rnd.outcome.valid
    heur = heuristic(SyntheticEnv(), "compute", 3)
    assert all(SyntheticEnv.CATEGORY[a] == "compute" for a in heur.sequence)


def test_oracle_searches_whole_levels_within_its_limit():
    """The oracle goes as deep as its limit allows and never searches a level in part."""
    # 5 passes; 'broken' fails, so nothing is searched after it: 5 + 4*4 + 4*3*3 sequences
    full = oracle(SyntheticEnv(), 3)
    assert full.decisions == [{"depth": 3, "sequences": 5 + 16 + 36}]
    level_one = len(SyntheticEnv().actions(()))
    shallow = oracle(SyntheticEnv(), 3, limit=level_one + 15)  # level two (16) does not fit whole
    assert shallow.decisions == [{"depth": 1, "sequences": level_one}]
    assert len(shallow.sequence) == 1
    assert oracle(SyntheticEnv(), 3, limit=level_one - 1).decisions[0]["depth"] == 0


def test_state_encoding():
    assert size_bucket(3) == "xs" and size_bucket(1000) == "xl"
    assert performance_bucket(None) == "unknown" and performance_bucket(0.9) == "p3"
    assert dominant_family(["Conv", "Relu", "Reshape", "Reshape"]) == "conv"
    assert dominant_family(["Conv", "MatMul"], {"MatMul": 5.0, "Conv": 1.0}) == "matmul"
    state = encode(10, "memory", ["Add", "Mul"], 0.3)
    assert State.from_key(state.key) == state and state.after("fold").last_pass == "fold"


def test_policy_show_cli(tmp_path):
    from adaptopt.cli import cli
    table = QTable()
    table.update("s|m|conv|p1|none", "fuse", 0.25, None, (), 1.0, 0.9)
    table.save(tmp_path / "q.json")
    result = CliRunner().invoke(cli, ["policy", "show", str(tmp_path / "q.json")])
    assert result.exit_code == 0 and "fuse" in result.output and "0.25" in result.output
    result = CliRunner().invoke(cli, ["policy", "show", str(tmp_path / "missing.json")])
    assert result.exit_code == 2





def test_exact_validation_refuses_a_new_direction_on_small_outputs():
    """Small-valued outputs: a tiny absolute error can still change the output's direction."""
    import numpy as np

    from adaptopt.validate import compare
    ref = {"y": np.array([2e-4, 0.0], np.float32)}
    turned = compare(ref, {"y": np.array([1.2e-4, 0.9e-4], np.float32)}, 1e-4)  # each error < 1e-4
    assert not turned.ok and "cosine" in turned.reason
    assert compare(ref, {"y": ref["y"] * (1 + 1e-6)}, 1e-4).ok
    negligible = {"y": np.array([1e-9, -1e-9], np.float32)}
    assert compare(negligible, {"y": -negligible["y"]}, 1e-4).ok  # below the tolerance: nothing to point


def test_integer_outputs_are_compared_element_by_element():
    """Class and token ids are not approximations: a flipped id fails the exact check even
    among large ids (a relative 1e-4 would pass 50000 vs 50001), and with a budget the
    share of equal elements must reach it (the cosine of ids barely moves on a flip)."""
    import numpy as np

    from adaptopt.validate import compare
    ids = {"ids": np.arange(50000, 51000, dtype=np.int64)}
    flipped = ids["ids"].copy()
    flipped[7] += 1
    exact = compare(ids, {"ids": flipped}, 1e-4)
    assert not exact.ok and "integer output" in exact.reason
    assert compare(ids, {"ids": flipped}, 1e-4, budget=0.999).ok  # 999 of 1000 equal
    assert not compare(ids, {"ids": flipped}, 1e-4, budget=0.9999).ok
    top1 = {"cls": np.array([3], np.int64)}
    lossy = compare(top1, {"cls": np.array([4], np.int64)}, 1e-4, budget=0.99)
    assert not lossy.ok and "elements equal" in lossy.reason
    mask = {"m": np.array([True, False, True])}
    assert compare(mask, {"m": mask["m"].copy()}, 1e-4).ok


def test_unvisited_pairs_back_off_to_similar_states_and_survive_the_file(tmp_path):
    table = QTable(initial=0.1)
    table.update("s|compute|conv|p1|none", "fuse", 0.4, None, (), 1.0, 0.9)
    table.update("m|compute|conv|p2|none", "fuse", 0.2, None, (), 1.0, 0.9)
    table.update("m|compute|conv|p2|none", "layout", -0.3, None, (), 1.0, 0.9)
    # a new size and performance bucket, same bound / family / last pass: the mean of the look-alikes
    assert table.q("xl|compute|conv|p0|none", "fuse") == pytest.approx(0.3)
    assert table.q("xl|compute|conv|p0|none", "layout") == pytest.approx(-0.3)  # lost before: below STOP (0)
    # another bound: the family + last-pass level still answers
    assert table.q("xl|memory|conv|p0|none", "fuse") == pytest.approx(0.3)
    # nothing similar (other family, or other last pass): the optimistic initial value
    assert table.q("xl|compute|matmul|p0|none", "fuse") == 0.1
    assert table.q("s|compute|conv|p1|fuse", "layout") == 0.1
    # re-updating a visited pair moves the mean, it does not count the pair twice
    table.update("s|compute|conv|p1|none", "fuse", 0.0, None, (), 1.0, 0.9)
    assert table.q("xl|compute|conv|p0|none", "fuse") == pytest.approx(0.1)
    table.save(tmp_path / "q.json")
    loaded = QTable.load(tmp_path / "q.json")
    loaded.initial = 0.1
    assert loaded.q("xl|compute|conv|p0|none", "fuse") == pytest.approx(0.1)
    assert loaded.q("xl|compute|conv|p0|none", "layout") == pytest.approx(-0.3)


def test_starting_table_prefers_the_file_then_the_prior(tmp_path):
    from adaptopt.policy.prior import prior_path, starting_table
    own = QTable()
    own.update("s|compute|conv|p1|none", "fuse", 0.5, None, (), 1.0, 0.9)
    own.save(tmp_path / "own.json")
    table, origin = starting_table(str(tmp_path / "own.json"), "cpu", True)
    assert origin.startswith("file") and table.q("s|compute|conv|p1|none", "fuse") == 0.5
    table, origin = starting_table(str(tmp_path / "absent.json"), "cpu", True)
    assert prior_path("cpu") is not None, "the built-in prior ships with the package (make prior)"
    assert origin.startswith("built-in prior") and table.values
    assert set(table.meta["trained_on"]).isdisjoint({"resnet_small", "bert_small"})
    for device, use_prior in (("cpu", False), ("cuda", True)):
        table, origin = starting_table(None, device, use_prior)
        assert not table.values and "cold" in origin


def test_a_subgraph_also_tries_the_picks_of_its_look_alikes():
    """Two look-alike subgraphs: the first found fuse -> quant; the second's search stopped
    at a worse sequence. It also tries its look-alike's pick (one measurement) and keeps
    it when faster there too; a subgraph of another kind is not offered it."""
    from adaptopt.policy.search import _transfer_picks
    found, stuck, other = SyntheticEnv(), SyntheticEnv(), SyntheticEnv(family="matmul")
    picks = [(("fuse", "quant"), found.evaluate(("fuse", "quant")), "greedy rollout", ()),
             (("fold",), stuck.evaluate(("fold",)), "greedy rollout", ()),
             (("fold",), other.evaluate(("fold",)), "greedy rollout", ())]
    before = [env.measurements for env in (found, stuck, other)]
    out = _transfer_picks([found, stuck, other], picks, 3, lambda: False)
    assert out[1][0] == ("fuse", "quant") and out[1][2] == "the pick of a look-alike subgraph"
    assert stuck.measurements == before[1] + 1
    assert out[0][0] == ("fuse", "quant") and found.measurements == before[0] + 1  # tried fold, kept its own
    assert out[2][0] == ("fold",) and other.measurements == before[2]  # another kind: not offered
    assert _transfer_picks([found, stuck], picks[:2], 3, lambda: True)[1][0] == ("fold",)  # out of time: no new try


def test_a_look_alikes_pick_is_tried_without_the_passes_that_do_not_apply():
    from adaptopt.policy.search import _transfer_picks

    class NoFold(SyntheticEnv):
        def actions(self, seq):
            return [a for a in super().actions(seq) if a != "fold"]

    found, other = SyntheticEnv(), NoFold()
    picks = [(("fold", "fuse", "quant"), found.evaluate(("fold", "fuse", "quant")), "greedy rollout", ()),
             (("layout",), other.evaluate(("layout",)), "greedy rollout", ())]
    out = _transfer_picks([found, other], picks, 3, lambda: False)
    assert out[1][0] == ("fuse", "quant")  # fold does not apply there: tried without it, and faster
