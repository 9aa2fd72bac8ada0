"""Mask R-CNN and Cascade Mask R-CNN with ConvNeXt backbones (COCO object detection and
instance segmentation): the 7 official files of facebookresearch/ConvNeXt ``object_detection``,
each row with its detector, test-time procedure and reported box / mask AP.
"""

from __future__ import annotations

from convnext_keras.registry.rows import (
    NUM_CLASSES_COCO,
    BoxHead,
    Checkpoint,
    Detection,
    DetectionEval,
    DetectorHead,
    Family,
    Source,
)

FAMILY = Family(
    "mask_rcnn_convnext",
    "Mask R-CNN / Cascade Mask R-CNN ConvNeXt",
    "https://arxiv.org/abs/2201.03545",
    "Zhuang Liu, Hanzi Mao, Chao-Yuan Wu, Christoph Feichtenhofer, Trevor Darrell, "
    'Saining Xie. "A ConvNet for the 2020s." CVPR 2022. arXiv:2201.03545; Kaiming He, '
    'Georgia Gkioxari, Piotr Dollar, Ross Girshick. "Mask R-CNN." ICCV 2017. '
    'arXiv:1703.06870; Zhaowei Cai, Nuno Vasconcelos. "Cascade R-CNN: High Quality Object '
    'Detection and Instance Segmentation." TPAMI 2019. arXiv:1906.09756',
    "https://github.com/facebookresearch/ConvNeXt/tree/main/object_detection",
    "MIT",
    "https://github.com/facebookresearch/ConvNeXt/blob/main/LICENSE",
)

#: The box head of mask_rcnn_convnext_fpn.py: Shared2FCBBoxHead, class-specific deltas.
MASK_RCNN = DetectorHead(
    "mask_rcnn",
    (BoxHead(target_stds=(0.1, 0.1, 0.2, 0.2), num_convs=0, num_fcs=2),),
)
#: The three stages of configs/convnext/cascade_mask_rcnn_convnext_*_giou_4conv1f_*.py:
#: ConvFCBBoxHead with 4 shared convs (SyncBN) and 1 fc, class-specific deltas, each stage its
#: own coder stds; a mask head per stage (the base config's mask_head, repeated).
CASCADE_MASK_RCNN = DetectorHead(
    "cascade_mask_rcnn",
    tuple(
        BoxHead(target_stds=stds, num_convs=4, num_fcs=1, conv_norm=True)
        for stds in ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
    ),
)


def checkpoints() -> list[Checkpoint]:
    """facebookresearch/ConvNeXt ``object_detection/README.md`` ("Results and Fine-tuned
    Models": file, method, box mAP, mask mAP) and the configs named above (test_cfg of the base
    model configs; test pipeline of ``coco_instance.py``: keep-ratio 1333 x 800, pad 32)."""
    family = FAMILY
    # name -> (file, backbone, pre-training, detector, box AP, mask AP)
    table = {
        "mask_rcnn_convnext_tiny_coco": (
            "mask_rcnn_convnext_tiny_1k_3x.pth",
            "tiny",
            "1k",
            MASK_RCNN,
            46.2,
            41.7,
        ),
        "cascade_mask_rcnn_convnext_tiny_coco": (
            "cascade_mask_rcnn_convnext_tiny_1k_3x.pth",
            "tiny",
            "1k",
            CASCADE_MASK_RCNN,
            50.4,
            43.7,
        ),
        "cascade_mask_rcnn_convnext_small_coco": (
            "cascade_mask_rcnn_convnext_small_1k_3x.pth",
            "small",
            "1k",
            CASCADE_MASK_RCNN,
            51.9,
            45.0,
        ),
        "cascade_mask_rcnn_convnext_base_coco": (
            "cascade_mask_rcnn_convnext_base_1k_3x.pth",
            "base",
            "1k",
            CASCADE_MASK_RCNN,
            52.7,
            45.6,
        ),
        "cascade_mask_rcnn_convnext_base_in22k_coco": (
            "cascade_mask_rcnn_convnext_base_22k_3x.pth",
            "base",
            "22k",
            CASCADE_MASK_RCNN,
            54.0,
            46.9,
        ),
        "cascade_mask_rcnn_convnext_large_in22k_coco": (
            "cascade_mask_rcnn_convnext_large_22k_3x.pth",
            "large",
            "22k",
            CASCADE_MASK_RCNN,
            54.8,
            47.6,
        ),
        "cascade_mask_rcnn_convnext_xlarge_in22k_coco": (
            "cascade_mask_rcnn_convnext_xlarge_22k_3x.pth",
            "xlarge",
            "22k",
            CASCADE_MASK_RCNN,
            55.2,
            47.7,
        ),
    }
    settings = DetectionEval()
    pretraining = {"1k": "imagenet-1k", "22k": "imagenet-21k"}
    return [
        Checkpoint(
            name,
            size,
            NUM_CLASSES_COCO,
            min(settings.image_scale),  # the test scale's short side
            f"{pretraining[data]} -> coco",
            Source(f"coco/{file}"),
            None,
            1.0,  # no crop: the image is resized whole (keep ratio), then padded
            "bilinear",
            family=family.name,
            licence=family.licence,
            detection=Detection(head, settings, box_ap, mask_ap),
        )
        for name, (file, size, data, head, box_ap, mask_ap) in table.items()
    ]
