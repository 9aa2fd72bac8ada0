"""Semantic segmentation: UperNet-ConvNeXt against transformers' UperNet (PyTorch), the
official test-time procedure against a PyTorch re-statement of mmsegmentation's, the mmseg
checkpoint layout, mIoU, the commands and the exports.

The models are built once per module.  The full-size proofs are the equality tests (tiny at
512, base at 640); the procedure and the commands run on the same network with the
registry's settings scaled down (crop 64), which exercises the same code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import upernet_reference as uref
from click.testing import CliRunner
from PIL import Image

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.cli import _checks as cli_checks
from convnext_keras.cli import main
from convnext_keras.data import ade20k
from convnext_keras.engines import graph_files
from convnext_keras.engines import upernet_graph as upernet_onnx
from convnext_keras.tasks import segment
from convnext_keras.tasks import segment_eval as seg_eval
from convnext_keras.weights import convert, layouts, read

TOLERANCE = 1e-4
TINY = "upernet_convnext_tiny_ade20k_512"
PHOTOS = sorted((Path(__file__).parents[2] / "examples" / "images").glob("*.jpg"))
#: The registry's procedure at a small scale: short side 64, windows of 64 every 43 pixels.
SMALL = registry.SegmentationEval(image_scale=(256, 64), crop=64, stride=43)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """transformers' UperNet-ConvNeXt-T (150 classes) and its file in the official layout."""
    torch_model = uref.hf_upernet(registry.VARIANTS["tiny"], seed=0)
    path = uref.save_mmseg(torch_model, tmp_path_factory.mktemp("seg") / "upernet_tiny.pth")
    return torch_model, path


@pytest.fixture(scope="module")
def keras_tiny(tiny):
    return ck.load_model(TINY, weights=tiny[1])


@pytest.fixture
def small_settings(monkeypatch):
    """Every segmentation row with the SMALL test settings (the commands read the registry)."""
    for name in registry.families("upernet_convnext"):
        row = registry.CHECKPOINTS[name]
        small = dataclasses.replace(row.segmentation, eval=SMALL)
        monkeypatch.setitem(
            registry.CHECKPOINTS, name, dataclasses.replace(row, segmentation=small)
        )


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------------------------
# The network against transformers' UperNet


@pytest.mark.equality
def test_tiny_matches_pytorch_at_512(tiny, keras_tiny):
    images = np.random.default_rng(0).standard_normal((1, 512, 512, 3)).astype(np.float32)
    expected = uref.logits(tiny[0], images)
    got = keras_tiny.predict_on_batch(images)
    assert got.shape == (1, 512, 512, 150) and got.dtype == np.float32
    assert _max_diff(got, expected) <= TOLERANCE
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.equality
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="TensorFlow proves base at 640; on JAX and PyTorch tiny at 512 proves the same code "
    "(CI time)",
)
def test_base_matches_pytorch_at_640(tmp_path):
    spec = registry.VARIANTS["base"]
    torch_model = uref.hf_upernet(spec, seed=1)
    path = uref.save_mmseg(torch_model, tmp_path / "upernet_base.pth")
    images = np.random.default_rng(1).standard_normal((1, 640, 640, 3)).astype(np.float32)
    expected = uref.logits(torch_model, images)
    del torch_model
    model = ck.load_model("upernet_convnext_base_22k_640x640", weights=path)  # the file's name
    assert model.name == "upernet_convnext_base_ade20k_640"
    assert model.count_params() == ck.api.count_segmentation_params(
        spec, registry.UperNetHead(), 150
    )
    got = model.predict_on_batch(images)
    assert _max_diff(got, expected) <= TOLERANCE
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))


def test_odd_sizes_and_the_graph_engines_match(tiny, keras_tiny):
    """Sizes that are no multiple of 32 (every resize is then non-integer), and the graph
    engines (onnxruntime and OpenVINO: one static-size graph per window size, any batch),
    against transformers."""
    images = np.random.default_rng(2).standard_normal((2, 77, 130, 3)).astype(np.float32)
    expected = uref.logits(tiny[0], images)
    assert _max_diff(keras_tiny.predict_on_batch(images), expected) <= TOLERANCE
    for name in ("onnxruntime", "openvino"):
        runner, engine = upernet_onnx.inference_function(keras_tiny, name)
        assert engine == name and isinstance(runner, upernet_onnx.SegmentationRunner)
        assert _max_diff(runner(images), expected) <= TOLERANCE, name
        assert _max_diff(runner(images[:1]), expected[:1]) <= TOLERANCE, name  # another batch
        assert list(runner._runners) == [(77, 130)]
    assert upernet_onnx.inference_function(keras_tiny)[1] == graph_files.cpu_graph_engine(
        segmentation=True
    )


@pytest.mark.backends
def test_mixed_precision_gives_float32_logits(tiny):
    model = ck.load_model(TINY, weights=tiny[1], precision="bf16")
    images = np.random.default_rng(3).standard_normal((1, 64, 96, 3)).astype(np.float32)
    logits = model.predict_on_batch(images)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    # bfloat16 keeps 8 bits of mantissa: close to float32's logits, not equal
    assert _max_diff(logits, uref.logits(tiny[0], images)) < 0.5
    assert model.get_layer("stage0_block0_pwconv1").compute_dtype == "bfloat16"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left as it was


