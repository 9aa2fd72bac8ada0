"""mIoU evaluation of a segmentation model on ADE20K validation (``convnext eval-seg``).

    from convnext_keras.tasks.segment_eval import evaluate_segmentation
    result = evaluate_segmentation("upernet_convnext_tiny_ade20k_512", "ADEChallengeData2016")
    result.miou, result.macc, result.aacc        # percent
    result.write("report.json")                  # + per-class IoU / accuracy, unreadable files

The metrics are mmsegmentation's (``mmseg/core/evaluation/metrics.py``, ``intersect_and_union``
and ``mean_iou``), accumulated over the whole set, not averaged per image, on annotations
read as mmseg reads them (:func:`convnext_keras.data.ade20k.read_annotation`: 0 and 255
ignored): for each class ``c``
over every scored pixel (label not :data:`convnext_keras.data.ade20k.IGNORE_INDEX`), ``intersect``
= pixels predicted ``c`` and labelled ``c``, ``union`` = predicted ``c`` + labelled ``c`` -
intersect; ``IoU = intersect / union`` and ``Acc = intersect / labelled``; mIoU and mAcc are
their means over the classes with a defined value (NaN for a class absent from labels and
predictions, left out as numpy's ``nanmean``); aAcc = all intersections / all labelled pixels.
Predictions are made as :func:`convnext_keras.tasks.segment.label_map` makes them (the official
test-time procedure), at each annotation's size.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from convnext_keras.data import ade20k


class IoUAccumulator:
    """Per-class pixel counts over a set of (prediction, label) maps (mmseg's
    ``total_intersect_and_union``).

    ``update(prediction, label)``: two ``(H, W)`` integer maps of the same shape; labels equal
    to ``ignore_index`` are not scored; a prediction or label outside ``[0, num_classes)``
    counts in no class (as ``torch.histc`` drops it) while the pixel stays scored.
    """

    def __init__(self, num_classes: int, ignore_index: int = ade20k.IGNORE_INDEX):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.intersect = np.zeros(num_classes, np.int64)
        self.predicted = np.zeros(num_classes, np.int64)
        self.labelled = np.zeros(num_classes, np.int64)

    def _count(self, values: np.ndarray) -> np.ndarray:
        values = values[(values >= 0) & (values < self.num_classes)]
        return np.bincount(values, minlength=self.num_classes).astype(np.int64)

    def update(self, prediction, label) -> None:
        prediction, label = np.asarray(prediction), np.asarray(label)
        if prediction.shape != label.shape:
            raise ValueError(
                f"prediction {prediction.shape} and label {label.shape} differ in shape."
            )
        scored = label != self.ignore_index
        prediction = prediction[scored].astype(np.int64)
        label = label[scored].astype(np.int64)
        self.intersect += self._count(prediction[prediction == label])
        self.predicted += self._count(prediction)
        self.labelled += self._count(label)

    @property
    def union(self) -> np.ndarray:
        return self.predicted + self.labelled - self.intersect

    def metrics(self) -> dict:
        """``{"miou", "macc", "aacc"}`` in percent (NaN when nothing was scored), and the
        per-class ``"iou"`` / ``"acc"`` arrays (NaN where undefined)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = self.intersect / self.union
            acc = self.intersect / self.labelled
            aacc = self.intersect.sum() / self.labelled.sum()

        def mean(values):
            return float(100 * np.nanmean(values)) if np.isfinite(values).any() else float("nan")

        return {
            "miou": mean(iou),
            "macc": mean(acc),
            "aacc": float(100 * aacc),
            "iou": iou,
            "acc": acc,
        }


@dataclasses.dataclass
class SegEvalResult:
    """mIoU, mAcc, aAcc (percent) and everything behind them; :meth:`to_dict` is the JSON
    report (NaN written as null)."""

    model: str
    data: str
    miou: float
    macc: float
    aacc: float
    evaluated: int
    seconds: float
    images_per_s: float
    #: ``{class name: {"index", "iou", "acc", "labelled_pixels", "predicted_pixels"}}``.
    per_class: dict[str, dict]
    unreadable: list[dict]
    config: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return _no_nan(dataclasses.asdict(self))

    def write(self, path) -> Path:
        """Write the JSON report atomically."""
        from convnext_keras.weights.cache import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        return path


