"""A detection file given to a classifier, segmentation or other detection name (and the
reverse) is refused with an error naming the model that loads it.  The state dicts carry the
exact key names and shapes of the official files (``convert_detection.expected_shapes``, which
``tests/nets/test_detection.py`` proves equal to the reference's) as zero-cost broadcast zeros:
the errors come from the names and shapes alone, before any tensor is read.
"""

from __future__ import annotations

import numpy as np
import pytest

from convnext_keras import registry
from convnext_keras.weights import convert, convert_detection
from convnext_keras.weights.layouts import detect_layout
from convnext_keras.weights.read import CheckpointError

MASK = "mask_rcnn_convnext_tiny_coco"
CASCADE = "cascade_mask_rcnn_convnext_tiny_coco"


def _state(name: str) -> dict[str, np.ndarray]:
    row = registry.CHECKPOINTS[name]
    shapes = convert_detection.expected_shapes(row.variant, row.detection.head, 80)
    return {k: np.broadcast_to(np.float32(0.01), s) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def mask_state():
    return _state(MASK)


def test_a_detector_file_is_not_a_classifier(mask_state):
    with pytest.raises(CheckpointError, match=f"mmdet detection checkpoint.*load it with {MASK}"):
        detect_layout(mask_state)


def test_a_detector_file_is_not_a_segmenter(mask_state):
    with pytest.raises(CheckpointError, match=f"mmdetection detection checkpoint.*{MASK}"):
        convert.convert_mmseg_state_dict(mask_state, "tiny")


def test_a_mask_rcnn_file_is_not_the_cascade(mask_state):
    head = registry.CHECKPOINTS[CASCADE].detection.head
    with pytest.raises(CheckpointError, match=f"not a Cascade Mask R-CNN.*load it with {MASK}"):
        convert_detection.convert_mmdet_state_dict(mask_state, "tiny", head, 80)


def test_another_backbone_names_the_detector_that_fits():
    state = _state("cascade_mask_rcnn_convnext_small_coco")
    head = registry.CHECKPOINTS[CASCADE].detection.head
    with pytest.raises(CheckpointError, match="load it with cascade_mask_rcnn_convnext_small_coco"):
        convert_detection.convert_mmdet_state_dict(state, "tiny", head, 80)


def test_a_segmenter_or_classifier_file_is_not_a_detector(mask_state):
    head = registry.CHECKPOINTS[MASK].detection.head
    segmenter = {k: v for k, v in mask_state.items() if k.startswith("backbone.")}
    segmenter["decode_head.conv_seg.weight"] = np.zeros((150, 512, 1, 1), np.float32)
    with pytest.raises(CheckpointError, match="upernet_convnext_tiny_ade20k_512"):
        convert_detection.convert_mmdet_state_dict(segmenter, "tiny", head, 80)
    classifier = {k.removeprefix("backbone."): v for k, v in segmenter.items()}
    with pytest.raises(CheckpointError, match="classification name"):
        convert_detection.convert_mmdet_state_dict(classifier, "tiny", head, 80)


def test_a_missing_and_a_misshaped_tensor_are_named(mask_state):
    head = registry.CHECKPOINTS[MASK].detection.head
    state = dict(mask_state)
    del state["rpn_head.rpn_cls.bias"]
    state["roi_head.bbox_head.fc_cls.weight"] = np.zeros((91, 1024), np.float32)
    with pytest.raises(CheckpointError) as caught:
        convert_detection.convert_mmdet_state_dict(state, "tiny", head, 80)
    assert "rpn_head.rpn_cls.bias" in str(caught.value)
    assert "roi_head.bbox_head.fc_cls.weight" in str(caught.value)


def test_the_official_file_converts_whole(mask_state):
    head = registry.CHECKPOINTS[MASK].detection.head
    weights = convert_detection.convert_mmdet_state_dict(mask_state, "tiny", head)
    assert weights["box0_cls"][0].shape == (1024, 81)
    assert weights["box0_fc0"][0].shape == (7 * 7 * 256, 1024)
    assert weights["mask0_upsample"][0].shape == (2, 2, 256, 256)
