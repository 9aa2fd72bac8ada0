"""Mask R-CNN and Cascade Mask R-CNN on ConvNeXt-T against the plain-PyTorch reference of
mmdetection 2.x inference (``tests/references/mmdet_reference.py``, itself proved against brute
force in ``test_detection_ops.py``), on real photos of several aspect ratios: FPN outputs and
RPN proposals, then the final detections one to one (same class, IoU > 0.99, score within
1e-4) and their mask probabilities.

The weights are random but well spread (``mmdet_reference.build``), written into the release
layout by the reference's own module names and converted by the library.  The equality tests
run on every backend with the registry's procedure scaled down (short side 384, 300
proposals: the same code on fewer numbers); ``test_*_at_full_scale`` run the registry's own
settings (1333 x 800, 1000 proposals) once, on TensorFlow.  The larger backbones are proved by
their checkpoint layout and parameter count (the same detector code on wider stages).
"""

from __future__ import annotations

import dataclasses

import keras
import mmdet_reference as mref
import numpy as np
import pytest
import torch
from skimage import data as photos

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.weights import convert_detection, read

MASK = "mask_rcnn_convnext_tiny_coco"
CASCADE = "cascade_mask_rcnn_convnext_tiny_coco"
#: The registry's procedure at a small scale: short side 384, long side at most 640, 200
#: proposals, 50 detections.
SMALL = dataclasses.replace(
    registry.DetectionEval(), image_scale=(640, 384), rpn_max=200, max_detections=50
)
#: Every photo at SMALL padded to one size (as a batch would be: mmcv's collate), so that JAX
#: compiles each model once.
CANVAS = (640, 640)
#: Features and scores: float32 agreement; box corners (pixels, up to ~1333): a few float32
#: steps of the coordinate.
TOLERANCE = 1e-4
BOX_RTOL = 1e-6


def _photo(name):
    return np.ascontiguousarray(getattr(photos, name)()[..., :3])


#: Square, landscape and portrait photos.
PHOTOS = {
    "astronaut": lambda: _photo("astronaut"),  # 512 x 512
    "coffee": lambda: _photo("coffee"),  # 400 x 600
    "portrait": lambda: np.ascontiguousarray(_photo("chelsea").transpose(1, 0, 2)),  # 451 x 300
}


