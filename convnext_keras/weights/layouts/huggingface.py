"""Hugging Face transformers' ``ConvNext*`` / ``ConvNextV2*`` layout (``embeddings``,
``encoder.stages.N.layers.M``, ``layer_scale_parameter``, ``classifier``; optionally under a
``convnext.`` / ``convnextv2.`` prefix) -> the official names.

transformers' ``ConvNextBackbone`` / ``ConvNextV2Backbone`` (``save_pretrained`` of the backbone
a ``UperNetForSemanticSegmentation`` uses) store the same network without final norm and head,
plus a LayerNorm on the output of each stage in ``out_features``:
``hidden_states_norms.stageN.*`` (N = 1..4).  Those become ``norm{N-1}.*``, the names of the
stage-output norms of the official segmentation backbone (facebookresearch/ConvNeXt
``semantic_segmentation/backbone/convnext.py``), which load as a pyramid model's
``stage{i}_output_norm`` layers (:func:`convnext_keras.weights.convert.convert_state_dict`).
"""

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
    (r"^hidden_states_norms\.stage(\d+)\.", lambda m: f"norm{int(m.group(1)) - 1}."),
    (r"^classifier\.", "head."),
]
_PREFIXES = ("convnext.embeddings.", "convnextv2.embeddings.", "embeddings.patch_embeddings.")


def matches(keys: list[str]) -> bool:
    return any(k.startswith(_PREFIXES) for k in keys)


def to_official(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return rename(state_dict, RULES, NAME, name_of=lambda key: re.sub(r"^convnext(v2)?\.", "", key))
