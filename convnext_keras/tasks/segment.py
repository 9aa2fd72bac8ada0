"""Semantic segmentation of image files with the official test-time procedure: label maps,
palette PNGs, overlays and legends.

    import convnext_keras as ck
    results = ck.segment_files("upernet_convnext_tiny_ade20k_512", ["street.jpg"], out_dir="seg/")
    results[0].mask       # (H, W) uint8 class ids at the image's own size
    results[0].classes    # the classes present, largest first: (index, name, pixels, share)

The procedure is the original's (mmsegmentation 0.x, as the configs of facebookresearch/ConvNeXt
``semantic_segmentation`` set it; every number comes from the model's registry row,
:class:`convnext_keras.registry.SegmentationEval`):

1. the photo (RGB, 0-255) resized keeping its aspect ratio to fit the row's ``image_scale``
   (mmcv ``imrescale``: factor ``min(long_limit / long_side, short / short_side)``, sizes
   rounded half up), bilinearly as ``cv2.INTER_LINEAR`` (half-pixel centres, no
   antialiasing; computed in float and rounded to uint8, where OpenCV's 11-bit fixed point can
   differ by one level), then normalised with the ImageNet mean/std (mmseg's ``Normalize``
   with ``mean=[123.675, 116.28, 103.53]``, ``std=[58.395, 57.12, 57.375]`` on 0-255 pixels);
2. ``"slide"`` (mmseg ``EncoderDecoder.slide_inference``): windows of ``crop x crop`` every
   ``stride`` pixels (the last one flush with the border; an image smaller than the crop is
   one window of its own size), the logits of overlapping windows averaged; or ``"whole"``:
   the image in one pass;
3. the logits resized to the photo's own size (bilinear, ``align_corners=False``) and the
   class of highest score taken per pixel;
4. ``multi_scale=True`` (``tools/test.py --aug-test``): steps 1-3 at every ratio of
   ``multi_scale_ratios`` times ``image_scale``, each also on the left-right flipped image
   (flipped back), in ``multi_scale_mode``; the softmax probabilities are averaged before the
   arg-max.

Unreadable files, and any the model returns NaN or infinite logits for (or that cannot be
processed at all, e.g. too large for memory), are reported in their result (``error``) and
skipped, as ``predict_files`` does: one file never costs the others their label maps.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from convnext_keras import registry
from convnext_keras.api import load_segmentation_model, segmentation_row

#: Rows of the photo-sized logits resized at a time (bounds the memory of the last step).
_ROWS_PER_CHUNK = 64
#: Opacity of the class colours over the photo in the overlay (mmseg's ``show_result``).
OVERLAY_OPACITY = 0.5
#: The engines of ``segment_files`` (``engines.runners.ENGINES``).
ENGINES = ("auto", "openvino", "onnxruntime", "keras")
#: What ``segment_files`` writes per image, by suffix.
OUTPUTS = {"labels": "_labels.png", "overlay": "_overlay.png", "legend": "_legend.png"}


# ---------------------------------------------------------------------------------------------
# The test pipeline


def rescale_size(width: int, height: int, image_scale, ratio: float = 1.0) -> tuple[int, int]:
    """``(width, height)`` after mmseg's keep-ratio ``Resize`` to ``image_scale`` =
    ``(long-side limit, short side)`` times ``ratio`` (``MultiScaleFlipAug`` truncates the
    scaled pair to integers first): mmcv ``rescale_size``."""
    if width < 1 or height < 1:
        raise ValueError(f"Image size must be positive, got {width}x{height}.")
    long_limit, short = (int(s * ratio) for s in image_scale)
    factor = min(
        max(long_limit, short) / max(width, height), min(long_limit, short) / min(width, height)
    )
    return max(int(width * factor + 0.5), 1), max(int(height * factor + 0.5), 1)


def _axis(in_size: int, out_size: int):
    """Source rows (``i0``, ``i1``) and the weight of ``i1`` for each output position of a
    bilinear resize with half-pixel centres, clamped at the borders (``align_corners=False``)."""
    source = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    source = np.maximum(source, 0.0)
    i0 = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (source - i0).astype(np.float32)


def resize_bilinear(
    x: np.ndarray, height: int, width: int, rows: slice | None = None
) -> np.ndarray:
    """``x`` ``(H, W, C)`` resized to ``(height, width, C)`` (float32), bilinear with
    ``align_corners=False`` and no antialiasing: PyTorch's ``F.interpolate(mode="bilinear")``
    and OpenCV's ``INTER_LINEAR`` geometry.  ``rows``: compute only these output rows."""
    x = np.asarray(x)
    r0, r1, rw = _axis(x.shape[0], height)
    c0, c1, cw = _axis(x.shape[1], width)
    if rows is not None:
        r0, r1, rw = r0[rows], r1[rows], rw[rows]
    top, bottom = x[r0].astype(np.float32), x[r1].astype(np.float32)
    y = top + (bottom - top) * rw[:, None, None]
    left, right = y[:, c0], y[:, c1]
    return left + (right - left) * cw[None, :, None]