def _settings(eval_settings):
    """(image scale, rpn config, rcnn config) of the reference for registry settings."""
    e = eval_settings
    rpn = dict(nms_pre=e.rpn_pre_nms, max_per_img=e.rpn_max, iou_threshold=e.rpn_iou)
    rpn["min_bbox_size"] = e.rpn_min_size
    rcnn = dict(score_thr=e.score_threshold, iou_threshold=e.iou, max_per_img=e.max_detections)
    rcnn["mask_thr_binary"] = e.mask_threshold
    return e.image_scale, rpn, rcnn


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The two reference detectors and their files in the release layout."""
    folder = tmp_path_factory.mktemp("det")
    out = {}
    for name, cascade, seed in ((MASK, False, 0), (CASCADE, True, 1)):
        model = mref.build(registry.VARIANTS["tiny"], cascade, seed=seed)
        out[name] = (model, mref.save_mmdet(model, folder / f"{name}.pth"))
    return out


@pytest.fixture(scope="module")
def small_models(files):
    return {
        name: ck.load_detection_model(name, weights=path, settings=SMALL)
        for name, (_, path) in files.items()
    }


def keras_inputs(img, meta):
    """The reference's preprocessed image as the Keras model's three inputs."""
    h_scale, w_scale = float(meta["scale_factor"][1]), float(meta["scale_factor"][0])
    return [
        img.permute(0, 2, 3, 1).numpy(),
        np.array([meta["img_shape"]], np.int32),
        np.array([[h_scale, w_scale]], np.float32),
    ]


def _probe(model):
    """The model with its FPN levels and RPN proposals as extra outputs."""
    names = [f"fpn_output{i}" for i in range(4)] + ["fpn_pool4"]
    levels = [model.get_layer(n).output for n in names]
    proposals, counts = model.get_layer("rpn_proposals").output
    return keras.Model(model.inputs, {**model.output, "levels": levels, "proposals": proposals,
                                      "proposal_counts": counts})  # fmt: skip


def box_iou(a, b):
    left, top = np.maximum(a[:, None, :2], b[None, :, :2]).transpose(2, 0, 1)
    right, bottom = np.minimum(a[:, None, 2:], b[None, :, 2:]).transpose(2, 0, 1)
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 1.0)


def assert_same_detections(got, reference, settings, image=0):
    """The Keras model's detections of image ``image`` against the reference's: one to one,
    same class, IoU > 0.99, score within TOLERANCE, mask probabilities within TOLERANCE.  A
    reference detection may go unmatched only at a near-tie the two float32 computations can
    decide either way: its score within TOLERANCE of the score threshold or of the last kept
    score."""
    n = int(got["num_detections"][image])
    boxes, scores = got["boxes"][image, :n], got["scores"][image, :n]
    labels, masks = got["labels"][image, :n], got["masks"][image, :n]
    ref_boxes, ref_scores = reference["boxes"].numpy(), reference["scores"].numpy()
    ref_labels, ref_masks = reference["labels"].numpy(), reference["mask_probs"].numpy()
    assert boxes.dtype == np.float32 and scores.dtype == np.float32 and labels.dtype == np.int32
    assert len(ref_scores) > 10, "the reference found too few detections to prove anything"
    assert abs(n - len(ref_scores)) <= 2
    iou = box_iou(ref_boxes, boxes) if n else np.zeros((len(ref_scores), 0))
    free = np.ones(n, bool)
    last = ref_scores[-1] if len(ref_scores) == settings.max_detections else -1.0
    unmatched = 0
    for i in range(len(ref_scores)):
        fits = free & (labels == ref_labels[i]) & (iou[i] > 0.99)
        fits &= np.abs(scores - ref_scores[i]) <= TOLERANCE
        if not fits.any():
            borderline = min(
                abs(ref_scores[i] - settings.score_threshold), abs(ref_scores[i] - last)
            )
            assert borderline <= TOLERANCE, f"reference detection {i} has no match"
            unmatched += 1
            continue
        j = int(np.flatnonzero(fits)[np.argmax(iou[i][fits])])
        free[j] = False
        np.testing.assert_allclose(boxes[j], ref_boxes[i], rtol=BOX_RTOL, atol=TOLERANCE)
        np.testing.assert_allclose(masks[j], ref_masks[i], atol=TOLERANCE)
    assert unmatched <= 2 and free.sum() <= 2
    assert not got["masks"][image, n:].any() and (got["labels"][image, n:] == -1).all()


def run_both(torch_model, keras_model, photo, settings, probe=True, pad_to=None):
    scale, rpn, rcnn = _settings(settings)
    img, meta = mref.preprocess(photo, scale, pad_to=pad_to)
    reference = mref.simple_test(torch_model, img, meta, rpn_cfg=rpn, rcnn_cfg=rcnn, paste=False)
    model = _probe(keras_model) if probe else keras_model
    got = model.predict_on_batch(keras_inputs(img, meta))
    return got, reference


def assert_same_rpn(got, reference):
    for level, expected in zip(got["levels"], reference["fpn"]):
        expected = expected.permute(0, 2, 3, 1).numpy()
        assert level.shape == expected.shape
        np.testing.assert_allclose(level, expected, atol=TOLERANCE)
    proposals = reference["proposals"].numpy()[:, :4]
    count = int(got["proposal_counts"][0])
    assert count == len(proposals)
    # The same boxes; their order may differ where two scores tie to float32 precision.  One
    # to one, greedily in the reference's order: two levels can propose the same box (NMS runs
    # per level), so "nearest" alone may pick one box twice.
    mine = got["proposals"][0, :count]
    distance = np.abs(mine[:, None, :] - proposals[None, :, :]).max(axis=-1)
    nearest, free = np.zeros(count, int), np.ones(count, bool)
    for i in range(count):
        nearest[i] = np.argmin(np.where(free, distance[:, i], np.inf))
        free[nearest[i]] = False
    np.testing.assert_allclose(mine[nearest], proposals, rtol=BOX_RTOL, atol=TOLERANCE)
    # In the same order up to ties: a proposal found at another position has the score of the
    # reference's proposal at that position (saturated sigmoids tie in float32).
    scores = reference["proposals"].numpy()[:, 4]
    moved = nearest != np.arange(count)
    assert moved.mean() < 0.25
    np.testing.assert_allclose(scores[nearest[moved]], scores[moved], atol=TOLERANCE)


#: The (detector, photo) pairs proved on each backend at the small settings (CI time).  On
#: TensorFlow the full-scale proofs below cover the landscape photo (Mask R-CNN) and the square
#: one (the cascade), so the small settings add the portrait photo alone.
PROVED_ON = {
    "tensorflow": {(MASK, "portrait")},
    "jax": {(MASK, "portrait"), (CASCADE, "portrait")},
    "torch": {(MASK, "portrait")},
}


@pytest.mark.equality
@pytest.mark.parametrize("photo", ["astronaut", "portrait"])
@pytest.mark.parametrize("name", [MASK, CASCADE])
def test_detections_match_the_reference(files, small_models, name, photo):
    if (name, photo) not in PROVED_ON[keras.backend.backend()]:
        pytest.skip("proved on another backend or at full scale (CI time)")
    photo = PHOTOS[photo]()
    got, reference = run_both(files[name][0], small_models[name], photo, SMALL, pad_to=CANVAS)
    assert_same_rpn(got, reference)
    assert_same_detections(got, reference, SMALL)


def test_mask_rcnn_at_full_scale(files):
    """The registry's own settings: 1333 x 800, 1000 proposals, 100 detections."""
    model = ck.load_model(MASK, weights=files[MASK][1])
    settings = registry.CHECKPOINTS[MASK].detection.eval
    got, reference = run_both(files[MASK][0], model, PHOTOS["coffee"](), settings)
    # 400 x 600 -> 800 x 1200, padded to 800 x 1216; P2 has stride 4
    assert got["levels"][0].shape[1:3] == (200, 304)
    assert_same_rpn(got, reference)
    assert_same_detections(got, reference, settings)


