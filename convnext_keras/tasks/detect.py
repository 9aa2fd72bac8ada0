"""Object detection and instance segmentation of image files with the official test-time
procedure: boxes, classes, scores and masks in each photo's pixels, overlays with a legend, and
COCO results JSON.

    import convnext_keras as ck
    results = ck.detect_files("mask_rcnn_convnext_tiny_coco", ["street.jpg"], out_dir="det/")
    results[0].boxes      # (n, 4) float32 x1, y1, x2, y2 in the photo's pixels, best first
    results[0].names      # the class of each detection ("person", "car"...)
    results[0].masks      # (n, H, W) bool, each detection's mask in the photo

The procedure is the original's (mmdetection 2.x, as the configs of facebookresearch/ConvNeXt
``object_detection`` set it; every number comes from the model's registry row,
:class:`convnext_keras.registry.DetectionEval`):

1. the photo (RGB, 0-255) resized keeping its aspect ratio to fit ``image_scale`` (1333 x 800;
   mmcv ``imrescale``, bilinear: :func:`convnext_keras.tasks.segment.test_image`), normalised
   with the ImageNet mean/std on 0-255 pixels, padded with zeros at the bottom and right to a
   multiple of ``size_divisor`` (32);
2. the detector (:mod:`convnext_keras.nets.detection.model`): boxes in the photo's pixels,
   scores, labels and 28 x 28 mask probabilities of at most ``max_detections`` detections;
3. each mask pasted into the photo (mmdetection ``FCNMaskHead._do_paste_mask`` as it runs on a
   GPU, where the reported AP was measured: the 28 x 28 probabilities sampled bilinearly at
   every pixel centre, ``grid_sample`` with ``align_corners=False`` and zeros outside) and
   binarised at ``mask_threshold`` (0.5).

Unreadable files, and any the model returns NaN or infinite outputs for, are reported in their
result (``error``) and skipped, as ``predict_files`` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from convnext_keras import registry
from convnext_keras.api import detection_row, load_detection_model
from convnext_keras.interface import fix

#: What ``detect_files`` writes per image, by suffix.
OUTPUTS = {"overlay": "_overlay.png", "json": "_detections.json"}
#: Opacity of a mask's colour over the photo in the overlay.
MASK_OPACITY = 0.5


# ---------------------------------------------------------------------------------------------
# The test pipeline


def test_input(photo: np.ndarray, settings: registry.DetectionEval, pad_to=None):
    """A photo ``(H, W, 3)`` uint8 RGB as the detector takes it: ``(image (h', w', 3) float32
    resized, normalised and padded; image size (h, w) before padding; scale factor (h / H,
    w / W))``.  ``pad_to``: pad to this ``(height, width)`` instead of the next multiple of
    ``size_divisor`` (a batch of photos shares one size: mmcv's ``collate``)."""
    from convnext_keras.tasks.segment import test_image

    image = test_image(photo, settings.image_scale)
    height, width = image.shape[:2]
    d = settings.size_divisor
    pad = pad_to or (-(-height // d) * d, -(-width // d) * d)
    if pad[0] < height or pad[1] < width:
        raise ValueError(f"pad_to {tuple(pad)} is smaller than the image ({height}, {width}).")
    padded = np.zeros((*pad, 3), np.float32)
    padded[:height, :width] = image
    scale = (height / photo.shape[0], width / photo.shape[1])
    return padded, (height, width), scale


def paste_masks(
    masks: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float | None = 0.5
) -> np.ndarray:
    """Masks ``(n, M, M)`` (probabilities in their boxes) pasted into a ``(height, width)``
    image: ``(n, height, width)`` bool (``>= threshold``), or float32 probabilities with
    ``threshold=None``.  ``boxes`` ``(n, 4)`` x1, y1, x2, y2 in that image's pixels.

    mmdetection 2.x ``_do_paste_mask`` with ``skip_empty=False`` (its GPU path): pixel centre
    ``(x + 0.5, y + 0.5)`` samples the mask at ``((x + 0.5 - x1) / (x2 - x1) * M - 0.5, ...)``
    bilinearly, zero outside; computed only near each box (elsewhere it is exactly zero).  A
    box of zero width or height samples the mask's middle column or row (mmdetection's
    ``inf -> 0``).
    """
    masks = np.asarray(masks, np.float32)
    boxes = np.asarray(boxes, np.float32)
    n, size = masks.shape[0], masks.shape[-1]
    out = np.zeros((n, height, width), np.float32 if threshold is None else bool)
    for i in range(n):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        xs = _span(x0, x1, width, size)
        ys = _span(y0, y1, height, size)
        if xs is None or ys is None:
            continue
        gx = _grid(np.arange(*xs, dtype=np.float32), x0, x1, size)
        gy = _grid(np.arange(*ys, dtype=np.float32), y0, y1, size)
        values = _bilinear_zeros(masks[i], gy, gx)
        out[i, ys[0] : ys[1], xs[0] : xs[1]] = values if threshold is None else values >= threshold
    return out


def _span(lo: float, hi: float, limit: int, size: int):
    """The pixel range ``[a, b)`` where a box side's samples can be non-zero."""
    extent = hi - lo
    if not np.isfinite(extent):
        return None
    if extent <= 0:
        return 0, limit
    margin = extent / size + 2
    a, b = max(int(np.floor(lo - margin)), 0), min(int(np.ceil(hi + margin)), limit)
    return (a, b) if a < b else None


def _grid(pixels: np.ndarray, lo: float, hi: float, size: int) -> np.ndarray:
    """Source coordinates (in mask cells, ``align_corners=False``) of pixel centres."""
    extent = np.float32(hi) - np.float32(lo)
    if extent == 0:  # grid_sample's normalised coordinate is inf -> set to 0: the middle
        return np.full(pixels.shape, (size - 1) / 2, np.float32)
    g = (pixels + np.float32(0.5) - np.float32(lo)) / extent * np.float32(2) - np.float32(1)
    return ((g + 1) * size - 1) / 2


def _bilinear_zeros(mask: np.ndarray, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """``mask`` sampled at rows ``gy`` x columns ``gx`` (outer product), bilinear, zero
    padding (``grid_sample(padding_mode="zeros")``)."""
    size_y, size_x = mask.shape
    padded = np.zeros((size_y + 2, size_x + 2), np.float32)
    padded[1:-1, 1:-1] = mask

    def axis(g, size):
        i0 = np.floor(g)
        w1 = (g - i0).astype(np.float32)
        i0 = np.clip(i0.astype(np.int64), -1, size) + 1  # -1 and size are zero padding
        i1 = np.clip(np.floor(g).astype(np.int64) + 1, -1, size) + 1
        return i0, i1, w1

    r0, r1, wy = axis(gy, size_y)
    c0, c1, wx = axis(gx, size_x)
    top = padded[r0][:, c0] * (1 - wx) + padded[r0][:, c1] * wx
    bottom = padded[r1][:, c0] * (1 - wx) + padded[r1][:, c1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


# ---------------------------------------------------------------------------------------------
# Results, COCO JSON and pictures


@dataclasses.dataclass
class DetectResult:
    """What happened to one input file."""

    path: str
    #: ``(n, 4)`` float32 x1, y1, x2, y2 in the photo's pixels (upright), best first.
    boxes: np.ndarray | None = None
    #: ``(n,)`` float32 scores in (0, 1).
    scores: np.ndarray | None = None
    #: ``(n,)`` int labels 0-79 (``convnext_keras.data.coco.classes()`` order).
    labels: np.ndarray | None = None
    #: ``(n, H, W)`` bool masks in the photo.
    masks: np.ndarray | None = None
    error: str | None = None
    #: The files written (``overlay``, ``json``), when ``out_dir`` was given.
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    #: The model was a name loaded with ``weights=None``: the detections mean nothing.
    random_weights: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def names(self) -> list[str]:
        from convnext_keras.data import coco

        return [coco.classes()[int(i)] for i in (self.labels if self.labels is not None else [])]

    def to_dict(self) -> dict:
        out: dict = {"file": self.path, "random_weights": self.random_weights}
        if self.error is not None:
            out["error"] = self.error
            return out
        out["height"], out["width"] = (int(n) for n in self.masks.shape[1:])
        out["detections"] = [
            {
                "label": name,
                "index": int(label),
                "score": float(score),
                "box": [float(v) for v in box],
                "mask_pixels": int(mask.sum()),
            }
            for name, label, score, box, mask in zip(
                self.names, self.labels, self.scores, self.boxes, self.masks
            )
        ]
        out.update(self.files)
        return out


def coco_results(result: DetectResult, image_id: int) -> list[dict]:
    """The detections of ``result`` as COCO results entries (``image_id``, ``category_id``,
    ``bbox`` [x, y, width, height], ``score``, ``segmentation`` as compressed RLE, pycocotools'
    ``mask.encode``), the format ``COCO.loadRes`` and the COCO evaluation server take."""
    from convnext_keras.data import coco

    mask_utils = _coco_mask_api()
    ids = coco.category_ids()
    entries = []
    for label, score, box, mask in zip(result.labels, result.scores, result.boxes, result.masks):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        x0, y0, x1, y1 = (float(v) for v in box)
        entries.append(
            {
                "image_id": int(image_id),
                "category_id": int(ids[int(label)]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(score),
                "segmentation": rle,
            }
        )
    return entries


def _coco_mask_api():
    """pycocotools' ``mask`` module; ``ValueError`` saying how to install it when missing."""
    try:
        from pycocotools import mask
    except ImportError:
        raise ValueError(
            "The COCO results JSON (RLE masks) needs pycocotools: pip install pycocotools (or "
            "pip install 'convnext-keras[detection]')."
        ) from None
    return mask


def overlay_image(photo: np.ndarray, result: DetectResult, *, opacity: float = MASK_OPACITY):
    """The photo with each detection's mask blended in its class colour, its box outlined and a
    legend (class and score per detection, best first; as many as fit beside the photo, then
    how many more) drawn in a white panel at the right (RGB PIL image)."""
    from PIL import Image, ImageDraw

    from convnext_keras.data import coco

    colours = coco.palette()
    picture = photo.astype(np.float32)
    # the worst first, so that the best detection is drawn on top
    for label, mask in reversed(list(zip(result.labels, result.masks))):
        picture[mask] = (1 - opacity) * picture[mask] + opacity * colours[int(label)]
    image = Image.fromarray(np.clip(np.rint(picture), 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    for label, box in zip(result.labels, result.boxes):
        draw.rectangle([float(v) for v in box], outline=tuple(int(c) for c in colours[label]))
    row, panel = 16, 220
    lines = [f"{s:.2f}  {n}" for n, s in zip(result.names, result.scores)] or ["no detections"]
    fit = max(2, (image.height - 8) // row)  # the legend stays as tall as the photo
    if len(lines) > fit:
        lines = lines[: fit - 1] + [f"... {len(lines) - fit + 1} more (see the JSON)"]
    height = max(image.height, row * len(lines) + 8)
    canvas = Image.new("RGB", (image.width + panel, height), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(lines):
        top = 4 + k * row
        if result.labels is not None and k < len(result.labels):
            colour = tuple(int(c) for c in colours[int(result.labels[k])])
            draw.rectangle([image.width + 6, top + 2, image.width + 18, top + 14], fill=colour)
        draw.text((image.width + 24, top + 2), text, fill="black")
    return canvas


def _write(path: Path, write) -> str:
    from convnext_keras.weights.cache import atomic_path

    with atomic_path(path) as tmp:
        write(tmp)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Files in, detections out


def _inference(model, weights, precision, settings, score_threshold=None):
    """``(keras model, DetectionEval)`` from a name, a ``.keras`` file or a model; a
    ``score_threshold`` replaces the settings' (a name's model is built with it; a model
    object's outputs are filtered by it, which needs it at least the one it was built with)."""
    import keras

    if isinstance(settings, str):
        settings = detection_row(settings).detection.eval
    if score_threshold is not None and not 0.0 <= float(score_threshold) < 1.0:
        raise ValueError(
            f"score_threshold must be a class score in [0, 1), got {score_threshold!r}."
        )
    if isinstance(model, (str, os.PathLike)) and not str(model).endswith(".keras"):
        row = detection_row(str(model))
        settings = settings or row.detection.eval
        if score_threshold is not None:
            settings = dataclasses.replace(settings, score_threshold=float(score_threshold))
        if weights is None:  # random weights, seeded: the same (meaningless) answers every run
            keras.utils.set_random_seed(0)
        loaded = load_detection_model(
            str(model), weights=weights, precision=precision, settings=settings
        )
        return loaded, settings
    from convnext_keras.tasks.predict import file_or_object

    model, settings = file_or_object(
        model, settings, lambda n: detection_row(n).detection.eval, "detection", "image scale"
    )
    if score_threshold is not None:
        built = settings.score_threshold
        if float(score_threshold) < built:
            raise ValueError(
                f"{model.name} keeps detections scoring above {built:g} (part of its graph): a "
                f"lower threshold ({float(score_threshold):g}) needs the model built with it - "
                f"load it by name with {fix('score_threshold=', '--score ')}"
                f"{float(score_threshold):g}."
            )
        settings = dataclasses.replace(settings, score_threshold=float(score_threshold))
    return model, settings


def detect_photo(model, photo: np.ndarray, settings: registry.DetectionEval) -> DetectResult:
    """The detections of one photo ``(H, W, 3)`` uint8 RGB (path left empty).

    Raises:
        FloatingPointError: the model returned NaN or infinite boxes, scores or masks.
    """
    image, size, scale = test_input(photo, settings)
    out = model.predict_on_batch(
        [image[None], np.array([size], np.int32), np.array([scale], np.float32)]
    )
    n = int(np.asarray(out["num_detections"])[0])
    boxes = np.asarray(out["boxes"])[0, :n]
    scores = np.asarray(out["scores"])[0, :n]
    probs = np.asarray(out["masks"])[0, :n]
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all() and np.isfinite(probs).all()):
        raise FloatingPointError(
            "the model returned NaN or infinite outputs (its weights are damaged or the image "
            "breaks it); no detections"
        )
    labels = np.asarray(out["labels"])[0, :n].astype(np.int64)
    # A threshold above the graph's keeps the same detections as a graph built with it (NMS
    # only lets a higher score suppress a lower one); for a graph built with it, a no-op.
    keep = scores > settings.score_threshold
    boxes, scores, probs, labels = boxes[keep], scores[keep], probs[keep], labels[keep]
    masks = paste_masks(probs, boxes, photo.shape[0], photo.shape[1], settings.mask_threshold)
    return DetectResult("", boxes=boxes, scores=scores, labels=labels, masks=masks)


def detect_files(
    model,
    paths,
    *,
    weights="official",
    out_dir=None,
    exif_transpose: bool = True,
    precision: str | None = None,
    settings=None,
    score_threshold: float | None = None,
) -> list[DetectResult]:
    """Detect objects (and their masks) in image files; unreadable ones (and any whose outputs
    are not finite) come back with ``error`` set, never raise.

    Args:
        model: a detection model name (``"mask_rcnn_convnext_tiny_coco"``, see
            ``convnext list coco``), a ``.keras`` file or a keras.Model from
            :func:`convnext_keras.load_model`.
        paths: image files (any format PIL reads).
        weights: for names: ``"official"``, None (random initialisation: the detections mean
            nothing, and each result says so) or a local mmdetection checkpoint file.
        out_dir: write ``<stem>_overlay.png`` (masks, boxes and a legend over the photo) and
            ``<stem>_detections.json`` (COCO results entries, masks as RLE; ``image_id`` the
            file's position in ``paths``) per image here.
        exif_transpose: turn photos upright by their EXIF orientation first (default True).
        precision: ``"fp32"``, or Keras mixed precision ``"bf16"`` / ``"fp16"`` (float32 boxes,
            scores and masks).
        settings: other test settings (a registry name or a ``registry.DetectionEval``), or
            those of a model object or file whose name is not a detection checkpoint's.
        score_threshold: keep detections whose class score is above this (default: the
            checkpoint's test setting, 0.05, as mmdetection evaluates; 0.3 for a picture).

    Raises ``ValueError`` for a ``score_threshold`` outside [0, 1), or below the one a model
    object was built with (a name's model is built with it).
    """
    from convnext_keras import preprocess
    from convnext_keras.tasks.predict import _cam_names, random_weights

    paths = [Path(p) for p in paths]
    if out_dir is not None:
        _coco_mask_api()  # missing: said before any download
    keras_model, test_settings = _inference(model, weights, precision, settings, score_threshold)
    random = random_weights(model, weights)
    if out_dir is not None:
        out_dir = Path(out_dir)
        targets = {kind: _cam_names(paths, out_dir, suffix) for kind, suffix in OUTPUTS.items()}
    results = []
    for i, path in enumerate(paths):
        try:
            photo = np.asarray(preprocess.load_image(path, exif_transpose=exif_transpose))
            result = detect_photo(keras_model, photo, test_settings)
        except (preprocess.ImageError, FloatingPointError) as e:
            message = str(e) if isinstance(e, preprocess.ImageError) else f"{path}: {e}"
            results.append(DetectResult(str(path), error=message, random_weights=random))
            continue
        result.path, result.random_weights = str(path), random
        results.append(result)
        if out_dir is not None:
            picture = overlay_image(photo, result)
            entries = coco_results(result, i)
            result.files = {
                "overlay": _write(
                    targets["overlay"][i], lambda tmp, p=picture: p.save(tmp, format="PNG")
                ),
                "json": _write(
                    targets["json"][i],
                    lambda tmp, e=entries: Path(tmp).write_text(json.dumps(e)),
                ),
            }
    return results


__all__: Sequence[str] = ("DetectResult", "coco_results", "detect_files", "paste_masks")