def test_image(
    photo: np.ndarray, image_scale, ratio: float = 1.0, flip: bool = False
) -> np.ndarray:
    """A photo ``(H, W, 3)`` uint8 RGB as the model takes it at one test scale: resized (keep
    ratio, :func:`rescale_size`), rounded to uint8, optionally flipped left-right, normalised
    with the ImageNet mean/std -> float32 ``(h, w, 3)``."""
    from convnext_keras.preprocess import normalize

    height, width = photo.shape[:2]
    new_width, new_height = rescale_size(width, height, image_scale, ratio)
    resized = photo
    if (new_height, new_width) != (height, width):
        resized = resize_bilinear(photo, new_height, new_width)
        resized = np.clip(np.floor(resized + 0.5), 0, 255).astype(np.uint8)
    if flip:
        resized = resized[:, ::-1]
    return normalize(resized)


def windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """``(y1, y2, x1, x2)`` of the sliding windows over an image (mmseg ``slide_inference``):
    every ``stride`` pixels, the last window flush with the border, windows no larger than the
    image."""
    if crop < 1 or stride < 1:
        raise ValueError(f"crop and stride must be positive, got {crop} and {stride}.")
    boxes = []
    for row in range(max(height - crop + stride - 1, 0) // stride + 1):
        for col in range(max(width - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(row * stride + crop, height), min(col * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


#: The smallest window the segmentation networks take (ConvNeXt's 4 x 2 x 2 x 2).
MIN_WINDOW = registry.VARIANTS["tiny"].min_input_size


def _padded(run, batch: np.ndarray, min_size: int) -> np.ndarray:
    """``run`` on a batch ``(n, h, w, 3)`` of normalised images, padded with zeros at the
    bottom and right to at least ``min_size`` (the smallest input the network takes), the
    logits cropped back to ``(n, h, w, classes)``.  Zero is the mean colour after
    normalisation: mmsegmentation 1.x's ``SegDataPreProcessor`` pads the normalised image with
    0 the same way and crops the logits back."""
    height, width = batch.shape[1:3]
    if height >= min_size and width >= min_size:
        return np.asarray(run(batch))
    padded = np.zeros(
        (batch.shape[0], max(height, min_size), max(width, min_size), batch.shape[3]), batch.dtype
    )
    padded[:, :height, :width] = batch
    return np.asarray(run(padded))[:, :height, :width]


def slide_logits(
    run, image: np.ndarray, crop: int, stride: int, batch_size: int = 4, min_size: int = MIN_WINDOW
) -> np.ndarray:
    """The averaged logits ``(h, w, classes)`` of the sliding windows over ``image``
    ``(h, w, 3)``; ``run`` maps a batch ``(n, hc, wc, 3)`` to logits ``(n, hc, wc, classes)``
    (every window has the same size, so they run in batches).  A window smaller than
    ``min_size`` (a thin or tiny image) is padded to it and its logits cropped back."""
    height, width = image.shape[:2]
    boxes = windows(height, width, crop, stride)
    total = count = None
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        batch = np.stack([image[y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        logits = _padded(run, batch, min_size)
        if total is None:
            total = np.zeros((height, width, logits.shape[-1]), np.float32)
            count = np.zeros((height, width, 1), np.float32)
        for (y1, y2, x1, x2), window in zip(chunk, logits):
            total[y1:y2, x1:x2] += window
            count[y1:y2, x1:x2] += 1
    return total / count


def image_logits(
    run, image: np.ndarray, mode: str, settings, batch_size: int = 4, min_size: int = MIN_WINDOW
) -> np.ndarray:
    """Logits ``(h, w, classes)`` of one test image in ``mode`` (``"slide"`` / ``"whole"``);
    windows (or a whole image) below ``min_size`` are padded, their logits cropped back."""
    if mode == "slide":
        return slide_logits(run, image, settings.crop, settings.stride, batch_size, min_size)
    if mode == "whole":
        return _padded(run, image[None], min_size)[0]
    raise ValueError(f"mode must be one of {registry.SEGMENTATION_MODES}, got {mode!r}.")


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    return x / x.sum(axis=-1, keepdims=True)


def label_map(
    run,
    photo: np.ndarray,
    settings: registry.SegmentationEval,
    *,
    mode: str | None = None,
    multi_scale: bool = False,
    batch_size: int = 4,
    min_size: int = MIN_WINDOW,
) -> np.ndarray:
    """The ``(H, W)`` uint8 class ids of a photo ``(H, W, 3)`` uint8 RGB (see the module
    docstring for the procedure).  Any size works: a window or image smaller than ``min_size``
    (the network's smallest input, 32) at some test scale is padded to it.

    Raises:
        FloatingPointError: the model returned NaN or infinite logits.
    """
    height, width = photo.shape[:2]
    if multi_scale:
        mode = mode or settings.multi_scale_mode
        views = [(r, flip) for r in settings.multi_scale_ratios for flip in (False, True)]
    else:
        mode = mode or settings.mode
        views = [(1.0, False)]
    scored = []
    for ratio, flip in views:
        image = test_image(photo, settings.image_scale, ratio, flip)
        logits = image_logits(run, image, mode, settings, batch_size, min_size)
        if not np.isfinite(logits).all():
            raise FloatingPointError(
                "the model returned NaN or infinite logits (its weights are damaged or the "
                "image breaks it); no label map"
            )
        scored.append((logits, flip))
    mask = np.empty((height, width), np.uint8)
    for start in range(0, height, _ROWS_PER_CHUNK):
        rows = slice(start, min(start + _ROWS_PER_CHUNK, height))
        total = None
        for logits, flip in scored:
            part = resize_bilinear(logits, height, width, rows)
            if flip:
                part = part[:, ::-1]
            if multi_scale:
                part = _softmax(part)
            total = part if total is None else total + part
        mask[rows] = np.argmax(total, axis=-1)
    return mask


# ---------------------------------------------------------------------------------------------
# Results and pictures


@dataclasses.dataclass
class SegmentResult:
    """What happened to one input file."""

    path: str
    #: ``(H, W)`` uint8 class ids at the image's own (upright) size; None on error.
    mask: np.ndarray | None = None
    #: ``[(class index, name, pixels, share of the image)]``, largest first.
    classes: list[tuple[int, str, int, float]] = dataclasses.field(default_factory=list)
    error: str | None = None
    #: The files written (``labels``, ``overlay``, ``legend``), when ``out_dir`` was given.
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    #: The model was a name loaded with ``weights=None``: the label map means nothing.
    random_weights: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        out: dict = {"file": self.path, "random_weights": self.random_weights}
        if self.error is not None:
            out["error"] = self.error
            return out
        out["height"], out["width"] = (int(n) for n in self.mask.shape)
        out["classes"] = [
            {"index": i, "label": name, "pixels": pixels, "share": share}
            for i, name, pixels, share in self.classes
        ]
        out.update(self.files)
        return out


def class_areas(mask: np.ndarray, names: Sequence[str]) -> list[tuple[int, str, int, float]]:
    """``[(class index, name, pixels, share)]`` of the classes present in ``mask``, largest
    first (ties by index)."""
    counts = np.bincount(mask.ravel(), minlength=len(names))
    present = np.flatnonzero(counts)
    order = present[np.argsort(-counts[present], kind="stable")]
    return [(int(i), names[i], int(counts[i]), float(counts[i] / mask.size)) for i in order]


def palette_image(mask: np.ndarray, palette: np.ndarray):
    """The label map as a palette (mode ``P``) PIL image: pixel value = class id."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    colours = np.zeros((256, 3), np.uint8)
    colours[: len(palette)] = palette
    image.putpalette(colours.ravel().tolist())
    return image


def overlay_image(
    photo: np.ndarray, mask: np.ndarray, palette: np.ndarray, opacity=OVERLAY_OPACITY
):
    """The photo with each pixel's class colour blended in at ``opacity`` (RGB PIL image)."""
    from PIL import Image

    blended = (1 - opacity) * photo.astype(np.float32) + opacity * palette[mask].astype(np.float32)
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), mode="RGB")


def legend_image(areas, palette: np.ndarray, *, row: int = 20, width: int = 300):
    """A legend of the classes present: a colour swatch, the share of the image and the name
    per class, largest first (RGB PIL image)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, row * max(len(areas), 1) + 8), "white")
    draw = ImageDraw.Draw(image)
    for k, (index, name, _, share) in enumerate(areas):
        top = 4 + k * row
        draw.rectangle(
            [6, top + 2, 6 + row - 4, top + row - 2],
            fill=tuple(int(c) for c in palette[index]),
            outline="black",
        )
        draw.text((row + 10, top + 4), f"{100 * share:5.1f}%  {name}", fill="black")
    return image


def _write_png(image, path: Path) -> str:
    from convnext_keras.weights.cache import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return str(path)


# ---------------------------------------------------------------------------------------------
# Files in, label maps out


def _min_size(model) -> int:
    """The smallest input ``model`` takes (its variant's; :data:`MIN_WINDOW` if unknown)."""
    from convnext_keras.nets.convnext import variant_of

    try:
        spec = variant_of(model)
    except (AttributeError, TypeError, ValueError):  # not a model of this library
        spec = None
    return spec.min_input_size if spec is not None else MIN_WINDOW


def file_error(path, error: BaseException) -> str:
    """One line for a file that could not be segmented: an :class:`ImageError` as it is (it
    names the file), anything else prefixed with the file."""
    from convnext_keras.errors import ImageError, plain

    if isinstance(error, ImageError):
        return str(error)
    if isinstance(error, MemoryError):
        return f"{path}: not enough memory to segment it ({error or 'MemoryError'})"
    return f"{path}: {plain(str(error)).strip() or type(error).__name__}"


def _row_of(model) -> registry.Checkpoint | None:
    """The segmentation row of a model name (None for anything else: the Keras path says
    what is wrong with it)."""
    if not isinstance(model, str) or model.endswith(".keras"):
        return None
    try:
        return segmentation_row(model)
    except ValueError:
        return None


def _inference(model, weights, precision, settings):
    """``(keras model, SegmentationEval, num_classes)`` from a name, a ``.keras`` file or a
    model; the settings come from the registry row of the name (or of the model's name), or
    from ``settings`` (a row name or a ``SegmentationEval``)."""
    import keras

    if isinstance(settings, str):
        settings = segmentation_row(settings).segmentation.eval
    if isinstance(model, (str, os.PathLike)) and not str(model).endswith(".keras"):
        row = segmentation_row(str(model))
        if weights is None:  # random weights, seeded: the same (meaningless) answers every run
            keras.utils.set_random_seed(0)
        loaded = load_segmentation_model(str(model), weights=weights, precision=precision)
        return loaded, settings or row.segmentation.eval
    from convnext_keras.tasks.predict import file_or_object

    return file_or_object(
        model,
        settings,
        lambda n: segmentation_row(n).segmentation.eval,
        "segmentation",
        "image scale, crop and stride",
    )


def segment_files(
    model,
    paths,
    *,
    weights="official",
    out_dir=None,
    mode: str | None = None,
    multi_scale: bool = False,
    batch_size: int = 4,
    exif_transpose: bool = True,
    precision: str | None = None,
    settings=None,
    engine: str = "auto",
) -> list[SegmentResult]:
    """Segment image files; unreadable ones (and any whose logits are not finite) come back
    with ``error`` set, never raise.

    Args:
        model: a segmentation model name (``"upernet_convnext_tiny_ade20k_512"``, see
            ``convnext list upernet``), a ``.keras`` file or a keras.Model from
            :func:`convnext_keras.load_model`.
        paths: image files (any format PIL reads).
        weights: for names: ``"official"``, None (random initialisation: the masks mean
            nothing, and each result says so) or a local mmsegmentation checkpoint file.
        out_dir: write ``<stem>_labels.png`` (palette PNG, value = class id, ADE20K colours),
            ``<stem>_overlay.png`` (the colours over the photo) and ``<stem>_legend.png`` (the
            classes present and their share) per image here.
        mode: ``"slide"`` or ``"whole"`` (default: the row's, ``"slide"`` for single scale).
        multi_scale: multi-scale + flip, as the original's ``--aug-test``.
        batch_size: sliding windows per model call.
        exif_transpose: turn photos upright by their EXIF orientation first (default True).
        precision: ``"fp32"``, or Keras mixed precision ``"bf16"`` / ``"fp16"`` (float32 logits).
        settings: the test settings for a model object or file whose name is not a
            segmentation checkpoint's: a registry name or a ``registry.SegmentationEval``.
        engine: ``"auto"`` (on a CPU for a float32 model the first installed of
            :data:`convnext_keras.engines.graph_files.SEGMENTATION_ENGINES`: onnxruntime, else
            OpenVINO; else Keras), ``"onnxruntime"``, ``"openvino"`` or ``"keras"``
            (:func:`convnext_keras.engines.upernet_graph.inference_function`).  A registry
            name with its official weights runs on its cached graph
            (:func:`convnext_keras.tasks.graph_route.graph_route`): the registry's window
            size is cached, so a later call imports no Keras.
    """
    from convnext_keras import preprocess
    from convnext_keras.data import ade20k
    from convnext_keras.tasks.graph_route import graph_route
    from convnext_keras.tasks.predict import _cam_names, random_weights

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if mode is not None and mode not in registry.SEGMENTATION_MODES:
        raise ValueError(f"mode must be one of {registry.SEGMENTATION_MODES}, got {mode!r}.")
    paths = [Path(p) for p in paths]
    route = None
    if settings is None:
        row = _row_of(model)
        window = None if row is None else row.segmentation.eval.crop
        # The registry's windows are cached; other sizes (whole images, images smaller than a
        # window) run from memory.
        sizes = None if window is None else ((window, window),)
        route = graph_route(
            model, weights, head="segmentation", engine=engine, precision=precision,
            cached_sizes=sizes,
        )  # fmt: skip
    if route is not None:
        test_settings, classes = route.checkpoint.segmentation.eval, int(route.num_classes)
        run, engine = route, route.engine
        min_size = registry.resolve(route.checkpoint.name).variant.min_input_size
        if (mode or test_settings.mode) == "slide" and not multi_scale:
            route.runner(test_settings.crop, test_settings.crop)  # cached on the first call
    else:
        from convnext_keras.engines.upernet_graph import inference_function

        keras_model, test_settings = _inference(model, weights, precision, settings)
        classes = int(keras_model.output_shape[-1])
        run, engine = inference_function(keras_model, engine)
        min_size = _min_size(keras_model)
    names, colours = ade20k.classes(), ade20k.palette()
    if classes != len(names):
        raise ValueError(
            f"The model has {classes} classes; segment_files names and colours ADE20K's "
            f"{len(names)}."
        )
    random = random_weights(model, weights)
    if out_dir is not None:
        out_dir = Path(out_dir)
        targets = {kind: _cam_names(paths, out_dir, suffix) for kind, suffix in OUTPUTS.items()}
    results = []
    for i, path in enumerate(paths):
        result = SegmentResult(str(path), random_weights=random)
        results.append(result)
        try:
            photo = np.asarray(preprocess.load_image(path, exif_transpose=exif_transpose))
            result.mask = label_map(
                run, photo, test_settings, mode=mode, multi_scale=multi_scale,
                batch_size=batch_size, min_size=min_size,
            )  # fmt: skip
        except (ValueError, FloatingPointError, MemoryError) as e:
            result.error = file_error(path, e)
            continue
        result.classes = class_areas(result.mask, names)
        if out_dir is not None:
            pictures = {
                "labels": palette_image(result.mask, colours),
                "overlay": overlay_image(photo, result.mask, colours),
                "legend": legend_image(result.classes, colours),
            }
            result.files = {k: _write_png(pictures[k], targets[k][i]) for k in OUTPUTS}
    return results
