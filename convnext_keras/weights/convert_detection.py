"""mmdetection's Mask R-CNN / Cascade Mask R-CNN checkpoints (the official COCO files of
facebookresearch/ConvNeXt ``object_detection``) -> Keras weights for
:func:`convnext_keras.nets.detection.model.build_detector`.

The layout (:mod:`convnext_keras.weights.layouts.mmdet`): ``backbone.*`` (the official ConvNeXt
names and the stage-output norms ``norm0`` ... ``norm3``), ``neck.lateral_convs.{i}.conv`` /
``neck.fpn_convs.{i}.conv`` (FPN), ``rpn_head.rpn_conv`` / ``rpn_cls`` / ``rpn_reg``,
``roi_head.bbox_head[.{stage}].shared_convs.{k}.conv`` + ``.bn`` / ``shared_fcs.{k}`` /
``fc_cls`` / ``fc_reg`` and ``roi_head.mask_head[.{stage}].convs.{k}.conv`` / ``upsample`` /
``conv_logits`` (a cascade numbers its heads by stage).  Every tensor is used, except
BatchNorm's ``num_batches_tracked`` counters (read, not needed); anything missing, unexpected
or of another shape is an error naming it.  The class scores keep mmdetection 2.x's order: the
80 classes, then the background.
"""

from __future__ import annotations

import numpy as np

from convnext_keras import registry
from convnext_keras.weights.convert import (
    _BATCH_NORM,
    _check_finite,
    _conv,
    _identity,
    _linear,
    _misfit,
    _official_plan,
    _take,
    convert_state_dict,
    infer_architecture,
)
from convnext_keras.weights.layouts import mmdet, mmseg, models_for
from convnext_keras.weights.read import CheckpointError


def _flattened_fc(size: int, channels: int):
    """torch ``Linear`` after ``x.flatten(1)`` of ``(C, S, S)`` -> Keras ``Dense`` after
    ``Flatten`` of ``(S, S, C)``: the input rows reordered channels-last."""

    def transform(w):
        out = w.shape[0]
        w = w.reshape(out, channels, size, size).transpose(2, 3, 1, 0)
        return np.ascontiguousarray(w.reshape(size * size * channels, out))

    return transform


def _deconv(w):  # torch ConvTranspose2d (in, out, kh, kw) -> keras (kh, kw, out, in)
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _detector_plan(spec: registry.Variant, head: registry.DetectorHead, num_classes: int):
    """Yield (keras layer, [(mmdet key, torch shape, transform)]) for everything but the
    backbone proper."""
    for i, dim in enumerate(spec.dims):
        yield (
            f"stage{i}_output_norm",
            [(f"{mmdet.BACKBONE}norm{i}.{p}", (dim,), _identity) for p in ("weight", "bias")],
        )
    c = head.fpn_channels

    def conv(layer, key, cout, cin, k, bias=True):
        entries = [(f"{key}.weight", (cout, cin, k, k), _conv)]
        if bias:
            entries.append((f"{key}.bias", (cout,), _identity))
        return layer, entries

    for i, dim in enumerate(spec.dims):
        yield conv(f"fpn_lateral{i}", f"{mmdet.NECK}lateral_convs.{i}.conv", c, dim, 1)
        yield conv(f"fpn_output{i}", f"{mmdet.NECK}fpn_convs.{i}.conv", c, c, 3)
    a = head.anchors_per_position
    yield conv("rpn_conv", f"{mmdet.RPN}rpn_conv", c, c, 3)
    yield conv("rpn_cls", f"{mmdet.RPN}rpn_cls", a, c, 1)
    yield conv("rpn_reg", f"{mmdet.RPN}rpn_reg", 4 * a, c, 1)
    cascade = head.num_stages > 1
    for s, box in enumerate(head.box_heads):
        key = f"{mmdet.ROI}bbox_head." + (f"{s}." if cascade else "")
        for k in range(box.num_convs):
            cin = c if k == 0 else box.conv_channels
            yield conv(
                f"box{s}_conv{k}", f"{key}shared_convs.{k}.conv", box.conv_channels, cin, 3,
                bias=not box.conv_norm,
            )  # fmt: skip
            if box.conv_norm:
                bn = f"{key}shared_convs.{k}.bn"
                yield (
                    f"box{s}_bn{k}",
                    [(f"{bn}.{p}", (box.conv_channels,), _identity) for p in _BATCH_NORM],
                )
        width = box.conv_channels if box.num_convs else c
        size = head.box_roi_size
        for k in range(box.num_fcs):
            cin = width * size * size if k == 0 else box.fc_channels
            transform = _flattened_fc(size, width) if k == 0 else _linear
            yield (
                f"box{s}_fc{k}",
                [
                    (f"{key}shared_fcs.{k}.weight", (box.fc_channels, cin), transform),
                    (f"{key}shared_fcs.{k}.bias", (box.fc_channels,), _identity),
                ],
            )
        deltas = 4 if box.class_agnostic else 4 * num_classes
        for layer, name, out in (("cls", "fc_cls", num_classes + 1), ("reg", "fc_reg", deltas)):
            yield (
                f"box{s}_{layer}",
                [
                    (f"{key}{name}.weight", (out, box.fc_channels), _linear),
                    (f"{key}{name}.bias", (out,), _identity),
                ],
            )
    m = head.mask_channels
    for s in range(head.num_stages):
        key = f"{mmdet.ROI}mask_head." + (f"{s}." if cascade else "")
        for k in range(head.mask_convs):
            yield conv(f"mask{s}_conv{k}", f"{key}convs.{k}.conv", m, c if k == 0 else m, 3)
        yield (
            f"mask{s}_upsample",
            [
                (f"{key}upsample.weight", (m, m, 2, 2), _deconv),
                (f"{key}upsample.bias", (m,), _identity),
            ],
        )
        yield conv(f"mask{s}_logits", f"{key}conv_logits", num_classes, m, 1)


