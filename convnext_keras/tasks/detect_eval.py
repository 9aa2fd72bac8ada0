"""Box and mask AP of a detection model on COCO (``convnext eval-det``).

    from convnext_keras.tasks.detect_eval import evaluate_detection
    result = evaluate_detection("mask_rcnn_convnext_tiny_coco", "coco")   # the COCO folder
    result.box_ap, result.mask_ap              # percent, COCO's AP@[.50:.95]
    result.write("report.json")                # + every COCOeval statistic, unreadable files

The metrics are the COCO API's (pycocotools ``COCOeval``, ``iouType`` ``"bbox"`` and
``"segm"``), as mmdetection 2.x's ``CocoDataset.evaluate`` computes them: the detections of
every image (:func:`convnext_keras.tasks.detect.detect_photo`, the official test-time
procedure) as COCO results entries, scored against ``annotations/instances_<split>.json`` over
the images evaluated.  The folder: ``annotations/instances_val2017.json`` and ``val2017/*.jpg``
(:func:`convnext_keras.data.coco.find_split`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
from pathlib import Path

import numpy as np

#: ``COCOeval.stats`` in order (``COCOeval.summarize``): AP over IoU .50:.95, at .50, at .75,
#: for small / medium / large objects; AR with 1, 10, 100 detections, small / medium / large.
STATS = (
    *("AP", "AP50", "AP75", "APs", "APm", "APl"),
    *("AR1", "AR10", "AR100", "ARs", "ARm", "ARl"),
)


@dataclasses.dataclass
class DetEvalResult:
    model: str
    data: str
    #: COCO's box and mask AP@[.50:.95] in percent.
    box_ap: float
    mask_ap: float
    #: Every ``COCOeval`` statistic (:data:`STATS`) per ``"bbox"`` / ``"segm"``, in percent
    #: (None where COCO has nothing to score, its -1).
    stats: dict
    evaluated: int
    seconds: float
    images_per_s: float
    unreadable: list = dataclasses.field(default_factory=list)
    config: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, path) -> Path:
        """Write the JSON report atomically."""
        from convnext_keras.weights.cache import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        return path


def coco_metrics(annotations, results: list[dict], image_ids: list[int]) -> dict:
    """``{"bbox": {stat: percent}, "segm": {...}}`` of COCO results entries against a COCO
    ground truth (a ``pycocotools.coco.COCO`` or the annotation file), over ``image_ids``
    (pycocotools ``COCOeval``; a statistic COCO cannot score is None)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not isinstance(annotations, COCO):
        with contextlib.redirect_stdout(io.StringIO()):
            annotations = COCO(str(annotations))
    out = {}
    for kind in ("bbox", "segm"):
        if not results:
            out[kind] = {name: 0.0 for name in STATS}
            continue
        entries = results if kind == "segm" else [_without_mask(r) for r in results]
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
            detections = annotations.loadRes(entries)
            evaluation = COCOeval(annotations, detections, kind)
            evaluation.params.imgIds = list(image_ids)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        out[kind] = {
            name: (None if value < 0 else float(100 * value))
            for name, value in zip(STATS, evaluation.stats)
        }
    return out


def _without_mask(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "segmentation"}


def evaluate_detection(
    model,
    data,
    *,
    weights="official",
    split: str = "val2017",
    limit: int | None = None,
    precision: str | None = None,
    settings=None,
    progress: bool | None = None,
) -> DetEvalResult:
    """Box and mask AP of ``model`` (a detection name, ``.keras`` file or keras.Model) on the
    COCO folder ``data`` (see the module docstring).

    ``limit``: a fixed random subset of N images (seed 0).  Unreadable images are listed in
    ``unreadable`` and left out of the score (``ValueError`` if none could be evaluated).

    Raises:
        FileNotFoundError / ValueError: not a COCO folder, bad options, no image evaluated.
    """
    import sys

    from convnext_keras import preprocess
    from convnext_keras.data import coco
    from convnext_keras.tasks.detect import _coco_mask_api, _inference, coco_results, detect_photo
    from convnext_keras.tasks.evaluate import _progress
    from convnext_keras.tasks.predict import random_weights

    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}.")
    _coco_mask_api()
    from pycocotools.coco import COCO

    annotation_file, folder = coco.find_split(data, split)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ground_truth = COCO(str(annotation_file))
    except (ValueError, KeyError, TypeError) as e:  # JSON errors are ValueErrors
        raise ValueError(f"{annotation_file} is not a COCO annotation file ({e}).") from None
    images = sorted(ground_truth.imgs.values(), key=lambda i: i["id"])
    if limit is not None and limit < len(images):
        keep = np.sort(np.random.default_rng(0).choice(len(images), limit, replace=False))
        images = [images[i] for i in keep]
    start = time.perf_counter()
    keras_model, test_settings = _inference(model, weights, precision, settings)
    bar = _progress(len(images), sys.stderr.isatty() if progress is None else progress)
    results, evaluated, unreadable = [], [], []
    try:
        for info in images:
            path = folder / info["file_name"]
            try:
                photo = np.asarray(preprocess.load_image(path))
                if photo.shape[:2] != (info["height"], info["width"]):
                    raise ValueError(
                        f"the image is {photo.shape[1]}x{photo.shape[0]} but its annotation "
                        f"says {info['width']}x{info['height']}"
                    )
                found = detect_photo(keras_model, photo, test_settings)
            except (ValueError, FloatingPointError) as e:
                own = isinstance(e, preprocess.ImageError) and e.path == str(path)
                unreadable.append({"file": str(path), "error": e.reason if own else str(e)})
            else:
                results += coco_results(found, info["id"])
                evaluated.append(info["id"])
            if bar:
                bar[0].update(bar[1], advance=1)
    finally:
        if bar:
            bar[0].stop()
    seconds = time.perf_counter() - start
    if not evaluated:
        first = unreadable[0] if unreadable else {"file": str(data), "error": "no image"}
        raise ValueError(
            f"None of the {len(images)} image(s) of {annotation_file} could be evaluated (e.g. "
            f"{first['file']}: {first['error']}); fix or remove them and run again."
        )
    stats = coco_metrics(ground_truth, results, evaluated)
    import keras

    return DetEvalResult(
        model=str(getattr(model, "name", model)),
        data=str(data),
        box_ap=stats["bbox"]["AP"] or 0.0,
        mask_ap=stats["segm"]["AP"] or 0.0,
        stats=stats,
        evaluated=len(evaluated),
        seconds=seconds,
        images_per_s=len(evaluated) / seconds if seconds > 0 else 0.0,
        unreadable=unreadable,
        config={
            "split": split,
            "image_scale": list(test_settings.image_scale),
            "score_threshold": test_settings.score_threshold,
            "max_detections": test_settings.max_detections,
            "precision": precision or "fp32",
            "backend": keras.backend.backend(),
            "random_weights": random_weights(model, weights),
            "limit": limit,
        },
    )
