"""Mask R-CNN and Cascade Mask R-CNN on the ConvNeXt pyramid as one Keras 3 functional model:
the networks of the official COCO checkpoints of facebookresearch/ConvNeXt
``object_detection`` (mmdetection 2.11), with their test-time procedure.

The backbone is :func:`convnext_keras.nets.convnext.build_model`'s pyramid with a LayerNorm on
each stage output (``stage_norms=True``; ``object_detection/mmdet/models/backbones/convnext.py``,
``norm0`` ... ``norm3``).  On it, with the settings of a registry row
(:class:`convnext_keras.registry.DetectorHead` and :class:`~convnext_keras.registry.DetectionEval`):

* FPN (``mmdet/models/necks/fpn.py``): ``fpn_lateral{i}`` (1x1), the top-down sums with
  nearest upsampling, ``fpn_output{i}`` (3x3), and P6 = P5 subsampled (max-pool, kernel 1,
  stride 2);
* RPN (``rpn_head.py``): ``rpn_conv`` (3x3 + ReLU), ``rpn_cls`` / ``rpn_reg`` (1x1) on every
  level, shared; then :class:`~.layers.RPNProposals`;
* R-CNN: :class:`~.layers.RoIFeatures` (7x7) and the box head of each stage
  (``box{s}_conv{k}`` + ``box{s}_bn{k}`` for the cascade's "4conv1f" heads, ``box{s}_fc{k}``,
  ``box{s}_cls``, ``box{s}_reg``); the cascade refines the boxes between stages
  (:class:`~.layers.RefineBoxes`); :class:`~.layers.Detections` makes the final boxes;
  :class:`~.layers.RoIFeatures` (14x14) on them and the mask head of each stage
  (``mask{s}_conv{k}``, ``mask{s}_upsample``: 2x2 stride-2 transposed conv, ``mask{s}_logits``),
  combined by :class:`~.layers.MaskProbabilities`.

The model contract (:func:`build_detector`):

* inputs ``images`` ``(B, H, W, 3)`` float32, RGB normalised with the ImageNet mean/std on
  0-255 pixels, padded with zeros at the bottom and right (to a multiple of 32 in the
  original's pipeline; any size from 32 up runs); ``image_sizes`` ``(B, 2)`` int32, the
  (height, width) of each resized image before padding (boxes are clipped to it);
  ``scale_factors`` ``(B, 2)`` float32, (height, width) of the resized image divided by the
  photo's (the boxes come out in the photo's pixels; pass ones for input pixels);
* outputs ``boxes`` ``(B, D, 4)`` float32 ``x1, y1, x2, y2`` in the photo's pixels, ``scores``
  ``(B, D)`` float32, ``labels`` ``(B, D)`` int32 (0-79, COCO's classes in
  ``convnext_keras.data.coco`` order; -1 past the count), ``masks`` ``(B, D, 28, 28)`` float32
  probabilities in each box (not yet pasted into the photo: ``tasks.detect.paste_masks``),
  ``num_detections`` ``(B,)`` int32; ``D`` = the row's ``max_detections`` (100), best first,
  rows past ``num_detections`` zeros.

Boxes, scores and masks are float32 under every dtype policy (mixed precision computes the
convolutions in bfloat16 / float16).
"""

from __future__ import annotations

import keras

from convnext_keras import registry
from convnext_keras.nets.detection.layers import (
    Detections,
    MaskProbabilities,
    NearestUpsample,
    RefineBoxes,
    RoIFeatures,
    RPNProposals,
)

#: The model's outputs, in order.
OUTPUTS = ("boxes", "scores", "labels", "masks", "num_detections")


def _kernel_init():
    from convnext_keras.nets.convnext import _kernel_init as init

    return init()


def _conv(filters, kernel, name, *, activation=None, use_bias=True, dtype=None):
    return keras.layers.Conv2D(
        filters,
        kernel,
        padding="same",
        activation=activation,
        use_bias=use_bias,
        kernel_initializer=_kernel_init(),
        data_format="channels_last",
        name=name,
        dtype=dtype,
    )


