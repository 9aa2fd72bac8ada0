"""Download, verify and cache official checkpoints and their converted Keras weights.

Cache layout under ``CONVNEXT_HOME`` (default ``~/.cache/convnext_keras``)::

    checkpoints/<official path>           the downloaded file, exactly as published (the path
                                          under the official server: convnext_tiny_1k_224_ema.pth,
                                          convnextv2/im1k/convnextv2_tiny_1k_224_ema.pt, ...)
    checkpoints/<official path>.sha256    its SHA-256 (``sha256sum -c`` reads it)
    keras/<model name>.safetensors        converted Keras weights ({layer/index: array})
    keras/<model name>.safetensors.sha256 their SHA-256
    locks/                                the cross-process lock files (empty; kept)

A file only ever appears under its final name complete and verified: downloads and
conversions go to a temporary file in the same directory (``.<name>.<random>.part``), are
checked (length, SHA-256 when one is pinned, readable, every tensor fits the architecture,
every value finite) and then atomically renamed; the SHA-256 record is written first.  Every
read of a cached file checks its record: a file that no longer matches (bit rot, a truncated
copy, an edit) or that cannot be read is moved aside as ``<name>.corrupt-<time>``, reported in
one line, and rebuilt - converted weights from the checkpoint, a checkpoint by downloading it
again once.  A per-file lock makes concurrent processes share one download, and temporary
files that an interrupted process (``kill -9``) left behind are removed on a later load once
they are stale (no lock held, older than :data:`STALE_SECONDS`).  ``CONVNEXT_BASE_URL`` may
also be a folder (``file:///path/`` or a plain path): files are copied from it, no server needed,
and checked as a download is.

Downloads are abandoned when they stall (fewer than :data:`MIN_RATE` bytes per second over
:data:`STALL_SECONDS`; ``CONVNEXT_STALL_SECONDS`` sets the window) and resume with an HTTP
``Range`` request after a dropped connection (up to :data:`RESUMES` times).

The official host publishes no checksums, so registry rows carry none; pin one per model with
``CONVNEXT_SHA256_<MODEL NAME>`` (e.g. ``CONVNEXT_SHA256_CONVNEXT_TINY_1K_224=<hex>``) or list
files in a ``sha256sum``-style file named by ``CONVNEXT_SHA256SUMS``; a download (and a cached
file) whose SHA-256 differs is refused.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from convnext_keras import registry
from convnext_keras.errors import plain, writing
from convnext_keras.interface import fix
from convnext_keras.weights import convert as checkpoints

T = TypeVar("T")
logger = logging.getLogger("convnext_keras")

#: Bumped when the converted-weights format changes, so stale caches are rebuilt.
CONVERTED_FORMAT = "1"
_CHUNK = 1 << 20
#: A download is abandoned when fewer than ``MIN_RATE * STALL_SECONDS`` bytes arrive in any
#: ``STALL_SECONDS`` (``CONVNEXT_STALL_SECONDS`` overrides the window); silence that long is a
#: dropped connection (resumed).
STALL_SECONDS = 30.0
MIN_RATE = 1024
#: How often one download resumes (HTTP Range) after the connection drops, and the pause
#: before each try (times the try's number).
RESUMES = 3
RESUME_PAUSE_SECONDS = 1.0
#: Temporary files of this library's naming older than this, with no lock held, are removed.
STALE_SECONDS = 10 * 60
#: Suffix of the SHA-256 record beside each cached file (``sha256sum`` format).
RECORD_SUFFIX = ".sha256"
_TEMP_NAME = re.compile(r"^\.(?P<dest>.+)\.[^.]+\.part$")


class DownloadError(RuntimeError):
    """A checkpoint could not be downloaded or what arrived is not the checkpoint."""


class DamagedFileError(checkpoints.CheckpointError):
    """A cached file that no longer matches its SHA-256 record or cannot be read."""


def cache_dir() -> Path:
    """The cache root: ``$CONVNEXT_HOME`` or ``~/.cache/convnext_keras``."""
    return Path(os.environ.get("CONVNEXT_HOME") or "~/.cache/convnext_keras").expanduser()


def checkpoint_cache_path(ckpt: registry.Checkpoint) -> Path:
    """Where this library keeps an official file (a Hub row's file stays in the Hugging Face
    cache, :func:`hub_cached_path`)."""
    return cache_dir() / "checkpoints" / ckpt.source.cache_name


def converted_cache_path(ckpt: registry.Checkpoint) -> Path:
    return cache_dir() / "keras" / f"{ckpt.name}.safetensors"


def is_cached(ckpt: registry.Checkpoint) -> bool:
    """True when the model loads offline (converted weights or the checkpoint are cached; a
    Hub file in the Hugging Face cache)."""
    if converted_cache_path(ckpt).is_file():
        return True
    if ckpt.source.is_hub:
        return hub_cached_path(ckpt) is not None
    return checkpoint_cache_path(ckpt).is_file()


def _lock_path(path: Path) -> Path:
    """The lock file guarding ``path`` (every writer of ``path`` holds it until the rename): in
    the cache's ``locks/`` folder, not beside the file.

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


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then put it back at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dest: Path):
    """Yield a temp path beside ``dest``; it is renamed onto ``dest`` only if the block succeeds.

    The file gets the usual permissions (``0666`` minus the umask), as any file the user asks
    for.  A failed write (full disk, read-only or forbidden folder) raises
    :class:`convnext_keras.errors.WriteError` naming ``dest``, and nothing is left behind.
    """
    dest = Path(dest)
    with writing(dest, "the file"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            # After the writer: some (safetensors) replace the file with a private one of theirs.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Integrity records


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def record_path(path: Path) -> Path:
    """The SHA-256 record of a cached file: ``<file>.sha256`` beside it."""
    return path.with_name(path.name + RECORD_SUFFIX)


def write_record(path: Path, digest: str) -> None:
    """Write ``path``'s SHA-256 record atomically (``<hex>  <name>``, as ``sha256sum``)."""
    with atomic_path(record_path(path)) as tmp:
        tmp.write_text(f"{digest}  {path.name}\n")


def read_record(path: Path) -> str | None:
    """The SHA-256 recorded for ``path``, or None when there is no (readable) record."""
    try:
        text = record_path(path).read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    return text[0].lower() if text and re.fullmatch(r"[0-9a-fA-F]{64}", text[0]) else None


def expected_sha256(ckpt: registry.Checkpoint) -> tuple[str, str] | None:
    """``(hex SHA-256, where it was pinned)`` for an official file, or None when none is.

    In order: ``CONVNEXT_SHA256_<NAME>`` (the model name upper-cased), the registry row, and
    the ``sha256sum``-style file named by ``CONVNEXT_SHA256SUMS`` (``<hex>  <file name>``).
    """
    variable = "CONVNEXT_SHA256_" + re.sub(r"\W", "_", ckpt.name).upper()
    pinned = [(os.environ.get(variable, ""), variable), (getattr(ckpt, "sha256", None), "registry")]
    sums = os.environ.get("CONVNEXT_SHA256SUMS")
    if sums:
        try:
            lines = Path(sums).expanduser().read_text().splitlines()
        except OSError as e:
            raise ValueError(f"CONVNEXT_SHA256SUMS={sums} cannot be read ({e}).") from e
        for line in lines:
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == ckpt.filename:
                pinned.append((parts[0], f"CONVNEXT_SHA256SUMS ({sums})"))
    for value, source in pinned:
        if value:
            if not re.fullmatch(r"[0-9a-fA-F]{64}", value.strip()):
                raise ValueError(f"{source}: {value!r} is not a SHA-256 (64 hex digits).")
            return value.strip().lower(), source
    return None


def quarantine(path: Path, problem: str) -> Path:
    """Move a damaged cache file aside (``<name>.corrupt-<time>``), drop its record, say so."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    record_path(path).unlink(missing_ok=True)
    logger.warning(
        f"convnext_keras: {path} is damaged ({problem}); moved it to {aside} and rebuilding it."
    )
    return aside


def _check_record(path: Path, pinned: tuple[str, str] | None = None) -> str:
    """``path``'s SHA-256, checked against its record and ``pinned``; ``DamagedFileError``
    when either differs.  A file without a record (an older version's cache) gets one."""
    digest = file_sha256(path)
    recorded = read_record(path)
    if recorded is not None and recorded != digest:
        raise DamagedFileError(
            f"its SHA-256 {digest[:12]}... differs from {recorded[:12]}... recorded when it was "
            "written"
        )
    if pinned is not None and pinned[0] != digest:
        raise DamagedFileError(f"its SHA-256 {digest[:12]}... is not the one pinned by {pinned[1]}")
    if recorded is None:
        with contextlib.suppress(OSError):  # a read-only (shared) cache still reads
            write_record(path, digest)
    return digest


def clean_stale(directory: Path, max_age: float = STALE_SECONDS) -> list[Path]:
    """Remove this library's temporary files in ``directory`` (``.<name>.<random>.part``) that
    an interrupted process left: older than ``max_age`` seconds and not locked by a writer."""
    from filelock import FileLock, Timeout

    removed = []
    if not directory.is_dir():
        return removed
    now = time.time()
    for entry in directory.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if not match or not entry.is_file():
            continue
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime < max_age:
                continue
            try:  # writers hold the lock of the file they write until the rename
                with FileLock(str(_lock_path(directory / match.group("dest"))), timeout=0):
                    size = entry.stat().st_size
                    entry.unlink()
            except Timeout:
                continue
            removed.append(entry)
            logger.info(f"convnext_keras: removed {entry} ({size} bytes) of an interrupted run")
    return removed


# ---------------------------------------------------------------------------------------------
# Downloads


def _offline_help(url: str, reason: str) -> str:
    """Why ``url`` could not be fetched, and the three ways to go on without internet."""
    rows = [
        c
        for c in registry.CHECKPOINTS.values()
        if not c.source.is_hub and url.endswith("/" + c.source.path)
    ]
    filename = rows[0].filename if rows else url.rsplit("/", 1)[-1]
    official = rows[0].source.official_url if rows else url
    fetch_it = f"`convnext fetch {rows[0].name} --to DIR`, or " if rows else ""
    return (
        f"Could not download {url} ({reason}).\n"
        f"No internet? On a machine that has it, get the official file {filename} ({fetch_it}"
        f"{official}), carry it here and pass "
        + fix("weights='FILE'", "--weights FILE")
        + "; or set CONVNEXT_BASE_URL to the folder holding it (file:///path/to/folder/, the "
        "file at its official path below it) or to a mirror; or see the whole pipeline run with "
        f"random weights ({fix('weights=None', '--weights none')}: the answers then mean "
        "nothing)."
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


def _copy(source: Path, url: str, tmp: Path) -> str:
    """Copy a local ``source`` (named ``url`` to the user) into ``tmp``; returns its SHA-256."""
    if not source.is_file():
        raise DownloadError(_offline_help(url, f"no such file: {source}"))
    try:
        shutil.copyfile(source, tmp)
    except OSError as e:
        raise DownloadError(_offline_help(url, f"{type(e).__name__}: {e}")) from e
    return file_sha256(tmp)


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


def stall_seconds() -> float:
    """The stall window: ``$CONVNEXT_STALL_SECONDS`` or :data:`STALL_SECONDS`."""
    value = os.environ.get("CONVNEXT_STALL_SECONDS")
    if not value:
        return STALL_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"CONVNEXT_STALL_SECONDS must be a positive number, got {value!r}.")
    return seconds


class _Stalled(Exception):
    def __init__(self, received: int, seconds: float):
        super().__init__(f"{received} bytes in {seconds:.0f} s")
        self.received, self.seconds = received, seconds


def _chunks(response, window: float):
    """The body of a streamed response, as it arrives; ``_Stalled`` when fewer than
    ``MIN_RATE * window`` bytes arrive in ``window`` seconds."""
    raw = response.raw
    read1 = getattr(raw, "read1", None)  # returns what has arrived (urllib3 >= 2.3)
    start, count = time.monotonic(), 0
    while True:
        chunk = read1(_CHUNK, decode_content=True) if read1 else raw.read(1 << 14, True)
        if not chunk:
            return
        yield chunk
        count += len(chunk)
        now = time.monotonic()
        if now - start >= window:
            if count < MIN_RATE * window:
                raise _Stalled(count, now - start)
            start, count = now, 0


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(first byte, total)`` of a ``Content-Range: bytes A-B/N`` header."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    if not match:
        return None, None
    total = match.group(2)
    return int(match.group(1)), (int(total) if total.isdigit() else None)


def _download(url: str, tmp: Path, dest: Path, timeout: float, window: float) -> str:
    """Stream ``url`` into ``tmp``, resuming after dropped connections; returns the SHA-256."""
    import requests
    import urllib3

    broken = (requests.RequestException, urllib3.exceptions.HTTPError)
    digest, received, total, validator, tries = hashlib.sha256(), 0, None, None, 0
    bar = None
    try:
        with open(tmp, "wb") as f:
            while True:
                headers = {"Accept-Encoding": "identity"}
                if received:
                    headers["Range"] = f"bytes={received}-"
                    if validator:  # the rest of the same file, or the whole new one
                        headers["If-Range"] = validator
                try:
                    response = requests.get(
                        url, stream=True, timeout=(timeout, min(timeout, window)), headers=headers
                    )
                except broken as e:
                    if received and tries < RESUMES:
                        tries += 1
                        time.sleep(RESUME_PAUSE_SECONDS * tries)
                        continue
                    raise DownloadError(
                        _offline_help(url, f"{type(e).__name__}: {plain(str(e))}")
                    ) from e
                with response:
                    first, size = _content_range(response.headers.get("Content-Range"))
                    if response.status_code == 206 and received and first == received:
                        total = size if size is not None else total
                    elif response.status_code == 200:
                        if received:  # the server ignored the range, or the file changed
                            f.seek(0)
                            f.truncate()
                            digest, received = hashlib.sha256(), 0
                        length = response.headers.get("Content-Length", "")
                        total = int(length) if length.isdigit() else None
                        etag = response.headers.get("ETag", "")
                        validator = (
                            etag if etag and not etag.startswith("W/") else None
                        ) or response.headers.get("Last-Modified")
                    elif response.status_code == 206:  # a range we did not ask for
                        raise DownloadError(
                            _offline_help(url, f"the server sent bytes from {first}, not 0")
                        )
                    else:
                        raise DownloadError(
                            _offline_help(url, f"HTTP {response.status_code} {response.reason}")
                        )
                    if bar is None:
                        bar = _progress(total, dest.name)
                    try:
                        for chunk in _chunks(response, window):
                            f.write(chunk)
                            digest.update(chunk)
                            received += len(chunk)
                            if bar:
                                bar[0].update(bar[1], completed=received, total=total)
                    except _Stalled as e:
                        of = f" of {total}" if total else ""
                        raise DownloadError(
                            f"Download of {url} stalled: {e} (less than {MIN_RATE} bytes/s over "
                            f"{window:g} s) after {received}{of} bytes. Nothing was cached at "
                            f"{dest}; try again later, set CONVNEXT_BASE_URL to a mirror, or "
                            f"pass a local file ({fix('weights=FILE', '--weights FILE')})."
                        ) from None
                    except broken as e:
                        if tries < RESUMES:
                            tries += 1
                            logger.info(f"{url}: connection broke at byte {received}; resuming")
                            time.sleep(RESUME_PAUSE_SECONDS * tries)
                            continue
                        of = f" of {total}" if total else ""
                        raise DownloadError(
                            _offline_help(
                                url,
                                f"incomplete: the connection broke after {received}{of} bytes "
                                f"({tries} resumes); nothing was cached at {dest} "
                                f"({type(e).__name__})",
                            )
                        ) from e
                if total is not None and received < total and tries < RESUMES:
                    tries += 1  # closed early without an error: resume as well
                    continue
                break
    finally:
        if bar:
            bar[0].stop()
    if total is not None and received != total:
        raise DownloadError(
            f"Download of {url} is incomplete: {received} of {total} bytes arrived. Nothing was "
            f"cached at {dest}; try again, or pass a local file with "
            f"{fix('weights=FILE', '--weights FILE')}."
        )
    return digest.hexdigest()


def fetch(
    url: str,
    dest: Path,
    *,
    verify: Callable[[Path], T],
    timeout: float = 60.0,
    sha256: str | tuple[str, str] | None = None,
    stall: float | None = None,
) -> T:
    """Download ``url`` to ``dest`` atomically, keeping it only if ``verify(tmp_path)`` passes.

    Args:
        url: what to download (HTTP or HTTPS), or a ``file:`` URL / plain path to copy
            (``CONVNEXT_BASE_URL`` naming a folder), checked the same way.
        dest: the final path; its SHA-256 record (``dest.sha256``) is written with it.
        verify: called on the complete temporary file; its ``CheckpointError`` refuses the file.
        timeout: seconds to connect, and the longest silence on an open connection before it
            counts as dropped (then resumed with an HTTP Range request, :data:`RESUMES` times).
        sha256: the expected hex SHA-256 (or ``(hex, where it was pinned)``); a file with
            another one is refused.
        stall: the stall window in seconds (default :func:`stall_seconds`): fewer than
            :data:`MIN_RATE` bytes per second over it abandons the download.

    Returns what ``verify`` returned.  Any failure leaves ``dest`` untouched and raises
    ``DownloadError`` naming the URL, the cache path and the way out.
    """
    dest = Path(dest)
    pinned = (sha256, "the caller") if isinstance(sha256, str) else sha256
    local = _local_source(url)
    with atomic_path(dest) as tmp:
        if local is not None:
            digest = _copy(local, url, tmp)
        else:
            digest = _download(url, tmp, dest, timeout, stall or stall_seconds())
        if pinned is not None and digest != pinned[0].lower():
            raise DownloadError(
                f"{url} delivered a file whose SHA-256 is {digest}, not {pinned[0].lower()} as "
                f"pinned by {pinned[1]}; nothing was cached at {dest}. A mirror or proxy changed "
                "it, or the pin is wrong."
            )
        try:
            result = verify(tmp)
        except checkpoints.CheckpointError as e:
            # The temporary file is gone when the user reads this: name the URL instead.
            reason = plain(str(e)).replace(str(tmp), url)
            raise DownloadError(
                f"{url} did not deliver a usable checkpoint, so nothing was cached at {dest}:\n"
                f"{reason}"
            ) from e
        write_record(dest, digest)
    return result


# ---------------------------------------------------------------------------------------------
# Converted weights


def _check_head(ckpt: registry.Checkpoint, weights: dict, source: str) -> None:
    head = weights.get("head_fc")
    classes = head[1].shape[0] if head else None
    if classes != ckpt.num_classes:
        raise checkpoints.CheckpointError(
            f"{source} has {'no' if classes is None else classes} head classes; registry entry "
            f"{ckpt.name} expects {ckpt.num_classes}."
        )


def save_converted(weights: dict[str, list[np.ndarray]], dest: Path, metadata: dict) -> None:
    """Write ``{layer: [arrays]}`` as safetensors atomically, with its SHA-256 record."""
    from safetensors.numpy import save_file

    flat = {
        f"{layer}/{i}": np.ascontiguousarray(a)
        for layer, arrays in weights.items()
        for i, a in enumerate(arrays)
    }
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        save_file(flat, str(tmp), metadata={**metadata, "format": CONVERTED_FORMAT})
        write_record(dest, file_sha256(tmp))


def read_converted(path: Path) -> dict[str, list[np.ndarray]] | None:
    """Read converted weights, checked: None for another format version (to be rebuilt).

    Raises:
        DamagedFileError: the file differs from its SHA-256 record, cannot be read, or holds
            NaN/inf (a file without a record, from an older version, gets one).
    """
    from safetensors import safe_open

    path = Path(path)
    _check_record(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            if (f.metadata() or {}).get("format") != CONVERTED_FORMAT:
                return None
            flat = {k: f.get_tensor(k) for k in f.keys()}
        order = sorted(flat, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1])))
    except Exception as e:  # safetensors raises its own error types
        raise DamagedFileError(f"unreadable: {plain(str(e))[:200]}") from e
    bad = [k for k in order if not np.isfinite(flat[k]).all()]
    if bad:
        raise DamagedFileError(f"NaN or inf in {len(bad)} tensor(s), e.g. {bad[0]}")
    weights: dict[str, list[np.ndarray]] = {}
    for key in order:
        weights.setdefault(key.rsplit("/", 1)[0], []).append(flat[key])
    return weights


