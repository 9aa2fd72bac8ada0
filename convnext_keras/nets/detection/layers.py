"""The Keras layers of the detectors that ``keras.layers`` lacks: nearest upsampling to a
reference size (the FPN's top-down path), the RPN's proposals, RoI features, the cascade's box
refinement, the final detections and the mask probabilities.  Each follows mmdetection 2.11's
test-time code (named in its docstring) with the settings of a registry row, and computes
boxes and scores in float32 under any dtype policy.

Shapes: ``B`` images, ``K`` RoIs per image (the RPN's ``rpn_max``), ``D`` detections per image
(``max_detections``); RoI features and head outputs are flattened to ``(B * K, ...)``.
"""

from __future__ import annotations

import keras
from keras import ops

from convnext_keras._registration import PACKAGE
from convnext_keras.nets.detection import boxes as box_ops
from convnext_keras.nets.detection import nms as nms_ops
from convnext_keras.nets.detection import roi_align as roi_ops


@keras.saving.register_keras_serializable(package=PACKAGE)
class NearestUpsample(keras.layers.Layer):
    """``layer(x, like)``: ``x`` (NHWC) resized to ``like``'s height and width by nearest
    neighbour, as PyTorch's ``F.interpolate(mode="nearest", size=...)`` picks the source
    pixel: ``min(floor(i * in / out), in - 1)`` (mmdetection ``FPN``'s top-down path)."""

    def call(self, x, like):
        def index(size_in, size_out):
            scale = ops.cast(size_in, "float32") / ops.cast(size_out, "float32")
            i = ops.floor(ops.cast(ops.arange(size_out), "float32") * scale)
            return ops.minimum(ops.cast(i, "int32"), size_in - 1)

        shape, target = ops.shape(x), ops.shape(like)
        x = ops.take(x, index(shape[1], target[1]), axis=1)
        return ops.take(x, index(shape[2], target[2]), axis=2)

    def compute_output_shape(self, x_shape, like_shape):
        return (x_shape[0], like_shape[1], like_shape[2], x_shape[3])


