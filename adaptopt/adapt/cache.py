"""On-disk measurement cache: (subgraph content hash, target, pass sequence) -> outcome.

Revisiting a state costs nothing, and a rerun with the same seed and cache makes
the same decisions (hence the same output bytes). One JSON-lines file per cache
folder; appends are line-atomic, a truncated last line (interrupted run) is skipped.

A cache folder that cannot be used (a regular file, read-only, a measurements file that
cannot be read) does not stop a run: it measures in memory only, and
:attr:`MeasurementCache.unusable` says why, for the caller to warn once.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    """(key -> entry) read from, and appended to, ``directory/measurements.jsonl``.

    ``unusable``: None, or why the folder cannot keep measurements (then they are kept in
    memory only, and a rerun measures again). Set at construction when the folder is
    visibly unusable, or at the first append that fails; the caller says it once.
    """

    def __init__(self, directory: Path | None, fingerprint: str):
        self.fingerprint = fingerprint
        self.path = None if directory is None else Path(directory) / "measurements.jsonl"
        self.entries: dict[str, dict] = {}
        self.hits = 0
        self.unusable: str | None = None
        if self.path is not None:
            problem = _unusable_folder(self.path.parent)
            if problem:
                self._give_up(problem)
            elif self.path.exists():
                self._read()

    def _give_up(self, why: str) -> None:
        """Keep measurements in memory only from now on, and remember why (first reason wins)."""
        if self.path is not None and self.unusable is None:
            self.unusable = _unusable_sentence(self.path.parent, why)
        self.path = None

    def _read(self) -> None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        entry = json.loads(line)
                    except (ValueError, RecursionError):
                        continue  # a line cut short by an interrupted run, or damaged
                    if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                        self.entries[entry["key"]] = entry
        except OSError as exc:  # unreadable (a folder, no permission): measure again, in memory only
            self._give_up(f"cannot read {self.path.name}: {_os_reason(exc)}")

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
            _append_line(self.path, json.dumps(entry))
        except OSError as exc:  # an unwritable cache costs re-measuring next time, nothing else
            self._give_up(f"cannot write {self.path.name}: {_os_reason(exc)}")

    def put_outcome(self, key: str, outcome: Outcome, **extra) -> None:
        self.put(key, time_ms=outcome.time_ms, valid=outcome.valid, bytes=outcome.bytes, reason=outcome.reason,
                 **extra)


def _typed(value, kind: type | tuple[type, ...]) -> bool:
    """``isinstance`` where a bool is not a number (JSON's true is not a time)."""
    if isinstance(value, bool):
        return kind is bool or (isinstance(kind, tuple) and bool in kind)
    return isinstance(value, kind)


def _append_line(path: Path, line: str) -> None:
    """Append ``line`` to ``path`` on a line of its own, safe for several runs sharing the file.

    One ``write`` on an ``O_APPEND`` descriptor: the kernel puts each run's line at the end
    whole, never interleaved with another's. When the file does not end with a newline (its
    last line was cut short: a run killed mid-write, a full disk, an edit), the line starts
    with one, so it is not glued to the broken line (which the reader skips) and lost. Two
    runs that both see the cut line both start with a newline: an empty line, also skipped.
    """
    data = line.encode("utf-8") + b"\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):  # a full disk: what was written is a cut line, skipped when read
            raise OSError(f"wrote {written} of {len(data)} bytes")
    finally:
        os.close(fd)


def unusable_reason(directory: Path | str | None) -> str | None:
    """One line saying why the cache folder ``directory`` cannot keep measurements, else None;
    what :attr:`MeasurementCache.unusable` says at construction, without reading the cache
    (for a caller to warn once before a run)."""
    if directory is None:
        return None
    folder = Path(directory)
    problem = _unusable_folder(folder)
    if problem is None and (folder / "measurements.jsonl").is_dir():
        problem = "measurements.jsonl is a folder"
    return None if problem is None else _unusable_sentence(folder, problem)


def _unusable_sentence(folder: Path, why: str) -> str:
    return (f"measurement cache {folder} is not usable ({why}): measurements are kept in memory only, "
            "and a rerun will measure them again")


def _unusable_folder(folder: Path) -> str | None:
    """Why ``folder`` cannot hold the cache file (not a folder, not writable), else None.
    A folder that does not exist yet is judged by the nearest part of its path that does."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        if existing.is_symlink():  # a dangling link: mkdir cannot create through it
            return "it is a broken symbolic link" if existing == folder else f"{existing} is a broken symbolic link"
        existing = existing.parent
    if not existing.is_dir():
        what = "a file, not a folder" if existing.is_file() else "not a folder"
        return f"it is {what}" if existing == folder else f"{existing} is {what}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return "it is read-only" if existing == folder else f"{existing} is read-only"
    return None


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