def load_converted(path: Path) -> dict[str, list[np.ndarray]] | None:
    """Read a converted-weights file; None if it is damaged, unreadable or of an old format."""
    try:
        return read_converted(path)
    except (DamagedFileError, OSError):
        return None


def convert_official(ckpt: registry.Checkpoint, path: Path) -> dict[str, list[np.ndarray]]:
    """Keras weights of the checkpoint file ``path`` of ``ckpt``; CheckpointError if the file is
    not that checkpoint (unreadable, another architecture or head size).  A segmentation
    row's file is an mmsegmentation checkpoint (:func:`checkpoints.convert_mmseg_state_dict`)."""
    state = checkpoints.read_state_dict(path)
    if ckpt.segmentation is not None:
        return checkpoints.convert_mmseg_state_dict(
            state, ckpt.variant, ckpt.segmentation.head, ckpt.num_classes
        )
    weights = checkpoints.convert_state_dict(state, ckpt.variant)
    _check_head(ckpt, weights, ckpt.filename)
    return weights


def _downloaded_weights(ckpt: registry.Checkpoint) -> dict[str, list[np.ndarray]]:
    """Converted weights of an official file: the cache's copy, else downloaded (verified)."""
    source = checkpoint_cache_path(ckpt)
    clean_stale(source.parent)
    convert = functools.partial(convert_official, ckpt)
    pinned = expected_sha256(ckpt)
    with _locked(source):
        if source.is_file():
            try:
                _check_record(source, pinned)
                return convert(source)
            except checkpoints.CheckpointError as e:  # DamagedFileError or unreadable
                quarantine(source, plain(str(e)).replace(f"{source} ", "it ").splitlines()[0])
        return fetch(ckpt.url, source, verify=convert, sha256=pinned)


