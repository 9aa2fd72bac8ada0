"""COCO box and mask AP (``convnext_keras.tasks.detect_eval``): the metric on ground truths
whose answers are known exactly (perfect detections: 100; a wrong class: 0; one detection at IoU
0.72: matched at the IoU thresholds .50-.70 of COCO's ten, AP 50), and the folder checks.  The
whole ``eval-det`` path with a model runs in ``tests/tasks/test_detect.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from convnext_keras.tasks import detect_eval


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _box_mask(box, height=200, width=300):
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture
def ground_truth(tmp_path):
    boxes = {1: [(10, 10, 110, 110), (150, 20, 250, 180)], 2: [(50, 50, 150, 100)]}
    images, annotations = [], []
    for image_id, image_boxes in boxes.items():
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": 200, "width": 300})
        for box in image_boxes:
            x0, y0, x1, y1 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 18,  # dog
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                    "segmentation": _rle(_box_mask(box)),
                }
            )
    path = tmp_path / "instances.json"
    categories = [{"id": 18, "name": "dog", "supercategory": "animal"}]
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path, annotations


def _as_results(annotations, category=18, score=0.9):
    return [
        {
            "image_id": a["image_id"],
            "category_id": category,
            "bbox": a["bbox"],
            "score": score,
            "segmentation": a["segmentation"],
        }
        for a in annotations
    ]


def test_perfect_wrong_class_and_one_iou(ground_truth):
    path, annotations = ground_truth
    perfect = detect_eval.coco_metrics(path, _as_results(annotations), [1, 2])
    assert perfect["bbox"]["AP"] == pytest.approx(100) and perfect["segm"]["AP"] == pytest.approx(
        100
    )
    wrong = detect_eval.coco_metrics(path, _as_results(annotations, category=1), [1, 2])
    assert wrong["bbox"]["AP"] == 0 and wrong["segm"]["AP"] == 0
    # image 2 alone, its box cut to 72% of its height: IoU 0.72
    cut = {"image_id": 2, "category_id": 18, "bbox": [50, 50, 100, 36], "score": 0.9}
    cut["segmentation"] = _rle(_box_mask((50, 50, 150, 86)))
    partial = detect_eval.coco_metrics(path, [cut], [2])
    assert partial["bbox"]["AP"] == pytest.approx(50) and partial["segm"]["AP"] == pytest.approx(50)
    assert partial["bbox"]["APs"] is None  # no small object: COCO's -1
    assert set(partial["bbox"]) == set(detect_eval.STATS)


def test_a_folder_not_in_the_coco_layout(tmp_path):
    with pytest.raises(ValueError, match="not in the COCO layout"):
        detect_eval.evaluate_detection("mask_rcnn_convnext_tiny_coco", tmp_path, weights=None)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{not json")
    (tmp_path / "val2017").mkdir()
    with pytest.raises(ValueError, match="not a COCO annotation file"):
        detect_eval.evaluate_detection("mask_rcnn_convnext_tiny_coco", tmp_path, weights=None)
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        detect_eval.evaluate_detection("mask_rcnn_convnext_tiny_coco", tmp_path, limit=0)