@pytest.mark.slow
def test_cascade_at_full_scale(files):
    model = ck.load_model(CASCADE, weights=files[CASCADE][1])
    settings = registry.CHECKPOINTS[CASCADE].detection.eval
    got, reference = run_both(files[CASCADE][0], model, PHOTOS["astronaut"](), settings)
    assert_same_rpn(got, reference)
    assert_same_detections(got, reference, settings)


def test_a_batch_of_two_sizes_is_padded_as_the_original(files, small_models):
    """Two photos in one batch, padded to the larger (mmcv's collate): each as the reference
    computes it at that padded size."""
    torch_model, model = files[MASK][0], small_models[MASK]
    scale, rpn, rcnn = _settings(SMALL)
    images = [PHOTOS["coffee"](), PHOTOS["portrait"]()]
    sizes = [mref.preprocess(p, scale)[0].shape[2:] for p in images]
    pad = tuple(max(s[i] for s in sizes) for i in (0, 1))
    inputs, references = [], []
    for photo in images:
        img, meta = mref.preprocess(photo, scale, pad_to=pad)
        inputs.append(keras_inputs(img, meta))
        references.append(
            mref.simple_test(torch_model, img, meta, rpn_cfg=rpn, rcnn_cfg=rcnn, paste=False)
        )
    batch = [np.concatenate(parts) for parts in zip(*inputs)]
    got = model.predict_on_batch(batch)
    for i, reference in enumerate(references):
        assert_same_detections(got, reference, SMALL, image=i)


