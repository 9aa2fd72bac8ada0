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
again once.  Converted weights without a record are unverified and rebuilt from the checkpoint
too (never trusted and re-recorded); they carry the SHA-256 of the checkpoint they were made
from (metadata ``source_sha256``), so a pin set after the model was cached is checked on
every load.  A complete, verified entry is read without taking a lock (a read-only cache, e.g.
a shared NFS mount, works); a per-file lock makes concurrent writers share one download.

Everything this library writes - the cache, reports, label maps, embedding parts, fine-tuning
runs, exports, ``convnext fetch`` folders - goes through :func:`atomic_path` (a file) or
:func:`temporary_dir` (a folder): one temporary name, ``.<name>.<random>.part``, held by its
writer (an advisory ``flock``) until it is renamed into place or removed.  What an interrupted
process (``kill -9``) left is removed by :func:`clean_stale` (no writer holds it, older than
:data:`STALE_SECONDS`) when a command next writes to that folder, and in every folder of the
cache on every load.  ``CONVNEXT_BASE_URL`` may
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
import errno
import hashlib
import logging
import os
import re
import stat
import tempfile
import time
from pathlib import Path

import numpy as np

from convnext_keras import registry
from convnext_keras.errors import plain, writing
from convnext_keras.weights.read import CheckpointError

logger = logging.getLogger("convnext_keras")


#: Bumped when the converted-weights format changes, so stale caches are rebuilt (2: the
#: source checkpoint's SHA-256 in the metadata, ``source_sha256``).
CONVERTED_FORMAT = "2"
#: Converted-weights formats :func:`read_converted` reads (a fine-tuning run's best weights of
#: an older version are format 1).
READABLE_FORMATS = ("1", "2")
CHUNK = 1 << 20

#: Temporary files of this library's naming older than this, with no lock held, are removed.
STALE_SECONDS = 10 * 60
#: Suffix of the SHA-256 record beside each cached file (``sha256sum`` format).
RECORD_SUFFIX = ".sha256"
#: The library's one temporary name: ``.<final name>.<random>.part``, with the suffix a writer
#: insists on after it where one does (Keras: ``.best.keras.<random>.part.keras``).
_TEMP_NAME = re.compile(r"^\.(?P<dest>.+)\.[^.]+\.part(?P<suffix>\.[A-Za-z0-9]{1,10})?$")
#: ``safetensors.numpy.save_file``'s own temporary name, which earlier versions of this library
#: left in the cache and in fine-tuning runs when killed (:func:`clean_stale` ``legacy``).
_LEGACY_TEMP = re.compile(r"^\.tmp[A-Za-z0-9_]{6}$")


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


#: errnos of a folder this process cannot write (a read-only or foreign cache): a lock there
#: cannot be taken, and is not needed to read what is complete.
_CANNOT_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def locked(path: Path):
    """Hold the cross-process lock of ``path`` (every writer of ``path`` holds it until the
    rename).  Where the lock file cannot be created - a read-only cache, a folder of another
    user - the block runs without it: nothing can be written there either, and reading a
    complete file needs no lock."""
    from filelock import FileLock

    lock = _lock_path(path)
    held = None
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        held = FileLock(str(lock))
        held.acquire()
    except OSError as e:
        if e.errno not in _CANNOT_WRITE:
            raise
        logger.debug(f"convnext_keras: {lock} cannot be created ({e}); reading without a lock")
        held = None
    try:
        yield
    finally:
        if held is not None:
            held.release()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then put it back at once
    os.umask(mask)
    return mask


def _hold(path: Path) -> int | None:
    """Open ``path`` (a temporary file or folder) and take an advisory ``flock`` on it: the
    mark of a live writer that :func:`clean_stale` respects.  Returns the descriptor to close
    (which releases it; so does the writer's death), or None where the OS has no ``flock``."""
    try:
        import fcntl
    except ImportError:  # Windows: the age rule alone
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) * path.is_dir())
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # a file system without flock: the age rule alone
    return fd


