"""Searching pass sequences for one subgraph: Q-learning and the baselines it must beat.

Everything here works against :class:`Environment`: apply a pass sequence to one
subgraph, get back a measured outcome. The real environment (``adapt.environment``)
rewrites, validates and times on the target; tests use a synthetic one with known
rewards. Every strategy reports how many distinct measurements it paid for, so they
can be compared at the same budget (``make bench SECTION=learning``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from adaptopt.policy.qtable import QTable, epsilon_at
from adaptopt.policy.state import STOP, State

Sequence_ = tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    time_ms: float
    valid: bool
    bytes: float = 0.0  # analytic bytes moved (for the bandwidth term); 0 when unknown
    reason: str = ""


class Environment(Protocol):
    def actions(self, sequence: Sequence_) -> list[str]:
        """Passes that apply after ``sequence`` (never one already in it)."""

    def evaluate(self, sequence: Sequence_) -> Outcome:
        """Apply ``sequence`` to the original subgraph, validate and time it (cached)."""

    def state(self, sequence: Sequence_) -> State:
        """The policy's view of the subgraph after ``sequence``."""

    def category(self, action: str) -> str:
        """compute | memory | hybrid."""

    @property
    def measurements(self) -> int:
        """Distinct sequences measured so far (cache hits are free)."""


@dataclass(frozen=True)
class RewardWeights:
    bandwidth_weight: float = 0.05
    failure_penalty: float = 1.0


def reward(before: Outcome, after: Outcome, weights: RewardWeights) -> float:
    """log speedup, minus a bandwidth term, or the failure penalty when validation failed."""
    if not after.valid:
        return -weights.failure_penalty
    r = math.log(before.time_ms / after.time_ms)
    if before.bytes > 0 and after.bytes > 0:
        r -= weights.bandwidth_weight * math.log(after.bytes / before.bytes)
    return r


@dataclass
class SearchResult:
    sequence: Sequence_
    outcome: Outcome
    baseline: Outcome
    measurements: int
    strategy: str
    curve: list[float] = field(default_factory=list)  # reward per epoch (Q-learning)
    decisions: list[dict] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.baseline.time_ms / self.outcome.time_ms


def best_seen(env: Environment, sequences: list[Sequence_]) -> tuple[Sequence_, Outcome]:
    """Lowest-time valid sequence among those measured (the empty one always qualifies)."""
    best: Sequence_ = ()
    best_out = env.evaluate(())
    for seq in sequences:
        out = env.evaluate(seq)
        if out.valid and out.time_ms < best_out.time_ms:
            best, best_out = seq, out
    return best, best_out


# ---------------------------------------------------------------- Q-learning
@dataclass(frozen=True)
class QSettings:
    epochs: int = 6
    learning_rate: float = 0.5
    discount: float = 0.9
    epsilon_start: float = 0.3
    epsilon_end: float = 0.0
    max_sequence: int = 4
    weights: RewardWeights = RewardWeights()
    optimistic_init: float = 0.0  # value of unvisited (state, action) pairs


def run_episode(env: Environment, table: QTable, settings: QSettings, epsilon: float,
                rng: random.Random, log: list[dict] | None = None,
                should_stop=lambda: False) -> tuple[float, Sequence_]:
    """One episode on one subgraph; returns (total reward, sequence reached). ``should_stop``
    (the time budget) is asked before each step: one step on a big subgraph takes seconds."""
    seq: Sequence_ = ()
    current = env.evaluate(seq)
    state = env.state(seq)
    total = 0.0
    failed: set[str] = set()
    for _ in range(settings.max_sequence):
        if should_stop():
            break
        actions = [a for a in env.actions(seq) if a not in failed] + [STOP]
        if not seq:  # the first step tries what no look-alike tried yet: one good first pass must not hide a better one
            actions = [a for a in actions if a != STOP and not table.known(state.key, a)] or actions
        action = table.choose(state.key, actions, epsilon, rng)
        if action == STOP:
            table.update(state.key, STOP, 0.0, None, (), settings.learning_rate, settings.discount)
            break
        outcome = env.evaluate(seq + (action,))
        r = reward(current, outcome, settings.weights)
        total += r
        if not outcome.valid:  # reverted: stay where we were, never try it again this episode
            failed.add(action)
            table.update(state.key, action, r, None, (), settings.learning_rate, settings.discount)
            _log(log, state, action, r, outcome)
            continue
        next_seq = seq + (action,)
        next_state = env.state(next_seq)
        next_actions = env.actions(next_seq) + [STOP]
        table.update(state.key, action, r, next_state.key, next_actions, settings.learning_rate, settings.discount)
        _log(log, state, action, r, outcome)
        seq, state, current = next_seq, next_state, outcome
    return total, seq