# ---------------------------------------------------------------------------------------------
# The test-time procedure, restated with PyTorch on the transformers model


def _padded_logits(torch_model, image, minimum=32):
    """The model's logits of a normalised image, as mmseg 1.x's ``SegDataPreProcessor`` runs
    one smaller than the network takes: zeros appended below and to the right up to
    ``minimum``, the logits cut back to the image."""
    _, _, height, width = image.shape
    padded = F.pad(image, (0, max(minimum - width, 0), 0, max(minimum - height, 0)))
    return torch_model(pixel_values=padded).logits[:, :, :height, :width]


def _reference_logits(torch_model, image, mode, settings):
    """mmseg ``EncoderDecoder.whole_inference`` / ``slide_inference`` (before the rescale)."""
    if mode == "whole":
        return _padded_logits(torch_model, image)
    _, _, height, width = image.shape
    crop, stride = settings.crop, settings.stride
    preds = torch.zeros((1, 150, height, width))
    count = torch.zeros((1, 1, height, width))
    for row in range(max(height - crop + stride - 1, 0) // stride + 1):
        for col in range(max(width - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(row * stride + crop, height), min(col * stride + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            window = _padded_logits(torch_model, image[:, :, y1:y2, x1:x2])
            preds += F.pad(window, (x1, width - x2, y1, height - y2))
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def torch_resize(photo, height, width):
    """mmcv's ``imrescale`` (``cv2.INTER_LINEAR``: half-pixel centres, no antialiasing) as
    ``F.interpolate``, rounded to uint8."""
    image = torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].float()
    image = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)
    return torch.floor(image + 0.5).clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.uint8)


def library_resize(photo, height, width):
    """The library's resize, for the exact comparisons: float rounding lets a pixel of the
    resized photo land one level apart from torch's (tested below), which can flip a
    near-tie of a random network's scores."""
    resized = segment.resize_bilinear(photo, height, width)
    return np.clip(np.floor(resized + 0.5), 0, 255).astype(np.uint8)


def reference_mask(torch_model, photo, settings, multi_scale=False, resize=torch_resize):
    """mmseg's test pipeline and inference (Resize keep_ratio -> Normalize -> slide/whole ->
    resize to the photo -> softmax -> flip back -> mean over views -> argmax), in torch:
    ``(label map, gap between the two best mean probabilities per pixel)``."""
    height, width = photo.shape[:2]
    views = [(1.0, False)]
    mode = settings.mode
    if multi_scale:
        views = [(r, flip) for r in settings.multi_scale_ratios for flip in (False, True)]
        mode = settings.multi_scale_mode
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    total = 0
    with torch.no_grad():
        for ratio, flip in views:
            long_side, short_side = (int(s * ratio) for s in settings.image_scale)
            factor = min(long_side / max(height, width), short_side / min(height, width))
            size = (int(height * factor + 0.5), int(width * factor + 0.5))
            image = resize(photo, *size) if size != (height, width) else photo
            image = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
            if flip:
                image = image.flip(3)
            logits = _reference_logits(torch_model, (image - mean) / std, mode, settings)
            logits = F.interpolate(
                logits, size=(height, width), mode="bilinear", align_corners=False
            )
            probs = F.softmax(logits, dim=1)
            total = total + (probs.flip(3) if flip else probs)
    scores = total[0].numpy()
    top2 = np.sort(scores, axis=0)[-2:]
    return scores.argmax(0).astype(np.uint8), (top2[1] - top2[0]) / len(views)


#: Pixels whose two best classes differ by less than this (averaged probability) are near-ties
#: of a random network: float rounding may pick either between two frameworks.
NEAR_TIE = 1e-5


def assert_same_labels(got, reference):
    """Equal label maps, but for near-ties of the reference (at most 0.01 % of the pixels)."""
    mask, gap = reference
    differ = got != mask
    assert np.all(gap[differ] < NEAR_TIE), f"{differ.sum()} pixels differ beyond near-ties"
    assert differ.mean() <= 1e-4


def _photo(path, size=None):
    image = Image.open(path).convert("RGB")
    return np.asarray(image if size is None else image.resize(size, Image.BILINEAR))


def test_the_photo_resize_is_cv2_linear():
    """The keep-ratio resize against ``F.interpolate`` (the geometry of ``cv2.INTER_LINEAR``):
    equal in float, and after rounding to uint8 at most one level apart on a few pixels."""
    photo = _photo(PHOTOS[1])
    for height, width in [(64, 96), (512, 770), (300, 451), (37, 500)]:
        expected = F.interpolate(
            torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].float(),
            size=(height, width),
            mode="bilinear",
            align_corners=False,
        )[0].permute(1, 2, 0)
        assert _max_diff(segment.resize_bilinear(photo, height, width), expected) < 2e-3
        rounded = library_resize(photo, height, width).astype(int) - torch_resize(
            photo, height, width
        )
        assert np.abs(rounded).max() <= 1 and np.mean(rounded != 0) < 1e-3


