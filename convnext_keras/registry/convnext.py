"""ConvNeXt (facebookresearch/ConvNeXt): the family, its sizes and its 21 official checkpoints.

Sizes: ``models/convnext.py`` for tiny..xlarge; timm's ``convnext.py`` for the small edge sizes
(atto/femto/pico/nano, whose trained weights are timm's: :mod:`.timm`).  Checkpoints: the
README's "Results and Pre-trained Models" (file, resolution, reported acc@1).  Fine-tuning:
TRAINING.md.
"""

from __future__ import annotations

from convnext_keras.registry.rows import (
    NUM_CLASSES_1K,
    NUM_CLASSES_21K,
    Checkpoint,
    Family,
    FinetuneDefaults,
    Source,
    Variant,
    official_crop_pct,
)

FAMILY = Family(
    "convnext",
    "ConvNeXt",
    "https://arxiv.org/abs/2201.03545",
    "Zhuang Liu, Hanzi Mao, Chao-Yuan Wu, Christoph Feichtenhofer, Trevor Darrell, "
    'Saining Xie. "A ConvNet for the 2020s." CVPR 2022. arXiv:2201.03545',
    "https://github.com/facebookresearch/ConvNeXt",
    "MIT",
    "https://github.com/facebookresearch/ConvNeXt/blob/main/LICENSE",
)

# facebookresearch/ConvNeXt models/convnext.py for tiny..xlarge; timm's convnext.py for the
# small edge variants (atto/femto/pico/nano).  ConvNeXt V2 reuses these shapes (convnextv2.py).
SIZES = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}

#: The hierarchical ConvNeXt architectures, keyed by their bare size names (``"tiny"``).
VARIANTS = [Variant(size, *shape) for size, shape in SIZES.items()]


def checkpoints() -> list[Checkpoint]:
    def row(name, size, classes, res, dataset, filename, acc):
        return Checkpoint(
            name,
            size,
            classes,
            res,
            dataset,
            Source(filename),
            acc,
            official_crop_pct(res),
        )

    table = []
    # ImageNet-1k trained (filename, reported acc@1 at 224 / 384).
    acc_1k_224 = {"tiny": 82.1, "small": 83.1, "base": 83.8, "large": 84.3}
    acc_1k_384 = {"base": 85.1, "large": 85.5}
    # ImageNet-22k trained, ImageNet-1k fine-tuned.
    acc_22k_1k_224 = {"tiny": 82.9, "small": 84.6, "base": 85.8, "large": 86.6, "xlarge": 87.0}
    acc_22k_1k_384 = {"tiny": 84.1, "small": 85.8, "base": 86.8, "large": 87.5, "xlarge": 87.8}
    for size, acc in acc_1k_224.items():
        table.append(
            row(
                f"convnext_{size}_1k_224",
                size,
                NUM_CLASSES_1K,
                224,
                "imagenet-1k",
                f"convnext_{size}_1k_224_ema.pth",
                acc,
            )
        )
    for size, acc in acc_1k_384.items():
        table.append(
            row(
                f"convnext_{size}_1k_384",
                size,
                NUM_CLASSES_1K,
                384,
                "imagenet-1k",
                f"convnext_{size}_1k_384.pth",
                acc,
            )
        )
    for size in acc_22k_1k_224:
        table.append(
            row(
                f"convnext_{size}_21k_224",
                size,
                NUM_CLASSES_21K,
                224,
                "imagenet-21k",
                f"convnext_{size}_22k_224.pth",
                None,
            )
        )
    for res, accs in ((224, acc_22k_1k_224), (384, acc_22k_1k_384)):
        for size, acc in accs.items():
            ema = "_ema" if size == "xlarge" else ""
            table.append(
                row(
                    f"convnext_{size}_21k_1k_{res}",
                    size,
                    NUM_CLASSES_1K,
                    res,
                    "imagenet-21k -> imagenet-1k",
                    f"convnext_{size}_22k_1k_{res}{ema}.pth",
                    acc,
                )
            )
    return table


_V1_TRAINING = "facebookresearch/ConvNeXt TRAINING.md, ImageNet-22K -> 1K fine-tuning"

#: Stochastic depth of the 22k -> 1k fine-tuning commands (the same at 224 and 384).
FINETUNE = {
    "base": FinetuneDefaults(0.2, source=_V1_TRAINING),
    "large": FinetuneDefaults(0.3, source=_V1_TRAINING),
    "xlarge": FinetuneDefaults(0.4, source=_V1_TRAINING),
}
