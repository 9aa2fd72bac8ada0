"""A registry row's Keras weights: the converted cache's copy, else its file - from the
official server (:mod:`.download`) or the Hugging Face Hub (:mod:`.hfhub`) - read, mapped to
the official names, converted, checked against the row and cached (:mod:`.cache`).

The second call for the same model reads only the converted cache (fast, offline).  A damaged
cache file is moved aside and rebuilt, never used.  Each cached file gets a provenance record
(:mod:`.provenance`), and one that did not come from its official source says so once per
process when it is used.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from pathlib import Path

import numpy as np

from convnext_keras import registry
from convnext_keras.errors import plain
from convnext_keras.weights import convert, convert_detection, provenance
from convnext_keras.weights.cache import (
    CONVERTED_FORMAT,
    DamagedFileError,
    check_record,
    checkpoint_cache_path,
    clean_cache,
    clean_stale,
    converted_cache_path,
    expected_sha256,
    file_sha256,
    locked,
    quarantine,
    read_converted_metadata,
    read_record,
    save_converted,
)
from convnext_keras.weights.download import DownloadError, fetch
from convnext_keras.weights.hfhub import hub_cached_path, hub_file
from convnext_keras.weights.read import CheckpointError, read_state_dict

logger = logging.getLogger("convnext_keras")

#: Converted-weights files this process could not write (a full disk): said once, not per load.
_UNSAVED: set[str] = set()


def is_cached(ckpt: registry.Checkpoint) -> bool:
    """True when the model loads offline (converted weights or the checkpoint are cached; a
    Hub file in the Hugging Face cache)."""
    if converted_cache_path(ckpt).is_file():
        return True
    if ckpt.source.is_hub:
        return hub_cached_path(ckpt) is not None
    return checkpoint_cache_path(ckpt).is_file()


def cached_from(ckpt: registry.Checkpoint) -> str | None:
    """Where the cached copy of ``ckpt``'s weights came from (:mod:`.provenance`):
    ``"official"``, the URL of a mirror, ``"unknown"`` (cached before provenance records), or
    None when nothing is cached.  The converted weights answer first, then the checkpoint."""
    paths = [converted_cache_path(ckpt)]
    if not ckpt.source.is_hub:
        paths.append(checkpoint_cache_path(ckpt))
    for path in paths:
        if path.is_file():
            info = provenance.read(path)
            if info is None or info.get("official") is None:
                return "unknown"
            return "official" if info["official"] else str(info.get("url"))
    return "unknown" if ckpt.source.is_hub and hub_cached_path(ckpt) is not None else None


def _check_head(ckpt: registry.Checkpoint, weights: dict, source: str) -> None:
    head = weights.get("head_fc")
    classes = head[1].shape[0] if head else None
    if classes != ckpt.num_classes:
        raise CheckpointError(
            f"{source} has {'no' if classes is None else classes} head classes; registry entry "
            f"{ckpt.name} expects {ckpt.num_classes}."
        )


def convert_official(ckpt: registry.Checkpoint, path: Path) -> dict[str, list[np.ndarray]]:
    """Keras weights of the checkpoint file ``path`` of ``ckpt``; CheckpointError if the file is
    not that checkpoint (unreadable, another architecture or head size).  A segmentation
    row's file is an mmsegmentation checkpoint (:func:`.convert.convert_mmseg_state_dict`), a
    detection row's an mmdetection one
    (:func:`.convert_detection.convert_mmdet_state_dict`)."""
    state = read_state_dict(path)
    if ckpt.detection is not None:
        return convert_detection.convert_mmdet_state_dict(
            state, ckpt.variant, ckpt.detection.head, ckpt.num_classes
        )
    if ckpt.segmentation is not None:
        return convert.convert_mmseg_state_dict(
            state, ckpt.variant, ckpt.segmentation.head, ckpt.num_classes
        )
    weights = convert.convert_state_dict(state, ckpt.variant)
    _check_head(ckpt, weights, ckpt.filename)
    return weights


def _record_provenance(path: Path, ckpt: registry.Checkpoint, kind: str, where: dict) -> None:
    """Write ``path``'s provenance record (:mod:`.provenance`); a cache that cannot take it
    (read-only, full) still serves the file."""
    with contextlib.suppress(OSError):
        provenance.write(path, ckpt, kind, where, read_record(path) or file_sha256(path))


def _downloaded_weights(
    ckpt: registry.Checkpoint,
) -> tuple[dict[str, list[np.ndarray]], str, dict]:
    """``(converted weights, the checkpoint's SHA-256, its provenance record)`` of an official
    file: the cache's copy, else downloaded (verified).  The record is empty for a file cached
    before records."""
    source = checkpoint_cache_path(ckpt)
    convert = functools.partial(convert_official, ckpt)
    pinned = expected_sha256(ckpt)
    with locked(source):
        if source.is_file():
            try:
                digest = check_record(source, pinned)
                weights = convert(source)
                info = provenance.read(source) or {}
                provenance.announce(source, info)
                return weights, digest, info
            except CheckpointError as e:  # DamagedFileError or unreadable
                _set_aside(source, plain(str(e)).replace(f"{source} ", "it ").splitlines()[0])
        where = provenance.origin(ckpt)
        weights = fetch(ckpt.url, source, verify=convert, sha256=pinned)
        _record_provenance(source, ckpt, "checkpoint", where)
        info = provenance.read(source) or {**where, "model": ckpt.name}
        provenance.announce(source, info)
        return weights, read_record(source) or file_sha256(source), info


def _set_aside(path: Path, problem: str) -> None:
    """:func:`quarantine` where the cache can be written; in a read-only cache the damaged
    file stays (it is not used: the weights are rebuilt in memory)."""
    try:
        quarantine(path, problem)
    except OSError:
        logger.warning(
            f"convnext_keras: {path} is damaged or unverified ({problem}) and the cache cannot "
            "be written; not using it."
        )


def _verified_converted(
    ckpt: registry.Checkpoint, path: Path
) -> dict[str, list[np.ndarray]] | None:
    """The converted cache's weights of ``ckpt``, checked: their SHA-256 record (required: a
    file without one is unverified), readable, finite, written by this format (else
    ``DamagedFileError`` ... or None for an older format, rebuilt), and made from the
    checkpoint any pin names (the ``source_sha256`` recorded in their metadata)."""
    weights, metadata = read_converted_metadata(path, required=True)
    if weights is None or metadata.get("format") != CONVERTED_FORMAT:
        return None  # an older format: rebuilt
    pinned = expected_sha256(ckpt)
    source = metadata.get("source_sha256", "")
    if pinned is not None and source != pinned[0]:
        raise DamagedFileError(
            f"it was converted from a file whose SHA-256 is {source[:12]}..., not the one "
            f"pinned by {pinned[1]}"
        )
    return weights


def official_weights(ckpt: registry.Checkpoint) -> dict[str, list[np.ndarray]]:
    """Converted Keras weights of a registry checkpoint: from cache, else download + convert.

    Official files are downloaded by this module (``CONVNEXT_BASE_URL``), Hub files by
    ``huggingface_hub`` (:func:`hub_file`); either way the converted weights land in this
    library's cache.  The second call for the same model reads only the converted cache (fast,
    offline), without taking a lock (a read-only cache works).  A damaged or unverified cache
    file, or one made from another file than a pin names, is moved aside and rebuilt (see
    :mod:`.cache`).  Every call removes the stale temporaries an interrupted run left in the
    cache.
    """
    clean_cache()
    converted = converted_cache_path(ckpt)
    if converted.is_file():  # complete and verified: read without a lock
        try:
            weights = _verified_converted(ckpt, converted)
        except (DamagedFileError, OSError):
            weights = None  # looked at again under the lock, then rebuilt
        if weights is not None:
            provenance.announce(converted, provenance.read(converted))
            return weights
    with locked(converted):
        if converted.is_file():
            try:
                weights = _verified_converted(ckpt, converted)
            except DamagedFileError as e:
                _set_aside(converted, str(e))
                weights = None
            if weights is not None:
                provenance.announce(converted, provenance.read(converted))
                return weights
        if ckpt.source.is_hub:
            weights, digest, where = _hub_weights(ckpt)
        else:
            weights, digest, where = _downloaded_weights(ckpt)
        metadata = {"source": ckpt.filename, "model": ckpt.name, "source_sha256": digest}
        try:
            save_converted(weights, converted, metadata)
        except OSError as e:  # e.g. a full disk: the weights are good, only the cache is lost
            if str(converted) not in _UNSAVED:  # said once per process, however often loaded
                _UNSAVED.add(str(converted))
                logger.warning(
                    f"convnext_keras: {e} The model loads; the next load converts again."
                )
        else:
            if where.get("url"):  # a checkpoint cached before provenance records: unknown
                _record_provenance(converted, ckpt, "converted", where)
            provenance._announced.add(str(converted))  # its checkpoint has said so already
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
    replaced.  The stale temporaries of an interrupted ``convnext fetch`` into ``folder`` (and
    the folders only they filled) are removed first.
    """
    folder = Path(folder).expanduser()
    clean_stale(folder, recursive=True)
    dest = folder / ckpt.source.cache_name
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
            check_record(dest, pinned)
            verify(dest)
            return dest, "present"
        except CheckpointError:
            pass  # replaced below
    cached = checkpoint_cache_path(ckpt)
    with locked(cached):
        if cached.is_file():
            try:
                check_record(cached, pinned)
                fetch(str(cached), dest, verify=verify, sha256=pinned)
                return dest, "copied from the cache"
            except (CheckpointError, DownloadError) as e:
                _set_aside(cached, plain(str(e)).splitlines()[0])
    fetch(ckpt.url, dest, verify=verify, sha256=pinned)
    return dest, "downloaded"


def _hub_weights(ckpt: registry.Checkpoint) -> tuple[dict[str, list[np.ndarray]], str, dict]:
    """``(converted weights, the file's SHA-256, where it came from)`` of a Hub row: the file
    from :func:`hub_file`, checked and converted; where: the Hub, or the ``HF_ENDPOINT`` it was
    downloaded from."""
    src = ckpt.source
    where = provenance.origin(ckpt)
    path = hub_file(src.repo, src.path, src.revision, sha256=expected_sha256(ckpt))
    blob = Path(path).resolve().name  # the Hugging Face cache names a file's blob by its SHA-256
    where["sha256"] = blob if re.fullmatch(r"[0-9a-f]{64}", blob) else file_sha256(path)
    provenance.announce(Path(path), {**where, "model": ckpt.name})
    try:
        return convert_official(ckpt, path), where["sha256"], where
    except CheckpointError as e:
        raise DownloadError(
            f"{src.url} did not deliver a usable checkpoint for {ckpt.name}, so nothing was "
            f"converted:\n{plain(str(e)).replace(str(path), src.path)}"
        ) from e