def _fpn(features, head: registry.DetectorHead):
    channels = head.fpn_channels
    laterals = [_conv(channels, 1, f"fpn_lateral{i}")(f) for i, f in enumerate(features)]
    for i in range(len(laterals) - 1, 0, -1):  # top-down: each level plus the one above
        above = NearestUpsample(name=f"fpn_top_down{i}_resize")(laterals[i], laterals[i - 1])
        laterals[i - 1] = keras.layers.Add(name=f"fpn_top_down{i}_add")([laterals[i - 1], above])
    outputs = [_conv(channels, 3, f"fpn_output{i}")(x) for i, x in enumerate(laterals)]
    for i in range(len(outputs), head.fpn_levels):  # P6: max_pool2d(kernel 1, stride 2)
        outputs.append(
            keras.layers.MaxPooling2D(
                1, strides=2, data_format="channels_last", name=f"fpn_pool{i}"
            )(outputs[-1])
        )
    return outputs


def _box_head(x, box: registry.BoxHead, stage: int, num_classes: int):
    """One stage's box head on ``(B * K, S, S, C)`` RoI features -> (logits, deltas)."""
    for k in range(box.num_convs):
        x = _conv(box.conv_channels, 3, f"box{stage}_conv{k}", use_bias=not box.conv_norm)(x)
        if box.conv_norm:
            x = keras.layers.BatchNormalization(
                epsilon=registry.BATCH_NORM_EPSILON, name=f"box{stage}_bn{k}"
            )(x)
        x = keras.layers.ReLU(name=f"box{stage}_relu{k}")(x)
    x = keras.layers.Flatten(name=f"box{stage}_flatten")(x)
    for k in range(box.num_fcs):
        x = keras.layers.Dense(
            box.fc_channels,
            activation="relu",
            kernel_initializer=_kernel_init(),
            name=f"box{stage}_fc{k}",
        )(x)
    logits = keras.layers.Dense(
        num_classes + 1, kernel_initializer=_kernel_init(), dtype="float32", name=f"box{stage}_cls"
    )(x)
    deltas = keras.layers.Dense(
        4 if box.class_agnostic else 4 * num_classes,
        kernel_initializer=_kernel_init(),
        dtype="float32",
        name=f"box{stage}_reg",
    )(x)
    return logits, deltas


def _mask_head(x, head: registry.DetectorHead, stage: int, num_classes: int):
    """One stage's mask head (``FCNMaskHead``) on ``(B * D, 14, 14, C)`` -> logits
    ``(B * D, 28, 28, classes)``."""
    for k in range(head.mask_convs):
        x = _conv(head.mask_channels, 3, f"mask{stage}_conv{k}", activation="relu")(x)
    x = keras.layers.Conv2DTranspose(
        head.mask_channels,
        2,
        strides=2,
        activation="relu",
        kernel_initializer=_kernel_init(),
        data_format="channels_last",
        name=f"mask{stage}_upsample",
    )(x)
    return _conv(num_classes, 1, f"mask{stage}_logits", dtype="float32")(x)


