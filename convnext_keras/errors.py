"""Error texts for people: foreign messages made plain, failed writes named by where and why.

* :func:`plain` strips terminal escape codes and other control characters from a message that
  quotes another library (PyTorch's unsafe-pickle text carries ``\\x1b[1m``), so an error is
  one clean line in a terminal, a log file or JSON.
* :func:`require` is every optional import: a missing module is :class:`MissingDependencyError`,
  one line naming what needs it and the extra that installs it
  (``pip install "convnext-keras[embed]"``); :func:`check_installed` finds that out without
  importing anything, for the checks made before any work starts.
* :class:`ImageError`: a file that cannot be read as an image (the image readers of
  :mod:`convnext_keras.preprocess` and :mod:`convnext_keras.data.ade20k` raise it).
* :func:`writing` turns a failed write - ``OSError`` (``ENOSPC``, ``EROFS``, ``EACCES``...) or
  another library's error that reports one (TensorFlow's ``ResourceExhaustedError`` while
  writing variables, safetensors' ``IoError``) - into a :class:`WriteError` that names the file
  the user asked for (not a temporary one) and what to do.

Imports nothing heavy: the command line's error boundary uses it before any backend loads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re

# CSI / OSC escape sequences, then any other C0/C1 control character except tab and newline.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

#: The write failures a user can fix by writing elsewhere, and the advice for each.
WRITE_ERRORS = {
    errno.ENOSPC: "free some space or write somewhere else",
    errno.EDQUOT: "free some space (disk quota exceeded) or write somewhere else",
    errno.EFBIG: "the file system does not take files this large; write somewhere else",
    errno.EROFS: "the file system is read-only; write somewhere else",
    errno.EACCES: "no permission to write there; choose another place or fix its permissions",
    errno.EPERM: "the operation is not permitted there; choose another place",
}
# safetensors (Rust) reports "Os { code: 28, ... }"; TensorFlow and others quote strerror().
_OS_CODE = re.compile(r"\bOs \{ code: (\d+)")
#: Libraries whose write failures are recognised by their message (not this library's own
#: errors, nor a download's: "Permission denied" from a socket is no failed write).
_FOREIGN_WRITERS = ("tensorflow", "safetensors", "keras", "h5py", "onnx", "tf2onnx", "jax", "torch")


def plain(text: str) -> str:
    """``text`` without terminal escape sequences and control characters (tab/newline kept)."""
    return _CONTROL.sub("", _ESCAPES.sub("", str(text)))


def write_errno(error: BaseException) -> int | None:
    """The errno of a write failure in :data:`WRITE_ERRORS` that ``error`` reports, else None.

    An ``OSError`` gives its own errno; the errors of the libraries that write files for this
    one (TensorFlow, safetensors, Keras, ONNX...) are recognised by the standard text of the
    errno (``os.strerror``) or a Rust ``Os { code: N }`` in their message.
    """
    if isinstance(error, OSError):
        return error.errno if error.errno in WRITE_ERRORS else None
    if type(error).__module__.split(".")[0] not in _FOREIGN_WRITERS:
        return None
    text = str(error)
    match = _OS_CODE.search(text)
    if match and int(match.group(1)) in WRITE_ERRORS:
        return int(match.group(1))
    for code in WRITE_ERRORS:
        if os.strerror(code) in text:
            return code
    return None


class WriteError(OSError):
    """A file or folder could not be written; ``str()`` says which, why and what to do."""

    def __init__(self, code: int, path, what: str = "the output"):
        self.what = what
        super().__init__(code, os.strerror(code), str(path))

    def __str__(self) -> str:
        name = errno.errorcode.get(self.errno, str(self.errno))
        return (
            f"Could not write {self.what} {self.filename}: {self.strerror} ({name}); "
            f"{WRITE_ERRORS.get(self.errno, 'write somewhere else')}. Nothing was left "
            "half-written."
        )


@contextlib.contextmanager
def writing(path, what: str = "the output"):
    """Re-raise a write failure inside the block as a :class:`WriteError` naming ``path``.

    Other errors pass unchanged.  ``path`` is what the user asked for: the error names it
    even when the failing write was to a temporary file beside it.
    """
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        code = write_errno(e)
        if code is None:
            raise
        raise WriteError(code, path, what) from e


def describe(error: BaseException) -> str:
    """One readable line for an error the command line reports (escape codes removed)."""
    if isinstance(error, OSError) and not isinstance(error, WriteError) and error.strerror:
        name = errno.errorcode.get(error.errno, "")
        where = f": {error.filename}" if error.filename else ""
        advice = WRITE_ERRORS.get(error.errno)
        text = f"{error.strerror}{f' ({name})' if name else ''}{where}" + (
            f"; {advice}." if advice else "."
        )
    else:
        text = str(error)
    return plain(text).strip()


class ImageError(ValueError):
    """A file that cannot be read as an image; the message names the file and the cause."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: cannot read as an image ({reason}).")

    def __reduce__(self):  # picklable across processes despite the two-argument __init__
        return (type(self), (self.path, self.reason))


