"""The Q-table a run starts from: the user's file, else the built-in prior, else empty.

The built-in prior is a table trained by ``make prior`` (``adapt/training.py``) on
generated models measured on a CPU target. It only orders exploration: every
value it holds is a starting estimate that the run's own measurements overwrite,
and a pass it rates badly is still tried when nothing similar was seen. It is used
for CPU targets only (GPU timings rank passes differently), never written to, and
opt-in (``policy: {prior: true}``): in the learning bench it saved measurements but
did not reliably find the cold start's gains.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from adaptopt.policy.qtable import QTable

PRIOR_FILES = {"cpu": "prior_cpu.json"}


def prior_path(device: str) -> Path | None:
    name = PRIOR_FILES.get(device)
    if name is None:
        return None
    path = Path(str(resources.files("adaptopt.policy") / name))
    return path if path.is_file() else None


def starting_table(path: str | None, device: str, use_prior: bool, target: dict | None = None
                   ) -> tuple[QTable, str]:
    """(table, where it came from) for a run. ``target``: this run's :func:`target_stamp`
    values; a file trained on another target still starts the run (its values only order
    exploration, every pass is measured here again), and the origin says so."""
    if path is not None and Path(path).exists():
        table = QTable.load(path)
        return table, f"file {path}" + _other_target(table, target)
    prior = prior_path(device) if use_prior else None
    if prior is not None:
        table = QTable.load(prior)
        trained = ", ".join(table.meta.get("trained_on", [])) or "unknown models"
        return table, f"built-in prior ({prior.name}, trained on {trained})"
    return QTable(), "empty (cold start)"


def stamp_target(table: QTable, target: dict) -> None:
    """Record the target (:func:`adapt.cache.target_stamp`) whose measurements trained ``table`` last."""
    table.meta["target"] = dict(target)


def _other_target(table: QTable, target: dict | None) -> str:
    trained = table.meta.get("target")
    if not target or not isinstance(trained, dict) or trained.get("fingerprint") == target.get("fingerprint"):
        return ""
    return (f" (trained on another target: {trained.get('machine', 'unknown')}; its values only order the "
            "exploration here)")
