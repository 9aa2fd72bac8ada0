"""The graph cache: this library's ONNX graph of a cached model, and the engine's compiled blob,
kept beside the converted weights so that a warm call needs no Keras.

Layout under ``CONVNEXT_HOME`` (beside ``keras/``, the converted weights)::

    graphs/<model name>/<entry>/graph.onnx          the graph (engines.onnx_graph / upernet_graph)
    graphs/<model name>/<entry>/graph.onnx.sha256   its SHA-256 (``sha256sum -c`` reads it)
    graphs/<model name>/<entry>/compiled/           the engine's own model cache (OpenVINO's
                                                    ``CACHE_DIR``): its blob, and the SHA-256
                                                    record this library writes beside it

An entry's name is its key (:class:`GraphKey`): the head (``classifier``, ``pooled``,
``segmentation``), the input height x width, the precision, the engine and its version, the
graph format of this library (:data:`GRAPH_FORMAT`) and the full SHA-256 of the converted
weights the graph was built from (read from their record).  New converted weights, another
engine version or a new graph format give another entry: a stale entry is never looked at, and
the entries it replaces are removed when the new one is written.

The graph follows the cache's rules (:mod:`.cache`): written to a temporary file and renamed
when complete, its SHA-256 record written first; checked against the record on every read; a
graph that differs, or has no record, is moved aside (``graph.onnx.corrupt-<time>``) and built
again, never used.  The compiled blob is OpenVINO's file, written by OpenVINO; this library
records its SHA-256 once OpenVINO has written it (:func:`record_compiled`) and checks it before
OpenVINO may read it (:func:`check_compiled`): a blob that differs from its record, or that no
record vouches for (a process killed while OpenVINO wrote it), is deleted, and OpenVINO
compiles the graph again.  Writers hold the entry's lock (:func:`entry_lock`).

Imports nothing heavy: the warm path (``tasks.graph_route``) runs on this module, the light
engines (:mod:`convnext_keras.engines.graph_files`) and PIL + numpy.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import NamedTuple

from convnext_keras import registry
from convnext_keras.weights import provenance
from convnext_keras.weights.cache import (
    _TEMP_NAME,
    RECORD_SUFFIX,
    DamagedFileError,
    atomic_path,
    cache_dir,
    check_record,
    clean_stale,
    converted_cache_path,
    expected_sha256,
    file_sha256,
    locked,
    quarantine,
    read_record,
    record_path,
    write_record,
)

logger = logging.getLogger("convnext_keras")

#: The format of the graphs this library writes; bumped whenever ``engines.onnx_graph`` or
#: ``engines.upernet_graph`` builds a different graph from the same weights, so that graphs of
#: an older version are never used.
GRAPH_FORMAT = "1"
#: The graph's file name in its entry.
GRAPH_FILE = "graph.onnx"
#: The engine's model cache (OpenVINO's ``CACHE_DIR``) in an entry.
COMPILED_DIR = "compiled"


class GraphKey(NamedTuple):
    """What a cached graph was built from and for; its entry's folder name is made of it."""

    #: The registry name of the checkpoint (``convnext_tiny_1k_224``).
    model: str
    #: ``"classifier"``, ``"pooled"`` or ``"segmentation"``.
    head: str
    height: int
    width: int
    #: ``"fp32"``.
    precision: str
    #: ``"openvino"`` or ``"onnxruntime"``.
    engine: str
    engine_version: str
    #: The SHA-256 (hex) of the converted weights the graph holds.
    weights_sha256: str

    @property
    def entry(self) -> str:
        version = "".join(c if c.isalnum() or c in ".+" else "_" for c in self.engine_version)
        return (
            f"{self.head}-{self.height}x{self.width}-{self.precision}-{self.engine}-{version}"
            f"-g{GRAPH_FORMAT}-{self.weights_sha256}"
        )

    @property
    def folder(self) -> Path:
        return graphs_dir() / self.model / self.entry

    @property
    def graph_path(self) -> Path:
        return self.folder / GRAPH_FILE

    @property
    def compiled_dir(self) -> Path:
        return self.folder / COMPILED_DIR


def graphs_dir() -> Path:
    """The graph cache's root: ``$CONVNEXT_HOME/graphs``."""
    return cache_dir() / "graphs"


def graph_key(
    ckpt: registry.Checkpoint,
    head: str,
    height: int,
    width: int,
    precision: str,
    engine: str,
    engine_version: str,
) -> GraphKey | None:
    """The key of ``ckpt``'s graph, or None while its converted weights are not cached (or
    carry no SHA-256 record): a graph is only ever keyed by weights that are.

    The converted weights are not read (their record is: 64 hex digits); the graph is checked
    against its own record when it is read (:func:`cached_graph`).  Weights that did not come
    from their official source say so (:func:`convnext_keras.weights.provenance.announce`)."""
    converted = converted_cache_path(ckpt)
    digest = read_record(converted) if converted.is_file() else None
    if digest is None:
        return None
    pinned = expected_sha256(ckpt)
    if pinned is not None and converted_source(converted) != pinned[0]:
        return None  # a pin the weights were not made from: the cold path says so, and rebuilds
    # Weights from a mirror say so on the warm path too, once per process, as the cold path
    # does (the record is a few hundred bytes).
    provenance.announce(converted, provenance.read(converted))
    return GraphKey(
        ckpt.name, head, int(height), int(width), precision, engine, engine_version, digest
    )


