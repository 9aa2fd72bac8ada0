"""ConvNeXt V2's FCMAE pre-training checkpoints (facebookresearch/ConvNeXt-V2 ``models/fcmae.py``,
``models/convnextv2_sparse.py``): the sparse encoder under ``encoder.`` with MinkowskiEngine
kernels -> the official names of the dense network; the pre-training decoder is dropped."""

from __future__ import annotations

import logging
import math
import re

import numpy as np

from convnext_keras.weights.layouts.rules import rename
from convnext_keras.weights.read import CheckpointError

NAME = "fcmae"

_LOG = logging.getLogger(__name__)

# The sparse encoder under "encoder."; MinkowskiLayerNorm / MinkowskiLinear wrap nn.LayerNorm /
# nn.Linear as ".ln" / ".linear"; convolutions hold a ".kernel" (re-laid out by
# minkowski_kernel).  The stem is a dense Conv2d + LayerNorm, named as in the official layout.
RULES = [
    (r"^encoder\.(.*)\.(ln|linear)\.(weight|bias)$", r"\1.\3"),
    (r"^encoder\.(.*)\.kernel$", r"\1.weight"),
    (r"^encoder\.", ""),
]
#: Tensors of an FCMAE file that only the pre-training uses (the decoder: 1x1 projection, mask
#: token, one dense V2 block, pixel prediction); dropped, and listed in a debug message.
DECODER = re.compile(r"^(decoder\.|proj\.|pred\.|mask_token$)")


def matches(keys: list[str]) -> bool:
    return any(k.startswith("encoder.downsample_layers.") for k in keys)


def minkowski_kernel(kernel: np.ndarray, key: str) -> np.ndarray:
    """A MinkowskiEngine convolution kernel as the dense PyTorch weight it computes.

    MinkowskiEngine stores a 2-D convolution's kernel as ``(k*k, in, out)`` (a depthwise one as
    ``(k*k, channels)``), one row per kernel offset, the offsets enumerated with the first
    spatial axis (height) fastest: row ``h + k * w``.  The dense weight is
    ``(out, in, k, k)`` (depthwise ``(channels, 1, k, k)``).  This is the re-layout the original
    fine-tuning applies (ConvNeXt-V2 ``utils.py``, ``remap_checkpoint_keys``).
    """
    side = math.isqrt(kernel.shape[0])
    if side * side != kernel.shape[0] or kernel.ndim not in (2, 3):
        raise CheckpointError(
            f"{key}: shape {tuple(kernel.shape)} is not a MinkowskiEngine 2-D kernel "
            "(k*k, in, out) or depthwise (k*k, channels)."
        )
    # (k*k, ...) -> (w, h, ...): row h + k * w is [w, h].
    grid = kernel.reshape(side, side, *kernel.shape[1:])
    if kernel.ndim == 3:  # (w, h, in, out) -> (out, in, h, w)
        return np.ascontiguousarray(grid.transpose(3, 2, 1, 0))
    return np.ascontiguousarray(grid.transpose(2, 1, 0)[:, None])  # (channels, 1, h, w)


def _value(name: str, key: str, value: np.ndarray) -> np.ndarray:
    if key.endswith(".kernel"):
        return minkowski_kernel(value, key)
    if name.endswith(".bias") and value.ndim == 2 and value.shape[0] == 1:
        return value.reshape(-1)  # MinkowskiConvolution biases are (1, out)
    return value


def to_official(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    dropped = [k for k in state_dict if DECODER.match(k)]
    encoder = {k: v for k, v in state_dict.items() if not DECODER.match(k)}
    out = rename(encoder, RULES, NAME, value_of=_value)
    if dropped:
        _LOG.debug(
            "FCMAE checkpoint: dropped %d pre-training tensors the encoder does not use: %s",
            len(dropped),
            ", ".join(dropped),
        )
    return out