def test_slide_windows_follow_mmseg():
    assert segment.windows(64, 64, 64, 43) == [(0, 64, 0, 64)]
    assert segment.windows(40, 50, 64, 43) == [(0, 40, 0, 50)]  # smaller than a window
    assert segment.windows(64, 150, 64, 43) == [(0, 64, 0, 64), (0, 64, 43, 107), (0, 64, 86, 150)]
    assert segment.rescale_size(451, 300, (2048, 512)) == (770, 512)
    assert segment.rescale_size(3000, 500, (2048, 512)) == (2048, 341)  # the long-side limit
    assert segment.rescale_size(451, 300, (2048, 512), 0.75) == (577, 384)


@pytest.mark.parametrize(
    ("mode", "multi_scale"), [("slide", False), (None, True)], ids=["slide", "multi-scale-whole"]
)
def test_label_maps_match_the_reference_procedure(tiny, keras_tiny, mode, multi_scale):
    settings = dataclasses.replace(SMALL, multi_scale_ratios=(0.75, 1.25))
    photo = _photo(PHOTOS[1])  # 451 x 300: two windows across at the small scale
    expected_mode = mode or settings.multi_scale_mode
    reference = reference_mask(
        tiny[0],
        photo,
        dataclasses.replace(settings, mode=expected_mode),
        multi_scale,
        library_resize,
    )
    got = segment.label_map(
        keras_tiny.predict_on_batch, photo, settings, mode=mode, multi_scale=multi_scale
    )
    assert got.shape == photo.shape[:2] and got.dtype == np.uint8
    assert_same_labels(got, reference)


def test_thin_photos_are_padded_at_every_scale_as_the_reference(tiny, keras_tiny):
    """A 3x100 strip under multi-scale + flip: whole images 1-2 pixels wide at every scale,
    each padded with zeros (the mean colour) to the network's 32 pixels and its logits cut
    back, as the PyTorch reference does; a label map of the photo's size, no error.  (Sliding
    windows of a 450x4 strip: ``test_eval_seg_command_gives_the_reference_miou``.)"""
    settings = dataclasses.replace(SMALL, multi_scale_ratios=(0.5, 1.25))
    photo = np.ascontiguousarray(_photo(PHOTOS[1])[:100, 200:203])
    mode = settings.multi_scale_mode
    reference = reference_mask(
        tiny[0], photo, dataclasses.replace(settings, mode=mode), True, library_resize
    )
    got = segment.label_map(keras_tiny.predict_on_batch, photo, settings, multi_scale=True)
    assert got.shape == photo.shape[:2]
    assert_same_labels(got, reference)


def test_slide_logits_match_the_reference_windows(tiny, keras_tiny):
    image = np.random.default_rng(4).standard_normal((70, 150, 3)).astype(np.float32)
    with torch.no_grad():
        expected = _reference_logits(
            tiny[0], torch.from_numpy(image.transpose(2, 0, 1)[None].copy()), "slide", SMALL
        )
    got = segment.slide_logits(keras_tiny.predict_on_batch, image, SMALL.crop, SMALL.stride, 2)
    assert _max_diff(got, expected.numpy()[0].transpose(1, 2, 0)) <= TOLERANCE


# ---------------------------------------------------------------------------------------------
# The mmsegmentation layout, the training-only head, the pickled meta


def test_every_official_layout_tensor_is_used_or_named(tiny, caplog):
    state = read.read_state_dict(tiny[1])
    assert layouts.is_mmseg_layout(state)
    with caplog.at_level(logging.INFO, logger="convnext_keras"):
        weights = convert.convert_mmseg_state_dict(state, "tiny", num_classes=150)
    dropped = sorted(k for k in state if k.startswith("auxiliary_head."))
    assert len(dropped) == 8  # conv, 5 BatchNorm tensors, classifier weight and bias
    assert f"({len(dropped)} tensors: {', '.join(dropped)})" in caplog.text
    assert "stage3_output_norm" in weights and "decode_conv_seg" in weights
    assert "head_norm" not in weights

    broken = dict(state)
    del broken["decode_head.fpn_convs.1.bn.running_var"]
    broken["decode_head.extra.weight"] = np.zeros(3, np.float32)
    broken["decode_head.bottleneck.conv.weight"] = np.zeros((512, 10, 3, 3), np.float32)
    with pytest.raises(ck.CheckpointError) as info:
        convert.convert_mmseg_state_dict(broken, "tiny")
    text = str(info.value)
    assert "missing: decode_head.fpn_convs.1.bn.running_var" in text
    assert "unexpected: decode_head.extra.weight" in text
    assert "decode_head.bottleneck.conv.weight: checkpoint (512, 10, 3, 3)" in text

    with pytest.raises(ck.CheckpointError, match="use upernet_convnext_tiny_ade20k_512"):
        convert.convert_mmseg_state_dict(state, "base")
    nan = dict(state)
    nan["decode_head.conv_seg.bias"] = np.full(150, np.nan, np.float32)
    with pytest.raises(ck.CheckpointError, match="NaN"):
        convert.convert_mmseg_state_dict(nan, "tiny")


def test_a_classification_file_for_a_segmentation_name_is_refused(tiny_reference):
    with pytest.raises(ck.CheckpointError, match="Not an mmsegmentation segmentation checkpoint"):
        ck.load_model(TINY, weights=tiny_reference[1])


