"""timm's trained small ConvNeXts (atto/femto/pico/nano, ImageNet-1k heads), from the Hub.

The architectures are ConvNeXt's (:mod:`.convnext`); the rows follow timm's ``default_cfgs``.
"""

from __future__ import annotations

from convnext_keras.registry.rows import NUM_CLASSES_1K, Checkpoint, Family, Source

FAMILY = Family(
    "timm",
    "ConvNeXt",
    "https://arxiv.org/abs/2201.03545",
    "Zhuang Liu, Hanzi Mao, Chao-Yuan Wu, Christoph Feichtenhofer, Trevor Darrell, "
    'Saining Xie. "A ConvNet for the 2020s." CVPR 2022. arXiv:2201.03545; weights '
    "trained by Ross Wightman, PyTorch Image Models (timm)",
    "https://github.com/huggingface/pytorch-image-models",
    # timm/models/convnext.py, _cfg(): 'license': 'apache-2.0'
    "Apache-2.0",
    "https://www.apache.org/licenses/LICENSE-2.0",
)


def checkpoints() -> list[Checkpoint]:
    """timm's ImageNet-1k-head weights of its small ConvNeXts (timm ``models/convnext.py``,
    ``default_cfgs``: input size, crop_pct, interpolation; every file is ``model.safetensors``
    of the Hub repository ``timm/<architecture>.<tag>``).  acc@1: timm's
    ``results/results-imagenet.csv`` at the configuration's input size and crop (timm's
    ``test_input_size`` of 288 scores higher; the rows keep the pretrained configuration)."""
    family = FAMILY
    # (name, size, timm tag, dataset, resolution, crop_pct, crop mode, acc@1)
    table = [
        ("convnext_atto_1k_224", "atto", "d2_in1k", "imagenet-1k", 224, 0.875, None, 75.672),
        ("convnext_femto_1k_224", "femto", "d1_in1k", "imagenet-1k", 224, 0.875, None, 77.498),
        ("convnext_pico_1k_224", "pico", "d1_in1k", "imagenet-1k", 224, 0.875, None, 79.516),
        ("convnext_nano_1k_224", "nano", "d1h_in1k", "imagenet-1k", 224, 0.95, None, 80.762),
        (
            "convnext_nano_12k_1k_224",
            "nano",
            "in12k_ft_in1k",
            "imagenet-12k -> imagenet-1k",
            224,
            0.95,
            None,
            82.306,
        ),
        # timm's default crop_mode is "center": at 384 it centre-crops (crop_pct 1.0) where the
        # official transform squashes.
        (
            "convnext_nano_12k_1k_384",
            "nano",
            "r384_in12k_ft_in1k",
            "imagenet-12k -> imagenet-1k",
            384,
            1.0,
            "center",
            83.334,
        ),
    ]
    return [
        Checkpoint(
            name,
            size,
            NUM_CLASSES_1K,
            res,
            dataset,
            Source("model.safetensors", repo=f"timm/convnext_{size}.{tag}"),
            acc,
            crop_pct,
            "bicubic",
            family=family.name,
            licence=family.licence,
            crop_mode=crop_mode,
        )
        for name, size, tag, dataset, res, crop_pct, crop_mode, acc in table
    ]
