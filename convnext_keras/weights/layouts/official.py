"""The official layout (facebookresearch/ConvNeXt and ConvNeXt-V2 ``models/convnext*.py``;
facebookresearch/dinov3 ``models/convnext.py`` is the same without head): the target of every
other layout.  Only DINOv3's second name of the final LayerNorm is dropped."""

from __future__ import annotations

import re

import numpy as np

from convnext_keras.weights.read import CheckpointError

NAME = "official"

# facebookresearch/dinov3 models/convnext.py lists the final LayerNorm a second time as
# "norms.3" (self.norms.append(self.norm)), so its state dict holds the same tensors twice.
_SECOND_NAME = re.compile(r"^norms\.\d+\.(weight|bias)$")


def matches(keys: list[str]) -> bool:
    return any(k.startswith("downsample_layers.0.0.") for k in keys)


def to_official(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop DINOv3's second name of the final LayerNorm (``norms.3.*``), checking it holds the
    same tensors as ``norm.*``; ``CheckpointError`` when it does not."""
    out = {}
    for key, value in state_dict.items():
        m = _SECOND_NAME.match(key)
        if m is None:
            out[key] = value
            continue
        first = state_dict.get(f"norm.{m.group(1)}")
        if first is None or first.shape != value.shape or not np.array_equal(first, value):
            raise CheckpointError(
                f"{key} is not a second name of norm.{m.group(1)} (as in facebookresearch/dinov3 "
                "models/convnext.py): the two differ, so the file is damaged or not a ConvNeXt."
            )
    return out
