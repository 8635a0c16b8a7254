"""Errors and exit codes.

Every error a user can cause is an :class:`AdaptoptError` with a one-line message;
the CLI maps it to its exit code. Anything else is a bug (exit 1).
"""

from __future__ import annotations

from contextlib import contextmanager
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL_ERROR = 1
    BAD_INPUT = 2
    GATE_NOT_MET = 3


class AdaptoptError(Exception):
    """Base class for errors caused by the user's input; one-line message."""

    exit_code: ExitCode = ExitCode.BAD_INPUT


class InputError(AdaptoptError):
    """A model, a file or an argument that cannot be used (exit 2)."""


class ModelError(InputError):
    """What the model holds cannot be run, typed or shaped (exit 2). Raised deep in the
    pipeline, where the file is not known; :func:`about_model` names it."""


def source_name(source) -> str:
    """How messages and reports name a model source: its path, ``<stdin>`` for ``-``."""
    return "<stdin>" if str(source) == "-" else str(source)


@contextmanager
def about_model(source) -> None:
    """Prefix a :class:`ModelError` raised inside with the model's :func:`source_name`, as
    every other message about a file starts."""
    name = source_name(source)
    try:
        yield
    except ModelError as exc:
        if str(exc).startswith(f"{name}: "):
            raise
        raise ModelError(f"{name}: {exc}") from None


class ConfigError(InputError):
    """A configuration key or value that is wrong (exit 2); names the key and file."""


class GateNotMet(AdaptoptError):
    """A gate the user asked for (``--require-speedup``, accuracy) was not met (exit 3)."""

    exit_code = ExitCode.GATE_NOT_MET
