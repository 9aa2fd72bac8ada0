"""mmsegmentation's encoder-decoder layout (the official ADE20K UperNet files of
facebookresearch/ConvNeXt ``semantic_segmentation``; mmseg ``EncoderDecoder``): ``backbone.*``
in the official ConvNeXt names plus the stage-output norms ``backbone.norm0`` ... ``norm3``,
``decode_head.*`` (the UPerHead) and ``auxiliary_head.*`` (the training-only FCN head).

The backbone's names are split off here; the decoder's tensors are mapped onto the Keras
layers by :func:`convnext_keras.weights.convert.convert_mmseg_state_dict`.
"""

from __future__ import annotations

import re

import numpy as np

NAME = "mmseg"

#: The parts of an mmsegmentation ``EncoderDecoder`` state dict: the backbone (the official
#: ConvNeXt names plus ``norm0`` ... ``norm3``), the UPerHead and the training-only FCN head.
BACKBONE, DECODER, AUXILIARY = "backbone.", "decode_head.", "auxiliary_head."
_STAGE_NORM = re.compile(rf"^{re.escape(BACKBONE)}norm\d+\.")


def matches(keys) -> bool:
    """Whether the keys are an mmsegmentation encoder-decoder's (``backbone.*`` and
    ``decode_head.*`` tensors)."""
    keys = list(keys)
    return any(k.startswith(BACKBONE) for k in keys) and any(k.startswith(DECODER) for k in keys)


def backbone_keys(state_dict: dict) -> list[str]:
    """The keys of the backbone proper (``backbone.*`` without the stage-output norms)."""
    return [k for k in state_dict if k.startswith(BACKBONE) and not _STAGE_NORM.match(k)]


def backbone(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The backbone's tensors under their official ConvNeXt names (``backbone.`` dropped)."""
    return {k[len(BACKBONE) :]: state_dict[k] for k in backbone_keys(state_dict)}
