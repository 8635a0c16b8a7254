"""Isolation: a crash, hang or exception in the worker costs one call; the caller goes on."""

from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from adaptopt.budget import Deadline
from adaptopt.isolation import Worker, WorkerFailure, describe_exit
from tests.conftest import run_model
from tests.make_bad_models import valid_model


# Functions the worker runs: module-level, so the spawned process can import them by name.
def add(a, b):
    return a + b


def pid() -> int:
    return os.getpid()


def segfault() -> None:
    ctypes.string_at(0)


def hang() -> None:
    while True:
        pass


def fail(message: str) -> None:
    raise ValueError(message)


def unpicklable():
    return lambda: None


def run_in_worker(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run_model(onnx.load_model_from_string(model_bytes), feeds)


@pytest.fixture(scope="module")
def worker():
    with Worker(name="test") as w:
        yield w


def test_one_worker_serves_many_calls(worker):
    first = worker.call(pid)
    assert [worker.call(add, i, 1) for i in range(20)] == list(range(1, 21))
    assert worker.call(pid) == first != os.getpid()  # the spawn cost is paid once


def test_models_and_arrays_cross_the_process_boundary(worker):
    model = valid_model()
    feeds = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}
    got = worker.call(run_in_worker, model.SerializeToString(), feeds, timeout=60)
    np.testing.assert_array_equal(got["y"], run_model(model, feeds)["y"])


@pytest.mark.parametrize("fn,arg,signal_name", [(segfault, None, "SIGSEGV"), (os.abort, None, "SIGABRT"),
                                                (os._exit, 3, "status 3")])
def test_crash_is_a_failure_and_the_next_call_works(worker, fn, arg, signal_name):
    before, starts = worker.call(pid), worker.starts
    with pytest.raises(WorkerFailure) as info:
        worker.call(fn, *([] if arg is None else [arg]), timeout=30)
    assert info.value.kind == "crash" and signal_name in info.value.message
    assert worker.call(add, 2, 3) == 5
    assert worker.call(pid) != before and worker.starts == starts + 1


def test_hang_times_out_and_the_worker_is_replaced(worker):
    before = worker.call(pid)
    with pytest.raises(WorkerFailure) as info:
        worker.call(hang, timeout=0.5)
    assert info.value.kind == "timeout" and "0.5 s" in info.value.message
    assert worker.call(add, 1, 1) == 2 and worker.call(pid) != before


def test_worker_killed_while_idle_is_replaced(worker):
    before = worker.call(pid)
    os.kill(before, signal.SIGKILL)  # e.g. the OOM killer, between two calls
    worker._process.join(10)  # dead before the next call looks (a death after the look is a "crash")
    assert worker.call(add, 3, 4) == 7 and worker.call(pid) != before


def test_exception_is_reported_and_the_worker_stays(worker):
    before = worker.call(pid)
    with pytest.raises(WorkerFailure) as info:
        worker.call(fail, "bad subgraph")
    failure = info.value
    assert failure.kind == "error" and failure.error_type == "ValueError"
    assert "bad subgraph" in failure.message and "Traceback" in failure.traceback
    assert str(failure).startswith("error: ")
    assert worker.call(pid) == before


def test_unpicklable_result_is_an_error(worker):
    with pytest.raises(WorkerFailure) as info:
        worker.call(unpicklable)
    assert info.value.kind == "error" and "pickle" in info.value.message
    assert worker.call(add, 1, 2) == 3


def test_deadline_caps_the_timeout_and_a_spent_budget_runs_nothing():
    clock = [0.0]
    deadline = Deadline(10, clock=lambda: clock[0])
    assert deadline.cap(30.0) == 10.0 and deadline.cap(None) == 10.0 and deadline.cap(2.0) == 2.0
    clock[0] = 4.0
    assert deadline.remaining() == 6.0 and deadline.elapsed() == 4.0 and not deadline.expired()
    clock[0] = 12.0
    assert deadline.remaining() == 0.0 and deadline.expired()
    unlimited = Deadline(None)
    assert unlimited.remaining() == math.inf and unlimited.cap(None) is None and not unlimited.expired()
    idle = Worker()
    with pytest.raises(WorkerFailure) as info:
        idle.call(add, 1, 2, deadline=deadline)
    assert info.value.kind == "timeout" and idle.pid is None  # never started
    with pytest.raises(ValueError):
        Deadline(-1)


def test_close_stops_the_process():
    w = Worker()
    assert w.call(add, 1, 1) == 2
    child = w.pid
    w.close()
    assert w.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # gone and reaped
    assert w.call(add, 2, 2) == 4  # a closed worker starts again when used
    w.close()


def test_failure_kinds_and_exit_descriptions():
    with pytest.raises(ValueError):
        WorkerFailure("melted", "x")
    assert describe_exit(-11) == "killed by SIGSEGV" and describe_exit(2) == "exited with status 2"
    assert describe_exit(None) == "stopped responding"


def announce_and_hang() -> None:
    print("HANGING", flush=True)  # the worker shares its parent's stdout
    hang()


# The parent waits on a hanging worker call with no timeout, under the CLI's signal handling.
WAITING_PARENT = """
import sys
from adaptopt.isolation import Worker
from adaptopt.signals import interrupts_as_exceptions
from tests.test_isolation import announce_and_hang, pid
worker = Worker()
with interrupts_as_exceptions():
    print(worker.call(pid), flush=True)
    try:
        worker.call(announce_and_hang)
    except KeyboardInterrupt as exc:
        print("interrupted:", exc, flush=True)
        sys.exit(143)
"""


def test_sigterm_while_waiting_kills_the_worker():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", WAITING_PARENT], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(root)), cwd=root)
    try:
        child = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "HANGING"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "terminated by SIGTERM" in out
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # no orphan left spinning


def test_start_boots_the_process_before_the_first_call():
    with Worker(name="early") as a, Worker(name="early") as b:
        assert a.pid is None
        a.start(), b.start()
        assert a.alive() and b.alive() and a.pid != b.pid
        first = a.pid
        assert a.start() is a and a.pid == first  # running: not started again
        assert a.call(pid) == first and a.starts == 1
