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


def q_update(q: float, reward: float, next_best: float, learning_rate: float, discount: float) -> float:
    """One Q-learning step: Q <- Q + lr * (r + gamma * max_a' Q(s', a') - Q)."""
    return q + learning_rate * (reward + discount * next_best - q)


def epsilon_at(epoch: int, epochs: int, start: float, end: float) -> float:
    """Linear decay from ``start`` (first epoch) to ``end`` (last epoch)."""
    if epochs <= 1:
        return end
    return start + (end - start) * min(epoch, epochs - 1) / (epochs - 1)


@dataclass
class QTable:
    """State -> action -> value. Unvisited pairs read as ``initial`` (optimistic
    initialisation: a positive value makes greedy choices try every action once
    before repeating one, which is how a table explores without wasting measurements)."""

    values: dict[str, dict[str, float]] = field(default_factory=dict)
    visits: dict[str, dict[str, int]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    initial: float = 0.0

    def q(self, state: str, action: str) -> float:
        return self.values.get(state, {}).get(action, self.initial)

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
        new = q_update(self.q(state, action), reward, next_best, learning_rate, discount)
        self.values.setdefault(state, {})[action] = new
        self.visits.setdefault(state, {})[action] = self.visits.get(state, {}).get(action, 0) + 1
        return new

    def rows(self) -> list[dict]:
        rows = []
        for state in sorted(self.values):
            for action, value in sorted(self.values[state].items(), key=lambda kv: -kv[1]):
                rows.append({"state": state, "action": action, "q": round(value, 4),
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
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read Q-table ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != QTABLE_FORMAT:
            raise InputError(f"{path}: not an adaptopt Q-table (format '{QTABLE_FORMAT}' expected)")
        if data.get("version") != QTABLE_VERSION:
            raise InputError(f"{path}: Q-table version {data.get('version')} is not supported "
                             f"(expected {QTABLE_VERSION})")
        values, visits = data.get("values", {}), data.get("visits", {})
        if not isinstance(values, dict) or not all(
                isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()) for v in values.values()):
            raise InputError(f"{path}: Q-table values must map state -> action -> number")
        return cls({s: {a: float(q) for a, q in acts.items()} for s, acts in values.items()},
                   {s: {a: int(n) for a, n in acts.items()} for s, acts in visits.items()}, data.get("meta", {}))

    @classmethod
    def load_or_new(cls, path: str | Path | None) -> "QTable":
        if path is not None and Path(path).exists():
            return cls.load(path)
        return cls()
