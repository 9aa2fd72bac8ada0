"""Quiet the backends' C++ start-up logging on the command line, keeping real warnings.

TensorFlow 2.16+ and XLA print their start-up notes through absl *before* absl's logging is
initialised, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them (tensorflow/tensorflow#102212)::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1796016963.249529 5246 cudart_stub.cc:31] Could not find cuda drivers ...
    I0000 00:00:1796016963.397459 5246 cpu_feature_guard.cc:227] This TensorFlow binary ...
    E0000 00:00:1796016973.941970 5267 cuda_platform.cc:52] failed call to cuInit: ...

Commands that compute call :func:`quiet_backend_logs` before a backend is imported.  It sets
``TF_CPP_MIN_LOG_LEVEL=1`` (INFO hidden, warnings and errors shown) and passes what the
libraries write to file descriptor 2 through a small filter process that drops only the
lines above: INFO lines, the absl banner, and the CUDA probes' failures on a machine without an
NVIDIA device (where they are expected) - and a few more lines that are noise on every run:
the TFLite converter's ``Ignored output_format`` / ``Ignored drop_control_dependency`` and its
interpreter's ``Created TensorFlow Lite XNNPACK delegate``, and Ray's core-worker error line
about every Ray Data actor pool (``... max_restarts > 0``) on a successful ``--ray`` run.
Every other line, warnings and errors included, goes through unchanged.  Python's own
``sys.stderr`` (errors, progress bars) keeps writing to the terminal directly.  The filter is
a separate process so that it still passes on the last lines of a process that crashes.

Nothing is changed when the user set ``TF_CPP_MIN_LOG_LEVEL`` (their choice wins: ``0`` shows
everything), or when ``sys.stderr`` is not the process's own (a test's CliRunner).
"""

from __future__ import annotations

import atexit
import io
import os
import subprocess
import sys
from pathlib import Path

#: The line head of absl / glog messages after the severity letter: date, time (before absl is
#: initialised, seconds since 1970), thread, ``file:line]``.
_HEAD = r"\d{4} [\d:.]+ +\d+ \S+:\d+\] "
_ABSL = "[IWEF]" + _HEAD
#: Start-up lines that say nothing a user can act on, on any machine.
_NOISE = [
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    "I" + _HEAD,  # INFO (TF_CPP_MIN_LOG_LEVEL=1 after start)
    _ABSL + r".*Unable to register cu(DNN|FFT|BLAS) factory",
    _ABSL + r".*[Cc]omputation placer already registered",
    _ABSL + r".*TF-TRT Warning: Could not find TensorRT",
    # The TFLite converter's notes on options that TensorFlow itself passes it, and the
    # interpreter's announcement of its default CPU delegate (TFLite export and verification).
    r"W\d{4} [\d:.]+ +\d+ tf_tfl_flatbuffer_helpers\.cc:\d+\] Ignored "
    r"(output_format|drop_control_dependency)\.",
    r"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.",
    # Ray's core worker on every Ray Data actor pool (its actors may restart, their constructor
    # arguments live in the object store): an error-level line on a run that succeeds.
    r"\[[\d-]+ [\d:,.]+ E \d+ \d+\] core_worker\.cc:\d+: Actor with class name: .* has "
    r"constructor arguments in the object store and max_restarts > 0",
]
#: Expected where there is no NVIDIA device; a real problem where there is one.
_NO_GPU_NOISE = [_ABSL + r".*failed call to cuInit"]
#: The second line of cpu_feature_guard's INFO message, dropped with it.
_CONTINUATION = r"To enable the following instructions: "

_FILTER = r"""
import os, re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # outlive Ctrl-C: pass on the last lines
noise, continuation = re.compile(sys.argv[1]), re.compile(sys.argv[2])
out, dropped = os.fdopen(1, "wb", 0), False
for line in sys.stdin.buffer:
    text = line.decode("utf-8", "replace")
    if noise.match(text) or (dropped and continuation.match(text)):
        dropped = True
        continue
    dropped = False
    out.write(line)
"""

_started = False


def noise_pattern() -> str:
    """The regular expression of the lines the filter drops on this machine."""
    gpu = any(Path("/dev").glob("nvidia[0-9]*"))
    return "|".join(f"(?:{p})" for p in _NOISE + ([] if gpu else _NO_GPU_NOISE))


def quiet_backend_logs() -> bool:
    """Start the filter (once per process) unless the user chose the log level; True if on."""
    global _started
    if _started or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return _started
    try:
        if sys.stderr is not sys.__stderr__ or sys.stderr.fileno() != 2:
            return False
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"
    sys.stderr.flush()
    terminal = os.dup(2)
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _FILTER, noise_pattern(), _CONTINUATION],
            stdin=subprocess.PIPE,
            stdout=terminal,
        )
    except OSError:
        os.close(terminal)
        return False
    os.dup2(child.stdin.fileno(), 2)
    child.stdin.close()
    # Python's own messages go straight to the terminal (a tty stays a tty for progress bars).
    sys.stderr = io.TextIOWrapper(
        io.FileIO(terminal, "w", closefd=False),
        encoding=sys.__stderr__.encoding,
        errors="backslashreplace",
        line_buffering=True,
        write_through=True,
    )
    atexit.register(_stop, child, terminal)
    _started = True
    return True


def _stop(child: subprocess.Popen, terminal: int) -> None:
    """Close the filter's input and let it pass on the last lines before the shell prompt."""
    with_errors = (OSError, ValueError)
    try:
        sys.stderr.flush()
        os.dup2(terminal, 2)
    except with_errors:
        return
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass  # a process we started still holds the pipe; the filter ends with it
