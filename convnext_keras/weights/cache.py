"""The cache: where files live, atomic writes, SHA-256 records, quarantine, stale leftovers, and
the converted Keras weights.

Layout under ``CONVNEXT_HOME`` (default ``~/.cache/convnext_keras``)::

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

Downloads (:mod:`.download`) and the Hugging Face Hub (:mod:`.hfhub`) write through
:func:`atomic_path` and :func:`write_record`; :mod:`.store` decides what a registry row needs.

The official host publishes no checksums, so registry rows carry none; pin one per model with
``CONVNEXT_SHA256_<MODEL NAME>`` (e.g. ``CONVNEXT_SHA256_CONVNEXT_TINY_1K_224=<hex>``) or list
files in a ``sha256sum``-style file named by ``CONVNEXT_SHA256SUMS``; a download (and a cached
file) whose SHA-256 differs is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from convnext_keras import registry
from convnext_keras.errors import plain, writing
from convnext_keras.weights.read import CheckpointError

logger = logging.getLogger("convnext_keras")


#: Bumped when the converted-weights format changes, so stale caches are rebuilt.
CONVERTED_FORMAT = "1"
CHUNK = 1 << 20

#: Temporary files of this library's naming older than this, with no lock held, are removed.
STALE_SECONDS = 10 * 60
#: Suffix of the SHA-256 record beside each cached file (``sha256sum`` format).
RECORD_SUFFIX = ".sha256"
_TEMP_NAME = re.compile(r"^\.(?P<dest>.+)\.[^.]+\.part$")


class DamagedFileError(CheckpointError):
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
def locked(path: Path):
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
        while block := f.read(CHUNK):
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


def check_record(path: Path, pinned: tuple[str, str] | None = None) -> str:
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
# Converted weights


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
    check_record(path)
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
