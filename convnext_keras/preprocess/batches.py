"""Batched input pipelines that decode and transform images in parallel and prefetch:
:class:`ImageBatches` (a thread or process pool yielding numpy batches; needs no TensorFlow) and
:func:`image_dataset` (a ``tf.data.Dataset``; TensorFlow is imported only there).  Both run the
PIL transform of :mod:`.transforms`, bit-equal with :func:`.transforms.eval_transform`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from convnext_keras.preprocess.transforms import (
    ImageError,
    as_config,
    load_image,
    normalize,
    resize_and_crop,
    transform_file,
)


class Batch(NamedTuple):
    """A batch from :class:`ImageBatches`: images and their positions in the path list."""

    images: np.ndarray  # float32 (n, res, res, 3); uint8 with normalized=False
    indices: np.ndarray  # int64 (n,)


def default_workers() -> int:
    """Decoding threads: the CPUs this process may use (PIL releases the GIL while working)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class ImageBatches:
    """Preprocessed batches from image files, decoded in parallel ahead of the consumer.

    ``for images, indices in ImageBatches(paths, "convnext_tiny_1k_224", 32): ...``

    Workers (threads, or with ``processes=True`` separate processes, which scale past
    Python's GIL on many-core machines but take a few seconds to start) decode and
    resize + crop each file to ``uint8``; a background thread stacks and normalises each batch
    (bit-equal with :func:`eval_transform`) and keeps up to ``prefetch`` batches ready.  No
    TensorFlow needed.  Images come in the order of ``paths``; ``indices`` says which paths a
    batch holds.  With ``skip_errors=True`` unreadable files are left out of the batches and
    recorded in :attr:`errors` (a list of :class:`ImageError`); otherwise the first one raises.
    ``normalized=False`` yields the ``uint8`` crops instead (for a model behind
    :class:`Normalize`, see :func:`with_normalization`).

    :attr:`busy_seconds` sums the time workers spent decoding and transforming, so
    :attr:`images_per_second` (images / (busy seconds / workers)) is the pipeline's capacity.
    """

    def __init__(
        self,
        paths,
        config,
        batch_size: int = 32,
        *,
        workers: int | None = None,
        processes: bool = False,
        prefetch: int = 2,
        exif_transpose: bool = False,
        skip_errors: bool = False,
        normalized: bool = True,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.normalized = normalized
        self.paths = [Path(p) for p in paths]
        self.config = as_config(config)
        self.batch_size = batch_size
        self.workers = workers or default_workers()
        self.processes = bool(processes)
        self.prefetch = max(1, int(prefetch))
        self.exif_transpose = exif_transpose
        self.skip_errors = skip_errors
        self.errors: list[ImageError] = []
        self.busy_seconds = 0.0

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    @property
    def images_per_second(self) -> float | None:
        """Decode + transform capacity of the workers (images / busy time per worker)."""
        done = len(self.paths) - len(self.errors)
        if self.busy_seconds <= 0:
            return None
        return done / (self.busy_seconds / self.workers)

    def __iter__(self) -> Iterator[Batch]:
        self.errors = []
        self.busy_seconds = 0.0
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(ready, stop), daemon=True)
        producer.start()
        try:
            while True:
                item = ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while producer.is_alive():
                with contextlib.suppress(queue.Empty):
                    ready.get(timeout=0.05)
            producer.join()

    def _produce(self, ready: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    ready.put(item, timeout=0.1)
                    return True
            return False

        try:
            for batch in self._batches(stop):
                if not put(batch):
                    return
            put(None)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    def _batches(self, stop: threading.Event) -> Iterator[Batch]:
        # Tasks are chunks of paths: one path per task for threads, a few for processes
        # (fewer round trips between processes).
        chunk = 8 if self.processes else 1
        starts = range(0, len(self.paths), chunk)
        ahead = max(1, (self.batch_size * (self.prefetch + 1)) // chunk)
        args = (self.config, self.exif_transpose)
        with _worker_pool(self.workers, self.processes) as submit:
            pending: collections.deque = collections.deque()
            tasks = iter(starts)
            images, indices = [], []

            def refill():
                while len(pending) < ahead:
                    start = next(tasks, None)
                    if start is None:
                        return
                    pending.append(
                        (start, submit(_load_crops, self.paths[start : start + chunk], *args))
                    )

            refill()
            while pending and not stop.is_set():
                start, result = pending.popleft()
                crops, busy = result()
                self.busy_seconds += busy
                refill()
                for offset, crop in enumerate(crops):
                    if isinstance(crop, ImageError):
                        if not self.skip_errors:
                            raise crop
                        self.errors.append(crop)
                        continue
                    images.append(crop)
                    indices.append(start + offset)
                    if len(images) == self.batch_size:
                        yield self._batch(images, indices)
                        images, indices = [], []
            if images and not stop.is_set():
                yield self._batch(images, indices)

    def _batch(self, images, indices) -> Batch:
        stacked = np.stack(images)
        indices = np.asarray(indices, dtype=np.int64)
        return Batch(normalize(stacked) if self.normalized else stacked, indices)


def _load_crops(paths, config, exif_transpose) -> tuple[list, float]:
    """Worker task: ``uint8`` crops (or the ImageError) of some files, and the time it took."""
    start = time.perf_counter()
    out = []
    for path in paths:
        try:
            image = load_image(path, exif_transpose=exif_transpose)
            out.append(np.asarray(resize_and_crop(image, *config), dtype=np.uint8))
        except ImageError as e:
            out.append(e)
    return out, time.perf_counter() - start


@contextlib.contextmanager
def _worker_pool(workers: int, processes: bool):
    """Yield ``submit(fn, *args) -> result()`` over a thread or a process pool."""
    if not processes:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            try:
                yield lambda fn, *args: pool.submit(fn, *args).result
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
        return
    import multiprocessing

    # Workers only decode images: start them (spawn: no fork of a process holding a GPU
    # runtime) with Keras' numpy backend, so importing this package does not load TensorFlow,
    # JAX or PyTorch in each of them.
    saved = {k: os.environ.get(k) for k in ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL")}
    os.environ.update(KERAS_BACKEND="numpy", TF_CPP_MIN_LOG_LEVEL="3")
    try:
        pool = multiprocessing.get_context("spawn").Pool(workers)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        yield lambda fn, *args: pool.apply_async(fn, args).get
    finally:
        pool.terminate()
        pool.join()


def image_dataset(
    paths,
    config,
    batch_size: int = 32,
    *,
    labels=None,
    exif_transpose: bool = False,
    num_parallel_calls: int | None = None,
    drop_remainder: bool = False,
):
    """A ``tf.data.Dataset`` of preprocessed batches (``images`` or ``(images, labels)``).

    Decoding and the transform run in PIL (bit-equal with :func:`eval_transform`) inside
    ``tf.numpy_function`` on ``num_parallel_calls`` parallel calls (default: autotune), order
    kept, with prefetching.  An unreadable file stops iteration with an error naming it; use
    :class:`ImageBatches` with ``skip_errors=True`` to skip such files instead.  Needs
    TensorFlow (imported here, not at module import).
    """
    import tensorflow as tf

    config = as_config(config)
    paths = [str(Path(p)) for p in paths]
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"Got {len(labels)} labels for {len(paths)} paths; they must match.")
    res = config.resolution

    def _load(path_bytes):
        return transform_file(path_bytes.decode(), config, exif_transpose=exif_transpose)

    def _map(path):
        image = tf.numpy_function(_load, [path], tf.float32, stateful=False)
        image.set_shape((res, res, 3))
        return image

    parallel = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
    ds = tf.data.Dataset.from_tensor_slices(paths)
    if labels is not None:
        label_ds = tf.data.Dataset.from_tensor_slices(np.asarray(labels))
        ds = tf.data.Dataset.zip((ds, label_ds))
        ds = ds.map(lambda p, y: (_map(p), y), num_parallel_calls=parallel, deterministic=True)
    else:
        ds = ds.map(_map, num_parallel_calls=parallel, deterministic=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
