"""The DINOv3 ConvNeXt backbones (facebookresearch/dinov3), from the Hugging Face Hub (gated).

ConvNeXt's tiny/small/base/large architectures without a classifier; the Hub's files are in
transformers' ``DINOv3ConvNext`` layout (:mod:`convnext_keras.weights.layouts`).
"""

from __future__ import annotations

from convnext_keras.registry.rows import Checkpoint, Family, Source

FAMILY = Family(
    "dinov3",
    "DINOv3 ConvNeXt",
    "https://arxiv.org/abs/2508.10104",
    "Oriane Simeoni, Huy V. Vo, Maximilian Seitzer, Federico Baldassarre, Maxime Oquab, "
    'et al. "DINOv3." arXiv:2508.10104, 2025',
    "https://github.com/facebookresearch/dinov3",
    # README "License": code and weights under the DINOv3 License (not an SPDX licence;
    # the Hub repositories are gated behind accepting it).
    "LicenseRef-DINOv3",
    "https://github.com/facebookresearch/dinov3/blob/main/LICENSE.md",
)

#: The DINOv3 ConvNeXt backbones' sizes (facebookresearch/dinov3 ``models/convnext.py``,
#: ``convnext_sizes``): ConvNeXt's tiny/small/base/large, layer scale 1e-6, no classifier.
SIZES = ("tiny", "small", "base", "large")


def checkpoints() -> list[Checkpoint]:
    """The Hugging Face Hub's copies (gated: the DINOv3 License must be accepted on the Hub) of
    the backbones distilled from DINOv3 on LVD-1689M.  Evaluation transform: the Hub's image
    processor (transformers ``DINOv3ViTImageProcessor``: resize to 224x224, bilinear, no crop;
    the README's ``make_transform`` is the same warp at 256)."""
    family = FAMILY
    return [
        Checkpoint(
            f"dinov3_convnext_{size}_lvd1689m",
            size,
            None,
            224,
            "dinov3 lvd-1689m",
            Source("model.safetensors", repo=f"facebook/dinov3-convnext-{size}-pretrain-lvd1689m"),
            None,
            1.0,
            "bilinear",
            family=family.name,
            licence=family.licence,
            crop_mode="squash",
        )
        for size in SIZES
    ]