class _Run:
    """Unpickling this object would run ``python -c`` touching a marker file (no os module)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, ([sys.executable, "-c", f"open({str(self.marker)!r}, 'w')"],))


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_pickled_meta_is_skipped_safely(tmp_path, caplog):
    state = {"backbone.norm0.weight": torch.ones(3), "decode_head.conv_seg.bias": torch.zeros(2)}
    clean = tmp_path / "clean.pth"
    torch.save({"meta": uref.training_meta(), "state_dict": state}, clean)
    assert sorted(read.read_state_dict(clean)) == sorted(state)

    marker = tmp_path / "ran"
    evil = tmp_path / "evil_meta.pth"
    torch.save({"meta": {"config": _Run(marker), "seed": 0}, "state_dict": state}, evil)
    with caplog.at_level(logging.WARNING, logger="convnext_keras.weights.read"):
        loaded = read.read_state_dict(evil)
    assert sorted(loaded) == sorted(state) and not marker.exists()
    assert ".call)" in caplog.text and "skipped without running anything" in caplog.text

    for name, obj in {
        "os_in_meta.pth": {"meta": {"x": _System(marker)}, "state_dict": state},
        "outside_meta.pth": {"meta": {}, "state_dict": state, "optimizer": _Run(marker)},
        "in_state.pth": {"state_dict": {**state, "backbone.x": _Run(marker)}},
    }.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ck.UnsafeCheckpointError, match="Refused to load"):
            read.read_state_dict(tmp_path / name)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Registry rows, parameter counts, names


#: facebookresearch/ConvNeXt semantic_segmentation/README.md, written again by hand:
#: name -> (file, crop, mIoU, mIoU ms+flip, #params in millions (the auxiliary head included)).
README = {
    "upernet_convnext_tiny_ade20k_512": (
        "upernet_convnext_tiny_1k_512x512.pth",
        512,
        46.0,
        46.7,
        60,
    ),
    "upernet_convnext_small_ade20k_512": (
        "upernet_convnext_small_1k_512x512.pth",
        512,
        48.7,
        49.6,
        82,
    ),
    "upernet_convnext_base_ade20k_512": (
        "upernet_convnext_base_1k_512x512.pth",
        512,
        49.1,
        49.9,
        122,
    ),
    "upernet_convnext_base_ade20k_640": (
        "upernet_convnext_base_22k_640x640.pth",
        640,
        52.6,
        53.1,
        122,
    ),
    "upernet_convnext_large_ade20k_640": (
        "upernet_convnext_large_22k_640x640.pth",
        640,
        53.2,
        53.7,
        235,
    ),
    "upernet_convnext_xlarge_ade20k_640": (
        "upernet_convnext_xlarge_22k_640x640.pth",
        640,
        53.6,
        54.0,
        391,
    ),
}


def test_rows_match_the_original_readme_and_configs():
    assert registry.families("upernet_convnext") == list(README)
    for name, (file, crop, miou, miou_ms, millions) in README.items():
        row = registry.CHECKPOINTS[name]
        seg = row.segmentation
        assert row.url == f"https://dl.fbaipublicfiles.com/convnext/ade20k/{file}"
        assert (row.resolution, row.num_classes, row.licence) == (crop, 150, "MIT")
        assert (seg.reported_miou, seg.reported_miou_ms) == (miou, miou_ms)
        # configs/convnext/*_ss.py test_cfg and the ade20k(_640x640).py test pipeline
        assert (seg.eval.mode, seg.eval.crop, seg.eval.stride) == (
            "slide",
            crop,
            {512: 341, 640: 426}[crop],
        )
        assert seg.eval.image_scale == (4 * crop, crop) and seg.eval.multi_scale_mode == "whole"
        assert seg.eval.multi_scale_ratios == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
        assert (seg.head.channels, seg.head.pool_scales) == (512, (1, 2, 3, 6))
        assert registry.resolve(file.removesuffix(".pth")).name == name
        # The README counts PyTorch parameters: the auxiliary FCN head (3x3 conv of stage 3 to
        # 256 + BatchNorm + classifier) in, BatchNorm's running statistics out.
        spec = row.spec
        keras_count = ck.api.count_segmentation_params(spec, seg.head, 150)
        auxiliary = spec.dims[2] * 256 * 9 + 2 * 256 + 256 * 150 + 150
        running = 2 * 512 * (len(seg.head.pool_scales) + 1 + 2 * 3 + 1)
        assert round((keras_count + auxiliary - running) / 1e6) == millions, name
    with pytest.raises(ck.UnknownModelError, match="no '_fe' feature-extractor twin"):
        registry.resolve("upernet_convnext_tiny_ade20k_512_fe")
    assert "upernet_convnext_tiny_ade20k_512_fe" not in registry.model_names()


def test_the_model_count_equals_the_arithmetic(keras_tiny):
    head = registry.UperNetHead()
    assert keras_tiny.count_params() == ck.api.count_segmentation_params("tiny", head, 150)
    assert keras_tiny.name == TINY and keras_tiny.get_layer("stage2_output_norm")


def test_wrong_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="features= and num_classes= are for classification"):
        ck.load_model(TINY, weights=None, features="pooled")
    with pytest.raises(ValueError, match="not a segmentation model"):
        segment.segment_files("convnext_tiny_1k_224", [], weights=None)
    with pytest.raises(ValueError, match="mode must be one of"):
        segment.segment_files(TINY, [], weights=None, mode="tiled")
    with pytest.raises(ValueError, match="engine must be one of"):
        segment.segment_files(TINY, [], weights=None, engine="tpu")
    with pytest.raises(ValueError, match="semantic-segmentation model: label images with"):
        ck.predict_files(TINY, [], weights=None)
    with pytest.raises(ValueError, match="stage_norms=True needs head='pyramid'"):
        ck.build_model("atto", stage_norms=True)


# ---------------------------------------------------------------------------------------------
# mIoU


def _brute_force(predictions, labels, classes, ignore=255):
    intersect, union, labelled = np.zeros(classes), np.zeros(classes), np.zeros(classes)
    for pred, label in zip(predictions, labels):
        for c in range(classes):
            scored = label != ignore
            p, t = (pred == c) & scored, (label == c) & scored
            intersect[c] += np.sum(p & t)
            union[c] += np.sum(p | t)
            labelled[c] += np.sum(t)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = intersect / union, intersect / labelled
    return iou, acc, intersect.sum() / labelled.sum()


def test_iou_accumulation_equals_a_brute_force_count():
    rng = np.random.default_rng(5)
    classes = 6
    predictions, labels = [], []
    for shape in [(7, 9), (5, 4), (11, 3)]:
        predictions.append(rng.integers(0, classes - 1, shape))  # class 5 is never predicted
        label = rng.integers(0, classes - 2, shape)  # classes 4, 5 never labelled
        label[rng.random(shape) < 0.2] = 255
        labels.append(label)
    counts = seg_eval.IoUAccumulator(classes)
    for p, t in zip(predictions, labels):
        counts.update(p, t)
    metrics = counts.metrics()
    iou, acc, aacc = _brute_force(predictions, labels, classes)
    np.testing.assert_allclose(metrics["iou"], iou)  # NaN where a class is nowhere
    np.testing.assert_allclose(metrics["acc"], acc)
    assert np.isnan(metrics["iou"][5]) and metrics["iou"][4] == 0  # predicted, never labelled
    assert metrics["miou"] == pytest.approx(100 * np.nanmean(iou))
    assert metrics["macc"] == pytest.approx(100 * np.nanmean(acc))
    assert metrics["aacc"] == pytest.approx(100 * aacc)
    with pytest.raises(ValueError, match="differ in shape"):
        counts.update(np.zeros((2, 2), int), np.zeros((2, 3), int))


def _mmseg_annotation(path) -> np.ndarray:
    """mmsegmentation 0.x's ``LoadAnnotations(reduce_zero_label=True)`` with its default
    pillow backend, restated: ``mmcv.imfrombytes(flag="unchanged", backend="pillow")`` is
    ``np.array(Image.open(f))``, then ``.squeeze().astype(np.uint8)``, then in uint8
    ``gt[gt == 0] = 255; gt = gt - 1; gt[gt == 254] = 255``."""
    gt = np.array(Image.open(path)).squeeze().astype(np.uint8)
    gt[gt == 0] = 255
    gt = gt - 1
    gt[gt == 254] = 255
    return gt


def test_annotations_are_read_as_mmseg_reads_them(tmp_path):
    """Every single-channel mode PIL opens (L, P, 1, I;16, I, F), values 0..255 and the 16-bit
    ones mmseg wraps: equal to mmseg's loading; 0 and 255 are both ignored (255 is not class
    254), 254 is class 253 (outside ADE20K's 150: scored, in no class)."""
    values = np.array([[0, 1, 2, 150], [151, 253, 254, 255]], np.uint8)
    palette = Image.new("P", values.shape[::-1])  # a palette annotation: indices are ids
    palette.putdata(values.ravel().tolist())
    images = {
        "L": Image.fromarray(values),
        "P": palette,
        "1": Image.fromarray(values > 127),
        "I;16": Image.fromarray(values.astype(np.uint16) + np.uint16(256 * 3)),
        "I": Image.fromarray(values.astype(np.int32)),
        "F": Image.fromarray(values.astype(np.float32)),
    }
    for mode, image in images.items():
        assert image.mode == mode
        path = tmp_path / f"{mode.replace(';', '_')}.{'png' if mode in ('L', 'P', '1') else 'tif'}"
        image.save(path)
        assert Image.open(path).mode == mode
        got = ade20k.read_annotation(path)
        np.testing.assert_array_equal(got, _mmseg_annotation(path), err_msg=mode)
        assert got.dtype == np.int64
    np.testing.assert_array_equal(
        ade20k.read_annotation(tmp_path / "L.png"), [[255, 0, 1, 149], [150, 252, 253, 255]]
    )
    Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="single-channel label image .* RGB"):
        ade20k.read_annotation(tmp_path / "rgb.png")
    Image.fromarray(np.full((2, 2), 1.5, np.float32)).save(tmp_path / "half.tif")
    with pytest.raises(ValueError, match="whole class ids 0..255"):
        ade20k.read_annotation(tmp_path / "half.tif")
    assert len(ade20k.classes()) == 150 and ade20k.classes()[:3] == ("wall", "building", "sky")
    assert ade20k.palette().shape == (150, 3) and tuple(ade20k.palette()[2]) == (6, 230, 230)


