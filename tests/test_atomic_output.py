"""Atomic output: a temp file in the target folder, renamed; -o may be the input; an
interrupted or failed run leaves no partial file and no temp file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from adaptopt import api
from adaptopt.cli import cli
from adaptopt.config import Config
from adaptopt.graph.io import atomic_directory, atomic_path, load_model, save_model
from tests.conftest import run_model
from tests.make_bad_models import valid_model, write_valid

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI with its two ways of writing a model file (whole bytes, or a model's
# pieces streamed: subgraph files) slowed down: part of the bytes reach the temp file,
# then it waits to be signalled. SIGINT is restored as an interactive shell would (a
# background job starts with it ignored).
SLOW_CLI = """
import signal, sys, time
from pathlib import Path
from adaptopt.graph.external import ModelPieces
signal.signal(signal.SIGINT, signal.default_int_handler)
real = Path.write_bytes
def slow(self, data):
    real(self, data[: max(1, len(data) // 2)])
    print("WRITING", self, flush=True)
    time.sleep(120)
def slow_pieces(self, fh):
    fh.write(b"partial")
    fh.flush()
    print("WRITING", fh.name, flush=True)
    time.sleep(120)
Path.write_bytes = slow
ModelPieces.write = slow_pieces
from adaptopt.cli import main
sys.argv = ["adaptopt"] + sys.argv[1:]
main()
"""


def run_and_signal(args: list[str], signum: int, marker: str = "WRITING") -> subprocess.CompletedProcess:
    """Start ``SLOW_CLI args``, wait for ``marker`` on its stdout, send ``signum``, collect it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    watchdog = threading.Timer(120, proc.kill)  # a broken handler must fail the test, not hang it
    watchdog.start()
    try:
        line = proc.stdout.readline()
        assert line.startswith(marker), (line, proc.stderr.read() if proc.poll() is not None else "")
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
    return subprocess.CompletedProcess(proc.args, proc.returncode, line + stdout, stderr)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp")


@pytest.mark.parametrize("signum,code,message", [(signal.SIGTERM, 143, "terminated by SIGTERM"),
                                                 (signal.SIGINT, 130, "interrupted"),
                                                 (signal.SIGHUP, 129, "terminated by SIGHUP")])
def test_signal_during_save_leaves_no_partial_file(tmp_path, signum, code, message):
    api.split(write_valid(tmp_path), tmp_path / "split", Config().with_section("granularity", min_nodes=1), 1)
    out = tmp_path / "out"
    out.mkdir()
    result = run_and_signal(["merge", str(tmp_path / "split"), "-o", str(out / "merged.onnx")], signum)
    assert result.returncode == code, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"adaptopt: error: {message}"
    assert list(out.iterdir()) == []  # neither the model nor its half-written temp file


def test_signal_during_split_leaves_no_folder(tmp_path):
    model = write_valid(tmp_path)
    before = model.read_bytes()
    result = run_and_signal(["split", str(model), "-o", str(tmp_path / "split"), "--granularity", "2"],
                            signal.SIGTERM)
    assert result.returncode == 143, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no split folder, no staging folder
    assert model.read_bytes() == before


def test_save_over_the_input_path(tmp_path):
    path = write_valid(tmp_path)
    feeds = {"x": np.ones((1, 4), np.float32)}
    reference = run_model(valid_model(), feeds)
    model = load_model(path)
    save_model(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    np.testing.assert_array_equal(run_model(load_model(path), feeds)["y"], reference["y"])
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


@pytest.mark.skipif("optimize" not in cli.commands, reason="optimize not built yet")
def test_optimize_output_equal_to_input(tmp_path):
    path = write_valid(tmp_path)
    feeds = {"x": np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4)}
    reference = run_model(valid_model(), feeds)
    result = CliRunner().invoke(cli, ["optimize", str(path), "-o", str(path), "--budget", "30"])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    np.testing.assert_allclose(run_model(onnx.load(str(path)), feeds)["y"], reference["y"], rtol=1e-5, atol=1e-6)


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")

    def disk_full(self, data):
        with open(self, "wb") as fh:
            fh.write(data[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError):
        save_model(valid_model(), path)
    assert path.read_bytes() == b"previous" and leftovers(tmp_path) == []


def test_atomic_path_cleans_up_on_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory(tmp_path):
    target = tmp_path / "split"
    with atomic_directory(target) as staging:  # new folder: renamed in one step
        (staging / "a.onnx").write_bytes(b"a1")
        (staging / "manifest.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["a.onnx", "manifest.json"]
    (target / "notes.txt").write_text("mine")
    with atomic_directory(target) as staging:  # existing folder: files replaced, others kept
        (staging / "a.onnx").write_bytes(b"a2")
        (staging / "manifest.json").write_text("{}")
    assert (target / "a.onnx").read_bytes() == b"a2" and (target / "notes.txt").read_text() == "mine"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as staging:
            (staging / "a.onnx").write_bytes(b"a3")
            raise KeyboardInterrupt
    assert (target / "a.onnx").read_bytes() == b"a2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]  # no staging folder left


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
