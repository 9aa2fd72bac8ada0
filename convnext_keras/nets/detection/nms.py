"""Non-maximum suppression in a padded, fixed-size form: one graph for TensorFlow, JAX and
PyTorch (``keras.ops`` only), batched, exact greedy NMS.

Greedy NMS keeps the best-scoring box, drops every box that overlaps it by more than the
threshold, and repeats with the next box still standing.  mmdetection's ``batched_nms`` (mmcv
1.3 ``mmcv/ops/nms.py``) runs it per group (an FPN level for the RPN, a class for the R-CNN)
by shifting each group's boxes by ``group * (max coordinate + 1)`` so that groups never
overlap; this module does the same shift (the overlaps are computed on the shifted boxes, as
there).  The overlap test is mmcv's CUDA kernel's, ``inter > iou * union`` (``boxes.overlaps``;
its CPU kernel tests ``>=``, which differs only for an IoU exactly at the threshold).

The form is TensorFlow's ``non_max_suppression_padded`` algorithm (which keras-hub's
``NonMaxSuppression`` layer also uses): the boxes sorted by score are processed in tiles of
``TILE``; a tile is first suppressed by the boxes kept so far, then by itself (a fixed point
of "kept = not overlapped by a kept, better box", which greedy NMS's order reaches exactly);
the loop stops as soon as every image has ``max_output`` boxes or no candidates left.  Shapes
are static; only the number of loop turns depends on the data.
"""

from __future__ import annotations

from keras import ops

from convnext_keras.nets.detection import boxes as box_ops

#: Boxes compared at a time (a tile against itself and against the kept boxes).
TILE = 256


def _tile_keep(tile_boxes, candidates, threshold):
    """Greedy NMS inside one tile: ``candidates`` (B, T) bool, boxes (B, T, 4) sorted by
    score; a candidate is kept unless a kept candidate before it overlaps it."""
    size = tile_boxes.shape[1]
    order = ops.arange(size)
    earlier = order[:, None] < order[None, :]
    suppresses = ops.logical_and(box_ops.overlaps(tile_boxes, tile_boxes, threshold), earlier)

    def step(keep, _changed):
        hit = ops.any(ops.logical_and(keep[:, :, None], suppresses), axis=1)
        new = ops.logical_and(candidates, ops.logical_not(hit))
        return new, ops.any(ops.not_equal(new, keep))

    keep, _ = ops.while_loop(
        lambda keep, changed: changed,
        step,
        (candidates, ops.convert_to_tensor(True)),
        maximum_iterations=size + 1,
    )
    return keep


def batched_nms(boxes, scores, valid, groups, iou_threshold: float, max_output: int):
    """Greedy NMS per image and per group, best first.

    Args:
        boxes: ``(B, N, 4)`` float32 ``x1, y1, x2, y2``.
        scores: ``(B, N)``; valid: ``(B, N)`` bool (only valid boxes take part);
        groups: ``(B, N)`` int (boxes of different groups never suppress each other).
        iou_threshold: a box overlapping a kept, better box of its group by more than this
            IoU is dropped.
        max_output: the number of boxes kept per image at most (``N`` and ``max_output`` are
            static).

    Returns:
        ``(indices, count)``: ``(B, max_output)`` int32 indices into ``N`` of the kept boxes,
        best first, and ``(B,)`` int32 how many are real (the rest of ``indices`` is 0).
    """
    batch = ops.shape(scores)[0]
    n = scores.shape[1]
    tiles = -(-n // TILE)
    pad = tiles * TILE - n
    masked = ops.where(valid, ops.cast(scores, "float32"), float("-inf"))
    _, order = ops.top_k(masked, k=n, sorted=True)
    order = ops.cast(order, "int32")
    boxes = ops.cast(boxes, "float32")
    sorted_boxes = ops.take_along_axis(boxes, order[:, :, None], axis=1)
    sorted_valid = ops.take_along_axis(valid, order, axis=1)
    sorted_groups = ops.cast(ops.take_along_axis(groups, order, axis=1), "float32")
    # batched_nms's shift: group * (the image's largest coordinate + 1).
    largest = ops.max(ops.where(sorted_valid[:, :, None], sorted_boxes, float("-inf")), axis=(1, 2))
    largest = ops.where(ops.any(sorted_valid, axis=1), largest, 0.0)
    shifted = sorted_boxes + (sorted_groups * (largest[:, None] + 1.0))[:, :, None]
    if pad:
        shifted = ops.pad(shifted, ((0, 0), (0, pad), (0, 0)))
        sorted_valid = ops.pad(sorted_valid, ((0, 0), (0, pad)), constant_values=False)
    num_valid = ops.sum(ops.cast(sorted_valid, "int32"), axis=1)
    slots = ops.arange(max_output, dtype="int32")
    positions = ops.arange(TILE, dtype="int32")

    def body(t, kept_boxes, kept_index, count):
        start = t * TILE
        tile_boxes = ops.slice(shifted, (0, start, 0), (batch, TILE, 4))
        candidates = ops.slice(sorted_valid, (0, start), (batch, TILE))
        candidates = ops.logical_and(candidates, (count < max_output)[:, None])
        filled = (slots[None, :] < count[:, None])[:, None, :]
        before = ops.any(
            ops.logical_and(box_ops.overlaps(tile_boxes, kept_boxes, iou_threshold), filled),
            axis=2,
        )
        keep = _tile_keep(
            tile_boxes, ops.logical_and(candidates, ops.logical_not(before)), iou_threshold
        )
        rank = count[:, None] + ops.cumsum(ops.cast(keep, "int32"), axis=1)
        keep = ops.logical_and(keep, rank <= max_output)
        # Append the tile's kept boxes after the ones kept so far (a one-hot product: no
        # scatter, so the same on every backend).
        place = ops.logical_and(
            ops.equal(rank[:, :, None] - 1, slots[None, None, :]), keep[:, :, None]
        )
        place = ops.cast(place, "float32")
        kept_boxes = kept_boxes + ops.einsum("btm,btk->bmk", place, tile_boxes)
        index = ops.cast(start + positions, "float32")
        kept_index = kept_index + ops.einsum("btm,t->bm", place, index)
        count = count + ops.sum(ops.cast(keep, "int32"), axis=1)
        return t + 1, kept_boxes, kept_index, count

    def more(t, kept_boxes, kept_index, count):
        active = ops.logical_and(count < max_output, t * TILE < num_valid)
        return ops.logical_and(t < tiles, ops.any(active))

    initial = (
        ops.convert_to_tensor(0, "int32"),
        ops.zeros((batch, max_output, 4), "float32"),
        ops.zeros((batch, max_output), "float32"),
        ops.zeros((batch,), "int32"),
    )
    _, _, kept_index, count = ops.while_loop(more, body, initial, maximum_iterations=tiles)
    kept_index = ops.cast(kept_index, "int32")
    indices = ops.take_along_axis(order, kept_index, axis=1)
    indices = ops.where(slots[None, :] < count[:, None], indices, 0)
    return indices, count