def _mmseg_intersect_and_union(pred, label, num_classes, ignore_index=255):
    """mmseg 0.x ``mmseg/core/evaluation/metrics.py`` ``intersect_and_union``, restated with
    torch as it is written there (``torch.histc`` over ``[0, num_classes - 1]``)."""
    pred, label = torch.from_numpy(np.asarray(pred)), torch.from_numpy(np.asarray(label))
    mask = label != ignore_index
    pred, label = pred[mask], label[mask]
    intersect = pred[pred == label]
    hist = functools.partial(torch.histc, bins=num_classes, min=0, max=num_classes - 1)
    area_intersect = hist(intersect.float())
    area_pred, area_label = hist(pred.float()), hist(label.float())
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def test_miou_equals_mmseg_on_annotations_with_0_and_255(tmp_path):
    """Annotations holding 0, 255 and 254 read and scored as mmseg does (its loading, then
    ``intersect_and_union`` summed over the set, ``mean_iou``'s nanmean): equal counts and
    mIoU.  A 10-pixel band of 255 in otherwise perfect annotations leaves mIoU at 100 (it was
    86.51 when 255 was read as class 254)."""
    rng = np.random.default_rng(7)
    classes, totals, counts = 150, None, seg_eval.IoUAccumulator(150)
    for i, shape in enumerate([(12, 20), (9, 31), (16, 16)]):
        stored = rng.integers(0, 256, shape).astype(np.uint8)
        stored[:, :3] = rng.choice([0, 254, 255], (shape[0], 3))
        path = tmp_path / f"{i}.png"
        Image.fromarray(stored).save(path)
        prediction = rng.integers(0, classes, shape)
        label = ade20k.read_annotation(path)
        counts.update(prediction, label)
        mine = _mmseg_intersect_and_union(prediction, _mmseg_annotation(path), classes)
        totals = mine if totals is None else [a + b for a, b in zip(totals, mine)]
    intersect, union, predicted, labelled = (t.numpy().astype(np.int64) for t in totals)
    np.testing.assert_array_equal(counts.intersect, intersect)
    np.testing.assert_array_equal(counts.union, union)
    np.testing.assert_array_equal(counts.labelled, labelled)
    with np.errstate(invalid="ignore", divide="ignore"):
        assert counts.metrics()["miou"] == pytest.approx(100 * np.nanmean(intersect / union))

    perfect = rng.integers(1, 151, (40, 40)).astype(np.uint8)
    banded = perfect.copy()
    banded[:, 10:20] = 255
    Image.fromarray(banded).save(tmp_path / "banded.png")
    counts = seg_eval.IoUAccumulator(classes)
    counts.update(perfect.astype(np.int64) - 1, ade20k.read_annotation(tmp_path / "banded.png"))
    assert counts.metrics()["miou"] == 100.0