# ---------------------------------------------------------------------------------------------
# Optional dependencies: one rule for every optional import


#: The pip name of each optional module whose name differs from it.
_PIP_NAMES = {
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "tensorflow_hub": "tensorflow-hub",
    "tf_keras": "tf-keras",
    "ray": "ray[data]",
}


class MissingDependencyError(ImportError, ValueError):
    """An optional dependency that is not installed (or cannot be imported); ``str()`` is one
    line naming what needs it and the extra that installs it: ``pip install
    "convnext-keras[embed]"``.  Both an ``ImportError`` (what Python callers expect of a missing
    module) and a ``ValueError`` (what the command line reports as one line, exit status 2)."""

    def __init__(self, message: str, *, module: str, extra: str | None):
        super().__init__(message, name=module)
        self.module, self.extra = module, extra

    def __reduce__(self):  # picklable across processes despite the keyword-only arguments
        return (_missing, (str(self), self.module, self.extra))


def _missing(message: str, module: str, extra: str | None) -> MissingDependencyError:
    return MissingDependencyError(message, module=module, extra=extra)


def missing_dependency(
    module: str,
    *,
    extra: str | None,
    purpose: str,
    alternative: str = "",
    cause: BaseException | None = None,
) -> MissingDependencyError:
    """The error for ``module`` missing: ``"<purpose> needs <package>, which is not installed:
    pip install "convnext-keras[<extra>]" (<alternative>)."`` (``extra`` None: a package no
    extra installs, ``pip install <package>``) - or, when ``cause`` shows the module is
    installed but its import failed, that failure instead of "not installed"."""
    top = module.split(".")[0]
    package = _PIP_NAMES.get(top, top)
    absent = cause is None or getattr(cause, "name", None) in (None, top, module)
    why = (
        "which is not installed"
        if absent
        else f"which could not be imported ({type(cause).__name__}: {plain(str(cause)).strip()})"
    )
    tail = f" ({alternative})" if alternative else ""
    command = f'pip install "convnext-keras[{extra}]"' if extra else f"pip install {package}"
    return MissingDependencyError(
        f"{purpose} needs {package}, {why}: {command}{tail}.", module=module, extra=extra
    )


def require(module: str, *, extra: str | None, purpose: str, alternative: str = ""):
    """``import module`` and return it, or raise :class:`MissingDependencyError` naming the
    extra of this package that installs it (``extra``: a key of pyproject.toml's
    ``optional-dependencies``), what needs it (``purpose``, e.g. ``"ONNX export"``) and any
    other way (``alternative``, e.g. ``"or --format npy"``).  Every optional import of the
    library goes through here, so a missing one is always the same one line."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise missing_dependency(
            module, extra=extra, purpose=purpose, alternative=alternative, cause=e
        ) from e


def installed(module: str) -> bool:
    """Whether ``module``'s top-level package can be found, without importing it (cheap: for
    checks made before any work starts)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):  # a parent package missing, or set to None in sys.modules
        return False


def check_installed(module: str, *, extra: str, purpose: str, alternative: str = "") -> None:
    """:func:`require`'s error when ``module`` is not installed, found without importing it."""
    if not installed(module):
        raise missing_dependency(module, extra=extra, purpose=purpose, alternative=alternative)
