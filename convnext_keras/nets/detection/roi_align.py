"""RoIAlign on the FPN levels, exactly as mmcv 1.3 computes it (``mmcv/ops/csrc/pytorch/
roi_align_cpu.cpp``, ``ROIAlignForward`` with ``aligned=True``, average pooling), in
``keras.ops``.

A RoI ``(x1, y1, x2, y2)`` in input pixels goes to its FPN level (``boxes.level_of``), is
scaled by ``1 / stride`` and shifted by half a pixel (``aligned``), and is cut into
``output_size x output_size`` bins.  Each bin is the mean of a grid of bilinear samples:
``sampling_ratio`` per side, or, when it is 0 (the checkpoints' setting), ``ceil(roi side /
output_size)`` per side ("adaptive": a RoI of zero size has none and gives zeros).  A sample
``(y, x)`` outside ``[-1, H] x [-1, W]`` counts as 0; one inside is first clamped to the map
(``y <= 0`` reads row 0, ``y >= H - 1`` the last row) and interpolated between its four
neighbours.

The number of samples differs from RoI to RoI (a long thin box has many), which no fixed-size
grid covers exactly.  So the samples of all RoIs are numbered one after another (``sum over
RoIs of bins x samples per bin``; a bin without samples keeps one slot of weight 0, so every
bin has at least one) and each is computed from its number: its RoI (a binary search in the
running total), bin, and position in the bin.  The sums per bin are ``segment_sum`` over these
numbers.  TensorFlow and PyTorch take all samples at once (a dynamic size: no padding, no
loop); JAX, whose shapes are static, takes them in chunks of ``CHUNK`` in a ``while_loop``,
adding each chunk's bins in place into the output (``slice_update``, in place under XLA).
Both forms compute the same numbers.
"""

from __future__ import annotations

import keras
from keras import ops

from convnext_keras.nets.detection import boxes as box_ops

#: Samples per loop turn of the chunked form (JAX).
CHUNK = 4096
#: The forms: "all" (every sample at once) and "chunked" (a loop over chunks of samples).
METHODS = ("all", "chunked")


def default_method() -> str:
    """``"chunked"`` on JAX (static shapes), ``"all"`` on TensorFlow and PyTorch."""
    return "chunked" if keras.backend.backend() == "jax" else "all"


def _roi_table(features, rois, batch_index, levels, valid, strides, output_size, sampling_ratio):
    """Per RoI: what its samples need (start, bin size, grid, map size, pixel offset), and the
    flattened features of every level, ``(sum of B * H * W, C)``."""
    shapes = [ops.shape(f) for f in features]
    channels = features[0].shape[-1]
    table = ops.concatenate([ops.reshape(f, (-1, channels)) for f in features], axis=0)
    heights = ops.stack([ops.cast(s[1], "int32") for s in shapes])
    widths = ops.stack([ops.cast(s[2], "int32") for s in shapes])
    sizes = ops.stack([ops.cast(s[0] * s[1] * s[2], "int32") for s in shapes])
    level_base = ops.cumsum(sizes) - sizes
    scales = ops.convert_to_tensor([1.0 / s for s in strides], "float32")

    height = ops.take(heights, levels)
    width = ops.take(widths, levels)
    base = ops.take(level_base, levels) + batch_index * height * width
    scale = ops.take(scales, levels)
    rois = ops.cast(rois, "float32")
    start_x = rois[:, 0] * scale - 0.5
    start_y = rois[:, 1] * scale - 0.5
    roi_w = (rois[:, 2] * scale - 0.5) - start_x
    roi_h = (rois[:, 3] * scale - 0.5) - start_y
    bin_w = roi_w / float(output_size)
    bin_h = roi_h / float(output_size)
    if sampling_ratio > 0:
        grid_h = ops.full(ops.shape(roi_h), sampling_ratio, "int32")
        grid_w = ops.full(ops.shape(roi_w), sampling_ratio, "int32")
    else:
        grid_h = ops.cast(ops.ceil(roi_h / float(output_size)), "int32")
        grid_w = ops.cast(ops.ceil(roi_w / float(output_size)), "int32")
    zero = ops.zeros_like(grid_h)
    grid_h = ops.where(valid, ops.maximum(grid_h, 0), zero)
    grid_w = ops.where(valid, ops.maximum(grid_w, 0), zero)
    per_bin = ops.maximum(grid_h * grid_w, 1)  # a bin without samples keeps one empty slot
    count = ops.cast(per_bin, table.dtype)  # mmcv divides by max(grid_h * grid_w, 1)
    roi = {
        "start_x": start_x,
        "start_y": start_y,
        "bin_w": bin_w,
        "bin_h": bin_h,
        "grid_h": grid_h,
        "grid_w": grid_w,
        "per_bin": per_bin,
        "height": height,
        "width": width,
        "base": base,
    }
    return table, roi, count


