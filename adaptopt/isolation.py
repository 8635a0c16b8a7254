"""Run functions in a persistent worker process: a crash or a hang costs one call, not the run.

An execution provider or custom op that segfaults, aborts or never returns would take
the whole optimizer down with it if it ran in-process. Subgraph sessions run here
instead::

    from adaptopt.isolation import Worker, WorkerFailure

    with Worker() as worker:                       # one process serves many calls
        try:
            times = worker.call(measure, model_bytes, feeds, timeout=30.0)
        except WorkerFailure as failure:           # kind: "crash" | "timeout" | "error"
            mark_failed(subgraph, failure.kind, failure.message)   # keep its original; go on

Contract:

- ``fn`` must be importable by name (a module-level function, not a lambda or a
  closure); its arguments and result must pickle. Pass models as serialized bytes
  (or a path, for models over 2 GiB), feeds and outputs as numpy arrays.
- The worker is started with the ``spawn`` method, a fresh interpreter: forking a
  process whose ONNX Runtime thread pool already exists copies locked mutexes and
  deadlocks. The start (interpreter plus imports, about a second) is paid once, on
  the first call; later calls reuse the process and whatever it has imported.
  ``Worker(initializer=f, initargs=(...))`` runs ``f`` once in each new process.
- A crash (segfault, abort, ``os._exit``, the OOM killer) raises
  ``WorkerFailure("crash", ...)`` naming the signal or exit status; a call that
  runs past ``timeout`` seconds kills the worker (SIGKILL) and raises
  ``WorkerFailure("timeout", ...)``. Either way the next call starts a new worker.
- An exception raised by ``fn`` raises ``WorkerFailure("error", "ValueError: ...")``
  with ``error_type`` and the worker's ``traceback``; the worker is intact and stays.
- ``deadline=Deadline(...)`` caps the timeout by the time left of the run's
  budget; a call made once the budget is spent raises ``WorkerFailure("timeout")``
  without running.
- The worker ignores SIGINT (Ctrl-C is the parent's to handle); an interrupt in the
  parent while it waits kills the worker and propagates. ``close()`` (or leaving
  the ``with`` block) stops the worker; it also exits when the parent dies.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import traceback
from typing import Any, Callable

from adaptopt.budget import Deadline

FAILURE_KINDS = ("crash", "timeout", "error")


class WorkerFailure(Exception):
    """A call that did not return: the worker crashed, timed out, or ``fn`` raised."""

    def __init__(self, kind: str, message: str, error_type: str | None = None, traceback: str | None = None):
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}")
        super().__init__(kind, message, error_type, traceback)
        self.kind = kind
        self.message = message
        self.error_type = error_type  # the exception's class name, for kind "error"
        self.traceback = traceback  # the worker's traceback, for kind "error"

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class Worker:
    """A persistent child process that runs one function call at a time."""

    def __init__(self, initializer: Callable[..., Any] | None = None, initargs: tuple = (), name: str = "worker"):
        self._context = multiprocessing.get_context("spawn")
        self._initializer = initializer
        self._initargs = initargs
        self.name = name
        self._process = None
        self._conn = None
        self.starts = 0  # processes started so far (1 + restarts after crashes/timeouts)

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def _start(self) -> None:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(target=_serve, args=(child_end, self._initializer, self._initargs),
                                        name=f"adaptopt-{self.name}", daemon=True)
        process.start()
        child_end.close()  # so the parent sees EOF when the child dies
        self._process, self._conn = process, parent_end
        self.starts += 1

    def start(self) -> "Worker":
        """Start the process now rather than on the first call (workers started together
        boot side by side); a no-op while it runs."""
        if not self.alive():
            self._kill()
            self._start()
        return self

    def close(self) -> None:
        """Stop the worker (politely, then by force); the next call would start a new one."""
        if self._process is None:
            return
        try:
            self._conn.send_bytes(pickle.dumps(None))
        except OSError:
            pass  # already gone
        self._process.join(timeout=2.0)
        self._kill()

    def _kill(self) -> int | None:
        """Kill the process if still running, reap it, and return its exit code."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if process is None:
            return None
        if process.is_alive():
            process.kill()
        process.join(timeout=10.0)
        conn.close()
        code = process.exitcode
        if code is not None:
            process.close()
        return code

    # ---------------------------------------------------------------- calls
    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None,
             deadline: Deadline | None = None, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in the worker; its result, or :class:`WorkerFailure`."""
        limit = deadline.cap(timeout) if deadline is not None else timeout
        label = getattr(fn, "__qualname__", repr(fn))
        if limit is not None and limit <= 0:
            raise WorkerFailure("timeout", f"{label} not run: the time budget is spent")
        payload = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        self.start()
        try:
            self._conn.send_bytes(payload)
            if not self._conn.poll(limit):
                self._kill()
                raise WorkerFailure("timeout", f"{label} did not finish within {limit:.3g} s; worker killed")
            status, *reply = self._conn.recv()
        except (EOFError, OSError):  # it died: during the call, or while idle since the liveness check
            raise WorkerFailure("crash", f"{label}: worker {describe_exit(self._kill())}") from None
        except BaseException:  # KeyboardInterrupt/SIGTERM mid-exchange: the pipe is unusable, kill, re-raise
            self._kill()
            raise
        if status == "ok":
            return reply[0]
        error_type, message, trace = reply
        raise WorkerFailure("error", f"{label}: {error_type}: {message}", error_type, trace)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else ""


def _serve(conn, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    """The worker's loop: receive (fn, args, kwargs), reply ("ok", result) or ("error", type, line, trace)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent went away
        try:
            request = pickle.loads(payload)
            if request is None:
                return
            fn, args, kwargs = request
            reply = ("ok", fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - not hidden: forwarded to the caller as WorkerFailure
            reply = ("error", type(exc).__name__, _first_line(exc), traceback.format_exc())
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            conn.send(("error", type(exc).__name__, f"result cannot be pickled: {_first_line(exc)}", ""))
