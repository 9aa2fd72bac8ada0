"""Download, verify and cache official checkpoints and their converted Keras weights.

Cache layout under ``CONVNEXT_HOME`` (default ``~/.cache/convnext_keras``)::

    checkpoints/<official file name>      the downloaded file, exactly as published
    keras/<model name>.safetensors        converted Keras weights ({layer/index: array})
    locks/                                the cross-process lock files (empty; kept)

A file only ever appears under its final name complete and verified: downloads go to a
temporary file in the same directory, are checked (length, readable, every tensor fits the
architecture) and then atomically renamed.  A per-file lock makes concurrent processes share
one download instead of racing.  ``CONVNEXT_BASE_URL`` may also be a folder
(``file:///path/`` or a plain path): files are copied from it, no server needed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from . import checkpoints, registry
from .interface import fix

T = TypeVar("T")

#: Bumped when the converted-weights format changes, so stale caches are rebuilt.
CONVERTED_FORMAT = "1"
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A checkpoint could not be downloaded or what arrived is not the checkpoint."""


def cache_dir() -> Path:
    """The cache root: ``$CONVNEXT_HOME`` or ``~/.cache/convnext_keras``."""
    return Path(os.environ.get("CONVNEXT_HOME") or "~/.cache/convnext_keras").expanduser()


def checkpoint_cache_path(ckpt: registry.Checkpoint) -> Path:
    return cache_dir() / "checkpoints" / ckpt.filename


def converted_cache_path(ckpt: registry.Checkpoint) -> Path:
    return cache_dir() / "keras" / f"{ckpt.name}.safetensors"


def is_cached(ckpt: registry.Checkpoint) -> bool:
    """True when the model loads offline (converted weights or the checkpoint are cached)."""
    return converted_cache_path(ckpt).is_file() or checkpoint_cache_path(ckpt).is_file()


def _lock_path(path: Path) -> Path:
    """The lock file guarding ``path``: in the cache's ``locks/`` folder, not beside the file.

    Lock files stay (deleting one that another process may be waiting on would let two
    processes in), so they are kept out of the folders users look into.
    """
    try:
        relative = path.resolve().relative_to(cache_dir().resolve())
    except ValueError:
        return path.with_name(path.name + ".lock")
    return cache_dir() / "locks" / ("--".join(relative.parts) + ".lock")


@contextlib.contextmanager
def _locked(path: Path):
    from filelock import FileLock

    lock = _lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        yield


