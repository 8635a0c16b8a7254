"""Odd files the tool reads besides the model: Q-tables, the measurement cache, packed models.

A damaged Q-table is bad input (one line, exit 2), never an internal error; names read
from it print as one line. The measurement cache survives a cut last line and says
why when its folder cannot be used. A compressed or zipped model is named as such.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import multiprocessing
import os
import re
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptopt.adapt.cache import MeasurementCache
from adaptopt.cli import cli
from adaptopt.errors import InputError
from adaptopt.policy.qtable import QTable
from tests.make_bad_models import write_valid
from tests.test_bad_input import assert_refused

STATE = "m|compute|matmul|p1|none"


def qtable_text(values="{}", visits="{}", meta="{}", version="1") -> str:
    return (f'{{"format": "adaptopt-qtable", "version": {version}, "meta": {meta}, '
            f'"values": {values}, "visits": {visits}}}')


def show(path: Path):
    return CliRunner().invoke(cli, ["policy", "show", str(path)])


def assert_one_error_line(result, expect: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("adaptopt: error: ") and re.search(expect, lines[0]), lines[0]
    assert result.stdout == ""
    return lines[0]


# ---------------------------------------------------------------- Q-table files
BAD_QTABLES = {
    "int_too_large_for_a_float": (qtable_text(values=f'{{"{STATE}": {{"fuse": {10 ** 400}}}}}'), "finite number"),
    "int_of_5000_digits": (qtable_text(values=f'{{"{STATE}": {{"fuse": {"9" * 5000}}}}}'), "cannot read"),
    "nested_100000_deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "nested_100000_deep_unclosed": ("[" * 100_000, "nested too deeply"),
    "values_nested_deep": (qtable_text(values=f'{{"{STATE}": {{"fuse": {"[" * 50_000}}}}}'), "nested too deeply"),
    "float_overflowing_to_inf": (qtable_text(values=f'{{"{STATE}": {{"fuse": 1e400}}}}'), "finite number"),
    "huge_finite_float": (qtable_text(values=f'{{"{STATE}": {{"fuse": 1e300}}}}'), "finite number"),
    "string_q": (qtable_text(values=f'{{"{STATE}": {{"fuse": "0.5"}}}}'), "finite number"),
    "bool_q": (qtable_text(values=f'{{"{STATE}": {{"fuse": true}}}}'), "finite number"),
    "null_q": (qtable_text(values=f'{{"{STATE}": {{"fuse": null}}}}'), "finite number"),
    "row_is_a_list": (qtable_text(values=f'{{"{STATE}": [1, 2]}}'), "finite number"),
    "row_is_a_number": (qtable_text(values=f'{{"{STATE}": 3}}'), "finite number"),
    "values_is_a_list": (qtable_text(values="[]"), "finite number"),
    "visits_string": (qtable_text(visits=f'{{"{STATE}": {{"fuse": "1"}}}}'), "integer"),
    "visits_negative": (qtable_text(visits=f'{{"{STATE}": {{"fuse": -1}}}}'), "integer"),
    "visits_huge": (qtable_text(visits=f'{{"{STATE}": {{"fuse": {10 ** 400}}}}}'), "integer"),
    "visits_float": (qtable_text(visits=f'{{"{STATE}": {{"fuse": 1.5}}}}'), "integer"),
    "meta_is_a_list": (qtable_text(meta="[]"), "meta"),
    "trained_on_is_a_number": (qtable_text(meta='{"trained_on": 3}'), "trained_on"),
    "trained_on_holds_numbers": (qtable_text(meta='{"trained_on": [1, 2]}'), "trained_on"),
    "version_huge_int": (qtable_text(version=str(10 ** 400)), "version"),
    "version_string": (qtable_text(version='"1"'), "version"),
    "top_level_list": ("[1, 2]", "not an adaptopt Q-table"),
    "top_level_number": ("1e999", "not an adaptopt Q-table"),
}


@pytest.mark.parametrize("name", BAD_QTABLES)
def test_a_malformed_qtable_is_one_line_exit_2(tmp_path, name):
    content, expect = BAD_QTABLES[name]
    path = tmp_path / "q.json"
    path.write_text(content)
    with pytest.raises(InputError):
        QTable.load(path)
    line = assert_one_error_line(show(path), expect)
    assert len(line) < 400, line  # the error names the problem, it does not echo a 400-digit number


@pytest.mark.parametrize("name", ["int_too_large_for_a_float", "nested_100000_deep"])
def test_a_malformed_qtable_fails_an_optimize_run_with_exit_2(tmp_path, name):
    model = write_valid(tmp_path)
    policy = tmp_path / "q.json"
    policy.write_text(BAD_QTABLES[name][0])
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(cli, ["optimize", str(model), "--policy", str(policy), "-o", str(out / "o.onnx"),
                                      "--budget", "20"], env={"ADAPTOPT_CACHE_DIR": str(tmp_path / "cache")})
    assert_one_error_line(result, "Q-table")
    assert not any(out.iterdir())


def test_large_but_sane_values_still_load(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(qtable_text(values=f'{{"{STATE}": {{"fuse": 1000000, "fold": -2.5e5}}}}',
                                visits=f'{{"{STATE}": {{"fuse": 3}}}}'))
    table = QTable.load(path)
    assert table.values[STATE] == {"fuse": 1e6, "fold": -2.5e5} and table.visits[STATE] == {"fuse": 3}


def test_control_characters_in_a_qtable_print_as_escapes_on_one_line(tmp_path):
    """A machine name, state or action with a newline or an ESC prints escaped: `policy show`
    prints the header, one line per row and the 'trained on' line, and no terminal escape."""
    path = tmp_path / "q.json"
    machine = "x\n\x1b[31mRED\r\u2028end"
    path.write_text(json.dumps({
        "format": "adaptopt-qtable", "version": 1,
        "meta": {"target": {"machine": machine, "fingerprint": "f"}, "trained_on": ["a\nb"]},
        "values": {STATE: {"fuse": 0.5}, "bad\nstate": {"act\x1bion": 0.25}}, "visits": {}}))
    result = show(path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "\x1b" not in result.stdout and "\r" not in result.stdout and "\u2028" not in result.stdout
    assert lines[0] == "trained on: x\\n\\x1b[31mRED\\r\\u2028end"
    assert len(lines) == 1 + 2 + 2, lines  # trained on, header + rule, two rows
    assert any("bad\\nstate" in line and "act\\x1bion" in line for line in lines)
    table = QTable.load(path)
    assert table.meta["trained_on"] == ["a\\nb"]
    assert "bad\nstate" in table.values  # keys are kept as they are; only what is shown is escaped


def test_printable_names_are_shown_unchanged(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"format": "adaptopt-qtable", "version": 1,
                                "meta": {"target": {"machine": "Intel® Xeon® | 模型 | CPUExecutionProvider"}},
                                "values": {STATE: {"fuse": 0.5}}, "visits": {STATE: {"fuse": 1}}}))
    result = show(path)
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == "trained on: Intel® Xeon® | 模型 | CPUExecutionProvider"


# ---------------------------------------------------------------- measurement cache
def test_an_append_after_a_cut_last_line_starts_on_a_fresh_line(tmp_path):
    path = tmp_path / "measurements.jsonl"
    path.write_text(json.dumps({"key": "old", "time_ms": 1.0}) + "\n" + '{"key": "cut", "time_')
    cache = MeasurementCache(tmp_path, "fp")
    assert set(cache.entries) == {"old"}
    cache.put("new", time_ms=2.0)
    cache.put("newer", time_ms=3.0)
    again = MeasurementCache(tmp_path, "fp")
    assert set(again.entries) == {"old", "new", "newer"}
    assert again.get("new", time_ms=float)["time_ms"] == 2.0
    assert path.read_text().endswith('"newer", "time_ms": 3.0}\n')
    assert again.unusable is None


def test_an_append_to_a_whole_file_adds_no_empty_line(tmp_path):
    cache = MeasurementCache(tmp_path, "fp")
    assert not (tmp_path / "measurements.jsonl").exists()  # nothing is written until a measurement is
    for i in range(3):
        cache.put(f"k{i}", time_ms=float(i))
    lines = (tmp_path / "measurements.jsonl").read_text().split("\n")
    assert len(lines) == 4 and lines[-1] == "" and all(lines[:3])


def _append_many(folder: str, worker: int, count: int) -> None:
    cache = MeasurementCache(Path(folder), "fp")
    for i in range(count):
        cache.put(f"w{worker}:{i}", time_ms=float(i), reason="x" * (i % 50))


def test_concurrent_appends_after_a_cut_line_lose_nothing(tmp_path):
    (tmp_path / "measurements.jsonl").write_text('{"key": "cut", "time_ms"')
    workers, count = 4, 150
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w, count)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = MeasurementCache(tmp_path, "fp").entries
    assert set(entries) == {f"w{w}:{i}" for w in range(workers) for i in range(count)}


def test_a_cache_folder_that_is_a_file_says_why_once(tmp_path):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file")
    for folder, expect in ((not_a_folder, "it is a file, not a folder"),
                           (not_a_folder / "sub", f"{re.escape(str(not_a_folder))} is a file, not a folder")):
        cache = MeasurementCache(folder, "fp")
        assert cache.unusable and re.search(expect, cache.unusable), cache.unusable
        assert "rerun will measure them again" in cache.unusable and "\n" not in cache.unusable
        cache.put("k", time_ms=1.0)  # kept in memory, no error
        assert cache.get("k", time_ms=float)["time_ms"] == 1.0
    assert not_a_folder.read_text() == "a file"


def test_a_measurements_file_that_cannot_be_read_says_why(tmp_path):
    (tmp_path / "measurements.jsonl").mkdir()
    cache = MeasurementCache(tmp_path, "fp")
    assert cache.unusable and "cannot read measurements.jsonl" in cache.unusable, cache.unusable
    cache.put("k", time_ms=1.0)
    assert cache.get("k", time_ms=float) is not None


def test_a_read_only_cache_folder_says_why(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path else real_access(p, mode))
    cache = MeasurementCache(tmp_path, "fp")
    assert cache.unusable and "read-only" in cache.unusable
    cache = MeasurementCache(tmp_path / "new" / "deeper", "fp")  # judged by the part that exists
    assert cache.unusable and f"{tmp_path} is read-only" in cache.unusable
    cache.put("k", time_ms=1.0)
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_really_read_only_cache_folder_says_why(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        cache = MeasurementCache(folder, "fp")
        assert cache.unusable and "read-only" in cache.unusable
    finally:
        folder.chmod(0o755)


def test_a_write_that_fails_later_says_why(tmp_path, monkeypatch):
    cache = MeasurementCache(tmp_path, "fp")
    assert cache.unusable is None

    def full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("adaptopt.adapt.cache._append_line", full)
    cache.put("a", time_ms=1.0)
    first = cache.unusable
    assert first and "No space left on device" in first
    cache.put("b", time_ms=1.0)
    assert cache.unusable == first and cache.get("b", time_ms=float) is not None


def test_a_usable_new_cache_folder_is_created_on_first_write(tmp_path):
    folder = tmp_path / "a" / "b"
    cache = MeasurementCache(folder, "fp")
    assert cache.unusable is None and not folder.exists()
    cache.put("k", time_ms=1.0)
    assert MeasurementCache(folder, "fp").get("k", time_ms=float)["time_ms"] == 1.0


# ---------------------------------------------------------------- packed models
def _compressed(compress, suffix: str):
    """A packer writing ``model`` compressed by ``compress`` (gzip, bz2, lzma) as model.onnx.SUFFIX."""
    def pack(model: Path, folder: Path) -> Path:
        path = folder / f"model.onnx.{suffix}"
        path.write_bytes(compress(model.read_bytes()))
        return path
    return pack


def _zip(model: Path, folder: Path) -> Path:
    path = folder / "model.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(model, "model.onnx")
    return path


PACKED = {"gzip": (_compressed(gzip.compress, "gz"), "gzip-compressed: decompress it first"),
          "zip": (_zip, "a zip archive: extract the .onnx file from it first"),
          "bzip2": (_compressed(bz2.compress, "bz2"), "bzip2-compressed: decompress it first"),
          "xz": (_compressed(lzma.compress, "xz"), "xz-compressed: decompress it first")}


@pytest.mark.parametrize("command", ["split", "optimize"])
@pytest.mark.parametrize("kind", PACKED)
def test_a_compressed_model_is_named_as_such(tmp_path, kind, command):
    case, out = tmp_path / "case", tmp_path / "out"
    case.mkdir()
    out.mkdir()
    pack, expect = PACKED[kind]
    source = write_valid(tmp_path)
    model = pack(source, case)
    args = [command, str(model), "-o", str(out / ("split" if command == "split" else "o.onnx"))]
    line = assert_refused(args, case, out, re.escape(expect))
    assert line == f"adaptopt: error: {model}: not a valid ONNX model ({line.split('(', 1)[1]}"


def test_a_gzipped_model_on_stdin_is_named_as_such(tmp_path):
    data = gzip.compress(write_valid(tmp_path).read_bytes())
    result = CliRunner().invoke(cli, ["split", "-", "-o", str(tmp_path / "split")], input=data)
    assert_one_error_line(result, r"<stdin>: not a valid ONNX model \(gzip-compressed: decompress it first")
    assert not (tmp_path / "split").exists()


def test_a_valid_model_and_random_bytes_are_unchanged(tmp_path):
    model = write_valid(tmp_path)
    assert CliRunner().invoke(cli, ["split", str(model), "-o", str(tmp_path / "split")]).exit_code == 0
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(bytes([0xFF] * 64))
    line = assert_one_error_line(CliRunner().invoke(cli, ["split", str(junk), "-o", str(tmp_path / "s2")]),
                                 "not a valid ONNX model")
    assert "compressed" not in line and "zip" not in line


def test_unusable_reason_says_what_the_cache_would_say_without_reading_it(tmp_path):
    from adaptopt.adapt.cache import unusable_reason
    assert unusable_reason(None) is None and unusable_reason(tmp_path / "new") is None
    (tmp_path / "file").write_text("x")
    assert unusable_reason(tmp_path / "file") == MeasurementCache(tmp_path / "file", "fp").unusable
    (tmp_path / "d" / "measurements.jsonl").mkdir(parents=True)
    assert "measurements.jsonl is a folder" in unusable_reason(tmp_path / "d")