def official_weights(ckpt: registry.Checkpoint) -> dict[str, list[np.ndarray]]:
    """Converted Keras weights of a registry checkpoint: from cache, else download + convert.

    Official files are downloaded by this module (``CONVNEXT_BASE_URL``), Hub files by
    ``huggingface_hub`` (:func:`hub_file`); either way the converted weights land in this
    library's cache.  The second call for the same model reads only the converted cache (fast,
    offline).  A damaged cache file is moved aside and rebuilt (see the module docstring).
    """
    converted = converted_cache_path(ckpt)
    clean_stale(converted.parent)
    with _locked(converted):
        if converted.is_file():
            try:
                weights = read_converted(converted)
            except DamagedFileError as e:
                quarantine(converted, str(e))
                weights = None
            if weights is not None:
                return weights
        weights = _hub_weights(ckpt) if ckpt.source.is_hub else _downloaded_weights(ckpt)
        try:
            save_converted(weights, converted, {"source": ckpt.filename, "model": ckpt.name})
        except OSError as e:  # e.g. a full disk: the weights are good, only the cache is lost
            logger.warning(f"convnext_keras: {e} The model loads; the next load converts again.")
        return weights


def fetch_official(ckpt: registry.Checkpoint, folder: str | os.PathLike) -> tuple[Path, str]:
    """Put the official file of ``ckpt`` into ``folder`` at its official path (the server's:
    ``convnext_tiny_1k_224_ema.pth``, ``convnextv2/im1k/convnextv2_tiny_1k_224_ema.pt``), verified,
    to carry to a machine without internet (``convnext fetch``): the folder then serves as
    ``CONVNEXT_BASE_URL``.  A Hub row's file goes to ``hf/<repo>/<revision>/<file>`` (use it
    with ``--weights FILE``, or carry the Hugging Face cache).

    The cache's copy is used when it holds one (checked against its record), else the file is
    downloaded (from ``CONVNEXT_BASE_URL`` when set).  Returns ``(path, how)``, ``how`` being
    ``"present"`` (already there and valid), ``"copied from the cache"`` or ``"downloaded"``.
    Raises DownloadError as :func:`fetch` does; a damaged file already in ``folder`` is
    replaced.
    """
    dest = Path(folder).expanduser() / ckpt.source.cache_name
    verify = functools.partial(convert_official, ckpt)
    pinned = expected_sha256(ckpt)
    if ckpt.source.is_hub:  # from the Hugging Face cache (downloaded there first if need be)
        src = ckpt.source
        path = hub_file(src.repo, src.path, src.revision, sha256=pinned)
        if dest.is_file() and file_sha256(dest) == file_sha256(path):
            return dest, "present"
        fetch(str(path), dest, verify=verify, sha256=pinned)
        return dest, "copied from the Hugging Face cache"
    if dest.is_file():
        try:
            _check_record(dest, pinned)
            verify(dest)
            return dest, "present"
        except checkpoints.CheckpointError:
            pass  # replaced below
    cached = checkpoint_cache_path(ckpt)
    with _locked(cached):
        if cached.is_file():
            try:
                _check_record(cached, pinned)
                fetch(str(cached), dest, verify=verify, sha256=pinned)
                return dest, "copied from the cache"
            except (checkpoints.CheckpointError, DownloadError) as e:
                quarantine(cached, plain(str(e)).splitlines()[0])
    fetch(ckpt.url, dest, verify=verify, sha256=pinned)
    return dest, "downloaded"


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub

