"""The Q-table: a pure update rule, epsilon-greedy choice, and a versioned JSON file.

The table persists between runs (``--policy FILE``): a table learnt on other models
warm-starts the next one, which is what lets a tabular agent beat plain search at a
small measurement budget.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from adaptopt.errors import InputError
from adaptopt.graph.io import atomic_path
from adaptopt.policy.state import STOP

QTABLE_FORMAT = "adaptopt-qtable"
QTABLE_VERSION = 1
# a Q value is a sum of discounted log-speedup rewards (a few units); a file's value beyond this
# is damage, and would overflow to inf/nan in the sums of look-alike states
MAX_Q = 1e9
MAX_VISITS = 2 ** 63 - 1


def q_update(q: float, reward: float, next_best: float, learning_rate: float, discount: float) -> float:
    """One Q-learning step: Q <- Q + lr * (r + gamma * max_a' Q(s', a') - Q)."""
    return q + learning_rate * (reward + discount * next_best - q)


def epsilon_at(epoch: int, epochs: int, start: float, end: float) -> float:
    """Linear decay from ``start`` (first epoch) to ``end`` (last epoch)."""
    if epochs <= 1:
        return end
    return start + (end - start) * min(epoch, epochs - 1) / (epochs - 1)


def backoff_keys(state: str) -> tuple[str, ...]:
    """Coarser views of a state key ``size|bound|family|performance|last``, most specific first.

    An unvisited (state, action) pair reads the mean value the action has in visited
    states that look alike: same size bucket, bound, op family and last pass; then the
    same without the size; then same family and last pass. This is how one leaf's measurements inform the next
    leaf of the same kind, and how a table learnt on one model starts the next.
    """
    parts = state.split("|")
    if len(parts) != 5:
        return ()
    size, bound, family, _performance, last = parts
    return (f"s:{size}|{bound}|{family}|{last}", f"b:{bound}|{family}|{last}", f"f:{family}|{last}")


@dataclass
class QTable:
    """State -> action -> value.

    An unvisited pair reads the mean value of the same action in similar visited
    states (:func:`backoff_keys`), and ``initial`` when the action was never tried in
    anything similar (optimistic initialisation: a positive value makes greedy choices
    try such an action once, which is how a table explores without wasting
    measurements, while actions already seen to lose in similar states are skipped).
    """

    values: dict[str, dict[str, float]] = field(default_factory=dict)
    visits: dict[str, dict[str, int]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    initial: float = 0.0
    _similar: dict[tuple[str, str], list[float]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for state, actions in self.values.items():
            for action, value in actions.items():
                self._add_similar(state, action, 0.0, value, new=True)

    def _add_similar(self, state: str, action: str, old: float, value: float, new: bool) -> None:
        for key in backoff_keys(state):
            total = self._similar.setdefault((key, action), [0.0, 0])
            total[0] += value - (0.0 if new else old)
            total[1] += 1 if new else 0

    def prior(self, state: str, action: str) -> float:
        """What an unvisited pair reads: the mean over similar visited states, else ``initial``."""
        for key in backoff_keys(state):
            total = self._similar.get((key, action))
            if total and total[1]:
                return total[0] / total[1]
        return self.initial

    def known(self, state: str, action: str) -> bool:
        """Whether ``action`` has a value here or in a look-alike state (it was tried in one)."""
        if action in self.values.get(state, {}):
            return True
        return any(self._similar.get((key, action), (0.0, 0))[1] for key in backoff_keys(state))

    def q(self, state: str, action: str) -> float:
        row = self.values.get(state)
        if row is not None and action in row:
            return row[action]
        return self.prior(state, action)

    def best_value(self, state: str, actions: Iterable[str]) -> float:
        actions = list(actions)
        return max((self.q(state, a) for a in actions), default=0.0)

    def greedy(self, state: str, actions: Sequence[str]) -> str:
        """The best-valued action; ties go to the first in ``actions`` (stable, deterministic)."""
        best, best_q = actions[0], -math.inf
        for action in actions:
            value = self.q(state, action)
            if value > best_q + 1e-12:
                best, best_q = action, value
        return best

    def choose(self, state: str, actions: Sequence[str], epsilon: float, rng: random.Random) -> str:
        if not actions:
            return STOP
        if rng.random() < epsilon:
            return actions[rng.randrange(len(actions))]
        return self.greedy(state, actions)

    def update(self, state: str, action: str, reward: float, next_state: str | None,
               next_actions: Iterable[str], learning_rate: float, discount: float) -> float:
        next_best = 0.0 if next_state is None else self.best_value(next_state, next_actions)
        seen = action in self.values.get(state, {})
        old = self.q(state, action)
        new = q_update(old, reward, next_best, learning_rate, discount)
        self.values.setdefault(state, {})[action] = new
        self._add_similar(state, action, old, new, new=not seen)
        self.visits.setdefault(state, {})[action] = self.visits.get(state, {}).get(action, 0) + 1
        return new

    def rows(self) -> list[dict]:
        rows = []
        for state in sorted(self.values):
            for action, value in sorted(self.values[state].items(), key=lambda kv: -kv[1]):
                rows.append({"state": _printable(state), "action": _printable(action), "q": round(value, 4),
                             "visits": self.visits.get(state, {}).get(action, 0)})
        return rows

    # ---------------------------------------------------------------- file
    def to_json(self) -> dict:
        return {"format": QTABLE_FORMAT, "version": QTABLE_VERSION, "meta": self.meta,
                "values": self.values, "visits": self.visits}

    def save(self, path: str | Path) -> None:
        with atomic_path(Path(path)) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "QTable":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: bad UTF-8, bad JSON, an integer of 4300+ digits
            raise InputError(f"{path}: cannot read Q-table ({exc})") from None
        except RecursionError:  # e.g. 100,000 nested '[': the decoder gives up, it is not a table
            raise InputError(f"{path}: not an adaptopt Q-table (JSON nested too deeply)") from None
        if not isinstance(data, dict) or data.get("format") != QTABLE_FORMAT:
            raise InputError(f"{path}: not an adaptopt Q-table (format '{QTABLE_FORMAT}' expected)")
        if data.get("version") != QTABLE_VERSION:
            raise InputError(f"{path}: Q-table version {_printable(repr(data.get('version')))[:40]} is not "
                             f"supported (expected {QTABLE_VERSION})")
        values, visits = data.get("values", {}), data.get("visits", {})
        if not isinstance(values, dict) or not all(
                isinstance(v, dict) and all(_q_value(x) for x in v.values()) for v in values.values()):
            raise InputError(f"{path}: Q-table values must map state -> action -> finite number "
                             f"(at most {MAX_Q:g} in magnitude)")
        if not isinstance(visits, dict) or not all(
                isinstance(v, dict) and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_VISITS
                                            for n in v.values())
                for v in visits.values()):
            raise InputError(f"{path}: Q-table visits must map state -> action -> non-negative integer")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise InputError(f"{path}: Q-table meta must be an object")
        trained_on = meta.get("trained_on", [])
        if not isinstance(trained_on, list) or not all(isinstance(name, str) for name in trained_on):
            raise InputError(f"{path}: Q-table meta.trained_on must be a list of model names")
        meta = dict(meta, trained_on=[_printable(name) for name in trained_on]) if "trained_on" in meta else meta
        if isinstance(meta.get("target"), dict):  # printed by `policy show` and a run's log: one line each
            meta["target"] = {k: _printable(v) if isinstance(v, str) else v for k, v in meta["target"].items()}
        return cls({s: {a: float(q) for a, q in acts.items()} for s, acts in values.items()},
                   {s: {a: int(n) for a, n in acts.items()} for s, acts in visits.items()}, meta)

    @classmethod
    def load_or_new(cls, path: str | Path | None) -> "QTable":
        if path is not None and Path(path).exists():
            return cls.load(path)
        return cls()


def _q_value(x) -> bool:
    """A usable Q value from a file: a JSON number (not true/false), finite, within +-MAX_Q
    (an integer too large for a float, like 10**400, is refused, not an OverflowError)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x) and abs(float(x)) <= MAX_Q
    except OverflowError:
        return False


def _printable(text: str) -> str:
    """``text`` with every non-printable character (newline, ESC, ...) written as its escape,
    so that a name read from a file prints as one line and moves no terminal cursor."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
