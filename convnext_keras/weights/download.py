"""HTTP downloads of the official files: a stall rule, HTTP ``Range`` resume, a progress bar,
and ``file://`` / folder mirrors; every file checked before it is renamed into place.


Downloads are abandoned when they stall (fewer than :data:`MIN_RATE` bytes per second over
:data:`STALL_SECONDS`; ``CONVNEXT_STALL_SECONDS`` sets the window; a connection silent that long
before its first byte - headers, then nothing - is a stall too, not resumed) and resume with
an HTTP ``Range`` request after a dropped connection (up to :data:`RESUMES` times).

A download goes to a temporary file beside its destination (:func:`.cache.atomic_path`), is
hashed as it arrives, checked by the caller's ``verify`` (e.g. the conversion) and only then
renamed, with its SHA-256 record (:mod:`.cache`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from convnext_keras import registry
from convnext_keras.errors import plain
from convnext_keras.interface import fix
from convnext_keras.weights.cache import (
    CHUNK,
    atomic_path,
    file_sha256,
    write_record,
)
from convnext_keras.weights.read import CheckpointError

T = TypeVar("T")
logger = logging.getLogger("convnext_keras")

#: A download is abandoned when fewer than ``MIN_RATE * STALL_SECONDS`` bytes arrive in any
#: ``STALL_SECONDS`` (``CONVNEXT_STALL_SECONDS`` overrides the window); silence that long is a
#: dropped connection (resumed).
STALL_SECONDS = 30.0
MIN_RATE = 1024
#: How often one download resumes (HTTP Range) after the connection drops, and the pause
#: before each try (times the try's number).
RESUMES = 3
RESUME_PAUSE_SECONDS = 1.0


class DownloadError(RuntimeError):
    """A checkpoint could not be downloaded or what arrived is not the checkpoint."""


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
    mirror = _mirror_help(url, rows[0].source.path) if rows and url != official else ""
    return (
        f"Could not download {url} ({reason}). {mirror}"
        f"No internet? On a machine that has it, get the official file {filename} ({fetch_it}"
        f"{official}), carry it here and pass "
        + fix("weights='FILE'", "--weights FILE")
        + "; or set CONVNEXT_BASE_URL to the folder holding it (file:///path/to/folder/; "
        f"{_layout_example(rows[0].source.path if rows else filename)}) or to a mirror; or see "
        f"the whole pipeline run with random weights ({fix('weights=None', '--weights none')}: "
        "the answers then mean nothing)."
    )


def _layout_example(path: str) -> str:
    """How a mirror folder holds the file of ``path`` (relative to the official base URL)."""
    return (
        f"each file at its path below the official base URL {registry.OFFICIAL_BASE_URL}: "
        f"FOLDER/{path}, as `convnext fetch --to FOLDER` writes it"
    )


def _network_reason(url: str, error: Exception) -> str:
    """A failed request in a few words: its type and, for the usual offline causes, what
    happened instead of urllib3's nested reprs (``HTTPSConnectionPool(host=...) ... Caused by
    NameResolutionError(...)``)."""
    from urllib.parse import urlparse

    text = plain(str(error))
    host = urlparse(url).hostname or url
    for pattern, words in (
        ("Failed to resolve|Name or service not known|nodename nor servname",
         f"{host} could not be resolved: no network, or no DNS"),
        ("Connection refused", f"{host} refused the connection"),
        ("timed out|Timeout", f"no answer from {host} in time"),
        ("Network is unreachable", "the network is unreachable"),
    ):  # fmt: skip
        if re.search(pattern, text):
            return f"{type(error).__name__}: {words}"
    return f"{type(error).__name__}: {text}"


def _mirror_help(url: str, path: str) -> str:
    """The sentence that says where a ``CONVNEXT_BASE_URL`` mirror was looked in, for the file at
    ``path`` below the official base URL: the exact place, and a copy of the file found
    elsewhere in a local mirror folder."""
    base = url[: -len(path)] if url.endswith(path) else url
    local = _local_source(url)
    where = f"looked for {local}" if local is not None else f"asked for {url}"
    text = (
        f"CONVNEXT_BASE_URL={base} is a mirror, which must hold this file at {path} below it "
        f"({where})"
    )
    root = _local_source(base) if local is not None else None
    if root is not None and root.is_dir():
        name = path.rsplit("/", 1)[-1]
        found = _find_below(root, name)
        if found is not None:
            text += f"; {found} has that name: move it to {local}"
    return text + ". The layout: docs/install.md#mirrors. "


def _find_below(root: Path, name: str, depth: int = 4) -> Path | None:
    """A file called ``name`` at most ``depth`` folders below ``root``, or None."""
    for dirpath, dirnames, filenames in os.walk(root):
        if len(Path(dirpath).relative_to(root).parts) >= depth:
            dirnames[:] = []
        dirnames.sort()
        if name in filenames:
            return Path(dirpath, name)
    return None


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
        chunk = read1(CHUNK, decode_content=True) if read1 else raw.read(1 << 14, True)
        if not chunk:
            return
        yield chunk
        count += len(chunk)
        now = time.monotonic()
        if now - start >= window:
            if count < MIN_RATE * window:
                raise _Stalled(count, now - start)
            start, count = now, 0


def _is_timeout(error: BaseException) -> bool:
    """Whether ``error`` (requests / urllib3) is a read that timed out, not a closed
    connection."""
    import requests
    import urllib3

    timeouts = (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)
    while error is not None:
        if isinstance(error, timeouts):
            return True
        error = error.__context__ or error.__cause__
    return False


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
                    raise DownloadError(_offline_help(url, _network_reason(url, e))) from e
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
                    before = received
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
                        if received == before and _is_timeout(e):
                            # Headers, then silence: a stall, not a dropped connection.
                            raise DownloadError(
                                f"Download of {url} stalled: the server sent nothing for "
                                f"{min(timeout, window):g} s after its headers (at byte "
                                f"{received}). Nothing was cached at {dest}; try again later, "
                                "set CONVNEXT_BASE_URL to a mirror, or pass a local file "
                                f"({fix('weights=FILE', '--weights FILE')})."
                            ) from None
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
        except CheckpointError as e:
            # The temporary file is gone when the user reads this: name the URL instead.
            reason = plain(str(e)).replace(str(tmp), url)
            raise DownloadError(
                f"{url} did not deliver a usable checkpoint, so nothing was cached at {dest}:\n"
                f"{reason}"
            ) from e
        write_record(dest, digest)
    return result
