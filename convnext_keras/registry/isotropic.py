"""The isotropic ConvNeXts (facebookresearch/ConvNeXt ``models/convnext_isotropic.py``): one
stage of identical blocks behind a 16x16 patch stem, and their 3 ImageNet-1k checkpoints.
"""

from __future__ import annotations

from convnext_keras.registry.rows import (
    ISOTROPIC_PATCH,
    NUM_CLASSES_1K,
    Checkpoint,
    Source,
    Variant,
    official_crop_pct,
)

# facebookresearch/ConvNeXt models/convnext_isotropic.py (depth, width) and TRAINING.md: small
# and base are trained with --layer_scale_init_value 0 (no layer scale), large with the default
# 1e-6 (main.py).
SIZES = {
    "small": (18, 384, "plain"),
    "base": (18, 768, "plain"),
    "large": (36, 1024, "layer_scale"),
}

#: ``iso_small``, ``iso_base``, ``iso_large`` (family ``convnext``: same paper, code and licence).
VARIANTS = [
    Variant(
        f"iso_{size}",
        (depth,),
        (dim,),
        block=block,
        patch_size=ISOTROPIC_PATCH,
        stem_norm=False,
    )
    for size, (depth, dim, block) in SIZES.items()
]


def checkpoints() -> list[Checkpoint]:
    """facebookresearch/ConvNeXt README, "ImageNet-1K trained models (isotropic)": 224x224,
    acc@1 as listed there; the evaluation transform is ``main.py``'s (the same as ConvNeXt's)."""
    acc = {"small": 78.7, "base": 82.0, "large": 82.6}
    return [
        Checkpoint(
            f"convnext_iso_{size}_1k_224",
            f"iso_{size}",
            NUM_CLASSES_1K,
            224,
            "imagenet-1k",
            Source(f"convnext_iso_{size}_1k_224_ema.pth"),
            top1,
            official_crop_pct(224),
        )
        for size, top1 in acc.items()
    ]