def expected_shapes(
    variant: str | registry.Variant, head: registry.DetectorHead, num_classes: int
) -> dict[str, tuple[int, ...]]:
    """Every tensor an mmdetection checkpoint of this detector holds, with its PyTorch shape
    (BatchNorm's ``num_batches_tracked`` counters aside): the layout
    :func:`convert_mmdet_state_dict` reads."""
    spec = registry.variant(variant)
    plans = [
        (layer, [(mmdet.BACKBONE + key, shape, t) for key, shape, t in entries])
        for layer, entries in _official_plan(spec)
        if layer != "head_norm"
    ]
    plans += list(_detector_plan(spec, head, num_classes))
    return {key: shape for _, entries in plans for key, shape, _ in entries}


def convert_mmdet_state_dict(
    state_dict: dict[str, np.ndarray],
    variant: str | registry.Variant,
    head: registry.DetectorHead,
    num_classes: int | None = None,
) -> dict[str, list[np.ndarray]]:
    """An mmdetection Mask R-CNN / Cascade Mask R-CNN state dict -> ``{keras layer name:
    [weights]}``.

    Args:
        variant: the backbone; head: the detector (a registry row's ``detection.head``);
        num_classes: object classes (default: the checkpoint's, from ``fc_cls``).

    Raises:
        CheckpointError: not this layout (a classifier's or segmenter's file: the error names
            the models that load it), another backbone or method (the error names the
            detection model that fits), or a missing, unexpected or wrongly shaped tensor
            (each named), or NaN/inf weights.
    """
    spec = registry.variant(variant)
    if not mmdet.matches(state_dict):
        what = (
            f"an mmsegmentation segmentation checkpoint ({models_for(state_dict, 'segmentation')})"
            if mmseg.matches(state_dict)
            else "a classifier's or backbone's checkpoint (load it with a classification name)"
        )
        raise CheckpointError(
            "Not an mmdetection detection checkpoint (backbone.*, neck.*, rpn_head.* and "
            f"roi_head.* tensors): it is {what}. First keys: {list(state_dict)[:5]}."
        )
    backbone = mmdet.backbone(state_dict)
    depths, dims, _ = infer_architecture(backbone)
    method = mmdet.method(state_dict)
    if (depths, dims) != (spec.depths, spec.dims) or method != head.method:
        title = {"mask_rcnn": "Mask R-CNN", "cascade_mask_rcnn": "Cascade Mask R-CNN"}
        raise CheckpointError(
            f"The checkpoint is not a {title[head.method]} on {spec.title} (depths "
            f"{list(spec.depths)}, dims {list(spec.dims)}): it is a {title[method]} on a "
            f"backbone of depths {list(depths)} and dims {list(dims)}; "
            f"{models_for(state_dict, 'detection')}."
        )
    weights = convert_state_dict(backbone, spec, final_norm=False)
    if num_classes is None:
        key = f"{mmdet.ROI}bbox_head." + ("0." if head.num_stages > 1 else "") + "fc_cls.bias"
        scores = state_dict.get(key)
        num_classes = int(scores.shape[0]) - 1 if scores is not None else 0
    missing, wrong, used = [], [], set()
    for layer, entries in _detector_plan(spec, head, num_classes):
        arrays = _take(state_dict, entries, used, missing, wrong)
        if arrays is not None:
            weights[layer] = arrays
    counters = {k for k in state_dict if k.endswith(".num_batches_tracked")}
    unexpected = sorted(set(state_dict) - used - counters - set(mmdet.backbone_keys(state_dict)))
    _check_finite(state_dict, used)
    if missing or wrong or unexpected:
        raise _misfit(
            f"The checkpoint does not fit {head.method} on {spec.title} ({num_classes} classes):",
            missing,
            wrong,
            unexpected,
            f"a {head.method} with {head.fpn_channels} FPN channels and "
            f"{head.num_stages} box and mask head(s) (the official COCO checkpoints)",
        )
    return weights