def converted_source(path: Path) -> str | None:
    """The SHA-256 of the checkpoint a converted-weights file was made from (its
    ``source_sha256`` metadata), read from the safetensors header alone (8 bytes of length,
    then JSON), or None when the file has none or cannot be read."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                return None
            header = json.loads(f.read(length))
        return (header.get("__metadata__") or {}).get("source_sha256")
    except (OSError, ValueError, struct.error, AttributeError):
        return None


@contextlib.contextmanager
def entry_lock(key: GraphKey):
    """Hold the entry's cross-process lock (while its graph or blob is checked or written)."""
    with locked(key.graph_path):
        yield


def cached_graph(key: GraphKey) -> Path | None:
    """The entry's graph file, checked against its SHA-256 record, or None when there is none.

    A graph that differs from its record, or has no record (this library writes the record
    before the graph appears), is moved aside (``graph.onnx.corrupt-<time>``) with one logged
    line, its compiled blob is deleted with it, and None is returned: the caller builds the
    graph again.  Call it holding :func:`entry_lock`.
    """
    path = key.graph_path
    if not path.is_file():
        return None
    try:
        if read_record(path) is None:
            raise DamagedFileError("it has no SHA-256 record (it was not written whole)")
        check_record(path)
    except (DamagedFileError, OSError) as e:
        quarantine(path, str(e))
        shutil.rmtree(key.compiled_dir, ignore_errors=True)
        return None
    return path


def save_graph(key: GraphKey, data: bytes) -> Path:
    """Write the serialized graph ``data`` as the entry's graph: atomically, its SHA-256
    record first; the older entries it replaces (other weights, engine version or graph format
    for the same model, head, size, precision and engine) are removed.  Returns the path.
    Raises :class:`convnext_keras.errors.WriteError` when it cannot be written (the caller can
    still run ``data``).  Call it holding :func:`entry_lock`."""
    import hashlib

    path = key.graph_path
    clean_stale(path.parent)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        write_record(path, hashlib.sha256(data).hexdigest())
    shutil.rmtree(key.compiled_dir, ignore_errors=True)  # a blob of an earlier graph: not ours
    _remove_replaced(key)
    return path


def _remove_replaced(key: GraphKey) -> None:
    """Remove the entries of the same model, head, size, precision and engine that ``key``
    replaces (stale: never used again)."""
    prefix = f"{key.head}-{key.height}x{key.width}-{key.precision}-{key.engine}-"
    model_dir = key.folder.parent
    for other in model_dir.iterdir():
        if other.is_dir() and other.name.startswith(prefix) and other.name != key.entry:
            shutil.rmtree(other, ignore_errors=True)
            logger.info(f"convnext_keras: removed the stale graph cache entry {other}")


def _compiled_files(folder: Path) -> list[Path]:
    """The engine's files in a compiled folder (not the records, not temporary files)."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.endswith(RECORD_SUFFIX) and not _TEMP_NAME.match(p.name)
    )


def check_compiled(key: GraphKey) -> Path:
    """The entry's compiled folder (created), with every file in it checked against its
    SHA-256 record first: a file that differs, or that has no record (written by a process
    that died before recording it), is deleted so that the engine compiles the graph again.
    Call it holding :func:`entry_lock`, before the engine reads the folder."""
    folder = key.compiled_dir
    folder.mkdir(parents=True, exist_ok=True)
    for path in _compiled_files(folder):
        problem = None
        recorded = read_record(path)
        if recorded is None:
            problem = "no SHA-256 record (not written whole)"
        else:
            try:
                if file_sha256(path) != recorded:
                    problem = "its SHA-256 differs from the one recorded when it was written"
            except OSError as e:
                problem = f"unreadable ({e})"
        if problem:
            path.unlink(missing_ok=True)
            record_path(path).unlink(missing_ok=True)
            logger.warning(
                f"convnext_keras: deleted the compiled graph {path} ({problem}); the engine "
                "compiles the graph again."
            )
    for record in folder.glob(f"*{RECORD_SUFFIX}"):  # records of files that are gone
        if not record.with_name(record.name[: -len(RECORD_SUFFIX)]).exists():
            record.unlink(missing_ok=True)
    return folder


def clear_compiled(key: GraphKey) -> None:
    """Delete the engine's files and their records from the entry's compiled folder."""
    shutil.rmtree(key.compiled_dir, ignore_errors=True)


def compiled_state(key: GraphKey) -> frozenset:
    """What the engine's files in the entry's compiled folder are now (name, size, change
    time, inode): compared before and after a compile, it says whether the engine wrote a
    blob (it compiled the graph) or imported the one there."""
    state = set()
    for path in _compiled_files(key.compiled_dir):
        with contextlib.suppress(OSError):
            info = path.stat()
            state.add((path.name, info.st_size, info.st_mtime_ns, info.st_ino))
    return frozenset(state)


def graph_recorded(key: GraphKey) -> bool:
    """Whether the entry's graph file is there with a SHA-256 record (not yet checked
    against it: :func:`cached_graph` does that when the graph is to be read)."""
    return key.graph_path.is_file() and read_record(key.graph_path) is not None


def record_compiled(key: GraphKey) -> None:
    """Record the SHA-256 of every file the engine wrote into the entry's compiled folder
    that has no record yet (right after the engine compiled, holding :func:`entry_lock`).  A
    cache that cannot be written to is left as it is."""
    for path in _compiled_files(key.compiled_dir):
        if read_record(path) is None:
            with contextlib.suppress(OSError):
                write_record(path, file_sha256(path))