def _ade_folder(root, torch_model):
    """An ADEChallengeData2016 folder of the sample photos, annotated with the reference
    model's label maps (shifted by one, as ADE20K stores them), a band marked 0 (ignored) and
    a block relabelled; returns the expected mIoU / aAcc / per-class IoU by brute force."""
    images, annotations = root / "images" / "validation", root / "annotations" / "validation"
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    predictions, labels = [], []
    for i, photo_path in enumerate(PHOTOS[:3]):
        shutil.copy(photo_path, images / f"ADE_val_{i:08d}.jpg")
    strip = np.ascontiguousarray(_photo(PHOTOS[1])[150:154, :450])  # 450x4: padded windows
    Image.fromarray(strip).save(images / "ADE_val_00000003.jpg")
    for i in range(4):
        photo = _photo(images / f"ADE_val_{i:08d}.jpg")
        prediction, gap = reference_mask(torch_model, photo, SMALL, resize=library_resize)
        label = prediction.astype(np.int64)
        label[: label.shape[0] // 4] = 255
        label[gap < NEAR_TIE] = 255  # not scored: either class is right there
        block = label[-20:, -30:]  # a view: relabels the scored pixels of a corner
        block[block != 255] = (block[block != 255] + 7) % 150
        stored = np.where(label == 255, 0, label + 1).astype(np.uint8)
        stored[:, -10:] = 255  # also ignored (mmseg: 255 stays 255, never class 254)
        label[:, -10:] = 255
        Image.fromarray(stored, mode="L").save(annotations / f"ADE_val_{i:08d}.png")
        predictions.append(prediction)
        labels.append(label)
    return _brute_force(predictions, labels, 150)


def _serve(server, monkeypatch, path):
    """The file as the official server publishes the tiny checkpoint, on the loopback."""
    row = registry.CHECKPOINTS[TINY]
    (server.root / row.source.path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, server.root / row.source.path)
    monkeypatch.setenv("CONVNEXT_BASE_URL", server.url)


def test_eval_seg_command_gives_the_reference_miou(
    tiny, tmp_path, small_settings, loopback_server, monkeypatch
):
    _serve(loopback_server, monkeypatch, tiny[1])  # --weights official: download, convert
    iou, acc, aacc = _ade_folder(tmp_path / "ADEChallengeData2016", tiny[0])
    validation = tmp_path / "ADEChallengeData2016" / "images" / "validation"
    (validation / "ADE_val_00000099.jpg").write_bytes(b"")
    (validation / "ADE_val_00000098.jpg").mkdir()  # reported, as eval reports it
    report = tmp_path / "report.json"
    args = ["eval-seg", str(tmp_path), "--model", TINY]
    result = CliRunner().invoke(main, [*args, "--report", str(report)])
    assert result.exit_code == 1, result.output  # the image without annotation, the directory
    assert "ADE_val_00000099.jpg: no annotation" in result.output
    assert "ADE_val_00000098.jpg: a directory, not an image file" in result.output
    assert f"mIoU      {100 * np.nanmean(iou):.2f}%" in result.output
    data = json.loads(report.read_text())
    assert data["evaluated"] == 4 and data["config"]["engine"] in ("onnxruntime", "keras")
    assert loopback_server.requests == ["/" + registry.CHECKPOINTS[TINY].source.path]
    assert data["miou"] == pytest.approx(100 * np.nanmean(iou), abs=1e-9)
    assert data["macc"] == pytest.approx(100 * np.nanmean(acc), abs=1e-9)
    assert data["aacc"] == pytest.approx(100 * aacc, abs=1e-9)
    for row in data["per_class"].values():
        expected = iou[row["index"]]
        assert (
            row["iou"] is None
            if np.isnan(expected)
            else row["iou"] == pytest.approx(100 * expected)
        )
    again = CliRunner().invoke(main, [*args, "--limit", "2", "--allow-unreadable"])
    assert again.exit_code == 0 and "2 evaluated" in again.output
    bad = CliRunner().invoke(
        main, ["eval-seg", str(tmp_path / "ADEChallengeData2016" / "images"), "--model", TINY]
    )
    assert bad.exit_code == 2 and "not in the ADEChallengeData2016 layout" in bad.output


def test_warm_segment_imports_no_keras_and_answers_as_the_first(
    tiny, small_settings, loopback_server, monkeypatch
):
    """``convnext segment`` by name: the first call (this process) caches the UperNet graph
    of the registry's window size; the same command in a fresh process imports no Keras, no
    backend and no onnx (the cached graph runs on ``auto``'s engine for segmentation) and
    prints the same label maps."""
    from test_graph_route import HEAVY, WARM

    _serve(loopback_server, monkeypatch, tiny[1])
    args = ["segment", *map(str, PHOTOS[:2]), "--model", TINY, "--json"]
    cold = CliRunner().invoke(main, args, catch_exceptions=False)
    assert cold.exit_code == 0, cold.output
    small = f"registry.SegmentationEval(image_scale={SMALL.image_scale}, crop={SMALL.crop}, " \
        f"stride={SMALL.stride})"  # fmt: skip
    patch = textwrap.dedent(
        f"""
        import dataclasses
        from convnext_keras import registry
        for name in registry.families("upernet_convnext"):
            row = registry.CHECKPOINTS[name]
            small = dataclasses.replace(row.segmentation, eval={small})
            registry.CHECKPOINTS[name] = dataclasses.replace(row, segmentation=small)
        """
    )
    warm = subprocess.run(
        [sys.executable, "-c", patch + WARM, json.dumps({"segment": args})],
        capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=300,
    )  # fmt: skip
    assert warm.returncode == 0, warm.stderr[-3000:]
    out = json.loads(warm.stdout.splitlines()[-1])
    assert out["loaded"] == [] and set(HEAVY) >= {"keras", "onnx"}
    assert out["segment"] == [0, cold.stdout]
    rows = json.loads(cold.stdout)
    assert [[r["height"], r["width"]] for r in rows] == [
        list(Image.open(p).size[::-1]) for p in PHOTOS[:2]
    ]
    (entry,) = (ck.weights.graphs.graphs_dir() / TINY).iterdir()
    assert entry.name.startswith(f"segmentation-{SMALL.crop}x{SMALL.crop}-fp32-")


def test_eval_seg_names_each_unreadable_image_once_and_refuses_to_score_nothing(
    tmp_path, monkeypatch
):
    """A folder whose only image is not one: the report's entry gives the reason (the file is
    its own field), and no mIoU of nothing (NaN) is printed - one line saying why, status 2.
    The model is never called here, so none is built."""
    images, annotations = (tmp_path / folder / "validation" for folder in ("images", "annotations"))
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    (images / "ADE_val_00000001.jpg").write_text("not a photo")
    Image.fromarray(np.ones((4, 4), np.uint8), mode="L").save(annotations / "ADE_val_00000001.png")
    row = registry.CHECKPOINTS[TINY].segmentation.eval
    monkeypatch.setattr(segment, "_inference", lambda *args: (None, row))
    monkeypatch.setattr(upernet_onnx, "inference_function", lambda *args: (None, "keras"))
    # Nor are its official weights fetched (the command line fetches them before a backend loads).
    monkeypatch.setattr(cli_checks, "weights", lambda *args, **kwargs: None)
    result = CliRunner().invoke(main, ["eval-seg", str(tmp_path), "--model", TINY])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "None of the 1 image(s)" in result.output and "nan" not in result.output.lower()
    assert result.output.count("ADE_val_00000001.jpg") == 1, result.output
    assert "ADE_val_00000001.jpg: not an image format PIL knows" in result.output


def test_segment_command_writes_label_maps_overlays_and_legends(
    tmp_path, small_settings, monkeypatch
):
    built = {}  # one random model for every command below (building is the slow part)
    load = segment.load_segmentation_model

    def load_once(name, **options):
        if name not in built:
            built[name] = load(name, **options)
        return built[name]

    monkeypatch.setattr(segment, "load_segmentation_model", load_once)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    thin = tmp_path / "thin.png"  # 3000x20: windows 2 pixels high at the small scale
    Image.fromarray(np.tile(_photo(PHOTOS[0])[:20, :300], (1, 10, 1))).save(thin)
    args = [str(thin), str(broken)] + [str(p) for p in PHOTOS[:2]]
    out = tmp_path / "seg"
    result = CliRunner().invoke(
        main, ["segment", *args, "--model", TINY, "--weights", "none", "--out", str(out), "--json"]
    )
    assert result.exit_code == 1, result.output
    rows = json.loads(result.stdout)
    assert [r["random_weights"] for r in rows] == [True] * 4
    assert "cannot read as an image" in rows[1]["error"]
    assert "error" not in rows[0]  # one bad file only
    assert (rows[0]["height"], rows[0]["width"]) == (20, 3000)
    assert np.asarray(Image.open(rows[0]["labels"])).shape == (20, 3000)
    for row, photo in zip(rows[2:], PHOTOS[:2]):
        width, height = Image.open(photo).size
        assert (row["width"], row["height"]) == (width, height) and "size" not in row
        labels = Image.open(row["labels"])
        assert labels.mode == "P" and labels.size == (width, height)
        assert labels.getpalette()[:6] == [120, 120, 120, 180, 120, 120]  # wall, building
        mask = np.asarray(labels)
        assert mask.max() < 150
        shares = {c["label"]: c["share"] for c in row["classes"]}
        assert sum(shares.values()) == pytest.approx(1.0)
        counts = np.bincount(mask.ravel(), minlength=150)
        assert [c["pixels"] for c in row["classes"]] == sorted(counts[counts > 0], reverse=True)
        assert Image.open(row["overlay"]).size == (width, height)
        assert Image.open(row["legend"]).mode == "RGB"
    text = CliRunner().invoke(
        main, ["segment", str(PHOTOS[0]), "--model", TINY, "--weights", "none", "--whole"]
    )
    assert text.exit_code == 0 and "RANDOM WEIGHTS" in text.output and "%" in text.output
    width, height = Image.open(PHOTOS[0]).size  # the text names the same order as --json
    assert f"{PHOTOS[0]}  (width {width} x height {height}, " in text.output
    for bad_args, message in [
        (["--model", "convnext_tiny_1k_224"], "not a segmentation model"),
        (["--model", TINY + "_fe"], "no '_fe' feature-extractor twin"),
        (["--model", TINY, "--precision", "int8"], "Invalid value for '--precision'"),
    ]:
        bad = CliRunner().invoke(main, ["segment", str(PHOTOS[0]), "--weights", "none", *bad_args])
        assert bad.exit_code == 2 and message in bad.output, bad.output


# ---------------------------------------------------------------------------------------------
# Export


def test_tflite_export_of_a_segmentation_model_is_refused_in_one_line(tmp_path):
    """TFLite's converter breaks the UperNet graph (a long multi-line error after a minute):
    refused before any work.  The model is a stand-in with the UperNet's classifier name."""
    images = keras.Input((None, None, 3), name="images")
    logits = keras.layers.Conv2D(150, 1, name="decode_conv_seg")(images)
    model = keras.Model(images, logits, name=TINY)
    with pytest.raises(ValueError, match="not supported .* export it as savedmodel or onnx"):
        ck.export(model, tmp_path / "m.tflite", format="tflite")
    assert not list(tmp_path.iterdir())


def test_savedmodel_and_onnx_exports_take_any_size(tiny, tmp_path, loopback_server, monkeypatch):
    """``convnext export NAME --format savedmodel --format onnx`` with the official weights
    (served on the loopback): both exports take any height/width (checked at two sizes,
    within 1e-4 of Keras) and return per-pixel logits."""
    _serve(loopback_server, monkeypatch, tiny[1])
    out = tmp_path / "exports"
    args = ["export", TINY, "--format", "savedmodel", "--format", "onnx", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--image-size", "64", "--json"])
    assert result.exit_code == 0, result.output
    for row in json.loads(result.stdout):
        assert row["input_shape"] == [None, None, None, 3] and row["outputs"] == ["logits"]
        assert row["max_abs_diff"] <= TOLERANCE and len(row["checks"]) >= 2
        assert not row["random_weights"]
    meta = json.loads((out / TINY / "assets.extra" / "convnext_keras.json").read_text())
    assert meta["task"] == "segmentation" and meta["reported_miou"] == 46.0
    assert meta["weights"] == registry.CHECKPOINTS[TINY].url
    bad = CliRunner().invoke(
        main, ["export", TINY, "--out", str(tmp_path / "x"), "--include-preprocessing"]
    )
    assert bad.exit_code == 2 and "include-preprocessing is for classifiers" in bad.output
