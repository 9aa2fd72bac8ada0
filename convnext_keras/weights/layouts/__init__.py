"""The foreign checkpoint layouts, each one pure function to the official names.

A layout is detected from the tensor names (never asked for), then renamed (and, where its
tensors are laid out differently, re-laid out) to the names and shapes of the original
repositories (facebookresearch/ConvNeXt and ConvNeXt-V2 ``models/convnext*.py``), which
:mod:`convnext_keras.weights.convert` maps onto the Keras layers.  One module per layout:

    official      the original repositories' (and facebookresearch/dinov3's)
    isotropic     models/convnext_isotropic.py: stem, blocks.N
    timm          timm/models/convnext.py
    huggingface   transformers' ConvNext / ConvNextV2
    dinov3        transformers' DINOv3ConvNext, as the Hub's facebook/dinov3-convnext-* store it
    fcmae         ConvNeXt V2's FCMAE pre-training (MinkowskiEngine kernels)
    mmseg         mmsegmentation's encoder-decoder (the official UperNet ADE20K files)
    mmdet         mmdetection's two-stage detectors (the official Mask R-CNN / Cascade Mask
                  R-CNN COCO files)

A new layout is one module with ``NAME``, ``matches(keys)`` and ``to_official(state_dict)``,
listed in :data:`DETECTION_ORDER`.
"""

from __future__ import annotations

import re

import numpy as np

from convnext_keras.weights.layouts import (
    dinov3,
    fcmae,
    huggingface,
    isotropic,
    mmdet,
    mmseg,
    official,
    timm,
)
from convnext_keras.weights.read import CheckpointError

#: The classifier/backbone layouts, in the order they are tried (a more specific key pattern
#: first: timm's ``.blocks.`` would also match an FCMAE or Hugging Face file's names).
DETECTION_ORDER = (huggingface, dinov3, fcmae, timm, isotropic, official)
LAYOUTS = ("official", "isotropic", "timm", "huggingface", "dinov3-huggingface", "fcmae")


def detect_layout(state_dict: dict) -> str:
    """One of :data:`LAYOUTS`, from the tensor names.  An mmsegmentation or mmdetection file
    (a segmenter's or detector's) is refused naming the models that load it."""
    keys = list(state_dict)
    for layout in DETECTION_ORDER:
        if layout.matches(keys):
            return layout.NAME
    for task, layout in (("detection", mmdet), ("segmentation", mmseg)):
        if layout.matches(keys):
            raise CheckpointError(
                f"This is an {layout.NAME} {task} checkpoint, not a classifier's: "
                f"{models_for(state_dict, task)}."
            )
    raise CheckpointError(
        "Not a ConvNeXt checkpoint in a known layout (official facebookresearch/ConvNeXt, its "
        "isotropic models, ConvNeXt-V2 or DINOv3, the FCMAE pre-training, timm or Hugging Face "
        f"transformers). First keys: {keys[:5]}"
    )


def to_official_layout(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename a state dict of any :data:`LAYOUTS` layout to the official names (detected, not
    asked), with the official shapes (GRN parameters ``(1, 1, 1, C)``, dense kernels).  An
    isotropic ConvNeXt's become those of a one-stage network (``downsample_layers.0.0`` its
    stem convolution, ``stages.0.N`` its blocks)."""
    name = detect_layout(state_dict)
    layout = next(m for m in DETECTION_ORDER if m.NAME == name)
    return layout.to_official(state_dict)


def models_for(state_dict: dict, task: str) -> str:
    """Which ``task`` (``"segmentation"``/``"detection"``) models of the registry load an
    mmsegmentation / mmdetection ``state_dict`` ("load it with NAME"), from its backbone's
    depths and widths (and, for a detector, its method)."""
    from convnext_keras import registry

    backbone = mmseg.backbone(state_dict)
    stages = {int(m.group(1)) for k in backbone if (m := re.match(r"stages\.(\d+)\.(\d+)\.", k))}
    depths = tuple(
        1 + max(int(m.group(1)) for k in backbone if (m := re.match(rf"stages\.{i}\.(\d+)\.", k)))
        for i in sorted(stages)
    )
    dims = tuple(
        int(backbone[f"stages.{i}.0.dwconv.weight"].shape[0])
        for i in sorted(stages)
        if f"stages.{i}.0.dwconv.weight" in backbone
    )
    method = mmdet.method(state_dict) if task == "detection" else None
    names = [
        c.name
        for c in registry.CHECKPOINTS.values()
        if c.task == task
        and (c.spec.depths, c.spec.dims) == (depths, dims)
        and (method is None or c.detection.head.method == method)
    ]
    if not names:
        return (
            f"no {task} model of the registry has its backbone (depths {list(depths)}, "
            f"dims {list(dims)})"
        )
    return f"load it with {' or '.join(names)}"


def is_mmseg_layout(state_dict: dict) -> bool:
    """Whether ``state_dict`` is an mmsegmentation encoder-decoder's (``backbone.*`` and
    ``decode_head.*`` tensors): a segmentation checkpoint (:mod:`.mmseg`)."""
    return mmseg.matches(state_dict)


def is_mmdet_layout(state_dict: dict) -> bool:
    """Whether ``state_dict`` is an mmdetection two-stage detector's (``backbone.*``,
    ``neck.*``, ``roi_head.*``): a detection checkpoint (:mod:`.mmdet`)."""
    return mmdet.matches(state_dict)