def build_detector(
    variant: str | registry.Variant = "tiny",
    *,
    head: registry.DetectorHead | None = None,
    settings: registry.DetectionEval | None = None,
    num_classes: int = registry.NUM_CLASSES_COCO,
    name: str | None = None,
    roi_method: str | None = None,
) -> keras.Model:
    """Build a randomly initialised Mask R-CNN / Cascade Mask R-CNN on a ConvNeXt.

    Args:
        variant: the backbone (a ``registry.VARIANTS`` key or architecture name).
        head: the detector (default: the Cascade Mask R-CNN of the official checkpoints,
            ``registry.detection.CASCADE_MASK_RCNN``).
        settings: the test-time settings (default :class:`registry.DetectionEval`: the
            original's score, NMS and per-image limits).
        num_classes: object classes (80 for COCO); the box heads add a background score.
        name: model name (default ``<method>_<architecture>``).
        roi_method: RoIAlign's form, ``"all"`` or ``"chunked"`` (default: the backend's,
            :func:`convnext_keras.nets.detection.roi_align.default_method`).

    Returns the model of the module docstring's contract.
    """
    from convnext_keras.nets.convnext import PYRAMID_OUTPUTS, build_model
    from convnext_keras.registry import detection

    spec = registry.variant(variant)
    head = head or detection.CASCADE_MASK_RCNN
    settings = settings or registry.DetectionEval()
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    backbone = build_model(spec, head="pyramid", stage_norms=True)
    images = backbone.inputs[0]
    image_sizes = keras.Input((2,), dtype="int32", name="image_sizes")
    scale_factors = keras.Input((2,), dtype="float32", name="scale_factors")
    levels = _fpn([backbone.output[k] for k in PYRAMID_OUTPUTS], head)

    anchors = head.anchors_per_position
    rpn_conv = _conv(head.fpn_channels, 3, "rpn_conv", activation="relu")
    rpn_cls = _conv(anchors, 1, "rpn_cls", dtype="float32")
    rpn_reg = _conv(4 * anchors, 1, "rpn_reg", dtype="float32")
    shared = [rpn_conv(x) for x in levels]
    proposals, counts = RPNProposals(
        head.anchor_strides,
        head.anchor_scales,
        head.anchor_ratios,
        head.rpn_target_means,
        head.rpn_target_stds,
        pre_nms=settings.rpn_pre_nms,
        max_proposals=settings.rpn_max,
        iou=settings.rpn_iou,
        min_size=settings.rpn_min_size,
        name="rpn_proposals",
    )([rpn_cls(x) for x in shared], [rpn_reg(x) for x in shared], image_sizes)

    roi_levels = levels[: len(head.roi_strides)]
    rois, logits = proposals, []
    for stage, box in enumerate(head.box_heads):
        features = RoIFeatures(
            head.roi_strides,
            head.box_roi_size,
            head.finest_scale,
            head.sampling_ratio,
            method=roi_method,
            name=f"box{stage}_roi_align",
        )(roi_levels, rois, counts)
        stage_logits, deltas = _box_head(features, box, stage, num_classes)
        logits.append(stage_logits)
        if stage < head.num_stages - 1:
            rois = RefineBoxes(
                box.target_means, box.target_stds, box.class_agnostic, name=f"box{stage}_refine"
            )(rois, stage_logits, deltas, image_sizes)
    last = head.box_heads[-1]
    boxes, scores, labels, found, mask_rois = Detections(
        last.target_means,
        last.target_stds,
        settings.score_threshold,
        settings.iou,
        settings.max_detections,
        class_agnostic=last.class_agnostic,
        zero_top_rois=head.method == "mask_rcnn",
        name="detections",
    )(rois, counts, logits, deltas, image_sizes, scale_factors)
    mask_features = RoIFeatures(
        head.roi_strides,
        head.mask_roi_size,
        head.finest_scale,
        head.sampling_ratio,
        method=roi_method,
        name="mask_roi_align",
    )(roi_levels, mask_rois, found)
    mask_logits = [_mask_head(mask_features, head, s, num_classes) for s in range(head.num_stages)]
    masks = MaskProbabilities(name="masks")(mask_logits, labels)
    outputs = dict(zip(OUTPUTS, (boxes, scores, labels, masks, found)))
    return keras.Model(
        [images, image_sizes, scale_factors],
        outputs,
        name=name or f"{head.method}_{spec.arch_name}",
    )


def layer_names(variant: str | registry.Variant, head: registry.DetectorHead) -> list[str]:
    """The weight-carrying layers of :func:`build_detector` beyond the backbone's
    (``nets.convnext.layer_names`` without the head, plus ``stage{i}_output_norm``)."""
    names = [f"fpn_lateral{i}" for i in range(4)] + [f"fpn_output{i}" for i in range(4)]
    names += ["rpn_conv", "rpn_cls", "rpn_reg"]
    for s, box in enumerate(head.box_heads):
        for k in range(box.num_convs):
            names.append(f"box{s}_conv{k}")
            if box.conv_norm:
                names.append(f"box{s}_bn{k}")
        names += [f"box{s}_fc{k}" for k in range(box.num_fcs)]
        names += [f"box{s}_cls", f"box{s}_reg"]
    for s in range(head.num_stages):
        names += [f"mask{s}_conv{k}" for k in range(head.mask_convs)]
        names += [f"mask{s}_upsample", f"mask{s}_logits"]
    return names