def test_a_changed_tensor_is_caught(files, tmp_path):
    """The comparison can fail: the reference file with its mask logits' bias moved by 0.01
    loads, and its masks no longer match the reference's (by up to 0.0025)."""
    torch_model, path = files[MASK]
    state = torch.load(path, weights_only=False)
    state["state_dict"]["roi_head.mask_head.conv_logits.bias"] += 0.01
    changed = tmp_path / "changed.pth"
    torch.save(state, changed)
    model = ck.load_detection_model(MASK, weights=changed, settings=SMALL)
    photo = PHOTOS["coffee"]()
    got, reference = run_both(torch_model, model, photo, SMALL, probe=False, pad_to=CANVAS)
    with pytest.raises(AssertionError):
        assert_same_detections(got, reference, SMALL)


@pytest.mark.backends
def test_mixed_precision_keeps_boxes_and_scores_float32(files):
    if keras.backend.backend() == "jax":
        pytest.skip("TensorFlow and PyTorch prove the float32 outputs; JAX compiles it again")
    tiny = dataclasses.replace(SMALL, image_scale=(192, 128), rpn_max=50, max_detections=10)
    model = ck.load_detection_model(MASK, weights=files[MASK][1], settings=tiny, precision="bf16")
    assert model.get_layer("stage0_block0_pwconv1").compute_dtype == "bfloat16"
    assert keras.config.dtype_policy().name == "float32"
    scale, rpn, rcnn = _settings(tiny)
    img, meta = mref.preprocess(PHOTOS["astronaut"](), scale)
    got = model.predict_on_batch(keras_inputs(img, meta))
    for key in ("boxes", "scores", "masks"):
        assert got[key].dtype == np.float32 and np.isfinite(got[key]).all()
    reference = mref.simple_test(files[MASK][0], img, meta, rpn_cfg=rpn, rcnn_cfg=rcnn, paste=False)
    # bfloat16 keeps 8 bits: the best detection is found again, roughly
    best = reference["boxes"].numpy()[:1]
    n = int(got["num_detections"][0])
    assert n >= 5 and box_iou(best, got["boxes"][0, :n]).max() > 0.8


# ---------------------------------------------------------------------------------------------
# The larger backbones: the checkpoint layout and the parameter count


@pytest.mark.parametrize("name", registry.families("mask_rcnn_convnext"))
def test_layout_and_parameters_equal_the_reference(name):
    row = registry.CHECKPOINTS[name]
    head = row.detection.head
    with torch.device("meta"):  # shapes only: XL has 407M parameters
        model = mref.Detector(row.spec.depths, row.spec.dims, head.method == "cascade_mask_rcnn")
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert convert_detection.expected_shapes(row.variant, head, 80) == state
    assert ck.api.count_detection_params(row.variant, head, 80) == mref.count_params(model)


#: facebookresearch/ConvNeXt object_detection/README.md, written again by hand: name -> (file,
#: method, box mAP, mask mAP, #params in millions).
README = {
    MASK: ("mask_rcnn_convnext_tiny_1k_3x.pth", "mask_rcnn", 46.2, 41.7, 48),
    CASCADE: ("cascade_mask_rcnn_convnext_tiny_1k_3x.pth", "cascade_mask_rcnn", 50.4, 43.7, 86),
    "cascade_mask_rcnn_convnext_small_coco": (
        "cascade_mask_rcnn_convnext_small_1k_3x.pth", "cascade_mask_rcnn", 51.9, 45.0, 108,
    ),
    "cascade_mask_rcnn_convnext_base_coco": (
        "cascade_mask_rcnn_convnext_base_1k_3x.pth", "cascade_mask_rcnn", 52.7, 45.6, 146,
    ),
    "cascade_mask_rcnn_convnext_base_in22k_coco": (
        "cascade_mask_rcnn_convnext_base_22k_3x.pth", "cascade_mask_rcnn", 54.0, 46.9, 146,
    ),
    "cascade_mask_rcnn_convnext_large_in22k_coco": (
        "cascade_mask_rcnn_convnext_large_22k_3x.pth", "cascade_mask_rcnn", 54.8, 47.6, 255,
    ),
    "cascade_mask_rcnn_convnext_xlarge_in22k_coco": (
        "cascade_mask_rcnn_convnext_xlarge_22k_3x.pth", "cascade_mask_rcnn", 55.2, 47.7, 407,
    ),
}  # fmt: skip