def _log(log: list[dict] | None, state: State, action: str, r: float, outcome: Outcome) -> None:
    if log is not None:
        log.append({"state": state.key, "action": action, "reward": round(r, 5), "valid": outcome.valid,
                    "time_ms": round(outcome.time_ms, 5), "reason": outcome.reason})


def greedy_rollout(env: Environment, table: QTable, max_sequence: int) -> Sequence_:
    """Follow the table's best action from the start; invalid steps end the rollout."""
    seq: Sequence_ = ()
    for _ in range(max_sequence):
        actions = env.actions(seq) + [STOP]
        action = table.greedy(env.state(seq).key, actions)
        if action == STOP or not env.evaluate(seq + (action,)).valid:
            break
        seq = seq + (action,)
    return seq


def q_learning(envs: Sequence[Environment], table: QTable, settings: QSettings, seed: int = 0,
               should_stop=lambda: False, progress=None) -> list[SearchResult]:
    """Train on all subgraphs for ``settings.epochs`` (one episode each per epoch), then roll out.

    The table is shared across subgraphs (and across models, via its file). An episode's
    first step picks among the passes that no look-alike state has tried yet, while there
    are any (:meth:`QTable.known`): optimistic values alone let the first big win hide a
    bigger one. The final
    sequence per subgraph is the greedy rollout, unless a sequence measured during
    training was faster, or the pick of a look-alike subgraph (same dominant op family)
    is faster here too (:func:`_transfer_picks`), or the pick behind a first pass that
    won alone (:func:`_prefixed_picks`): the decision log says which.
    """
    rng = random.Random(seed)
    table.initial = settings.optimistic_init
    curves: list[list[float]] = [[] for _ in envs]
    visited: list[list[Sequence_]] = [[] for _ in envs]
    logs: list[list[dict]] = [[] for _ in envs]
    for epoch in range(settings.epochs):
        if should_stop():
            break
        epsilon = epsilon_at(epoch, settings.epochs, settings.epsilon_start, settings.epsilon_end)
        for i, env in enumerate(envs):
            if should_stop():  # checked per episode: one epoch over a big model's leaves takes long
                break
            total, seq = run_episode(env, table, settings, epsilon, rng, logs[i], should_stop)
            curves[i].append(total)
            visited[i].append(seq)
            if progress is not None:
                progress(epoch * len(envs) + i + 1, settings.epochs * len(envs))
    picks = []
    for i, env in enumerate(envs):
        # out of time: no new measurements, the best sequence measured so far stands
        rollout = () if should_stop() else greedy_rollout(env, table, settings.max_sequence)
        best, best_out = best_seen(env, [rollout] + visited[i])
        chosen_by = "greedy rollout" if best == rollout and rollout else \
            "best measured during training" if best else "nothing measured beat the original"
        picks.append((best, best_out, chosen_by, rollout))
    results = []
    picks = _transfer_picks(envs, picks, settings.max_sequence, should_stop)
    picks = _prefixed_picks(envs, picks, table, settings.max_sequence, should_stop)
    for i, (env, (best, best_out, chosen_by, rollout)) in enumerate(zip(envs, picks)):
        logs[i].append({"final": list(best), "chosen_by": chosen_by, "rollout": list(rollout)})
        results.append(SearchResult(best, best_out, env.evaluate(()), env.measurements, "q-learning",
                                    curves[i], logs[i]))
    return results


def _adapted(env: Environment, sequence: Sequence_) -> Sequence_:
    """``sequence`` without the passes that do not apply here (at their turn)."""
    kept: Sequence_ = ()
    for action in sequence:
        if action in env.actions(kept):
            kept = kept + (action,)
    return kept


def _transfer_picks(envs: Sequence[Environment], picks: list[tuple], max_sequence: int,
                    should_stop) -> list[tuple]:
    """Each subgraph also tries the picks of its look-alikes (same dominant op family), less
    the passes that do not apply to it (one measurement each, the same sequence measured
    once): the table shares values between similar states, but an episode that exploited
    one good first step never measured the alternative a look-alike found (on bert_small:
    static QDQ kept on one leaf, no quantization on another, dynamic int8 won on the rest)."""
    kinds = [env.state(()).family for env in envs]  # look-alikes: the same dominant op family
    out = []
    for i, env in enumerate(envs):
        others = dict.fromkeys(p[0] for j, p in enumerate(picks) if j != i and p[0] and kinds[j] == kinds[i])
        out.append(_keep_faster(env, picks[i], others, "the pick of a look-alike subgraph", max_sequence,
                                should_stop))
    return out


