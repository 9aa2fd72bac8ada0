"""timm's ConvNeXt layout (``timm/models/convnext.py``: ``stem``, ``stages.N.blocks.M``,
``conv_dw``, ``mlp.fc1``/``fc2``, ``head.norm``/``head.fc``) -> the official names."""

from __future__ import annotations

import numpy as np

from convnext_keras.weights.layouts.rules import rename

NAME = "timm"

# (pattern, replacement) applied in order; the first match wins.
RULES = [
    (r"^stem\.0\.", "downsample_layers.0.0."),
    (r"^stem\.1\.", "downsample_layers.0.1."),
    (r"^stages\.(\d+)\.downsample\.(\d)\.", r"downsample_layers.\1.\2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.\2.pwconv1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.\2.pwconv2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.grn\.weight$", r"stages.\1.\2.grn.gamma"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.grn\.bias$", r"stages.\1.\2.grn.beta"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),  # norm, gamma
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
]


def matches(keys: list[str]) -> bool:
    return any(k.startswith("stem.0.") for k in keys) or any(".blocks." in k for k in keys)


def to_official(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return rename(state_dict, RULES, NAME)
