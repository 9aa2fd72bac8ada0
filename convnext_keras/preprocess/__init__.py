"""Images in, model inputs out: the official ConvNeXt evaluation transform, exactly.

The original evaluates with torchvision on PIL images (``main.py`` / ``datasets.py``,
``build_transform``)::

    res < 384:  Resize(int(res / crop_pct), BICUBIC)   # shorter side; aspect ratio kept
                CenterCrop(res)
    res >= 384: Resize((res, res), BICUBIC)            # squash, no crop
    ToTensor()                                         # uint8 -> [0, 1]
    Normalize(IMAGENET_MEAN, IMAGENET_STD)

:func:`eval_transform` does exactly that with PIL (the same resampling code torchvision calls),
so this library's inputs equal the original's to the last bit.  The settings come from the
registry (:func:`config_for`), where a checkpoint's ``crop_mode`` can fix the choice between
crop and squash whatever the resolution (timm's centre crop at 384, DINOv3's squash at 224).

Also here:

* :func:`load_image` - any file PIL reads becomes RGB (grayscale, palette, alpha, CMYK,
  16-bit), optionally upright by its EXIF orientation; unreadable files raise
  :class:`ImageError` naming the file.
* :func:`normalize` / :func:`denormalize` and :class:`EvalPreprocessing`, a Keras layer that
  does resize + crop + normalise inside a model (close to, not bit-equal with, PIL).
* Batched input pipelines that decode and resize in parallel and prefetch:
  :class:`ImageBatches` (a thread pool yielding numpy batches; needs no TensorFlow) and
  :func:`image_dataset` (a ``tf.data.Dataset``; TensorFlow is imported only there).
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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np
from keras import ops
from PIL import Image, ImageOps

from convnext_keras import registry
from convnext_keras._registration import PACKAGE

#: Default evaluation settings of architecture names without a checkpoint (from the registry).
DEFAULT_RESOLUTION = registry.DEFAULT_RESOLUTION
DEFAULT_CROP_PCT = registry.EVAL_CROP_PCT
DEFAULT_INTERPOLATION = registry.DEFAULT_INTERPOLATION

_MEAN = np.asarray(registry.IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(registry.IMAGENET_STD, dtype=np.float32)
#: normalize() of every uint8 value, per channel: (3, 256).
_UINT8_TABLE = np.ascontiguousarray(
    ((np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0) - _MEAN) / _STD).T
)

#: Interpolation names (torchvision's ``InterpolationMode`` values) -> PIL resampling filters.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
#: The subset the Keras layer supports (``keras.ops.image.resize``).
_KERAS_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


class ImageError(ValueError):
    """A file that cannot be read as an image; the message names the file and the cause."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: cannot read as an image ({reason}).")

    def __reduce__(self):  # picklable across processes despite the two-argument __init__
        return (type(self), (self.path, self.reason))


class PreprocessConfig(NamedTuple):
    """Evaluation settings of a model: ``resolution, crop_pct, interpolation, crop_mode``.

    ``crop_mode``: ``"center"``, ``"squash"`` or None (the official rule: squash at 384 and
    above, ``registry.squashes``)."""

    resolution: int
    crop_pct: float
    interpolation: str = DEFAULT_INTERPOLATION
    crop_mode: str | None = None

    @property
    def squash(self) -> bool:
        """True where the evaluation warps to ``res x res`` instead of resize + crop."""
        return registry.squashes(self.resolution, self.crop_mode)

    @property
    def resize_size(self) -> int:
        """Shorter side after the resize (before the centre crop), as the original computes it."""
        return self.resolution if self.squash else int(self.resolution / self.crop_pct)


def config_for(name: str) -> PreprocessConfig:
    """The evaluation settings of a model name, from its registry entry.

    Architecture names without a checkpoint (``convnext_atto``) get the original's defaults:
    224, crop 0.875, bicubic.  ``_fe`` names use their checkpoint's settings.
    """
    ckpt = registry.resolve(name).checkpoint
    if ckpt is None:
        return PreprocessConfig(DEFAULT_RESOLUTION, DEFAULT_CROP_PCT, DEFAULT_INTERPOLATION)
    return PreprocessConfig(ckpt.resolution, ckpt.crop_pct, ckpt.interpolation, ckpt.crop_mode)


