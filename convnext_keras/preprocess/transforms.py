"""Images in, model inputs out, with PIL and numpy only: the official ConvNeXt evaluation
transform, exactly.

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

Imports no Keras and no backend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from convnext_keras import registry
from convnext_keras.data import files
from convnext_keras.errors import ImageError

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
        ImageError: the file is missing, not a regular file (a FIFO, a device, a directory: never
            opened, so a named pipe cannot block), not an image, truncated or otherwise
            unreadable; the message names the file.
    """
    if isinstance(path, (str, bytes, os.PathLike)):
        problem = files.not_regular(path)
        if problem is not None:
            what = problem if problem == "no such file" else f"{problem}, not an image file"
            raise ImageError(path, what)
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
        raise ImageError(path, files.unidentified_reason(path)) from None
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


#: The most pixels :func:`resize_and_crop` resizes a whole image to before cropping (the
#: original's order, bit for bit): 16.8 M (64 MiB of RGBA), an aspect ratio of 256:1 at the
#: usual 256-pixel resize.  Beyond it (a thin strip) the crop is resampled alone.
MAX_RESIZED_PIXELS = 1 << 24


def resize_and_crop(
    image: Image.Image,
    resolution: int,
    crop_pct: float = DEFAULT_CROP_PCT,
    interpolation: str = DEFAULT_INTERPOLATION,
    crop_mode: str | None = None,
) -> Image.Image:
    """The geometric half of :func:`eval_transform`: a ``resolution``-square RGB PIL image.

    The original's order - resize the whole image, then crop - where the resized image has at
    most :data:`MAX_RESIZED_PIXELS` (every photo: bit-identical); past it (a 1x8000 strip would
    take gigabytes) the crop's region of the image is resampled directly to ``resolution``
    (PIL's ``resize(box=...)``: the same filter over the same source region, its coordinates
    in float32, so a pixel may differ by a level), at a cost bounded by the output's size."""
    config = as_config((resolution, crop_pct, interpolation, crop_mode))
    resample = INTERPOLATIONS[config.interpolation]
    res = config.resolution
    if config.squash:
        return image.resize((res, res), resample) if image.size != (res, res) else image
    new_w, new_h, left, top = _resize_crop_geometry(image.size, config)
    if new_w * new_h > MAX_RESIZED_PIXELS:
        # An extreme aspect ratio (a 1x8000 strip: 256 x 2,048,000 after the resize): only the
        # crop's region is resampled (PIL's ``box``), the work bounded by the output's size.
        return image.resize((res, res), resample, box=crop_box(image.size, config))
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