def test_rows_match_the_original_readme_and_configs():
    assert registry.families("mask_rcnn_convnext") == list(README)
    for name, (file, method, box_ap, mask_ap, millions) in README.items():
        row = registry.CHECKPOINTS[name]
        det = row.detection
        assert row.url == f"https://dl.fbaipublicfiles.com/convnext/coco/{file}"
        assert (row.num_classes, row.licence, row.task) == (80, "MIT", "detection")
        assert (det.head.method, det.reported_box_ap, det.reported_mask_ap) == (
            method,
            box_ap,
            mask_ap,
        )
        assert registry.resolve(file.removesuffix(".pth")).name == name
        # coco_instance.py's test pipeline and the base configs' test_cfg
        assert (det.eval.image_scale, det.eval.size_divisor) == ((1333, 800), 32)
        assert (det.eval.rpn_pre_nms, det.eval.rpn_max, det.eval.rpn_iou) == (1000, 1000, 0.7)
        assert (det.eval.score_threshold, det.eval.iou, det.eval.max_detections) == (0.05, 0.5, 100)
        assert det.eval.mask_threshold == 0.5
        stds = [b.target_stds for b in det.head.box_heads]
        if method == "mask_rcnn":
            assert stds == [(0.1, 0.1, 0.2, 0.2)] and det.head.box_heads[0].num_fcs == 2
        else:  # the configs' giou_4conv1f heads
            assert stds == [
                (0.1, 0.1, 0.2, 0.2),
                (0.05, 0.05, 0.1, 0.1),
                (0.033, 0.033, 0.067, 0.067),
            ]
            assert all(
                (b.num_convs, b.num_fcs, b.conv_norm) == (4, 1, True) for b in det.head.box_heads
            )
        # The README counts PyTorch parameters (BatchNorm statistics are buffers there).
        count = ck.api.count_detection_params(row.variant, det.head, 80)
        running = sum(2 * b.conv_channels * b.num_convs for b in det.head.box_heads if b.conv_norm)
        assert round((count - running) / 1e6) == millions, name
    with pytest.raises(ck.UnknownModelError, match="object-detection model .* no '_fe'"):
        registry.resolve(f"{MASK}_fe")
    assert f"{MASK}_fe" not in registry.model_names()


def test_the_model_count_equals_the_arithmetic(small_models):
    for name, model in small_models.items():
        row = registry.CHECKPOINTS[name]
        assert model.count_params() == ck.api.count_detection_params("tiny", row.detection.head, 80)
        assert model.name == name


def test_the_full_conversion_of_a_larger_backbone(tmp_path):
    """ConvNeXt-S's cascade (27 blocks in stage 3): every tensor of the file lands on the
    Keras model."""
    torch_model = mref.build(registry.VARIANTS["small"], True, seed=3)
    path = mref.save_mmdet(torch_model, tmp_path / "s.pth")
    del torch_model
    model = ck.load_model("cascade_mask_rcnn_convnext_small_1k_3x", weights=path)
    state = read.read_state_dict(path)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.get_layer("box2_bn3").moving_variance),
        state["roi_head.bbox_head.2.shared_convs.3.bn.running_var"],
    )
    head = registry.CHECKPOINTS["cascade_mask_rcnn_convnext_small_coco"].detection.head
    assert model.count_params() == ck.api.count_detection_params("small", head, 80)