@keras.saving.register_keras_serializable(package=PACKAGE)
class RPNProposals(keras.layers.Layer):
    """The RPN's proposals (mmdetection ``RPNHead._get_bboxes``): per level the sigmoid
    objectness of every anchor, the ``pre_nms`` best with their deltas and anchors; decoded
    (``DeltaXYWHBBoxCoder``, ``target_means`` / ``target_stds``) and clipped to each image's
    size; NMS at ``iou`` within each level; the ``max_proposals`` best.

    ``layer(scores, deltas, image_sizes)``: ``scores`` one ``(B, H, W, A)`` map per level,
    ``deltas`` one ``(B, H, W, 4 A)`` per level, ``image_sizes`` ``(B, 2)`` (height, width of
    the resized image before padding) -> ``(proposals (B, max_proposals, 4), counts (B,))``,
    best first; rows from ``counts`` on are zeros.
    """

    def __init__(
        self,
        strides,
        anchor_scales,
        anchor_ratios,
        target_means,
        target_stds,
        pre_nms: int,
        max_proposals: int,
        iou: float,
        min_size: float = 0.0,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.strides = tuple(int(s) for s in strides)
        self.anchor_scales = tuple(float(s) for s in anchor_scales)
        self.anchor_ratios = tuple(float(r) for r in anchor_ratios)
        self.target_means = tuple(float(m) for m in target_means)
        self.target_stds = tuple(float(s) for s in target_stds)
        self.pre_nms = int(pre_nms)
        self.max_proposals = int(max_proposals)
        self.iou = float(iou)
        self.min_size = float(min_size)
        self._base = [
            box_ops.base_anchors(s, self.anchor_scales, self.anchor_ratios) for s in self.strides
        ]

    def call(self, scores, deltas, image_sizes):
        batch = ops.shape(image_sizes)[0]
        all_scores, all_deltas, all_anchors, all_valid, all_levels = [], [], [], [], []
        for level, (score, delta, stride, base) in enumerate(
            zip(scores, deltas, self.strides, self._base)
        ):
            shape = ops.shape(score)
            score = ops.reshape(ops.sigmoid(ops.cast(score, "float32")), (batch, -1))
            delta = ops.reshape(ops.cast(delta, "float32"), (batch, -1, 4))
            anchors = box_ops.grid_anchors(base, shape[1], shape[2], stride)
            n = ops.shape(anchors)[0]
            # At least pre_nms candidates per level (padding, never valid), so top_k has a
            # static size; a level with fewer anchors keeps them all, as the original.
            pad = self.pre_nms
            score = ops.pad(score, ((0, 0), (0, pad)), constant_values=float("-inf"))
            delta = ops.pad(delta, ((0, 0), (0, pad), (0, 0)))
            anchors = ops.pad(anchors, ((0, pad), (0, 0)))
            best, index = ops.top_k(score, k=self.pre_nms, sorted=True)
            index = ops.cast(index, "int32")
            all_scores.append(best)
            all_deltas.append(ops.take_along_axis(delta, index[:, :, None], axis=1))
            all_anchors.append(ops.take(anchors, index, axis=0))
            all_valid.append(index < n)
            all_levels.append(ops.full(ops.shape(index), level, "int32"))
        score = ops.concatenate(all_scores, axis=1)
        valid = ops.concatenate(all_valid, axis=1)
        levels = ops.concatenate(all_levels, axis=1)
        max_hw = ops.cast(image_sizes, "float32")[:, None, :]
        boxes = box_ops.decode(
            ops.concatenate(all_anchors, axis=1),
            ops.concatenate(all_deltas, axis=1),
            self.target_means,
            self.target_stds,
            max_hw,
        )
        if self.min_size > 0:
            wide = (boxes[..., 2] - boxes[..., 0]) >= self.min_size
            high = (boxes[..., 3] - boxes[..., 1]) >= self.min_size
            valid = valid & wide & high
        keep, counts = nms_ops.batched_nms(
            boxes, score, valid, levels, self.iou, self.max_proposals
        )
        proposals = ops.take_along_axis(boxes, keep[:, :, None], axis=1)
        real = ops.arange(self.max_proposals, dtype="int32")[None, :] < counts[:, None]
        return ops.where(real[:, :, None], proposals, 0.0), counts

    def compute_output_spec(self, scores, deltas, image_sizes):
        batch = image_sizes.shape[0]
        return (
            keras.KerasTensor((batch, self.max_proposals, 4), "float32"),
            keras.KerasTensor((batch,), "int32"),
        )

    def get_config(self):
        return {
            **super().get_config(),
            "strides": self.strides,
            "anchor_scales": self.anchor_scales,
            "anchor_ratios": self.anchor_ratios,
            "target_means": self.target_means,
            "target_stds": self.target_stds,
            "pre_nms": self.pre_nms,
            "max_proposals": self.max_proposals,
            "iou": self.iou,
            "min_size": self.min_size,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class RoIFeatures(keras.layers.Layer):
    """mmdetection ``SingleRoIExtractor`` + mmcv ``RoIAlign`` (``roi_align``):
    ``layer(levels, rois, counts)`` with the FPN levels ``[(B, H_l, W_l, C)]``, ``rois``
    ``(B, K, 4)`` in input pixels and ``counts`` ``(B,)`` -> ``(B * K, S, S, C)``, zeros for
    the RoIs from ``counts`` on."""

    def __init__(
        self,
        strides,
        output_size: int,
        finest_scale: int,
        sampling_ratio: int = 0,
        method: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.strides = tuple(int(s) for s in strides)
        self.output_size = int(output_size)
        self.finest_scale = int(finest_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.method = method

    def call(self, levels, rois, counts):
        levels = [ops.cast(f, self.compute_dtype) for f in levels]
        return roi_ops.multilevel_roi_align(
            levels,
            rois,
            counts,
            strides=self.strides,
            finest_scale=self.finest_scale,
            output_size=self.output_size,
            sampling_ratio=self.sampling_ratio,
            method=self.method,
        )

    def compute_output_spec(self, levels, rois, counts):
        batch, k = rois.shape[0], rois.shape[1]
        total = None if batch is None else batch * k
        size = self.output_size
        return keras.KerasTensor((total, size, size, levels[0].shape[-1]), self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "strides": self.strides,
            "output_size": self.output_size,
            "finest_scale": self.finest_scale,
            "sampling_ratio": self.sampling_ratio,
            "method": self.method,
        }


def _class_deltas(deltas, labels, num_classes: int, class_agnostic: bool):
    """The four deltas of each RoI's class: ``deltas`` ``(B, K, 4 * classes)`` (or
    ``(B, K, 4)`` class-agnostic), ``labels`` ``(B, K)``."""
    if class_agnostic:
        return deltas
    deltas = ops.reshape(deltas, (ops.shape(deltas)[0], -1, num_classes, 4))
    return ops.take_along_axis(deltas, labels[:, :, None, None], axis=2)[:, :, 0]


@keras.saving.register_keras_serializable(package=PACKAGE)
class RefineBoxes(keras.layers.Layer):
    """One cascade stage's boxes for the next (mmdetection ``BBoxHead.regress_by_class``, as
    ``CascadeRoIHead.simple_test`` calls it): each RoI's class is the arg-max of its
    foreground scores, its deltas for that class are decoded on the RoI with the stage's
    ``target_means`` / ``target_stds`` and clipped to the image.

    ``layer(rois, logits, deltas, image_sizes)``: rois ``(B, K, 4)``, logits
    ``(B * K, classes + 1)``, deltas ``(B * K, 4 * classes)`` -> ``(B, K, 4)``."""

    def __init__(self, target_means, target_stds, class_agnostic: bool = False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.target_means = tuple(float(m) for m in target_means)
        self.target_stds = tuple(float(s) for s in target_stds)
        self.class_agnostic = bool(class_agnostic)

    def call(self, rois, logits, deltas, image_sizes):
        batch, k = ops.shape(rois)[0], rois.shape[1]
        # The last axis by its static size: with a dynamic batch, -1 would leave it unknown in
        # a traced graph (tf.function, SavedModel), and ``classes`` needs it.
        logits = ops.reshape(ops.cast(logits, "float32"), (batch, k, logits.shape[-1]))
        deltas = ops.reshape(ops.cast(deltas, "float32"), (batch, k, deltas.shape[-1]))
        classes = logits.shape[-1] - 1
        labels = ops.cast(ops.argmax(logits[..., :classes], axis=-1), "int32")
        chosen = _class_deltas(deltas, labels, classes, self.class_agnostic)
        max_hw = ops.cast(image_sizes, "float32")[:, None, :]
        return box_ops.decode(rois, chosen, self.target_means, self.target_stds, max_hw)

    def compute_output_spec(self, rois, logits, deltas, image_sizes):
        return keras.KerasTensor(rois.shape, "float32")

    def get_config(self):
        return {
            **super().get_config(),
            "target_means": self.target_means,
            "target_stds": self.target_stds,
            "class_agnostic": self.class_agnostic,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class Detections(keras.layers.Layer):
    """The final boxes, scores and classes (mmdetection ``BBoxHead.get_bboxes`` with
    ``rescale=True`` and ``multiclass_nms``; for the cascade, ``CascadeRoIHead.simple_test``
    first averages the class logits of the stages).

    The class scores are the softmax of the logits (background last, left out); every RoI's
    deltas of every class are decoded on the RoI (``target_means`` / ``target_stds``),
    clipped to the image and divided by its scale factors (the original photo's pixels); the
    (RoI, class) pairs scoring above ``score_threshold`` go through NMS at ``iou`` within each
    class; the ``max_detections`` best are kept.  ``zero_top_rois``: as mmdetection's
    ``StandardRoIHead.simple_test_bboxes`` (Mask R-CNN), whose batch padding test also catches
    real RoIs with ``y2 == 0``: their logits and deltas count as zeros.

    ``layer(rois, counts, logits, deltas, image_sizes, scale_factors)``: rois ``(B, K, 4)``,
    counts ``(B,)``, logits one ``(B * K, classes + 1)`` per stage, deltas of the last stage
    ``(B * K, 4 * classes)``, image_sizes ``(B, 2)``, scale_factors ``(B, 2)`` (resized / photo,
    height and width) -> ``(boxes (B, D, 4) in photo pixels, scores (B, D), labels (B, D)
    int32, counts (B,) int32, mask_rois (B, D, 4) in input pixels)``; rows from the count on
    are zeros (labels -1).
    """

    def __init__(
        self,
        target_means,
        target_stds,
        score_threshold: float,
        iou: float,
        max_detections: int,
        class_agnostic: bool = False,
        zero_top_rois: bool = False,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.target_means = tuple(float(m) for m in target_means)
        self.target_stds = tuple(float(s) for s in target_stds)
        self.score_threshold = float(score_threshold)
        self.iou = float(iou)
        self.max_detections = int(max_detections)
        self.class_agnostic = bool(class_agnostic)
        self.zero_top_rois = bool(zero_top_rois)

    def call(self, rois, counts, logits, deltas, image_sizes, scale_factors):
        batch, k = ops.shape(rois)[0], rois.shape[1]
        # (static last axes, as in RefineBoxes.call)
        logits = [ops.reshape(ops.cast(x, "float32"), (batch, k, x.shape[-1])) for x in logits]
        logits = logits[0] if len(logits) == 1 else sum(logits) / float(len(logits))
        deltas = ops.reshape(ops.cast(deltas, "float32"), (batch, k, deltas.shape[-1]))
        if self.zero_top_rois:
            top = (rois[..., 3] == 0.0)[:, :, None]
            logits = ops.where(top, 0.0, logits)
            deltas = ops.where(top, 0.0, deltas)
        classes = logits.shape[-1] - 1
        scores = ops.softmax(logits, axis=-1)[..., :classes]
        if self.class_agnostic:
            deltas = ops.repeat(deltas[:, :, None, :], classes, axis=2)
        else:
            deltas = ops.reshape(deltas, (batch, k, classes, 4))
        max_hw = ops.cast(image_sizes, "float32")[:, None, None, :]
        boxes = box_ops.decode(
            rois[:, :, None, :], deltas, self.target_means, self.target_stds, max_hw
        )
        factors = ops.cast(scale_factors, "float32")
        # mmdetection's (w_scale, h_scale, w_scale, h_scale)
        factors = ops.stack([factors[:, 1], factors[:, 0], factors[:, 1], factors[:, 0]], -1)
        boxes = boxes / factors[:, None, None, :]
        real = ops.arange(k, dtype="int32")[None, :] < counts[:, None]
        valid = ops.logical_and(scores > self.score_threshold, real[:, :, None])
        labels = ops.tile(ops.arange(classes, dtype="int32")[None, None, :], (batch, k, 1))
        flat_boxes = ops.reshape(boxes, (batch, k * classes, 4))
        flat_scores = ops.reshape(scores, (batch, k * classes))
        flat_labels = ops.reshape(labels, (batch, k * classes))
        keep, found = nms_ops.batched_nms(
            flat_boxes,
            flat_scores,
            ops.reshape(valid, (batch, k * classes)),
            flat_labels,
            self.iou,
            self.max_detections,
        )
        real = ops.arange(self.max_detections, dtype="int32")[None, :] < found[:, None]
        out_boxes = ops.where(
            real[:, :, None], ops.take_along_axis(flat_boxes, keep[:, :, None], axis=1), 0.0
        )
        out_scores = ops.where(real, ops.take_along_axis(flat_scores, keep, axis=1), 0.0)
        out_labels = ops.where(real, ops.take_along_axis(flat_labels, keep, axis=1), -1)
        # The mask RoIs: the boxes back in input pixels (CascadeRoIHead.simple_test /
        # MaskTestMixin.simple_test_mask multiply by the scale factors).
        mask_rois = out_boxes * factors[:, None, :]
        return out_boxes, out_scores, out_labels, found, mask_rois

    def compute_output_spec(self, rois, counts, logits, deltas, image_sizes, scale_factors):
        batch, d = rois.shape[0], self.max_detections
        return (
            keras.KerasTensor((batch, d, 4), "float32"),
            keras.KerasTensor((batch, d), "float32"),
            keras.KerasTensor((batch, d), "int32"),
            keras.KerasTensor((batch,), "int32"),
            keras.KerasTensor((batch, d, 4), "float32"),
        )

    def get_config(self):
        return {
            **super().get_config(),
            "target_means": self.target_means,
            "target_stds": self.target_stds,
            "score_threshold": self.score_threshold,
            "iou": self.iou,
            "max_detections": self.max_detections,
            "class_agnostic": self.class_agnostic,
            "zero_top_rois": self.zero_top_rois,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaskProbabilities(keras.layers.Layer):
    """Each detection's mask: the sigmoid of its class's mask logits, averaged over the mask
    heads of the stages (``CascadeRoIHead.simple_test``: ``merge_aug_masks``, a plain mean;
    Mask R-CNN has one head).  ``layer(logits, labels)``: logits one ``(B * D, M, M, classes)``
    per stage, labels ``(B, D)`` int32 (-1: no detection) -> ``(B, D, M, M)`` float32 in
    [0, 1], zeros where there is no detection."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, logits, labels):
        batch, d = ops.shape(labels)[0], labels.shape[1]
        chosen = ops.reshape(ops.maximum(labels, 0), (-1,))
        total = None
        for stage in logits:
            stage = ops.cast(stage, "float32")
            picked = ops.take_along_axis(stage, chosen[:, None, None, None], axis=3)[..., 0]
            probability = ops.sigmoid(picked)
            total = probability if total is None else total + probability
        masks = total / float(len(logits))
        size = masks.shape[1]
        masks = ops.reshape(masks, (batch, d, size, masks.shape[2]))
        return ops.where((labels >= 0)[:, :, None, None], masks, 0.0)

    def compute_output_spec(self, logits, labels):
        size = logits[0].shape[1]
        return keras.KerasTensor((labels.shape[0], labels.shape[1], size, size), "float32")
