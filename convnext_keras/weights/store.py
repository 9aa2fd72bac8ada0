"""A registry row's Keras weights: the converted cache's copy, else its file - from the
official server (:mod:`.download`) or the Hugging Face Hub (:mod:`.hfhub`) - read, mapped to
the official names, converted, checked against the row and cached (:mod:`.cache`).

The second call for the same model reads only the converted cache (fast, offline).  A damaged
cache file is moved aside and rebuilt, never used.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np

from convnext_keras import registry
from convnext_keras.errors import plain
from convnext_keras.weights import convert, convert_detection
from convnext_keras.weights.cache import (
    DamagedFileError,
    check_record,
    checkpoint_cache_path,
    clean_stale,
    converted_cache_path,
    expected_sha256,
    file_sha256,
    locked,
    quarantine,
    read_converted,
    save_converted,
)
from convnext_keras.weights.download import DownloadError, fetch
from convnext_keras.weights.hfhub import hub_cached_path, hub_file
from convnext_keras.weights.read import CheckpointError, read_state_dict

logger = logging.getLogger("convnext_keras")


def is_cached(ckpt: registry.Checkpoint) -> bool:
    """True when the model loads offline (converted weights or the checkpoint are cached; a
    Hub file in the Hugging Face cache)."""
    if converted_cache_path(ckpt).is_file():
        return True
    if ckpt.source.is_hub:
        return hub_cached_path(ckpt) is not None
    return checkpoint_cache_path(ckpt).is_file()


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


def _downloaded_weights(ckpt: registry.Checkpoint) -> dict[str, list[np.ndarray]]:
    """Converted weights of an official file: the cache's copy, else downloaded (verified)."""
    source = checkpoint_cache_path(ckpt)
    clean_stale(source.parent)
    convert = functools.partial(convert_official, ckpt)
    pinned = expected_sha256(ckpt)
    with locked(source):
        if source.is_file():
            try:
                check_record(source, pinned)
                return convert(source)
            except CheckpointError as e:  # DamagedFileError or unreadable
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
    with locked(converted):
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
                quarantine(cached, plain(str(e)).splitlines()[0])
    fetch(ckpt.url, dest, verify=verify, sha256=pinned)
    return dest, "downloaded"


def _hub_weights(ckpt: registry.Checkpoint) -> dict[str, list[np.ndarray]]:
    """Converted weights of a Hub row: the file from :func:`hub_file`, checked and converted."""
    src = ckpt.source
    path = hub_file(src.repo, src.path, src.revision, sha256=expected_sha256(ckpt))
    try:
        return convert_official(ckpt, path)
    except CheckpointError as e:
        raise DownloadError(
            f"{src.url} did not deliver a usable checkpoint for {ckpt.name}, so nothing was "
            f"converted:\n{plain(str(e)).replace(str(path), src.path)}"
        ) from e
