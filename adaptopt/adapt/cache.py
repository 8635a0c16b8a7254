"""On-disk measurement cache: (subgraph content hash, target, pass sequence) -> outcome.

Revisiting a state costs nothing, and a rerun with the same seed and cache makes
the same decisions (hence the same output bytes). One JSON-lines file per cache
folder; appends are line-atomic, a truncated last line (interrupted run) is skipped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from adaptopt.config import TargetConfig
from adaptopt.policy.search import Outcome


def target_fingerprint(target: TargetConfig) -> str:
    """What a timing depends on besides the graph: the calibration's machine fingerprint
    (CPU model, cores, ORT version, first provider, threads, GPU name) plus the whole
    provider chain (a fallback changes timings too)."""
    from adaptopt.profile.calibrate import cache_key, fingerprint
    from adaptopt.runtime import resolve_providers
    text = cache_key(fingerprint(target)) + " | " + ",".join(resolve_providers(target))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def target_stamp(target: TargetConfig) -> dict:
    """The target as a Q-table records it: :func:`target_fingerprint`, and in words."""
    from adaptopt.profile.calibrate import cache_key, fingerprint
    from adaptopt.runtime import resolve_providers
    return {"fingerprint": target_fingerprint(target),
            "machine": cache_key(fingerprint(target)) + " | " + ",".join(resolve_providers(target))}


class MeasurementCache:
    def __init__(self, directory: Path | None, fingerprint: str):
        self.fingerprint = fingerprint
        self.path = None if directory is None else Path(directory) / "measurements.jsonl"
        self.entries: dict[str, dict] = {}
        self.hits = 0
        if self.path is not None and self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # a line cut short by an interrupted run, or damaged
                    if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                        self.entries[entry["key"]] = entry
        except OSError:  # unreadable (a folder, no permission): measure again, in memory only
            self.path = None

    def key(self, content_hash: str, sequence: tuple[str, ...], kind: str = "subgraph") -> str:
        return f"{kind}:{self.fingerprint}:{content_hash}:{'/'.join(sequence)}"

    def get(self, key: str, **required: type | tuple[type, ...]) -> dict | None:
        """The entry for ``key``; a miss when it lacks a ``required`` field of the given type
        (an entry written by another version, or damaged, is measured again)."""
        entry = self.entries.get(key)
        if entry is None or not all(_typed(entry.get(name), kind) for name, kind in required.items()):
            return None
        self.hits += 1
        return entry

    def put(self, key: str, **values) -> None:
        entry = {"key": key, **values}
        self.entries[key] = entry
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
        except OSError:  # an unwritable cache costs re-measuring next time, nothing else
            self.path = None

    def put_outcome(self, key: str, outcome: Outcome, **extra) -> None:
        self.put(key, time_ms=outcome.time_ms, valid=outcome.valid, bytes=outcome.bytes, reason=outcome.reason,
                 **extra)


def _typed(value, kind: type | tuple[type, ...]) -> bool:
    """``isinstance`` where a bool is not a number (JSON's true is not a time)."""
    if isinstance(value, bool):
        return kind is bool or (isinstance(kind, tuple) and bool in kind)
    return isinstance(value, kind)
