"""The detectors' two operators with data-dependent work, RoIAlign and NMS, against brute force:
first the PyTorch reference's (``mmdet_reference``, which the detector equality tests trust),
then the library's (``convnext_keras.nets.detection``; both RoIAlign forms, every backend).

The brute force is written from the definitions, one number at a time: RoIAlign (mmcv's
``ROIAlignForward``, ``aligned=True``, average) as the mean of bilinear samples on a grid in
each bin, with mmcv's rules at the borders; NMS as the greedy loop over every pair.
"""

from __future__ import annotations

import math

import keras
import mmdet_reference as mref
import numpy as np
import pytest
import torch

from convnext_keras.nets.detection import boxes as box_ops
from convnext_keras.nets.detection import nms as nms_ops
from convnext_keras.nets.detection import roi_align as roi_ops


def brute_roi_align(feat, roi, size, scale, sampling_ratio=0):
    """One RoI on one (H, W, C) map -> (size, size, C), sample by sample in float64."""
    height, width, channels = feat.shape
    x1, y1, x2, y2 = (float(np.float32(v)) for v in roi)
    start_w, start_h = x1 * scale - 0.5, y1 * scale - 0.5
    roi_w, roi_h = x2 * scale - 0.5 - start_w, y2 * scale - 0.5 - start_h
    grid_h = sampling_ratio or math.ceil(roi_h / size)
    grid_w = sampling_ratio or math.ceil(roi_w / size)
    out = np.zeros((size, size, channels))
    for ph in range(size):
        for pw in range(size):
            total = np.zeros(channels)
            for iy in range(grid_h):
                y = start_h + ph * roi_h / size + (iy + 0.5) * roi_h / size / grid_h
                for ix in range(grid_w):
                    x = start_w + pw * roi_w / size + (ix + 0.5) * roi_w / size / grid_w
                    if y < -1 or y > height or x < -1 or x > width:
                        continue  # outside the map: the sample counts as zero
                    yc = min(max(y, 0.0), height - 1)  # clamped onto the map
                    xc = min(max(x, 0.0), width - 1)
                    y0, x0 = int(math.floor(yc)), int(math.floor(xc))
                    y1_, x1_ = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
                    ly, lx = yc - y0, xc - x0
                    total += (
                        (1 - ly) * (1 - lx) * feat[y0, x0]
                        + (1 - ly) * lx * feat[y0, x1_]
                        + ly * (1 - lx) * feat[y1_, x0]
                        + ly * lx * feat[y1_, x1_]
                    )
            out[ph, pw] = total / max(grid_h * grid_w, 1)
    return out


def _rois(height, width, stride, rng):
    """Boxes (input pixels) of every kind on a ``height x width`` map at ``stride``."""
    h, w = height * stride, width * stride
    boxes = [
        [0.0, 0.0, w, h],  # the whole map
        [w - 3.3, h - 5.1, w, h],  # at the bottom-right corner
        [-9.5, -4.2, 11.7, 13.1],  # partly outside, top-left
        [w - 20.0, 3.0, w + 25.0, 40.0],  # partly outside on the right
        [-30.0, -30.0, -10.0, -12.0],  # wholly outside: zeros
        [10.2, 7.7, 10.5, 7.9],  # smaller than a pixel
        [15.0, 15.0, 15.0, 30.0],  # zero width: no samples, zeros
        [3.0, 1.0, w - 2.0, 9.0],  # long and thin: many samples per bin
    ]
    for _ in range(6):
        x1, y1 = rng.uniform(-8, w - 4), rng.uniform(-8, h - 4)
        boxes.append([x1, y1, x1 + rng.uniform(0.1, w / 2), y1 + rng.uniform(0.1, h / 2)])
    return np.asarray(boxes, np.float32)


