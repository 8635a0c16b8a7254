"""Clean interruption: SIGTERM (and SIGHUP) unwind the stack like Ctrl-C does.

Python turns SIGINT into KeyboardInterrupt, so ``finally`` blocks and context
managers run: ``graph.io.atomic_path`` removes its temp file, ``TemporaryDirectory``
its folder, ``isolation.Worker`` kills its process. SIGTERM, which is what job
runners and ``timeout`` send, would instead end the process on the spot and leave
temp files behind. Inside :func:`interrupts_as_exceptions` it raises
:class:`Terminated` (a KeyboardInterrupt) in the main thread instead.

A signal is handled between Python bytecodes: while ONNX Runtime runs a session
in C++, the interrupt waits until that call returns.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal other than SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"terminated by {signal.Signals(self.signum).name}"


def _raise(signum: int, frame) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP raise :class:`Terminated`; handlers are restored after.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    signum = interrupt.signum if isinstance(interrupt, Terminated) else signal.SIGINT
    return 128 + int(signum)


def describe(interrupt: KeyboardInterrupt) -> str:
    return str(interrupt) if isinstance(interrupt, Terminated) else "interrupted"