def _prefixed_picks(envs: Sequence[Environment], picks: list[tuple], table: QTable, max_sequence: int,
                    should_stop, width: int = 2) -> list[tuple]:
    """Each subgraph also tries its pick behind the ``width`` best first passes that won
    alone (a positive learnt value here or in a look-alike) and are not in it (one
    measurement each). A pass that pays off mostly before another is learnt late: the
    episodes exploit the bigger first win instead (on resnet_small, static QDQ alone
    1.22x, after fuse_conv_bn 1.53x)."""
    out = []
    for env, pick in zip(envs, picks):
        root, best = env.state(()).key, pick[0]
        firsts = sorted((a for a in env.actions(()) if a not in best and table.known(root, a)
                         and table.q(root, a) > 0), key=lambda a: -table.q(root, a))
        out.append(_keep_faster(env, pick, [(a,) + best for a in firsts[:width]],
                                "the pick behind a first pass that won alone", max_sequence, should_stop))
    return out


def _keep_faster(env: Environment, pick: tuple, candidates, why: str, max_sequence: int, should_stop) -> tuple:
    """The fastest of ``pick`` (best, outcome, chosen_by, rollout) and ``candidates`` (less
    the passes that do not apply here), ``why`` saying when a candidate won; each candidate
    is measured once, and none longer than ``max_sequence``."""
    best, best_out, chosen_by, rollout = pick
    tried = {best}
    for seq in candidates:
        if should_stop():
            break
        seq = _adapted(env, seq)
        if not seq or seq in tried or len(seq) > max_sequence:
            continue
        tried.add(seq)
        outcome = env.evaluate(seq)
        if outcome.valid and outcome.time_ms < best_out.time_ms:
            best, best_out, chosen_by = seq, outcome, why
    return best, best_out, chosen_by, rollout


# ---------------------------------------------------------------- baselines
def random_search(env: Environment, budget: int, max_sequence: int, seed: int = 0) -> SearchResult:
    """Random sequences (random length, random applicable passes) until ``budget`` measurements."""
    rng = random.Random(seed)
    tried: list[Sequence_] = []
    attempts = 0
    while env.measurements < budget and attempts < budget * 20:
        attempts += 1
        seq: Sequence_ = ()
        for _ in range(rng.randint(1, max_sequence)):
            actions = env.actions(seq)
            if not actions:
                break
            seq = seq + (rng.choice(actions),)
            if not env.evaluate(seq).valid or env.measurements >= budget:
                break
        tried.append(seq)
    best, out = best_seen(env, tried)
    return SearchResult(best, out, env.evaluate(()), env.measurements, "random")


def heuristic(env: Environment, bound: str, max_sequence: int) -> SearchResult:
    """The seed's static rule: compute-bound -> compute passes, else memory passes; keep what helps."""
    wanted = {"compute"} if bound == "compute" else {"memory"}
    seq: Sequence_ = ()
    current = env.evaluate(seq)
    for action in [a for a in env.actions(seq) if env.category(a) in wanted]:
        if len(seq) >= max_sequence or action not in env.actions(seq):
            continue
        out = env.evaluate(seq + (action,))
        if out.valid and out.time_ms < current.time_ms:
            seq, current = seq + (action,), out
    return SearchResult(seq, current, env.evaluate(()), env.measurements, "heuristic")


def greedy_search(env: Environment, max_sequence: int) -> SearchResult:
    """Try every applicable pass, keep the best, repeat until none helps."""
    seq: Sequence_ = ()
    current = env.evaluate(seq)
    for _ in range(max_sequence):
        best_action, best_out = None, current
        for action in env.actions(seq):
            out = env.evaluate(seq + (action,))
            if out.valid and out.time_ms < best_out.time_ms:
                best_action, best_out = action, out
        if best_action is None:
            break
        seq, current = seq + (best_action,), best_out
    return SearchResult(seq, current, env.evaluate(()), env.measurements, "greedy")


def oracle(env: Environment, max_sequence: int, limit: int = 2000) -> SearchResult:
    """Exhaustive search over every sequence up to ``max_sequence`` long, level by level,
    stopping before a level that would take the sequences tried past ``limit`` (so a
    subgraph where few passes apply is searched as deep as the policy may go, one where
    many apply only as deep as the limit allows: levels are searched whole, never cut).
    ``decisions`` records the depth reached."""
    tried: list[Sequence_] = []
    frontier: list[Sequence_] = [()]
    depth = 0
    for _ in range(max_sequence):
        level = [seq + (action,) for seq in frontier for action in env.actions(seq)]
        if not level or len(tried) + len(level) > limit:
            break
        tried.extend(level)
        frontier = [cand for cand in level if env.evaluate(cand).valid]
        depth += 1
    best, out = best_seen(env, tried)
    return SearchResult(best, out, env.evaluate(()), env.measurements, "oracle",
                        decisions=[{"depth": depth, "sequences": len(tried)}])