def as_config(spec) -> PreprocessConfig:
    """A :class:`PreprocessConfig` from a model name, a config, or a
    ``(res, crop[, interp[, crop_mode]])`` tuple."""
    if isinstance(spec, PreprocessConfig):
        config = spec
    elif isinstance(spec, str):
        return config_for(spec)
    elif isinstance(spec, Sequence) and len(spec) in (2, 3, 4):
        config = PreprocessConfig(*spec)
    else:
        raise ValueError(
            "Expected a model name (e.g. 'convnext_tiny_1k_224'), a PreprocessConfig or a "
            f"(resolution, crop_pct[, interpolation[, crop_mode]]) tuple, got {spec!r}."
        )
    _check(config.resolution, config.crop_pct, config.interpolation)
    registry.squashes(config.resolution, config.crop_mode)  # ValueError for a bad crop_mode
    return config


def _check(resolution, crop_pct, interpolation) -> None:
    if not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}.")
    if not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise ValueError(
            f"crop_pct must be in (0, 1] (the fraction of the resized image kept by the centre "
            f"crop; the original uses {DEFAULT_CROP_PCT}), got {crop_pct!r}."
        )
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}."
        )


# ---------------------------------------------------------------------------------------------
# Reading files


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels are composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        # Palette images with a transparent colour carry it in info["transparency"].
        mode_to = "RGBA" if "transparency" in image.info else "RGB"
        image = image.convert(mode_to)
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("L", "RGB") and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (PNG, TIFF): scale 0..65535 to 0..255 instead of PIL's clipping.
        data = np.asarray(image, dtype=np.float64)
        data = np.clip(np.rint(data / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(data, "L").convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV, F (clipped to 0..255 by PIL).
    return image.convert("RGB")


def load_image(path, *, exif_transpose: bool = False) -> Image.Image:
    """Read an image file as an RGB PIL image.

    Every mode PIL reads becomes RGB: grayscale and 1-bit are replicated, palettes expanded,
    CMYK converted, 16-bit grayscale scaled to 8 bits (``value / 257``), and transparency
    (RGBA, LA, palette transparency) composited on a white background.  For JPEG files - all of
    ImageNet - this equals the original's ``Image.open(f).convert("RGB")``.  Multi-frame files
    (GIF, TIFF) give their first frame.

    Args:
        path: the file.
        exif_transpose: rotate/flip by the EXIF orientation tag, as a photo viewer shows it
            (``convnext predict`` does; the official evaluation, and ``convnext eval``, do not).

    Raises:
        ImageError: the file is missing, not an image, truncated or otherwise unreadable; the
            message names the file.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
            if rgb is image:
                rgb = image.copy()
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "it is a directory") from None
    except Image.UnidentifiedImageError:
        raise ImageError(path, "not an image format PIL knows") from None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on corrupt files
        raise ImageError(path, f"{type(e).__name__}: {e}") from e
    return rgb


# ---------------------------------------------------------------------------------------------
# The transform


def normalize(x) -> np.ndarray:
    """Scale to [0, 1] and normalise with the ImageNet mean/std (float32, channels last).

    ``uint8`` input is divided by 255 (as torchvision's ``ToTensor``); float input is taken as
    already in [0, 1].
    """
    x = np.asarray(x)
    if x.shape[-1:] != (3,):
        raise ValueError(f"Expected RGB images with 3 channels last, got shape {x.shape}.")
    if x.dtype == np.uint8:
        # A per-channel table of the 256 possible results of the formula below: the same
        # float32 values, without numpy's slow broadcasting over a 3-wide last axis.
        out = np.empty(x.shape, np.float32)
        for c in range(3):
            np.take(_UINT8_TABLE[c], x[..., c], out=out[..., c])
        return out
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
    else:
        raise ValueError(
            f"Expected uint8 (0..255) or float (0..1) pixels, got dtype {x.dtype}; convert "
            "integer images to uint8 first."
        )
    return (x - _MEAN) / _STD


def denormalize(x) -> np.ndarray:
    """Inverse of :func:`normalize`: model inputs back to displayable ``uint8`` RGB."""
    x = np.asarray(x, dtype=np.float32) * _STD + _MEAN
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _resize_crop_geometry(size, config: PreprocessConfig) -> tuple[int, int, int, int]:
    """``(new_w, new_h, left, top)``: the resized size and the crop's corner, as torchvision."""
    # Resize(int): shorter side -> size, longer side int(size * long / short).
    short = config.resize_size
    w, h = size
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    # CenterCrop: offsets rounded with Python's round (half to even).
    res = config.resolution
    return new_w, new_h, int(round((new_w - res) / 2.0)), int(round((new_h - res) / 2.0))


def resize_and_crop(
    image: Image.Image,
    resolution: int,
    crop_pct: float = DEFAULT_CROP_PCT,
    interpolation: str = DEFAULT_INTERPOLATION,
    crop_mode: str | None = None,
) -> Image.Image:
    """The geometric half of :func:`eval_transform`: a ``resolution``-square RGB PIL image."""
    config = as_config((resolution, crop_pct, interpolation, crop_mode))
    resample = INTERPOLATIONS[config.interpolation]
    res = config.resolution
    if config.squash:
        return image.resize((res, res), resample) if image.size != (res, res) else image
    new_w, new_h, left, top = _resize_crop_geometry(image.size, config)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample)
    return image.crop((left, top, left + res, top + res))


def crop_box(size: tuple[int, int], config) -> tuple[float, float, float, float]:
    """The region ``(left, top, right, bottom)`` of an image of ``size = (width, height)`` that
    the model sees after :func:`resize_and_crop`, in the image's own pixel coordinates."""
    config = as_config(config)
    w, h = size
    if config.squash:
        return (0.0, 0.0, float(w), float(h))
    new_w, new_h, left, top = _resize_crop_geometry(size, config)
    res = config.resolution
    sx, sy = w / new_w, h / new_h
    return (left * sx, top * sy, (left + res) * sx, (top + res) * sy)


def eval_transform(
    image: Image.Image,
    resolution: int,
    crop_pct: float = DEFAULT_CROP_PCT,
    interpolation: str = DEFAULT_INTERPOLATION,
    crop_mode: str | None = None,
) -> np.ndarray:
    """The official evaluation transform of one RGB PIL image -> float32 ``(res, res, 3)``.

    Below 384: resize the shorter side to ``int(res / crop_pct)`` (aspect ratio kept), centre
    crop ``res x res``; at 384 and above: squash to ``res x res`` (``crop_pct`` unused, as in the
    original); ``crop_mode`` ``"center"`` / ``"squash"`` chooses one whatever the resolution.
    Then scale to [0, 1] and normalise with the ImageNet mean/std.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(
            f"eval_transform takes a PIL image, got {type(image).__name__}; read files with "
            "load_image(path) first."
        )
    if image.mode != "RGB":
        image = _to_rgb(image)
    cropped = resize_and_crop(image, resolution, crop_pct, interpolation, crop_mode)
    return normalize(np.asarray(cropped, dtype=np.uint8))


def transform_file(path, config, *, exif_transpose: bool = False) -> np.ndarray:
    """:func:`load_image` then :func:`eval_transform` with a model name's (or config's) settings."""
    config = as_config(config)
    return eval_transform(load_image(path, exif_transpose=exif_transpose), *config)


# ---------------------------------------------------------------------------------------------
# A Keras layer for users who want preprocessing inside the model


def _normalize_ops(x, input_scale: float):
    x = ops.cast(x, "float32") / input_scale
    return (x - ops.convert_to_tensor(_MEAN)) / ops.convert_to_tensor(_STD)


@keras.saving.register_keras_serializable(package=PACKAGE)
class Normalize(keras.layers.Layer):
    """Pixels in 0..``input_scale`` (``uint8`` images: 255) -> the model's normalised float32
    input, as :func:`normalize` (up to float rounding).  Feeding ``uint8`` to a model that
    starts with this layer moves 4x fewer bytes to the accelerator than float32."""

    def __init__(self, input_scale: float = 255.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not input_scale > 0:
            raise ValueError(f"input_scale must be positive, got {input_scale!r}.")
        self.input_scale = float(input_scale)

    def call(self, inputs):
        return _normalize_ops(inputs, self.input_scale)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "input_scale": self.input_scale}


def with_normalization(model, resolution: int | None = None, input_scale: float = 255.0):
    """``model`` behind a :class:`Normalize` layer: takes ``uint8`` (or 0..255) images."""
    shape = (resolution, resolution, 3) if resolution else model.input_shape[1:]
    inputs = keras.Input(shape, dtype="uint8" if input_scale == 255.0 else "float32")
    outputs = model(Normalize(input_scale, name="normalize")(inputs))
    return keras.Model(inputs, outputs, name=model.name)


@keras.saving.register_keras_serializable(package=PACKAGE)
class EvalPreprocessing(keras.layers.Layer):
    """Resize + centre crop + normalise inside a Keras model (any backend).

    Takes ``(batch, H, W, 3)`` (or one ``(H, W, 3)``) RGB pixels in 0..255 (any dtype;
    set ``input_scale=1.0`` for [0, 1] floats) and returns the model's normalised float32
    ``(batch, res, res, 3)`` input.  Geometry is the official evaluation's (shorter side to
    ``int(res / crop_pct)``, centre crop; squash at 384 and above, or as ``crop_mode`` says:
    the arguments are :class:`PreprocessConfig`'s, in its order).  Resampling is
    ``keras.ops.image.resize`` with antialiasing, so results are close to, but not
    bit-equal with, PIL's (see docs/predict_eval.md for the measured difference); use
    :func:`eval_transform` where exactness matters.
    """

    def __init__(
        self,
        resolution: int = DEFAULT_RESOLUTION,
        crop_pct: float = DEFAULT_CROP_PCT,
        interpolation: str = DEFAULT_INTERPOLATION,
        crop_mode: str | None = None,
        input_scale: float = 255.0,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        config = as_config((int(resolution), float(crop_pct), interpolation, crop_mode))
        if config.interpolation not in _KERAS_INTERPOLATIONS:
            raise ValueError(
                f"EvalPreprocessing supports interpolation {_KERAS_INTERPOLATIONS}, got "
                f"{interpolation!r}."
            )
        if not input_scale > 0:
            raise ValueError(f"input_scale must be positive, got {input_scale!r}.")
        self.config = config
        self.input_scale = float(input_scale)

    def _resize_crop(self, x):
        """Shorter side to ``resize_size``, then the centre ``res`` square (as torchvision)."""
        size, res = self.config.resize_size, self.config.resolution
        shape = ops.shape(x)
        h, w = shape[-3], shape[-2]
        if isinstance(h, int) and isinstance(w, int):
            new_h, new_w = (size * h // w, size) if w <= h else (size, size * w // h)
            top, left = int(round((new_h - res) / 2.0)), int(round((new_w - res) / 2.0))
        else:  # TensorFlow graph with unknown height/width: the same arithmetic on tensors
            h, w = ops.cast(h, "int32"), ops.cast(w, "int32")
            new_h = ops.where(w <= h, size * h // w, size)
            new_w = ops.where(w <= h, size, size * w // h)
            # ops.round rounds half to even, as Python's round in torchvision's CenterCrop.
            top = ops.cast(ops.round(ops.cast(new_h - res, "float32") / 2.0), "int32")
            left = ops.cast(ops.round(ops.cast(new_w - res, "float32") / 2.0), "int32")
            # keras.ops.image.resize wants Python ints; only TensorFlow gets here.
            import tensorflow as tf

            x = tf.image.resize(x, (new_h, new_w), method=self.config.interpolation, antialias=True)
            return x[..., top : top + res, left : left + res, :]
        x = ops.image.resize(
            x,
            (new_h, new_w),
            interpolation=self.config.interpolation,
            antialias=True,
            data_format="channels_last",
        )
        return x[..., top : top + res, left : left + res, :]

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        res = self.config.resolution
        if self.config.squash:
            x = ops.image.resize(
                x,
                (res, res),
                interpolation=self.config.interpolation,
                antialias=True,
                data_format="channels_last",
            )
        else:
            x = self._resize_crop(x)
        return _normalize_ops(ops.clip(x, 0.0, self.input_scale), self.input_scale)

    def compute_output_shape(self, input_shape):
        res = self.config.resolution
        return (*input_shape[:-3], res, res, 3)

    def get_config(self):
        return {
            **super().get_config(),
            "resolution": self.config.resolution,
            "crop_pct": self.config.crop_pct,
            "interpolation": self.config.interpolation,
            "crop_mode": self.config.crop_mode,
            "input_scale": self.input_scale,
        }


def preprocessing_layer(name_or_config, *, input_scale: float = 255.0, **kwargs):
    """A :class:`EvalPreprocessing` layer with a model name's (or a config's) settings."""
    config = as_config(name_or_config)
    return EvalPreprocessing(*config, input_scale=input_scale, **kwargs)


# ---------------------------------------------------------------------------------------------
# Batched pipelines


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