def _sample(s, roi, ends, output_size):
    """The samples numbered ``s`` (int32): ``(segment = roi * bins + bin, four flat pixel
    indices, four weights)``."""
    r = ops.cast(ops.searchsorted(ends, s, side="right"), "int32")
    r = ops.minimum(r, ops.shape(ends)[0] - 1)
    per_bin = ops.take(roi["per_bin"], r)
    first = ops.take(ends, r) - per_bin * output_size * output_size
    local = s - first
    bin_index = local // per_bin
    k = local - bin_index * per_bin
    grid_h = ops.take(roi["grid_h"], r)
    grid_w = ops.maximum(ops.take(roi["grid_w"], r), 1)
    ky = k // grid_w
    kx = k - ky * grid_w
    ph = bin_index // output_size
    pw = bin_index - ph * output_size
    bin_h = ops.take(roi["bin_h"], r)
    bin_w = ops.take(roi["bin_w"], r)
    grid_hf = ops.cast(ops.maximum(grid_h, 1), "float32")
    grid_wf = ops.cast(grid_w, "float32")
    y = (ops.take(roi["start_y"], r) + ops.cast(ph, "float32") * bin_h) + (
        (ops.cast(ky, "float32") + 0.5) * bin_h
    ) / grid_hf
    x = (ops.take(roi["start_x"], r) + ops.cast(pw, "float32") * bin_w) + (
        (ops.cast(kx, "float32") + 0.5) * bin_w
    ) / grid_wf
    height = ops.take(roi["height"], r)
    width = ops.take(roi["width"], r)
    heightf = ops.cast(height, "float32")
    widthf = ops.cast(width, "float32")
    inside = (y >= -1.0) & (y <= heightf) & (x >= -1.0) & (x <= widthf)
    inside = inside & (grid_h > 0) & (ops.take(roi["grid_w"], r) > 0)
    y = ops.maximum(y, 0.0)
    x = ops.maximum(x, 0.0)
    y_low = ops.cast(ops.floor(y), "int32")
    x_low = ops.cast(ops.floor(x), "int32")
    y_last = y_low >= height - 1
    x_last = x_low >= width - 1
    y_low = ops.where(y_last, height - 1, y_low)
    x_low = ops.where(x_last, width - 1, x_low)
    y_high = ops.where(y_last, y_low, y_low + 1)
    x_high = ops.where(x_last, x_low, x_low + 1)
    y = ops.where(y_last, ops.cast(y_low, "float32"), y)
    x = ops.where(x_last, ops.cast(x_low, "float32"), x)
    ly = y - ops.cast(y_low, "float32")
    lx = x - ops.cast(x_low, "float32")
    hy = 1.0 - ly
    hx = 1.0 - lx
    zero = ops.zeros_like(ly)
    weights = [ops.where(inside, w, zero) for w in (hy * hx, hy * lx, ly * hx, ly * lx)]
    base = ops.take(roi["base"], r)
    # Outside samples read pixel (0, 0) of their map with weight 0.
    y_low, y_high, x_low, x_high = (ops.where(inside, v, 0) for v in (y_low, y_high, x_low, x_high))
    pixels = [
        base + y_low * width + x_low,
        base + y_low * width + x_high,
        base + y_high * width + x_low,
        base + y_high * width + x_high,
    ]
    segment = r * output_size * output_size + bin_index
    return segment, pixels, weights


def _weighted(table, pixels, weights):
    total = None
    for index, weight in zip(pixels, weights):
        term = ops.take(table, index, axis=0) * ops.cast(weight, table.dtype)[:, None]
        total = term if total is None else total + term
    return total


