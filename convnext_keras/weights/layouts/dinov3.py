"""DINOv3's ConvNeXt as the Hugging Face Hub stores it (transformers' ``DINOv3ConvNextModel``:
``stages.N.downsample_layers`` / ``stages.N.layers.M``, ``depthwise_conv``,
``pointwise_conv1``/``2``, ``layer_norm``) -> the official names."""

from __future__ import annotations

import re

import numpy as np

from convnext_keras.weights.layouts.rules import rename

NAME = "dinov3-huggingface"

# "stages.N" as the Hub's files store it (transformers 4.56), "model.stages.N" as transformers
# >= 5 saves it; the final LayerNorm is "layer_norm".
RULES = [
    (r"^(?:model\.)?stages\.(\d+)\.downsample_layers\.(\d)\.", r"downsample_layers.\1.\2."),
    (r"^(?:model\.)?stages\.(\d+)\.layers\.(\d+)\.depthwise_conv\.", r"stages.\1.\2.dwconv."),
    (r"^(?:model\.)?stages\.(\d+)\.layers\.(\d+)\.layer_norm\.", r"stages.\1.\2.norm."),
    (r"^(?:model\.)?stages\.(\d+)\.layers\.(\d+)\.pointwise_conv1\.", r"stages.\1.\2.pwconv1."),
    (r"^(?:model\.)?stages\.(\d+)\.layers\.(\d+)\.pointwise_conv2\.", r"stages.\1.\2.pwconv2."),
    (r"^(?:model\.)?stages\.(\d+)\.layers\.(\d+)\.gamma$", r"stages.\1.\2.gamma"),
    (r"^layer_norm\.", "norm."),
]
_KEY = re.compile(r"^(?:model\.)?stages\.\d+\.(?:downsample_layers|layers)\.")


def matches(keys: list[str]) -> bool:
    return any(_KEY.match(k) for k in keys)


def to_official(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return rename(state_dict, RULES, NAME)
