"""Boxes as mmdetection 2.x computes them at test time, in ``keras.ops``.

Boxes are ``(x1, y1, x2, y2)`` in pixels of the network's input (the resized image), float32.
Sources: mmdetection 2.11 ``mmdet/core/anchor/anchor_generator.py`` (``AnchorGenerator``),
``mmdet/core/bbox/coder/delta_xywh_bbox_coder.py`` (``delta2bbox``) and mmcv 1.3
``mmcv/ops/csrc/nms_cuda_kernel.cuh`` (``devIoU``, the overlap test of NMS).  The arithmetic
keeps the originals' order of operations, so that float32 results agree to the last bits
where they can.
"""

from __future__ import annotations

import numpy as np
from keras import ops


def base_anchors(stride: int, scales, ratios) -> np.ndarray:
    """``(len(ratios) * len(scales), 4)`` float32 anchors of one level centred on (0, 0):
    ``AnchorGenerator.gen_single_level_base_anchors`` with ``base_size = stride``,
    ``scale_major=True`` (ratio-major order) and ``center_offset=0``; a ratio is height /
    width."""
    ratios = np.asarray(ratios, np.float32)
    scales = np.asarray(scales, np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1) / h_ratios
    size = np.float32(stride)
    ws = (size * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (size * h_ratios[:, None] * scales[None, :]).reshape(-1)
    half = np.float32(0.5)
    return np.stack([-half * ws, -half * hs, half * ws, half * hs], axis=-1).astype(np.float32)


def grid_anchors(base: np.ndarray, height, width, stride: int):
    """``(height * width * A, 4)`` anchors of a ``height x width`` feature map: every base
    anchor shifted to each grid point ``(x * stride, y * stride)``, rows in (y, x, anchor)
    order (``AnchorGenerator.single_level_grid_anchors``).  ``height``/``width`` may be
    tensors (dynamic shapes)."""
    shift_x = ops.cast(ops.arange(width), "float32") * float(stride)
    shift_y = ops.cast(ops.arange(height), "float32") * float(stride)
    xx = ops.tile(shift_x[None, :], (height, 1))
    yy = ops.tile(shift_y[:, None], (1, width))
    shifts = ops.stack([xx, yy, xx, yy], axis=-1)  # (H, W, 4)
    anchors = shifts[:, :, None, :] + ops.convert_to_tensor(base)[None, None]
    return ops.reshape(anchors, (-1, 4))


def decode(rois, deltas, means, stds, max_hw=None):
    """``delta2bbox``: boxes from reference boxes ``rois`` (..., 4) and deltas (..., 4)
    (``(dx, dy, dw, dh)`` normalised by ``means`` / ``stds``), the log-size deltas clamped to
    ``+-|log(registry.DELTA_WH_RATIO_CLIP)|``; clipped to ``max_hw`` (..., 2) = (height,
    width) when given: x to ``[0, width]``, y to ``[0, height]``."""
    from convnext_keras import registry

    means = ops.convert_to_tensor(np.asarray(means, np.float32))
    stds = ops.convert_to_tensor(np.asarray(stds, np.float32))
    denorm = deltas * stds + means
    dx, dy, dw, dh = (denorm[..., i] for i in range(4))
    max_ratio = float(np.abs(np.log(np.float32(registry.DELTA_WH_RATIO_CLIP))))
    dw = ops.clip(dw, -max_ratio, max_ratio)
    dh = ops.clip(dh, -max_ratio, max_ratio)
    x1, y1, x2, y2 = (rois[..., i] for i in range(4))
    px = (x1 + x2) * 0.5
    py = (y1 + y2) * 0.5
    pw = x2 - x1
    ph = y2 - y1
    gw = pw * ops.exp(dw)
    gh = ph * ops.exp(dh)
    gx = px + pw * dx
    gy = py + ph * dy
    boxes = ops.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], axis=-1)
    if max_hw is None:
        return boxes
    return clip(boxes, max_hw)


def clip(boxes, max_hw):
    """Boxes (..., 4) clipped to ``[0, width] x [0, height]``; ``max_hw`` (..., 2) =
    (height, width), broadcast against ``boxes[..., 0]``."""
    max_hw = ops.cast(max_hw, boxes.dtype)
    limit = ops.stack([max_hw[..., 1], max_hw[..., 0], max_hw[..., 1], max_hw[..., 0]], axis=-1)
    return ops.minimum(ops.maximum(boxes, 0.0), limit)


def area(boxes):
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def overlaps(a, b, threshold: float):
    """Whether boxes ``a`` (..., N, 4) and ``b`` (..., M, 4) overlap by more than
    ``threshold`` IoU: ``(..., N, M)`` bool, as mmcv's CUDA NMS tests it
    (``inter > threshold * (area_a + area_b - inter)``, no division: two empty boxes do not
    overlap)."""
    left = ops.maximum(a[..., :, None, 0], b[..., None, :, 0])
    top = ops.maximum(a[..., :, None, 1], b[..., None, :, 1])
    right = ops.minimum(a[..., :, None, 2], b[..., None, :, 2])
    bottom = ops.minimum(a[..., :, None, 3], b[..., None, :, 3])
    inter = ops.maximum(right - left, 0.0) * ops.maximum(bottom - top, 0.0)
    union = area(a)[..., :, None] + area(b)[..., None, :] - inter
    return inter > threshold * union


def level_of(boxes, finest_scale: int, levels: int):
    """The FPN level (0-based, int32) of each RoI: ``floor(log2(sqrt(w h) / finest_scale +
    1e-6))`` clamped to ``[0, levels - 1]`` (mmdetection ``SingleRoIExtractor.map_roi_levels``).
    """
    scale = ops.sqrt(area(boxes))
    level = ops.floor(ops.log2(scale / float(finest_scale) + 1e-6))
    return ops.cast(ops.clip(level, 0.0, float(levels - 1)), "int32")