def _no_nan(value):
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def evaluate_segmentation(
    model,
    data,
    *,
    weights="official",
    limit: int | None = None,
    mode: str | None = None,
    multi_scale: bool = False,
    batch_size: int = 4,
    precision: str | None = None,
    engine: str = "auto",
    progress: bool | None = None,
) -> SegEvalResult:
    """mIoU of ``model`` on the ADE20K validation images of ``data``.

    Args:
        model: a segmentation model name, ``.keras`` file or keras.Model (see
            :func:`convnext_keras.tasks.segment.segment_files`).
        data: the ``ADEChallengeData2016`` folder (``images/validation/*.jpg``,
            ``annotations/validation/*.png``) or the folder holding it.
        weights: for names: ``"official"``, None (random: the numbers mean nothing) or a
            local mmsegmentation checkpoint.
        limit: evaluate a reproducible random subset of this many images.
        mode, multi_scale, batch_size, precision, engine: as :func:`segment_files`.
        progress: a progress bar on stderr (default: when stderr is a terminal).

    Images that cannot be read, have no annotation, or give non-finite logits are listed in
    ``unreadable`` and left out.  Photos are read as stored (no EXIF rotation: the
    annotations are aligned with the stored pixels).
    """
    import sys

    import keras

    from convnext_keras import preprocess
    from convnext_keras.engines import runners
    from convnext_keras.engines.upernet_graph import inference_function
    from convnext_keras.tasks.evaluate import _progress
    from convnext_keras.tasks.predict import random_weights
    from convnext_keras.tasks.segment import _inference, _min_size, file_error, label_map

    runners.check_engine(engine)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}.")
    pairs, unreadable = ade20k.find_pairs(data)
    if limit is not None and limit < len(pairs):
        keep = np.sort(np.random.default_rng(0).choice(len(pairs), limit, replace=False))
        pairs = [pairs[i] for i in keep]
    start = time.perf_counter()
    keras_model, settings = _inference(model, weights, precision, None)
    run, engine_name = inference_function(keras_model, engine)
    min_size = _min_size(keras_model)
    names = ade20k.classes()
    counts = IoUAccumulator(len(names))
    if progress is None:
        progress = sys.stderr.isatty()
    bar = _progress(len(pairs), progress)
    evaluated = 0
    try:
        for image, annotation in pairs:
            try:
                label = ade20k.read_annotation(annotation)
                photo = np.asarray(preprocess.load_image(image))
                if photo.shape[:2] != label.shape:
                    raise ValueError(
                        f"the image is {photo.shape[1]}x{photo.shape[0]} but its "
                        f"annotation {label.shape[1]}x{label.shape[0]}"
                    )
                mask = label_map(
                    run,
                    photo,
                    settings,
                    mode=mode,
                    multi_scale=multi_scale,
                    batch_size=batch_size,
                    min_size=min_size,
                )
            except (ValueError, FloatingPointError, MemoryError) as e:
                # The entry names the image; an error about the image itself gives its reason
                # only (as evaluate's report), one about its annotation names that file.
                own = isinstance(e, preprocess.ImageError) and e.path == str(image)
                error = e.reason if own else file_error(image, e).removeprefix(f"{image}: ")
                unreadable.append({"file": str(image), "error": error})
            else:
                counts.update(mask, label)
                evaluated += 1
            if bar:
                bar[0].update(bar[1], advance=1)
    finally:
        if bar:
            bar[0].stop()
    seconds = time.perf_counter() - start
    if evaluated == 0:  # mIoU of nothing is NaN: say why instead
        first = unreadable[0] if unreadable else {"file": str(data), "error": "no image"}
        raise ValueError(
            f"None of the {len(unreadable)} image(s) in {data} could be evaluated (e.g. "
            f"{first['file']}: {first['error']}); fix or remove them and run again."
        )
    metrics = counts.metrics()
    per_class = {
        name: {
            "index": i,
            "iou": float(100 * metrics["iou"][i]),
            "acc": float(100 * metrics["acc"][i]),
            "labelled_pixels": int(counts.labelled[i]),
            "predicted_pixels": int(counts.predicted[i]),
        }
        for i, name in enumerate(names)
    }
    return SegEvalResult(
        model=str(getattr(model, "name", model)),
        data=str(data),
        miou=metrics["miou"],
        macc=metrics["macc"],
        aacc=metrics["aacc"],
        evaluated=evaluated,
        seconds=seconds,
        images_per_s=evaluated / seconds if seconds > 0 else 0.0,
        per_class=per_class,
        unreadable=unreadable,
        config={
            "mode": mode or (settings.multi_scale_mode if multi_scale else settings.mode),
            "multi_scale": multi_scale,
            "image_scale": list(settings.image_scale),
            "crop": settings.crop,
            "stride": settings.stride,
            "precision": precision or "fp32",
            "engine": engine_name,
            "backend": keras.backend.backend(),
            "random_weights": random_weights(model, weights),
            "limit": limit,
        },
    )
