"""mmdetection's two-stage detector layout (the official COCO files of facebookresearch/ConvNeXt
``object_detection``; mmdetection 2.x ``MaskRCNN`` / ``CascadeRCNN``): ``backbone.*`` in the
official ConvNeXt names plus the stage-output norms ``backbone.norm0`` ... ``norm3``,
``neck.*`` (the FPN), ``rpn_head.*`` and ``roi_head.*`` (box and mask heads; a cascade's are
numbered ``roi_head.bbox_head.{stage}.*``).

The backbone's names are split off here (they are mmsegmentation's too); the rest is mapped onto
the Keras layers by :mod:`convnext_keras.weights.convert_detection`.
"""

from __future__ import annotations

import re

import numpy as np

from convnext_keras.weights.layouts import mmseg

NAME = "mmdet"

BACKBONE, NECK, RPN, ROI = mmseg.BACKBONE, "neck.", "rpn_head.", "roi_head."
_CASCADE = re.compile(rf"^{re.escape(ROI)}bbox_head\.(\d+)\.")


def matches(keys) -> bool:
    """Whether the keys are an mmdetection two-stage detector's (``backbone.*``, ``neck.*``
    and ``roi_head.*`` tensors)."""
    keys = list(keys)
    return all(any(k.startswith(p) for k in keys) for p in (BACKBONE, NECK, ROI))


def backbone_keys(state_dict: dict) -> list[str]:
    """The keys of the backbone proper (``backbone.*`` without the stage-output norms)."""
    return mmseg.backbone_keys(state_dict)


def backbone(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The backbone's tensors under their official ConvNeXt names (``backbone.`` dropped)."""
    return mmseg.backbone(state_dict)


def method(state_dict: dict) -> str:
    """``"cascade_mask_rcnn"`` when the box heads are numbered by stage, else ``"mask_rcnn"``."""
    return "cascade_mask_rcnn" if any(_CASCADE.match(k) for k in state_dict) else "mask_rcnn"