def _bin_sums(table, segment, pixels, weights, num_segments):
    """``out[b] = sum over samples s of bin b, corners c: weights[c][s] * table[pixels[c][s]]``
    -- a sparse (bins x pixels) matrix times the feature table.  TensorFlow and PyTorch
    multiply it as a sparse matrix (no (samples, C) intermediates: the fast form, measured in
    BENCHMARKS.md); elsewhere gather + ``segment_sum``."""
    backend = keras.backend.backend()
    # Sample by sample, its four corners: the rows (bins) stay in ascending order.
    rows = ops.reshape(ops.stack([segment] * 4, axis=1), (-1,))
    cols = ops.reshape(ops.stack(pixels, axis=1), (-1,))
    values = ops.cast(ops.reshape(ops.stack(weights, axis=1), (-1,)), table.dtype)
    if backend == "tensorflow":
        import tensorflow as tf

        indices = tf.cast(tf.stack([rows, cols], axis=1), "int64")
        shape = tf.cast(tf.stack([num_segments, tf.shape(table)[0]]), "int64")
        matrix = tf.SparseTensor(indices, values, shape)
        return tf.sparse.sparse_dense_matmul(matrix, table)
    if backend == "torch":
        import torch

        shape = (int(num_segments), int(table.shape[0]))
        matrix = torch.sparse_coo_tensor(
            torch.stack([rows.long(), cols.long()]), values, shape, check_invariants=False
        )
        return torch.sparse.mm(matrix, table)
    return ops.segment_sum(_weighted(table, pixels, weights), segment, num_segments=num_segments)


def roi_align(
    features,
    rois,
    batch_index,
    levels,
    valid,
    *,
    strides,
    output_size: int,
    sampling_ratio: int = 0,
    method: str | None = None,
):
    """mmcv's RoIAlign (``aligned=True``, average) of each RoI on its level.

    Args:
        features: the FPN levels, ``[(B, H_l, W_l, C)]`` (NHWC).
        rois: ``(R, 4)`` boxes in input pixels; batch_index ``(R,)`` int32 (the image of each);
            levels ``(R,)`` int32 (``boxes.level_of``); valid ``(R,)`` bool (an invalid RoI
            gives zeros).
        strides: the stride of each level (``1 / spatial_scale``).
        output_size: bins per side; sampling_ratio: samples per bin side, 0 = adaptive.
        method: ``"all"`` or ``"chunked"`` (see the module docstring); None:
            :func:`default_method`.

    Returns ``(R, output_size, output_size, C)`` in the features' dtype.
    """
    method = method or default_method()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    table, roi, count = _roi_table(
        features, rois, batch_index, levels, valid, strides, output_size, sampling_ratio
    )
    channels = table.shape[-1]
    bins = output_size * output_size
    num_rois = ops.shape(rois)[0]
    segments = num_rois * bins
    ends = ops.cumsum(roi["per_bin"] * bins)
    total = ends[-1]
    if method == "all":
        s = ops.arange(total, dtype="int32")
        segment, pixels, weights = _sample(s, roi, ends, output_size)
        out = _bin_sums(table, segment, pixels, weights, segments)
    else:
        chunks = (total + CHUNK - 1) // CHUNK
        offsets = ops.arange(CHUNK, dtype="int32")

        def body(c, out):
            s = c * CHUNK + offsets
            real = s < total
            segment, pixels, weights = _sample(ops.minimum(s, total - 1), roi, ends, output_size)
            weights = [ops.where(real, w, ops.zeros_like(w)) for w in weights]
            first = segment[0]
            local = ops.where(real, segment - first, 0)
            part = ops.segment_sum(_weighted(table, pixels, weights), local, num_segments=CHUNK)
            current = ops.slice(out, (first, 0), (CHUNK, channels))
            return c + 1, ops.slice_update(out, (first, 0), current + part)

        out = ops.zeros((segments + CHUNK, channels), table.dtype)
        _, out = ops.while_loop(lambda c, out: c < chunks, body, (0, out))
        out = out[:segments]
    out = out / ops.repeat(count, bins)[:, None]
    return ops.reshape(out, (-1, output_size, output_size, channels))


def multilevel_roi_align(
    features,
    rois,
    counts,
    *,
    strides,
    finest_scale: int,
    output_size: int,
    sampling_ratio: int = 0,
    method: str | None = None,
):
    """mmdetection's ``SingleRoIExtractor`` at test time: the RoIs of each image (``rois``
    ``(B, K, 4)``, the first ``counts`` ``(B,)`` of each real) on their FPN levels ->
    ``(B * K, output_size, output_size, C)``, the padding RoIs zeros."""
    batch = ops.shape(rois)[0]
    k = rois.shape[1]
    flat = ops.reshape(ops.cast(rois, "float32"), (-1, 4))
    batch_index = ops.repeat(ops.arange(batch, dtype="int32"), k)
    valid = ops.reshape(ops.arange(k, dtype="int32")[None, :] < counts[:, None], (-1,))
    levels = box_ops.level_of(flat, finest_scale, len(features))
    return roi_align(
        features,
        flat,
        batch_index,
        levels,
        valid,
        strides=strides,
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        method=method,
    )