@contextlib.contextmanager
def atomic_path(dest: Path):
    """Yield a temp path beside ``dest``; it is renamed onto ``dest`` only if the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _offline_help(url: str, reason: str) -> str:
    """Why ``url`` could not be fetched, and the three ways to go on without internet."""
    filename = url.rsplit("/", 1)[-1]
    names = [c.name for c in registry.CHECKPOINTS.values() if c.filename == filename]
    fetch_it = f"`convnext fetch {names[0]} --to DIR`, or " if names else ""
    return (
        f"Could not download {url} ({reason}).\n"
        f"No internet? On a machine that has it, get the official file {filename} ({fetch_it}"
        f"{registry.OFFICIAL_BASE_URL}{filename}), carry it here and pass "
        + fix("weights='FILE'", "--weights FILE")
        + "; or set CONVNEXT_BASE_URL to the folder holding it (file:///path/to/folder/) or to "
        "a mirror; or see the whole pipeline run with random weights "
        f"({fix('weights=None', '--weights none')}: the answers then mean nothing)."
    )


def _local_source(url: str) -> Path | None:
    """The file behind a ``file:`` URL or a plain path (a folder as CONVNEXT_BASE_URL)."""
    if url.startswith("file:"):
        from urllib.parse import unquote, urlparse
        from urllib.request import url2pathname

        return Path(url2pathname(unquote(urlparse(url).path)))
    if "://" not in url:
        return Path(url).expanduser()
    return None


def _copy_verified(source: Path, url: str, dest: Path, verify: Callable[[Path], T]) -> T:
    """Copy a local file to ``dest`` atomically, keeping it only if ``verify`` passes."""
    if not source.is_file():
        raise DownloadError(_offline_help(url, f"no such file: {source}"))
    with atomic_path(dest) as tmp:
        try:
            shutil.copyfile(source, tmp)
        except OSError as e:
            raise DownloadError(_offline_help(url, f"{type(e).__name__}: {e}")) from e
        return _verified(url, tmp, verify)


def _verified(url: str, tmp: Path, verify: Callable[[Path], T]) -> T:
    try:
        return verify(tmp)
    except checkpoints.CheckpointError as e:
        raise DownloadError(
            f"{url} did not deliver a usable checkpoint, so nothing was cached:\n{e}"
        ) from e


def _progress(total: int | None, description: str):
    """A rich progress bar when stderr is a terminal (drawn there, never on stdout: output
    such as ``--json`` stays clean), nothing otherwise."""
    if not sys.stderr.isatty() or os.environ.get("CONVNEXT_NO_PROGRESS"):
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
        console=Console(stderr=True),
    )
    bar.start()
    task = bar.add_task(description, total=total)
    return bar, task


def fetch(url: str, dest: Path, *, verify: Callable[[Path], T], timeout: float = 60.0) -> T:
    """Download ``url`` to ``dest`` atomically, keeping it only if ``verify(tmp_path)`` passes.

    Returns what ``verify`` returned.  Any failure leaves ``dest`` untouched and raises
    ``DownloadError`` naming the URL and the way out.  A ``file:`` URL or a plain path is
    copied instead (``CONVNEXT_BASE_URL`` naming a folder).
    """
    local = _local_source(url)
    if local is not None:
        return _copy_verified(local, url, dest, verify)
    import requests

    with atomic_path(dest) as tmp:
        try:
            response = requests.get(url, stream=True, timeout=timeout)
        except requests.RequestException as e:
            raise DownloadError(_offline_help(url, type(e).__name__ + ": " + str(e))) from e
        with response:
            if response.status_code != 200:
                raise DownloadError(
                    _offline_help(url, f"HTTP {response.status_code} {response.reason}")
                )
            expected = response.headers.get("Content-Length")
            expected = int(expected) if expected and expected.isdigit() else None
            bar = _progress(expected, dest.name)
            received = 0
            try:
                with open(tmp, "wb") as f:
                    for chunk in response.iter_content(_CHUNK):
                        f.write(chunk)
                        received += len(chunk)
                        if bar:
                            bar[0].update(bar[1], completed=received)
            except requests.RequestException as e:
                of = f" of {expected}" if expected else ""
                raise DownloadError(
                    _offline_help(
                        url,
                        f"incomplete: the connection broke after {received}{of} "
                        f"bytes; nothing was cached ({type(e).__name__})",
                    )
                ) from e
            finally:
                if bar:
                    bar[0].stop()
        if expected is not None and received != expected:
            raise DownloadError(
                f"Download of {url} is incomplete: {received} of {expected} bytes arrived. "
                "Nothing was cached; try again, or pass a local file with "
                f"{fix('weights=FILE', '--weights FILE')}."
            )
        result = _verified(url, tmp, verify)
    return result


def _check_head(ckpt: registry.Checkpoint, weights: dict, source: str) -> None:
    head = weights.get("head_fc")
    classes = head[1].shape[0] if head else None
    if classes != ckpt.num_classes:
        raise checkpoints.CheckpointError(
            f"{source} has {'no' if classes is None else classes} head classes; registry entry "
            f"{ckpt.name} expects {ckpt.num_classes}."
        )


def save_converted(weights: dict[str, list[np.ndarray]], dest: Path, metadata: dict) -> None:
    from safetensors.numpy import save_file

    flat = {
        f"{layer}/{i}": np.ascontiguousarray(a)
        for layer, arrays in weights.items()
        for i, a in enumerate(arrays)
    }
    with atomic_path(dest) as tmp:
        save_file(flat, str(tmp), metadata={**metadata, "format": CONVERTED_FORMAT})


def load_converted(path: Path) -> dict[str, list[np.ndarray]] | None:
    """Read a converted-weights cache file; None if it is unreadable or of an old format."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            if (f.metadata() or {}).get("format") != CONVERTED_FORMAT:
                return None
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None
    weights: dict[str, list[np.ndarray]] = {}
    for key in sorted(flat, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1]))):
        weights.setdefault(key.rsplit("/", 1)[0], []).append(flat[key])
    return weights


def convert_official(ckpt: registry.Checkpoint, path: Path) -> dict[str, list[np.ndarray]]:
    """Keras weights of the checkpoint file ``path`` of ``ckpt``; CheckpointError if the file is
    not that checkpoint (unreadable, another architecture or head size)."""
    weights = checkpoints.convert_state_dict(checkpoints.read_state_dict(path), ckpt.variant)
    _check_head(ckpt, weights, ckpt.filename)
    return weights


def official_weights(ckpt: registry.Checkpoint) -> dict[str, list[np.ndarray]]:
    """Converted Keras weights of an official checkpoint: from cache, else download + convert.

    The second call for the same model reads only the converted cache (fast, offline).
    """
    converted = converted_cache_path(ckpt)
    with _locked(converted):
        if converted.is_file():
            weights = load_converted(converted)
            if weights is not None:
                return weights
        source = checkpoint_cache_path(ckpt)
        convert = functools.partial(convert_official, ckpt)
        with _locked(source):
            if source.is_file():
                weights = convert(source)
            else:
                weights = fetch(ckpt.url, source, verify=convert)
        save_converted(weights, converted, {"source": ckpt.filename, "model": ckpt.name})
        return weights


def fetch_official(ckpt: registry.Checkpoint, folder: str | os.PathLike) -> tuple[Path, str]:
    """Put the official file of ``ckpt`` into ``folder`` under its official name, verified,
    to carry to a machine without internet (``convnext fetch``).

    The cache's copy is used when it holds one, else the file is downloaded (from
    ``CONVNEXT_BASE_URL`` when set).  Returns ``(path, how)``, ``how`` being ``"present"``
    (already there and valid), ``"copied from the cache"`` or ``"downloaded"``.  Raises
    DownloadError as :func:`fetch` does; a damaged file already in ``folder`` is replaced.
    """
    dest = Path(folder).expanduser() / ckpt.filename
    verify = functools.partial(convert_official, ckpt)
    if dest.is_file():
        try:
            verify(dest)
            return dest, "present"
        except checkpoints.CheckpointError:
            pass  # replaced below
    cached = checkpoint_cache_path(ckpt)
    with _locked(cached):
        if cached.is_file():
            _copy_verified(cached, str(cached), dest, verify)
            return dest, "copied from the cache"
    fetch(ckpt.url, dest, verify=verify)
    return dest, "downloaded"