#: ``weights=`` / ``--weights`` prefix of a file on the Hub: ``hf://org/repo[@revision][/file]``.
HF_SCHEME = "hf://"
#: The files looked for, in order, when an ``hf://`` address names a repository only.
HUB_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_ADDRESS = re.compile(
    r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^/]+))?(?:/(?P<path>.+))?$"
)


def parse_hf_address(address: str) -> tuple[str, str | None, str | None]:
    """``(repo, revision or None, file or None)`` of ``hf://org/repo[@revision][/file]``;
    ``ValueError`` for anything else."""
    match = _HF_ADDRESS.match(address.strip())
    if not match:
        raise ValueError(
            f"{address!r} is not a Hub address: write hf://ORG/REPO, hf://ORG/REPO/FILE or "
            "hf://ORG/REPO@REVISION/FILE (e.g. hf://timm/convnext_atto.d2_in1k/model.safetensors)."
        )
    return match.group("repo"), match.group("revision"), match.group("path")


def _hub_page(repo: str) -> str:
    import huggingface_hub

    return f"{huggingface_hub.constants.ENDPOINT.rstrip('/')}/{repo}"


def _hub_error(error: Exception, repo: str, filename: str, revision: str | None) -> DownloadError:
    """The one-line :class:`DownloadError` of a ``huggingface_hub`` failure: what was wrong
    (gated, not found, offline, incomplete) and what to do."""
    import huggingface_hub
    from huggingface_hub import errors

    if isinstance(error, ValueError) and isinstance(error.__cause__, Exception):
        error = error.__cause__  # hf_hub_download(force_download=True) wraps why it failed
    page, at = _hub_page(repo), f"@{revision}" if revision else ""
    where = f"{repo}{at}/{filename}"
    cause = plain(str(error)).strip().splitlines()
    detail = next((line for line in cause if line.strip()), type(error).__name__)
    token = huggingface_hub.get_token() is not None
    if isinstance(error, errors.GatedRepoError):
        if token:
            return DownloadError(
                f"{repo} is gated and the Hugging Face token given (HF_TOKEN or `hf auth login`) "
                f"has no access to it: accept its licence at {page} with the account of that "
                f"token, then try again ({detail})."
            )
        return DownloadError(
            f"{repo} is gated: accept its licence at {page}, then give this machine a token "
            "of that account (set HF_TOKEN=hf_..., or run `hf auth login`) and try again "
            f"({detail})."
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        hint = (
            "the token given has no access to it"
            if token
            else "if it is private or gated, accept its terms at that page and set HF_TOKEN "
            "(or run `hf auth login`)"
        )
        return DownloadError(
            f"The Hub has no repository {repo} that this machine may read ({page}): check the "
            f"name; {hint} ({detail})."
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return DownloadError(f"{repo} has no revision {revision!r} ({page}): {detail}")
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    if isinstance(error, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)) and offline:
        return DownloadError(
            f"HF_HUB_OFFLINE is set and {where} is not in the Hugging Face cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE}): unset it to download, or pass the file "
            f"with {fix('weights=FILE', '--weights FILE')}."
        )
    if isinstance(error, errors.LocalEntryNotFoundError):
        return DownloadError(
            f"Could not download {where} from {huggingface_hub.constants.ENDPOINT} and it is not "
            f"in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}): {detail}. "
            "No internet? Download it where there is (or set HF_ENDPOINT to a mirror), copy "
            "the cache (HF_HOME) here and set HF_HUB_OFFLINE=1, or pass the file with "
            + fix("weights='FILE'", "--weights FILE")
            + "."
        )
    if isinstance(error, errors.EntryNotFoundError):
        return DownloadError(
            f"{repo}{at} has no file {filename!r}: see the files at {page}/tree/"
            f"{revision or 'main'} and name one (hf://{repo}/FILE)."
        )
    return DownloadError(
        f"Could not download {where} from the Hugging Face Hub ({type(error).__name__}: "
        f"{detail}); nothing was cached. Try again, or pass the file with "
        f"{fix('weights=FILE', '--weights FILE')}."
    )


def _hub_download(repo: str, filename: str, revision: str | None, force: bool) -> Path:
    import huggingface_hub

    from convnext_keras import __version__

    try:
        return Path(
            huggingface_hub.hf_hub_download(
                repo,
                filename,
                revision=revision,
                force_download=force,
                library_name="convnext_keras",
                library_version=__version__,
            )
        )
    except (
        huggingface_hub.errors.HfHubHTTPError,
        huggingface_hub.errors.EntryNotFoundError,  # not an HTTP error when offline
        OSError,
        ValueError,
    ) as e:
        raise _hub_error(e, repo, filename, revision) from e


def _hub_blob_problem(path: Path, pinned: tuple[str, str] | None) -> str | None:
    """Why the Hub file at ``path`` is not the one published, or None.

    ``huggingface_hub`` names a large (LFS) file's blob by its SHA-256 (the Hub's ETag); the
    bytes must hash to it, and to ``pinned`` when one is.
    """
    blob = path.resolve()
    named = blob.name if re.fullmatch(r"[0-9a-f]{64}", blob.name) else None
    if named is None and pinned is None:
        return None
    digest = file_sha256(blob)
    if named is not None and digest != named:
        return f"its SHA-256 {digest[:12]}... is not the {named[:12]}... the Hub published"
    if pinned is not None and digest != pinned[0]:
        return f"its SHA-256 {digest[:12]}... is not the one pinned by {pinned[1]}"
    return None


def hub_file(
    repo: str,
    filename: str,
    revision: str | None = None,
    *,
    sha256: tuple[str, str] | None = None,
) -> Path:
    """A file of a Hugging Face Hub repository, downloaded (once) by ``huggingface_hub``.

    The library's own settings apply: ``HF_ENDPOINT`` (a mirror, or a test server), ``HF_HOME``
    / ``HF_HUB_CACHE`` (where files are kept), ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` (or the token
    of ``hf auth login``) for gated and private repositories; downloads resume after a dropped
    connection and a file shorter than announced is refused.  The file's bytes are checked
    against the SHA-256 the Hub published (a large file's blob name) and against ``sha256``
    (``(hex, where it was pinned)``); a file that differs is downloaded again once.

    Returns the path in the Hugging Face cache.  Raises :class:`DownloadError` with one line
    saying what was wrong and what to do (gated: accept the licence on the repository's page
    and set ``HF_TOKEN``; missing file; offline).
    """
    path = _hub_download(repo, filename, revision, force=False)
    problem = _hub_blob_problem(path, sha256)
    if problem is None:
        return path
    logger.warning(
        f"convnext_keras: the Hugging Face cache's copy of {repo}/{filename} is damaged "
        f"({problem}); downloading it again."
    )
    path = _hub_download(repo, filename, revision, force=True)
    problem = _hub_blob_problem(path, sha256)
    if problem is not None:
        raise DownloadError(
            f"{_hub_page(repo)} delivered {filename}, but {problem}: a mirror or proxy changed "
            "it, or the pin is wrong. Nothing was converted."
        )
    return path


def resolve_hub_address(address: str) -> Path:
    """The local file of an ``hf://org/repo[@revision][/file]`` address (downloaded by
    :func:`hub_file`); a repository without file gives its ``model.safetensors``, else its
    ``pytorch_model.bin``."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo, revision, filename = parse_hf_address(address)
    if filename is not None:
        return hub_file(repo, filename, revision)
    for candidate in HUB_DEFAULT_FILES:
        try:
            return hub_file(repo, candidate, revision)
        except DownloadError as e:
            cause = e.__cause__
            # Only "the Hub has no such file" moves on (not offline, not a missing cache copy).
            absent = isinstance(cause, EntryNotFoundError)
            if not absent or isinstance(cause, LocalEntryNotFoundError):
                raise
    raise DownloadError(
        f"{repo} holds neither {' nor '.join(HUB_DEFAULT_FILES)}: name the file "
        f"(hf://{repo}/FILE; see {_hub_page(repo)}/tree/{revision or 'main'})."
    )


def _hf_cache_root() -> Path:
    """The Hugging Face cache folder, resolved from the environment as ``huggingface_hub``'s
    ``constants.HF_HUB_CACHE`` is (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME/hub``,
    ``$XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``) - or read from it when
    the library is imported already."""
    loaded = sys.modules.get("huggingface_hub.constants")
    if loaded is not None:
        return Path(loaded.HF_HUB_CACHE)
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def hub_cached_path(ckpt: registry.Checkpoint) -> Path | None:
    """The Hugging Face cache's copy of a Hub row's file, or None (nothing downloaded).

    ``huggingface_hub.try_to_load_from_cache`` answers; it is imported (0.2-0.4 s) only when
    the cache holds a folder of the repository (``models--<org>--<name>``), so that
    ``convnext list`` stays quick on a machine that never downloaded one."""
    src = ckpt.source
    if not (_hf_cache_root() / f"models--{src.repo.replace('/', '--')}").is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(src.repo, src.path, revision=src.revision)
    return Path(found) if isinstance(found, str) else None


def _hub_weights(ckpt: registry.Checkpoint) -> dict[str, list[np.ndarray]]:
    """Converted weights of a Hub row: the file from :func:`hub_file`, checked and converted."""
    src = ckpt.source
    path = hub_file(src.repo, src.path, src.revision, sha256=expected_sha256(ckpt))
    try:
        return convert_official(ckpt, path)
    except checkpoints.CheckpointError as e:
        raise DownloadError(
            f"{src.url} did not deliver a usable checkpoint for {ckpt.name}, so nothing was "
            f"converted:\n{plain(str(e)).replace(str(path), src.path)}"
        ) from e
