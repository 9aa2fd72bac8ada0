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

A new layout is one module with ``NAME``, ``matches(keys)`` and ``to_official(state_dict)``,
listed in :data:`DETECTION_ORDER`.
"""

from __future__ import annotations

import numpy as np

from convnext_keras.weights.layouts import (
    dinov3,
    fcmae,
    huggingface,
    isotropic,
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
    """One of :data:`LAYOUTS`, from the tensor names."""
    keys = list(state_dict)
    for layout in DETECTION_ORDER:
        if layout.matches(keys):
            return layout.NAME
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


def is_mmseg_layout(state_dict: dict) -> bool:
    """Whether ``state_dict`` is an mmsegmentation encoder-decoder's (``backbone.*`` and
    ``decode_head.*`` tensors): a segmentation checkpoint (:mod:`.mmseg`)."""
    return mmseg.matches(state_dict)
