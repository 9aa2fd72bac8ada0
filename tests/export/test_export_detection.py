"""A detector's export: the SavedModel of a Mask R-CNN / Cascade Mask R-CNN (three inputs, five
outputs) reloaded with ``tf.saved_model.load`` and compared with the Keras model it came from;
ONNX and TFLite refused with one line naming what works.

One small random-weights Cascade Mask R-CNN on ConvNeXt-atto (the registry's cascade head at a
low score threshold, so that every output holds real detections) is shared by the tests.
"""

from __future__ import annotations

import importlib
import json

import keras
import numpy as np
import pytest

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.cli import main
from convnext_keras.export import planning, writers
from convnext_keras.nets.detection.model import OUTPUTS, build_detector

ex = importlib.import_module("convnext_keras.export.exporter")

TF = keras.backend.backend() == "tensorflow"
needs_tf = pytest.mark.skipif(not TF, reason="TensorFlow-backend test (runs in the TF pass)")


@pytest.fixture(scope="module")
def detector():
    """Cascade Mask R-CNN on ConvNeXt-atto, random weights (the mask logits scaled up); score
    threshold 0 (every kept box is a detection), few proposals and detections (a small
    export)."""
    settings = registry.DetectionEval(
        rpn_pre_nms=64, rpn_max=32, score_threshold=0.0, max_detections=8
    )
    model = build_detector("atto", settings=settings, name="cascade_mask_rcnn_convnext_atto")
    for layer in model.layers:  # mask logits of a few units, not ~0 (probabilities far from 0.5)
        if layer.name.startswith("mask") and layer.name.endswith("_logits"):
            layer.kernel.assign(layer.kernel * 300.0)
    return model


def _batch(rng, sizes, side=96):
    images = np.zeros((len(sizes), side, side + 32, 3), np.float32)
    for i, (h, w) in enumerate(sizes):
        images[i, :h, :w] = rng.standard_normal((h, w, 3))
    return {
        "images": images,
        "image_sizes": np.asarray(sizes, np.int32),
        "scale_factors": np.asarray([[1.0, 1.0], [0.5, 0.75]][: len(sizes)], np.float32),
    }


@needs_tf
def test_detector_savedmodel_equals_the_keras_model(detector, tmp_path):
    """The export's callable and its serving_default signature, reloaded in this test with
    tf.saved_model.load, give the Keras model's boxes, scores, labels, masks and counts on a
    padded batch of another size than the ones the export verified."""
    import tensorflow as tf

    result = ck.export(detector, tmp_path / "det", image_size=64)
    assert result.max_abs_diff <= 1e-4 and result.outputs == list(OUTPUTS)
    assert [c.split(" on ")[0] for c in result.checks] == [
        "tf.saved_model.load(path)(inputs)",
        "serving_default signature",
    ] * 2
    assert result.input_shape == (None, None, None, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["det"]

    feed = _batch(np.random.default_rng(3), [(96, 128), (80, 100)])
    expected = {k: keras.ops.convert_to_numpy(v) for k, v in detector(feed).items()}
    assert expected["num_detections"].tolist() == [8, 8]  # real detections, not padding
    assert expected["masks"].std() > 0.05 and expected["boxes"].std() > 1.0

    obj = tf.saved_model.load(str(result.path))
    serving = obj.signatures["serving_default"]
    assert sorted(serving.structured_input_signature[1]) == sorted(planning.DETECTION_INPUTS)
    assert sorted(serving.structured_outputs) == sorted(OUTPUTS)
    tensors = {k: tf.constant(v) for k, v in feed.items()}
    for got in (obj(tensors, training=False), serving(**tensors)):
        for k in OUTPUTS:
            g = np.asarray(got[k])
            assert g.shape == expected[k].shape and g.dtype == expected[k].dtype, k
            np.testing.assert_allclose(g, expected[k], atol=1e-4, rtol=0, err_msg=k)

    meta = json.loads((result.path / writers.METADATA_FILE).read_text())
    assert meta["task"] == "detection" and meta["outputs"] == list(OUTPUTS)
    assert "image_sizes" in meta["input"]["contract"]
    assert json.loads(obj.metadata().numpy()) == meta


def test_detector_keras_file_equals_the_keras_model(detector, tmp_path):
    """The .keras export (every backend, in-process) reloads with the detector's layers."""
    result = ck.export(detector, tmp_path / "det.keras", "keras", image_size=64)
    assert result.max_abs_diff <= 1e-4 and result.outputs == list(OUTPUTS)
    assert [c.split(" on ")[0] for c in result.checks] == ["keras.saving.load_model(path)"] * 2


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_detector_onnx_and_tflite_are_refused_naming_savedmodel(detector, tmp_path, fmt):
    """From Python (a built model) and from the command line (a detection name, refused
    before anything is loaded): one line naming the format that works; nothing written."""
    path = ex.default_path("det", tmp_path, fmt)
    with pytest.raises(ValueError, match=rf"^{fmt} export of a detector .* format='savedmodel'"):
        ck.export(detector, path, fmt, image_size=64)
    out = tmp_path / "cli"
    name = "cascade_mask_rcnn_convnext_tiny_coco"
    with pytest.raises(ValueError, match=rf"^{fmt} export of a detector"):
        ex.check_named(name, out, [fmt])
    from click.testing import CliRunner

    run = CliRunner().invoke(main, ["export", name, "--format", fmt, "--out", str(out)])
    assert run.exit_code != 0
    assert f"{fmt} export of a detector" in run.output and "--format savedmodel" in run.output
    assert list(tmp_path.iterdir()) == []


def test_detector_export_options_are_refused(detector, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="include_preprocessing.* is for classifiers"):
        ck.export(detector, tmp_path / "d", image_size=64, include_preprocessing=True)
    with pytest.raises(ValueError, match="images of any size"):
        ck.export(detector, tmp_path / "d", image_size=64, dynamic_size=False)
    with pytest.raises(ValueError, match="pass image_size=N"):
        ck.export(detector, tmp_path / "d")
    # Under another backend the SavedModel is refused (the .keras file is written in-process).
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ck.ExportError, match="KERAS_BACKEND=tensorflow, or export format='keras'"):
        ck.export(detector, tmp_path / "d", image_size=64)
    assert list(tmp_path.iterdir()) == []
