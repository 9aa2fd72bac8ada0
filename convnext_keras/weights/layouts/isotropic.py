"""The isotropic ConvNeXt's layout (facebookresearch/ConvNeXt ``models/convnext_isotropic.py``:
``stem``, ``blocks.N``) -> the official names of a network with one stage: its stem (a patch
convolution, no LayerNorm) is ``downsample_layers.0.0``, its blocks ``stages.0.N``."""

from __future__ import annotations

import numpy as np

from convnext_keras.weights.layouts.rules import rename

NAME = "isotropic"

RULES = [
    (r"^stem\.", "downsample_layers.0.0."),
    (r"^blocks\.(\d+)\.", r"stages.0.\1."),
    (r"^(norm|head)\.", r"\1."),
]


def matches(keys: list[str]) -> bool:
    return "stem.weight" in keys or any(k.startswith("blocks.") for k in keys)


def to_official(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return rename(state_dict, RULES, NAME)
