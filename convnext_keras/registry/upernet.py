"""UperNet-ConvNeXt semantic segmentation (ADE20K): the 6 official files of
facebookresearch/ConvNeXt ``semantic_segmentation``, each row with its decoder, test-time
procedure and reported mIoU.
"""

from __future__ import annotations

from convnext_keras.registry.rows import (
    NUM_CLASSES_ADE20K,
    Checkpoint,
    Family,
    Segmentation,
    SegmentationEval,
    Source,
    UperNetHead,
)

FAMILY = Family(
    "upernet_convnext",
    "UperNet-ConvNeXt",
    "https://arxiv.org/abs/2201.03545",
    "Zhuang Liu, Hanzi Mao, Chao-Yuan Wu, Christoph Feichtenhofer, Trevor Darrell, "
    'Saining Xie. "A ConvNet for the 2020s." CVPR 2022. arXiv:2201.03545; Tete Xiao, '
    'Yingcheng Liu, Bolei Zhou, Yuning Jiang, Jian Sun. "Unified Perceptual Parsing for '
    'Scene Understanding." ECCV 2018. arXiv:1807.10221',
    "https://github.com/facebookresearch/ConvNeXt/tree/main/semantic_segmentation",
    "MIT",
    "https://github.com/facebookresearch/ConvNeXt/blob/main/LICENSE",
)


def checkpoints() -> list[Checkpoint]:
    """facebookresearch/ConvNeXt ``semantic_segmentation/README.md`` ("Results and Fine-tuned
    Models": file, crop, mIoU and mIoU ms+flip) and the configs named above."""
    family = FAMILY
    # (size, pre-training, crop): (mIoU, mIoU ms+flip)
    table = {
        ("tiny", "1k", 512): (46.0, 46.7),
        ("small", "1k", 512): (48.7, 49.6),
        ("base", "1k", 512): (49.1, 49.9),
        ("base", "22k", 640): (52.6, 53.1),
        ("large", "22k", 640): (53.2, 53.7),
        ("xlarge", "22k", 640): (53.6, 54.0),
    }
    # ade20k.py / ade20k_640x640.py img_scale; test_cfg slide crop and stride of the _ss configs.
    settings = {
        512: SegmentationEval(image_scale=(2048, 512), crop=512, stride=341),
        640: SegmentationEval(image_scale=(2560, 640), crop=640, stride=426),
    }
    pretraining = {"1k": "imagenet-1k", "22k": "imagenet-21k"}
    return [
        Checkpoint(
            f"upernet_convnext_{size}_ade20k_{crop}",
            size,
            NUM_CLASSES_ADE20K,
            crop,
            f"{pretraining[data]} -> ade20k",
            Source(f"ade20k/upernet_convnext_{size}_{data}_{crop}x{crop}.pth"),
            None,
            1.0,  # no centre crop: the image is resized whole (keep ratio), then windowed
            "bilinear",
            family=family.name,
            licence=family.licence,
            segmentation=Segmentation(UperNetHead(), settings[crop], *miou),
        )
        for (size, data, crop), miou in table.items()
    ]