def _release(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _held_elsewhere(entry: Path, is_dir: bool) -> bool:
    """Whether another process holds ``entry``'s ``flock`` (a live writer)."""
    try:
        import fcntl
    except ImportError:
        return False
    flags = os.O_RDONLY | os.O_NONBLOCK | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0)
    try:
        fd = os.open(entry, flags)
    except OSError:
        return True  # gone or unreadable: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # no flock on this file system
    finally:
        os.close(fd)
    return False


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and the folders above it that are missing; returns those created,
    deepest first (to remove them again if the write fails)."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; stops at the first that is not empty
        try:
            folder.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def atomic_path(dest: Path, *, suffix: str = ""):
    """Yield a temp path beside ``dest``; it is renamed onto ``dest`` only if the block succeeds.

    The temporary name is the library's one pattern, ``.<name>.<random>.part`` (+ ``suffix``
    for a writer that insists on one, e.g. ``".keras"``), held by this process (``flock``)
    until the rename; the first write of a command into a folder removes the stale temporaries
    an interrupted run left there (:func:`clean_stale`).  The file gets the usual permissions
    (``0666`` minus the umask), as any file the user asks for.  A failed write (full disk,
    read-only or forbidden folder) raises :class:`convnext_keras.errors.WriteError` naming
    ``dest``, and nothing is left behind (not even the folders created for it).
    """
    dest = Path(dest)
    with writing(dest, "the file"):
        created = _make_parents(dest.parent)
        clean_once(dest.parent)
        fd, tmp = tempfile.mkstemp(
            dir=dest.parent, prefix=f".{dest.name}.", suffix=f".part{suffix}"
        )
        os.close(fd)
        tmp = Path(tmp)
        held = _hold(tmp)
        done = False
        try:
            yield tmp
            # After the writer: some replace the file with a private one of theirs.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, dest)
            done = True
        finally:
            _release(held)
            tmp.unlink(missing_ok=True)
            if not done:
                _remove_empty(created)


@contextlib.contextmanager
def temporary_dir(dest: Path):
    """A temporary folder beside ``dest`` under the library's temporary name
    (``.<name>.<random>.part``), held by this process while the block runs and removed after
    it (what the block moved out of it stays); the stale temporaries an interrupted run left
    beside ``dest`` are removed first (:func:`clean_stale`).  Writers of folders (exports)
    stage their output here."""
    import shutil

    dest = Path(dest)
    created = _make_parents(dest.parent)
    clean_stale(dest.parent)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
    held = _hold(tmp)
    try:
        yield tmp
    finally:
        _release(held)
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.exists():
            _remove_empty(created)


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


def check_record(
    path: Path, pinned: tuple[str, str] | None = None, *, required: bool = False
) -> str:
    """``path``'s SHA-256, checked against its record and ``pinned``; ``DamagedFileError``
    when either differs.  A file without a record gets one (an older version's checkpoint:
    the caller checks its content), unless ``required``: then it is unverified and refused
    (converted weights, rebuilt from their checkpoint instead of trusted)."""
    digest = file_sha256(path)
    recorded = read_record(path)
    if recorded is not None and recorded != digest:
        raise DamagedFileError(
            f"its SHA-256 {digest[:12]}... differs from {recorded[:12]}... recorded when it was "
            "written"
        )
    if recorded is None and required:
        raise DamagedFileError(
            f"it has no SHA-256 record ({record_path(path).name}), so it is unverified"
        )
    if pinned is not None and pinned[0] != digest:
        raise DamagedFileError(f"its SHA-256 {digest[:12]}... is not the one pinned by {pinned[1]}")
    if recorded is None:
        with contextlib.suppress(OSError):  # a read-only (shared) cache still reads
            write_record(path, digest)
    return digest


# ---------------------------------------------------------------------------------------------
# Stale temporaries


def _age(info: os.stat_result, now: float) -> float:
    return now - info.st_mtime


def _remove(entry: Path, is_dir: bool) -> int:
    """Remove a stale temporary (a file, or a folder with what is in it); its size in bytes."""
    import shutil

    if not is_dir:
        size = entry.lstat().st_size
        entry.unlink()
        return size
    size = sum(f.lstat().st_size for f in entry.rglob("*") if f.is_file() and not f.is_symlink())
    shutil.rmtree(entry)
    return size


