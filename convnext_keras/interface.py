"""Errors name their fix in the terms of the interface the user is in.

The library's messages say ``weights=None`` to a Python caller and ``--weights none`` to someone
at the ``convnext`` command line: a message builds the fix with :func:`fix`, and the CLI runs
every command inside :func:`command_line`.  Keras-free (imported by the registry's errors).
"""

from __future__ import annotations

import contextlib

_command_line = False


def fix(python: str, cli: str) -> str:
    """``python`` (e.g. ``"weights=None"``), or ``cli`` (``"--weights none"``) while a
    ``convnext`` command runs."""
    return cli if _command_line else python


@contextlib.contextmanager
def command_line():
    """Within this block, :func:`fix` answers in command-line terms."""
    global _command_line
    previous, _command_line = _command_line, True
    try:
        yield
    finally:
        _command_line = previous