@pytest.fixture(scope="module")
def roi_case():
    rng = np.random.default_rng(0)
    feats = [
        rng.standard_normal((1, 13 // s + 1, 21 // s + 1, 3)).astype(np.float32) for s in (1, 2)
    ]
    return feats, rng


@pytest.mark.parametrize("size", [7, 2])
def test_reference_roi_align_is_the_brute_force(roi_case, size):
    feats, rng = roi_case
    feat = feats[0][0]
    for stride in (4, 8):
        rois = _rois(*feat.shape[:2], stride, rng)
        got = mref.roi_align(
            torch.from_numpy(feat).permute(2, 0, 1), torch.from_numpy(rois), size, 1 / stride
        )
        for roi, out in zip(rois, got.numpy().transpose(0, 2, 3, 1)):
            np.testing.assert_allclose(out, brute_roi_align(feat, roi, size, 1 / stride), atol=1e-5)
    # a fixed sampling grid (sampling_ratio > 0) too
    rois = _rois(*feat.shape[:2], 4, rng)
    got = mref.roi_align(
        torch.from_numpy(feat).permute(2, 0, 1), torch.from_numpy(rois), size, 0.25, 2
    )
    for roi, out in zip(rois, got.numpy().transpose(0, 2, 3, 1)):
        np.testing.assert_allclose(out, brute_roi_align(feat, roi, size, 0.25, 2), atol=1e-5)


@pytest.mark.backends
@pytest.mark.parametrize("method", roi_ops.METHODS)
def test_library_roi_align_is_the_brute_force(roi_case, method):
    """Both forms on every backend, two levels, two images, invalid RoIs giving zeros."""
    feats, rng = roi_case
    feats = [np.concatenate([f, f[:, ::-1] * 2.0], axis=0) for f in feats]  # two images
    strides = (4, 8)
    rois = np.concatenate(
        [_rois(*feats[0].shape[1:3], 4, rng), _rois(*feats[1].shape[1:3], 8, rng)]
    )
    n = len(rois)
    batch_index = np.arange(n, dtype=np.int32) % 2
    levels = np.repeat(np.arange(2, dtype=np.int32), n // 2)
    valid = np.ones(n, bool)
    valid[3] = False
    got = roi_ops.roi_align(
        [keras.ops.convert_to_tensor(f) for f in feats],
        keras.ops.convert_to_tensor(rois),
        keras.ops.convert_to_tensor(batch_index),
        keras.ops.convert_to_tensor(levels),
        keras.ops.convert_to_tensor(valid),
        strides=strides,
        output_size=7,
        method=method,
    )
    got = keras.ops.convert_to_numpy(got)
    assert got.shape == (n, 7, 7, 3)
    for i in range(n):
        feat = feats[levels[i]][batch_index[i]]
        expected = brute_roi_align(feat, rois[i], 7, 1 / strides[levels[i]]) if valid[i] else 0.0
        np.testing.assert_allclose(got[i], expected, atol=1e-5, err_msg=f"roi {i}: {rois[i]}")


def test_the_chunked_form_crosses_chunks(roi_case, monkeypatch):
    """More samples than one chunk: the loop's bins are added where they belong."""
    feats, rng = roi_case
    monkeypatch.setattr(roi_ops, "CHUNK", 64)
    rois = _rois(*feats[0].shape[1:3], 4, rng)
    args = ([keras.ops.convert_to_tensor(feats[0])], rois, np.zeros(len(rois), np.int32))
    args += (np.zeros(len(rois), np.int32), np.ones(len(rois), bool))
    chunked = roi_ops.roi_align(*args, strides=(4,), output_size=7, method="chunked")
    for roi, out in zip(rois, keras.ops.convert_to_numpy(chunked)):
        np.testing.assert_allclose(out, brute_roi_align(feats[0][0], roi, 7, 0.25), atol=1e-5)


def test_roi_levels_follow_the_finest_scale():
    boxes = np.array(
        [[0, 0, 10, 10], [0, 0, 111.9, 112], [0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 2000, 900]],
        np.float32,
    )
    levels = keras.ops.convert_to_numpy(box_ops.level_of(boxes, 56, 4))
    np.testing.assert_array_equal(levels, [0, 0, 1, 2, 3])


# ---------------------------------------------------------------------------------------------
# NMS


def brute_nms(boxes, scores, threshold):
    """Greedy NMS over every pair, in float64: indices kept, best first."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept = []
    for i in order:
        a = boxes[i]
        survives = True
        for j in kept:
            b = boxes[j]
            w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = w * h
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            if union > 0 and inter / union > threshold:
                survives = False
                break
        if survives:
            kept.append(i)
    return kept


def _clustered_boxes(n, rng, size=200.0):
    """Boxes in clusters (many overlaps around any threshold), some empty."""
    centres = rng.uniform(0, size, (max(n // 8, 1), 2))
    pick = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 4, (n, 2))
    wh = rng.uniform(5, 40, (n, 2))
    boxes = np.concatenate([pick - wh / 2, pick + wh / 2], axis=1)
    empty = rng.random(n) < 0.03
    boxes[empty, 2:] = boxes[empty, :2]  # zero area
    return boxes.astype(np.float32)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_reference_nms_is_the_brute_force(threshold):
    rng = np.random.default_rng(1)
    boxes = _clustered_boxes(300, rng)
    scores = rng.permutation(300).astype(np.float32) / 300  # no ties
    keep = mref.nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold)
    assert keep.tolist() == brute_nms(boxes.astype(np.float64), scores, threshold)
    # batched_nms: groups never suppress each other
    groups = rng.integers(0, 4, 300)
    _, kept = mref.batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups), threshold
    )
    expected = []
    for g in range(4):
        members = np.flatnonzero(groups == g)
        expected += [
            members[i]
            for i in brute_nms(boxes[members].astype(np.float64), scores[members], threshold)
        ]
    assert kept.tolist() == sorted(expected, key=lambda i: -scores[i])
    limited = mref.nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold, max_keep=5)
    assert limited.tolist() == brute_nms(boxes.astype(np.float64), scores, threshold)[:5]


@pytest.mark.backends
@pytest.mark.parametrize(("n", "max_output"), [(700, 1000), (700, 40), (5, 3)])
def test_library_batched_nms_is_the_brute_force(n, max_output):
    """Several tiles (700 > 256 boxes), groups, invalid boxes, a batch whose images stop at
    different turns, and the output limit."""
    rng = np.random.default_rng(2)
    batch = 2
    boxes = np.stack([_clustered_boxes(n, rng) for _ in range(batch)])
    scores = np.stack([rng.permutation(n) for _ in range(batch)]).astype(np.float32) / n
    valid = rng.random((batch, n)) < 0.9
    valid[1, n // 3 :] = False  # the second image has fewer candidates
    groups = rng.integers(0, 5, (batch, n)).astype(np.int32)
    indices, counts = nms_ops.batched_nms(boxes, scores, valid, groups, 0.5, max_output)
    indices, counts = keras.ops.convert_to_numpy(indices), keras.ops.convert_to_numpy(counts)
    assert indices.shape == (batch, max_output)
    for b in range(batch):
        expected = []
        for g in range(5):
            members = np.flatnonzero(valid[b] & (groups[b] == g))
            found = brute_nms(boxes[b, members].astype(np.float64), scores[b, members], 0.5)
            expected += [members[i] for i in found]
        expected = sorted(expected, key=lambda i: -scores[b, i])[:max_output]
        assert counts[b] == len(expected)
        assert indices[b, : counts[b]].tolist() == expected
        assert not indices[b, counts[b] :].any()