def clean_stale(
    directory: Path,
    max_age: float = STALE_SECONDS,
    *,
    recursive: bool = False,
    legacy: bool = False,
) -> list[Path]:
    """Remove this library's temporaries in ``directory`` (``.<name>.<random>.part`` files and
    folders) that an interrupted process left: older than ``max_age`` seconds, held by no
    writer (neither the temporary's own ``flock`` nor, in the cache, the lock of the file it
    was to become).  ``recursive``: in every folder below too, removing a folder that only the
    removed temporaries filled.  ``legacy``: also ``safetensors``' own temporaries
    (``.tmpXXXXXX``), which earlier versions left through ``save_file`` - only in folders
    that are the library's alone (the cache, a fine-tuning run).  Whatever cannot be removed (a
    read-only cache) is left, and nothing here raises.  Returns what was removed."""
    from filelock import FileLock, Timeout

    removed: list[Path] = []
    directory = Path(directory)
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    in_cache = _inside_cache(directory)
    for entry in entries:
        path = Path(entry.path)
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        is_dir = stat.S_ISDIR(info.st_mode)
        match = _TEMP_NAME.match(entry.name)
        if legacy and not match and not is_dir and _LEGACY_TEMP.match(entry.name):
            match = _LEGACY_TEMP.match(entry.name)
        if not match:
            if recursive and is_dir:
                before = len(removed)
                removed += clean_stale(path, max_age, recursive=True, legacy=legacy)
                if len(removed) > before:  # emptied by the clean-up: it held only leftovers
                    with contextlib.suppress(OSError):
                        path.rmdir()
            continue
        if not (is_dir or stat.S_ISREG(info.st_mode)) or _age(info, now) < max_age:
            continue
        if _held_elsewhere(path, is_dir):
            continue
        try:
            if in_cache and "dest" in match.groupdict():  # and the lock of the file to be
                with FileLock(str(_lock_path(directory / match.group("dest"))), timeout=0):
                    size = _remove(path, is_dir)
            else:
                size = _remove(path, is_dir)
        except (Timeout, OSError):
            continue
        removed.append(path)
        logger.info(f"convnext_keras: removed {path} ({size} bytes) of an interrupted run")
    return removed


def _inside_cache(directory: Path) -> bool:
    try:
        Path(directory).resolve().relative_to(cache_dir().resolve())
    except (ValueError, OSError):
        return False
    return True


_CLEANED: set[str] = set()


def clean_once(directory: Path) -> None:
    """:func:`clean_stale` of ``directory``, once per process (the first write of a command to
    a folder; a folder of many outputs is not listed again for every file)."""
    key = os.path.abspath(directory)
    if key not in _CLEANED:
        _CLEANED.add(key)
        clean_stale(Path(directory))


def clean_cache() -> list[Path]:
    """:func:`clean_stale` of every folder of the cache (``checkpoints/`` with its
    sub-folders, ``keras/``, ``locks/``): what every load does."""
    root = cache_dir()
    return clean_stale(root, recursive=True, legacy=True) if root.is_dir() else []


# ---------------------------------------------------------------------------------------------
# Converted weights


def save_converted(weights: dict[str, list[np.ndarray]], dest: Path, metadata: dict) -> None:
    """Write ``{layer: [arrays]}`` as safetensors atomically, with its SHA-256 record.

    The bytes come from ``safetensors.numpy.save`` and are written through :func:`atomic_path`
    (``save_file`` would stage them in a temporary file of its own naming, which an
    interrupted run would leave behind)."""
    from safetensors.numpy import save

    flat = {
        f"{layer}/{i}": np.ascontiguousarray(a)
        for layer, arrays in weights.items()
        for i, a in enumerate(arrays)
    }
    dest = Path(dest)
    data = save(flat, metadata={**metadata, "format": CONVERTED_FORMAT})
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
        write_record(dest, hashlib.sha256(data).hexdigest())


def read_converted_metadata(
    path: Path, *, required: bool = False
) -> tuple[dict[str, list[np.ndarray]] | None, dict]:
    """``(weights, metadata)`` of a converted-weights file, checked; weights None for a format
    this version does not read.  ``required``: a file without a SHA-256 record is refused as
    unverified (the cache's rule; :func:`check_record`).

    Raises:
        DamagedFileError: the file differs from its SHA-256 record (or has none, when
            ``required``), cannot be read, or holds NaN/inf.
    """
    from safetensors import safe_open

    path = Path(path)
    check_record(path, required=required)
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") not in READABLE_FORMATS:
                return None, metadata
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
    return weights, metadata


def read_converted(path: Path) -> dict[str, list[np.ndarray]] | None:
    """Read converted weights, checked: None for another format version (to be rebuilt).

    Raises:
        DamagedFileError: the file differs from its SHA-256 record, cannot be read, or holds
            NaN/inf (a file without a record, from an older version, gets one).
    """
    return read_converted_metadata(path)[0]


def load_converted(path: Path) -> dict[str, list[np.ndarray]] | None:
    """Read a converted-weights file; None if it is damaged, unreadable or of an old format."""
    try:
        return read_converted(path)
    except (DamagedFileError, OSError):
        return None
