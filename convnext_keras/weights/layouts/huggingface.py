"""Hugging Face transformers' ``ConvNext*`` / ``ConvNextV2*`` layout (``embeddings``,
``encoder.stages.N.layers.M``, ``layer_scale_parameter``, ``classifier``; optionally under a
``convnext.`` / ``convnextv2.`` prefix) -> the official names."""

from __future__ import annotations

import re

import numpy as np

from convnext_keras.weights.layouts.rules import rename

NAME = "huggingface"

RULES = [
    (r"^embeddings\.patch_embeddings\.", "downsample_layers.0.0."),
    (r"^embeddings\.layernorm\.", "downsample_layers.0.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.(\d)\.", r"downsample_layers.\1.\2."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.\2.norm."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.\2.gamma"),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.grn\.weight$", r"stages.\1.\2.grn.gamma"),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.grn\.bias$", r"stages.\1.\2.grn.beta"),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.\2."),  # dwconv, pwconv1/2
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]
_PREFIXES = ("convnext.embeddings.", "convnextv2.embeddings.", "embeddings.patch_embeddings.")


def matches(keys: list[str]) -> bool:
    return any(k.startswith(_PREFIXES) for k in keys)


def to_official(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return rename(state_dict, RULES, NAME, name_of=lambda key: re.sub(r"^convnext(v2)?\.", "", key))
