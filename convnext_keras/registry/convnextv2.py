"""ConvNeXt V2 (facebookresearch/ConvNeXt-V2): the family, its GRN sizes and its 26 checkpoints.

Sizes: ``models/convnextv2.py`` (ConvNeXt's shapes, plus huge).  Checkpoints: the README's
"Results and Pre-trained Models" (the FCMAE encoders, ImageNet-1k and 22k -> 1k fine-tuned).
Fine-tuning: TRAINING.md.
"""

from __future__ import annotations

import dataclasses

from convnext_keras.registry.convnext import SIZES as CONVNEXT_SIZES
from convnext_keras.registry.rows import (
    NUM_CLASSES_1K,
    Checkpoint,
    Family,
    FinetuneDefaults,
    Source,
    Variant,
    official_crop_pct,
)

FAMILY = Family(
    "convnextv2",
    "ConvNeXt V2",
    "https://arxiv.org/abs/2301.00808",
    "Sanghyun Woo, Shoubhik Debnath, Ronghang Hu, Xinlei Chen, Zhuang Liu, In So Kweon, "
    'Saining Xie. "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked '
    'Autoencoders." CVPR 2023. arXiv:2301.00808',
    "https://github.com/facebookresearch/ConvNeXt-V2",
    # README "License": the code is MIT, the ImageNet pre-trained and fine-tuned weights
    # are CC BY-NC 4.0.
    "CC-BY-NC-4.0",
    "https://creativecommons.org/licenses/by-nc/4.0/",
)

SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")
_V2_ONLY = {"huge": ((3, 3, 27, 3), (352, 704, 1408, 2816))}

#: ConvNeXt V2 architectures (``"convnextv2_tiny"``): ConvNeXt's shapes with GRN blocks.
VARIANTS = [
    Variant(
        f"convnextv2_{size}", *(CONVNEXT_SIZES.get(size) or _V2_ONLY[size]), "convnextv2", "grn"
    )
    for size in SIZES
]


def checkpoints() -> list[Checkpoint]:
    """facebookresearch/ConvNeXt-V2 README, "Results and Pre-trained Models" (acc@1 as listed
    there; the eval transform is ``datasets.py``'s, the same as ConvNeXt's)."""
    family = FAMILY

    def row(name, size, classes, res, dataset, path, acc):
        return Checkpoint(
            name,
            f"convnextv2_{size}",
            classes,
            res,
            dataset,
            Source(f"convnextv2/{path}"),
            acc,
            official_crop_pct(res),
            family=family.name,
            licence=family.licence,
        )

    acc_1k = {
        "atto": 76.7,
        "femto": 78.5,
        "pico": 80.3,
        "nano": 81.9,
        "tiny": 83.0,
        "base": 84.9,
        "large": 85.8,
        "huge": 86.3,
    }
    acc_22k = {
        ("nano", 224): 82.1,
        ("nano", 384): 83.4,
        ("tiny", 224): 83.9,
        ("tiny", 384): 85.1,
        ("base", 224): 86.8,
        ("base", 384): 87.7,
        ("large", 224): 87.3,
        ("large", 384): 88.2,
        ("huge", 384): 88.7,
        ("huge", 512): 88.9,
    }
    table = [
        row(
            f"convnextv2_{size}_fcmae",
            size,
            None,
            224,
            "fcmae imagenet-1k",
            f"pt_only/convnextv2_{size}_1k_224_fcmae.pt",
            None,
        )
        for size in SIZES
    ]
    table += [
        row(
            f"convnextv2_{size}_1k_224",
            size,
            NUM_CLASSES_1K,
            224,
            "fcmae -> imagenet-1k",
            f"im1k/convnextv2_{size}_1k_224_ema.pt",
            acc,
        )
        for size, acc in acc_1k.items()
    ]
    table += [
        row(
            f"convnextv2_{size}_21k_1k_{res}",
            size,
            NUM_CLASSES_1K,
            res,
            "fcmae -> imagenet-21k -> imagenet-1k",
            f"im22k/convnextv2_{size}_22k_{res}_ema.pt",
            acc,
        )
        for (size, res), acc in acc_22k.items()
    ]
    return table


_V2_TRAINING = "facebookresearch/ConvNeXt-V2 TRAINING.md, ImageNet-1K fine-tuning"
_V2_ATTO = FinetuneDefaults(0.1, "single", 0.9, 2e-4, 0.3, f"{_V2_TRAINING}, ConvNeXt V2-Atto")
_V2_TINY = FinetuneDefaults(0.2, "single", 0.9, 8e-4, 0.05, f"{_V2_TRAINING}, ConvNeXt V2-Tiny")
_V2_BASE = FinetuneDefaults(0.1, "group", 0.6, 6.25e-4, 0.05, f"{_V2_TRAINING}, ConvNeXt V2-Base")


def _carried(defaults: FinetuneDefaults, from_size: str) -> FinetuneDefaults:
    return dataclasses.replace(
        defaults,
        source=f"{from_size}'s ({_V2_TRAINING} publishes no command for this size)",
    )


#: The atto, tiny and base commands; femto/pico/nano take atto's, large and huge base's (the
#: layer-decay scheme the paper gives for those sizes).
FINETUNE = {
    "convnextv2_atto": _V2_ATTO,
    "convnextv2_femto": _carried(_V2_ATTO, "atto"),
    "convnextv2_pico": _carried(_V2_ATTO, "atto"),
    "convnextv2_nano": _carried(_V2_ATTO, "atto"),
    "convnextv2_tiny": _V2_TINY,
    "convnextv2_base": _V2_BASE,
    "convnextv2_large": _carried(_V2_BASE, "base"),
    "convnextv2_huge": _carried(_V2_BASE, "base"),
}
