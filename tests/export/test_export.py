"""Exports (SavedModel, ONNX, TFLite, .keras) reloaded by their runtimes and compared with an
independent PyTorch reference (transformers' ConvNext with the same random weights).

ConvNeXt-T exports share module fixtures (one export per format); error paths use ConvNeXt-atto.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import torch_reference as ref
from click.testing import CliRunner

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.cli import main
from convnext_keras.errors import WriteError
from convnext_keras.export import planning, tf_subprocess, verify, writers
from convnext_keras.tasks.predict import with_precision

# ``ck.export`` is the function; the module (for its helpers and monkeypatching) is here.
ex = importlib.import_module("convnext_keras.export.exporter")

TF = keras.backend.backend() == "tensorflow"
needs_tf = pytest.mark.skipif(not TF, reason="TensorFlow-backend test (runs in the TF pass)")


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(11).standard_normal((3, 224, 224, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def expected(tiny_reference, images):
    """The PyTorch reference's logits and pooled features on ``images``."""
    return ref.hf_outputs(tiny_reference[0], images)


def _export(tiny_reference, name, fmt, directory):
    """Export the reference-weight ConvNeXt-T (classifier or ``_fe``) in ``fmt``.

    Each test exports what it checks (no shared export fixture: under pytest-xdist a shared
    fixture would be rebuilt on every worker anyway).
    """
    model = ck.load_model(name, weights=tiny_reference[1])
    return ex.export(model, ex.default_path(name, directory, fmt), fmt)


# ----------------------------------------------------------------------------------------------
# SavedModel


@needs_tf
def test_savedmodel_classifier(tiny_reference, images, expected, tmp_path):
    """One export, every loader: tf.saved_model.load (callable and serving_default),
    saved_model_cli, the metadata, Keras 3's TFSMLayer - all equal to PyTorch's logits."""
    import tensorflow as tf

    result = _export(tiny_reference, "convnext_tiny_1k_224", "savedmodel", tmp_path)
    assert result.max_abs_diff <= 1e-4 and result.tolerance == 1e-4
    assert [c.split(" on ")[0] for c in result.checks] == [
        "tf.saved_model.load(path)(images)",
        "serving_default signature",
    ]
    path = result.path
    obj = tf.saved_model.load(str(path))
    assert _diff(obj(images), expected["logits"]) <= 1e-4
    assert _diff(obj(images, training=False), expected["logits"]) <= 1e-4
    signature = obj.signatures["serving_default"]
    out = signature(images=tf.constant(images[:1]))
    assert list(out) == ["logits"]
    assert _diff(out["logits"], expected["logits"][:1]) <= 1e-4

    # The signature TF Serving sees: a named float32 [batch, 224, 224, 3] input, named output.
    args, kwargs = signature.structured_input_signature
    assert args == () and list(kwargs) == ["images"]
    assert kwargs["images"].shape.as_list() == [None, 224, 224, 3]
    assert kwargs["images"].dtype == tf.float32
    assert signature.structured_outputs["logits"].shape.as_list() == [None, 1000]
    cli = Path(sys.executable).with_name("saved_model_cli")
    shown = subprocess.run(
        [str(cli), "show", "--dir", str(path), "--tag_set", "serve"]
        + ["--signature_def", "serving_default"],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    ).stdout
    assert "inputs['images'] tensor_info:" in shown
    assert "dtype: DT_FLOAT" in shown and "shape: (-1, 224, 224, 3)" in shown
    assert "outputs['logits'] tensor_info:" in shown and "shape: (-1, 1000)" in shown

    # The input contract, in the SavedModel and beside it.
    meta = json.loads(obj.metadata().numpy().decode())
    assert meta == json.loads((path / writers.METADATA_FILE).read_text())
    assert meta["model"] == "convnext_tiny_1k_224" and meta["outputs"] == ["logits"]
    contract = meta["input"]
    assert contract["dtype"] == "float32" and contract["layout"] == "NHWC"
    assert contract["channels"] == "RGB" and contract["shape"] == [None, 224, 224, 3]
    assert contract["mean"] == list(registry.IMAGENET_MEAN)
    assert contract["std"] == list(registry.IMAGENET_STD)
    assert "normalised with the ImageNet mean" in contract["contract"]
    assert meta["dataset"] == "imagenet-1k" and meta["reported_acc1"] == 82.1
    assert "https://arxiv.org/abs/2201.03545" in meta["references"]

    # Keras 3: TFSMLayer, also inside a new model.
    layer = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")
    assert _diff(layer(images)["logits"], expected["logits"]) <= 1e-4
    inputs = keras.Input((224, 224, 3))
    model = keras.Model(inputs, keras.layers.Dense(4)(layer(inputs)["logits"]))
    assert model.predict_on_batch(images).shape == (3, 4)


@needs_tf
def test_feature_extractor_fine_tunes_with_tf_hub(tiny_reference, images, expected, tmp_path):
    """hub.KerasLayer(trainable=True) + a new head under tf-keras: every backbone variable
    gets a non-zero gradient and is changed by one SGD step; no losses, no warnings."""
    import tensorflow as tf

    result = _export(tiny_reference, "convnext_tiny_1k_224_fe", "savedmodel", tmp_path)
    assert result.outputs == ["features"] and result.max_abs_diff <= 1e-4
    obj = tf.saved_model.load(str(result.path))
    assert _diff(obj(images), expected["pooled"]) <= 1e-4
    out = obj.signatures["serving_default"](images=tf.constant(images[:2]))
    assert _diff(out["features"], expected["pooled"][:2]) <= 1e-4
    fe = ck.load_model("convnext_tiny_1k_224_fe", weights=None)
    assert len(obj.trainable_variables) == len(obj.variables) == len(fe.trainable_variables)
    assert len(obj.regularization_losses) == 0

    report = ex.hub_finetune_check(result.path, num_classes=5, batch=2)
    assert report["backbone_variables"] == len(fe.trainable_variables)
    assert report["none_gradients"] == 0 and report["zero_gradients"] == 0
    assert report["changed"] == report["backbone_variables"]
    assert report["regularization_losses"] == 0
    assert report["warnings"] == []
    assert report["output_shape"] == [2, 5] and np.isfinite(report["loss"])


# ----------------------------------------------------------------------------------------------
# ONNX, TFLite, .keras


@needs_tf
def test_onnx_equals_pytorch_with_dynamic_batch(tiny_reference, images, expected, tmp_path):
    import onnx
    import onnxruntime as ort

    result = _export(tiny_reference, "convnext_tiny_1k_224", "onnx", tmp_path)
    proto = onnx.load(str(result.path))
    opset = {o.domain: o.version for o in proto.opset_import}[""]
    assert opset >= 17
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "images" and dims[0].dim_param and not dims[0].dim_value
    assert [d.dim_value for d in dims[1:]] == [224, 224, 3]
    assert [o.name for o in proto.graph.output] == ["logits"]
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        (logits,) = session.run(None, {"images": images[:batch]})
        assert _diff(logits, expected["logits"][:batch]) <= 1e-4


@needs_tf
def test_tflite_equals_pytorch(tiny_reference, images, expected, tmp_path):
    result = _export(tiny_reference, "convnext_tiny_1k_224", "tflite", tmp_path)
    assert result.tolerance == 1e-3
    interpreter = verify._tflite_interpreter(result.path)
    (detail,) = interpreter.get_input_details()
    assert list(detail["shape_signature"]) == [-1, 224, 224, 3]
    runner = interpreter.get_signature_runner()
    for batch in (1, 2):
        out = runner(images=images[:batch])
        assert list(out) == ["logits"]
        assert _diff(out["logits"], expected["logits"][:batch]) <= 1e-3


@pytest.mark.backends
def test_onnx_pyramid_with_dynamic_size_on_any_backend(tmp_path, monkeypatch):
    """A pyramid model's ONNX (built from the weights, no TensorFlow on any backend): every
    stage output at sizes that are not multiples of the stride, equal to the Keras model."""
    import onnx
    import onnxruntime as ort

    monkeypatch.setattr(tf_subprocess, "_export_via_tensorflow", None)  # must not be needed
    model = ck.load_model("convnext_atto", weights=None, features="pyramid")
    result = ck.export(model, tmp_path / "p.onnx", "onnx", image_size=64, dynamic_size=True)
    assert result.input_shape == (None, None, None, 3)
    assert result.outputs == ["stage1", "stage2", "stage3", "stage4"]
    proto = onnx.load(str(result.path))
    assert {o.version for o in proto.opset_import if o.domain == ""} == {writers.ONNX_OPSET}
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["convnext_keras.nets.convnext"] == "convnext_atto"
    assert "ImageNet mean" in props["convnext_keras.input"]
    assert props["convnext_keras.min_input_size"] == "32"
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(4).standard_normal((2, 77, 45, 3)).astype(np.float32)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": x})))
    want = model.predict_on_batch(x)
    for key in result.outputs:
        assert got[key].shape == tuple(keras.ops.shape(want[key]))
        assert _diff(got[key], want[key]) <= 1e-4, key


@needs_tf
def test_onnx_of_a_model_with_its_own_layers_goes_through_tf2onnx(tmp_path):
    fe = ck.load_model("convnext_atto_fe", weights=None, input_shape=(64, 64, 3))
    head = keras.layers.Dense(3, name="my_head")(fe.output)
    model = keras.Model(fe.input, head, name="custom")
    assert "my_head" in ck.engines.onnx_graph.graph_unsupported_reason(model)
    result = ck.export(model, tmp_path / "c.onnx", "onnx")
    assert result.max_abs_diff <= 1e-4 and result.input_shape == (None, 64, 64, 3)


def test_keras_file_equals_pytorch(tiny_reference, images, expected, tmp_path):
    result = _export(tiny_reference, "convnext_tiny_1k_224", "keras", tmp_path)
    model = keras.saving.load_model(str(result.path))
    assert model.name == "convnext_tiny_1k_224"
    assert _diff(model.predict_on_batch(images), expected["logits"]) <= 1e-4


# ----------------------------------------------------------------------------------------------
# Options: baked-in preprocessing, dynamic size


@pytest.fixture(scope="module")
def atto():
    spec = registry.VARIANTS["atto"]
    torch_model = ref.hf_model(spec.depths, spec.dims, 1000, seed=5)
    state = {k: v.numpy() for k, v in ref.official_state_dict(torch_model).items()}
    weights = ck.convert_state_dict(state, spec)
    model = ck.load_model("convnext_atto", weights=None)
    ck.weights.convert.assign_weights(model, weights)
    return model


@needs_tf
def test_include_preprocessing_takes_raw_images(atto, tmp_path):
    """A SavedModel fed uint8 photos of any size matches the PIL pipeline + Keras model."""
    import skimage.data
    import tensorflow as tf
    from PIL import Image

    from convnext_keras.preprocess import eval_transform

    result = ck.export(atto, tmp_path / "raw", include_preprocessing=True)
    assert result.input_shape == (None, None, None, 3) and result.input_dtype == "uint8"
    obj = tf.saved_model.load(str(result.path))
    meta = json.loads(obj.metadata().numpy().decode())
    assert meta["input"]["preprocessing_included"] and "uint8" in meta["input"]["contract"]
    for photo in (skimage.data.astronaut(), skimage.data.chelsea()):
        got = obj.signatures["serving_default"](images=tf.constant(photo[None]))["logits"]
        x = eval_transform(Image.fromarray(photo), 224, 0.875, "bicubic")
        want = atto.predict_on_batch(x[None])
        # Keras' antialiased resize is close to, not bit-equal with, PIL's.
        assert _diff(got, want) <= 0.05 * float(np.max(np.abs(want)))
        assert np.argmax(got) == np.argmax(want)


@needs_tf
def test_dynamic_size_savedmodel(atto, tmp_path):
    import tensorflow as tf

    result = ck.export(atto, tmp_path / "dyn", image_size=64, dynamic_size=True)
    assert result.input_shape == (None, None, None, 3)
    assert {c.split(" on ")[1].split(":")[0] for c in result.checks} == {
        "float32[2, 64, 64, 3]",
        "float32[2, 96, 64, 3]",
    }
    obj = tf.saved_model.load(str(result.path))
    x = np.random.default_rng(0).standard_normal((1, 128, 96, 3)).astype(np.float32)
    assert _diff(obj(x), atto.predict_on_batch(x)) <= 1e-4
    # An image the network cannot take is refused by the signature, never answered with NaN.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"at least 32x32 pixels"):
        obj.signatures["serving_default"](images=tf.zeros((1, 16, 28, 3)))


# ----------------------------------------------------------------------------------------------
# Bad input and failed verification


def test_unknown_format_lists_the_choices(atto, tmp_path):
    with pytest.raises(ValueError, match="savedmodel, onnx, tflite, keras"):
        ck.export(atto, tmp_path / "m.pb", "pb")
    assert ex.canonical_format("LiteRT") == "tflite"
    assert ex.canonical_format("tf_saved_model") == "savedmodel"


def test_unknown_model_name_suggests_names(tmp_path):
    with pytest.raises(ck.UnknownModelError, match="convnext_tiny_1k_224"):
        ck.export("convnext_tiny_1k_244", tmp_path / "m.keras", "keras")
    assert not tmp_path.joinpath("m.keras").exists()


def test_bad_paths_and_options_are_refused(atto, tmp_path):
    with pytest.raises(ValueError, match=r"ending in \.onnx"):
        ck.export(atto, tmp_path / "m.tflite", "onnx")
    with pytest.raises(ValueError, match="format='onnx'"):
        ck.export(atto, tmp_path / "m.onnx", "savedmodel")
    with pytest.raises(ValueError, match="fixed image size"):
        ck.export(atto, tmp_path / "m.tflite", "tflite", dynamic_size=True)
    with pytest.raises(ValueError, match="savedmodel and keras"):
        ck.export(atto, tmp_path / "m.onnx", "onnx", include_preprocessing=True)
    with pytest.raises(ValueError, match="image_size must be an integer >= 32"):
        ck.export(atto, tmp_path / "m.keras", "keras", image_size=16)
    with pytest.raises(ValueError, match="model names only"):
        ck.export(atto, tmp_path / "m.keras", "keras", weights="x.pth")
    pyramid = ck.load_model("convnext_atto", weights=None, features="pyramid")
    with pytest.raises(ValueError, match="image_size"):
        ck.export(keras.Model(pyramid.input, pyramid.output, name="custom"), tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_mixed_precision_model_is_refused(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = ck.load_model("convnext_atto", weights=None)
    finally:
        keras.config.set_dtype_policy("float32")
    with pytest.raises(ValueError, match="float32"):
        ck.export(model, tmp_path / "m.keras", "keras")
    # A float32 model copied into bf16 keeps a float32 model policy over bf16 layers.
    copy = with_precision(ck.load_model("convnext_atto", weights=None), "bf16")
    with pytest.raises(ValueError, match="layer 'stem_conv' computes in bfloat16"):
        ck.export(copy, tmp_path / "m.keras", "keras")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(atto, tmp_path):
    target = tmp_path / "m.keras"
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        ck.export(atto, target, "keras", image_size=64)
    assert target.read_text() == "keep me"
    ck.export(atto, target, "keras", image_size=64, overwrite=True)
    assert keras.saving.load_model(str(target)).name == "convnext_atto"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras"]


def test_onnx_over_the_protobuf_limit_is_written_with_its_data_file(atto, tmp_path, monkeypatch):
    """ConvNeXt V2-H's graph is over protobuf's 2 GiB: the export writes NAME.onnx and its
    weights in NAME.onnx.data beside it (ONNX's external-data format), verified, moved into
    place together; here the threshold is lowered so that ConvNeXt-atto crosses it.  Exported
    again under the threshold (overwrite), the old data file goes."""
    import onnx
    import onnxruntime as ort

    from convnext_keras.engines import onnx_graph

    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_THRESHOLD", 1 << 20)
    target = tmp_path / "out" / "convnext_atto.onnx"
    result = ck.export(atto, target, "onnx", image_size=64)
    assert result.max_abs_diff <= 1e-4 and "onnxruntime" in result.checks[0]
    data = target.with_name("convnext_atto.onnx.data")
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name, data.name]
    assert target.stat().st_size < 1 << 20 < data.stat().st_size
    proto = onnx.load(str(target))  # reads the data file beside it
    assert onnx_graph.weight_bytes(proto) > 1 << 20
    x = np.random.default_rng(4).standard_normal((2, 64, 64, 3)).astype(np.float32)
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x})[0]
    assert _diff(got, atto.predict_on_batch(x)) <= 1e-4
    monkeypatch.undo()
    ck.export(atto, target, "onnx", image_size=64, overwrite=True)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def _perturbing(runner, amount):
    def run(path, plan, inputs):
        for what, i, out in runner(path, plan, inputs):
            yield what, i, {k: np.asarray(v) + amount for k, v in out.items()}

    return run


@pytest.mark.parametrize("fmt", ["keras", pytest.param("savedmodel", marks=needs_tf)])
def test_failed_verification_leaves_nothing(atto, tmp_path, monkeypatch, fmt):
    """An export off by 3e-3 is discarded: the error shows the difference, the old file stays."""
    monkeypatch.setitem(verify._RUNNERS, fmt, _perturbing(verify._RUNNERS[fmt], 3e-3))
    target = ex.default_path("convnext_atto", tmp_path, fmt)
    if fmt == "keras":  # (a SavedModel export costs more; its case is the overwrite below)
        with pytest.raises(ck.VerificationError, match=r"max \|diff\| = 0\.003 > tolerance"):
            ck.export(atto, target, fmt, image_size=64)
        assert list(tmp_path.iterdir()) == []
    target.mkdir() if fmt == "savedmodel" else target.write_text("previous")
    with pytest.raises(ck.VerificationError, match=r"max \|diff\| = 0\.003 > tolerance") as info:
        ck.export(atto, target, fmt, image_size=64, overwrite=True)
    assert info.value.max_abs_diff == pytest.approx(3e-3, rel=1e-3)
    assert info.value.tolerance == 1e-4
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert target.is_dir() if fmt == "savedmodel" else target.read_text() == "previous"


@pytest.mark.backends
def test_export_from_any_backend(atto, tmp_path):
    """.keras files are written in-process on every backend; under JAX a SavedModel is
    exported in a TensorFlow subprocess and verified against this process's model."""
    x = np.random.default_rng(4).standard_normal((2, 64, 64, 3)).astype(np.float32)
    result = ck.export(atto, tmp_path / "atto.keras", "keras", image_size=64)
    assert result.max_abs_diff <= 1e-4
    reloaded = keras.saving.load_model(str(result.path))
    assert _diff(reloaded.predict_on_batch(x), atto.predict_on_batch(x)) <= 1e-4
    if TF:
        return  # the TensorFlow path of every format is tested above
    if keras.backend.backend() == "torch":
        # The subprocess hand-over below does not depend on the backend beyond the .keras file
        # checked above; it runs on JAX (the GPU machines' backend) to keep CI short.
        return
    result = ck.export(atto, tmp_path / "atto", "savedmodel", image_size=64)
    assert result.max_abs_diff <= 1e-4 and result.path.is_dir()
    assert f"vs the {keras.backend.backend()} original" in result.checks[0]
    code = (
        "import sys, numpy as np, tensorflow as tf\n"
        "x = np.load(sys.argv[2])\n"
        "np.save(sys.argv[3], tf.saved_model.load(sys.argv[1])(x).numpy())\n"
    )
    np.save(tmp_path / "x.npy", x)
    subprocess.run(
        [sys.executable, "-c", code, str(result.path), str(tmp_path / "x.npy")]
        + [str(tmp_path / "y.npy")],
        check=True,
        capture_output=True,
    )
    assert _diff(np.load(tmp_path / "y.npy"), atto.predict_on_batch(x)) <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atto", "atto.keras", "x.npy", "y.npy"]


# ----------------------------------------------------------------------------------------------
# Command line


def test_cli_export_with_a_checkpoint(tmp_path):
    """``convnext export NAME --weights CHECKPOINT`` takes any layout the core reads (timm's
    safetensors here) and writes a verified file equal to PyTorch."""
    spec = registry.VARIANTS["atto"]
    torch_model = ref.hf_model(spec.depths, spec.dims, 1000, seed=9)
    checkpoint = ref.save_timm(torch_model, tmp_path / "atto.safetensors", conv_mlp=True)
    result = CliRunner().invoke(
        main,
        ["export", "convnext_atto_fe", "--weights", str(checkpoint), "--format", "keras"]
        + ["--image-size", "64", "--out", str(tmp_path / "out")],
    )
    assert result.exit_code == 0, result.output
    target = tmp_path / "out" / "convnext_atto_fe.keras"
    assert f"wrote {target}" in result.output and "verified: keras.saving" in result.output
    x = np.random.default_rng(2).standard_normal((2, 64, 64, 3)).astype(np.float32)
    model = keras.saving.load_model(str(target))
    assert _diff(model.predict_on_batch(x), ref.hf_outputs(torch_model, x)["pooled"]) <= 1e-4


def test_cli_export_errors(tmp_path):
    runner = CliRunner()
    base = ["export", "convnext_atto", "--weights", "none", "--out", str(tmp_path)]
    bad = runner.invoke(main, [*base, "--format", "pb"])
    assert bad.exit_code == 2 and "choose one of savedmodel, onnx, tflite, keras" in bad.output
    unknown = runner.invoke(main, ["export", "convnext_tinny", "--out", str(tmp_path)])
    assert unknown.exit_code == 2 and "Unknown model name" in unknown.output
    (tmp_path / "convnext_atto.keras").write_text("keep")
    exists = runner.invoke(main, [*base, "--format", "keras"])
    assert exists.exit_code == 2 and "--overwrite" in exists.output
    assert (tmp_path / "convnext_atto.keras").read_text() == "keep"


def test_without_tensorflow_keras_export_works_and_savedmodel_says_why(tmp_path):
    """As on the GPU machines (Keras + JAX, no TensorFlow): .keras and ONNX are written, a
    SavedModel export raises ExportError saying TensorFlow is needed and how to go on."""
    from test_no_tensorflow import BLOCK_TENSORFLOW

    code = BLOCK_TENSORFLOW + (
        "import convnext_keras as ck\n"
        "from convnext_keras.export import collection\n"
        "from convnext_keras.cli import main\n"
        "m = ck.load_model('convnext_atto', weights=None)\n"
        f"print(ck.export(m, {str(tmp_path / 'a.keras')!r}, 'keras', image_size=64).format)\n"
        f"print(ck.export(m, {str(tmp_path / 'a.onnx')!r}, 'onnx', image_size=64).format)\n"
        "try:\n"
        f"    ck.export(m, {str(tmp_path / 'a')!r}, image_size=64)\n"
        "except ck.ExportError as e:\n"
        "    print('ExportError:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "KERAS_BACKEND": "jax"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("keras\nonnx\nExportError: savedmodel export needs TensorFlow"), out
    assert "pip install tensorflow-cpu" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.keras", "a.onnx"]


# ----------------------------------------------------------------------------------------------
# One 384 model and one ImageNet-21k model, batch 1, every format


@pytest.mark.slow
@needs_tf
@pytest.mark.parametrize("name", ["convnext_tiny_21k_1k_384", "convnext_tiny_21k_224"])
def test_384_and_21k_models_in_every_format(name, tmp_path):
    entry = registry.CHECKPOINTS[name]
    spec = entry.spec
    torch_model = ref.hf_model(spec.depths, spec.dims, entry.num_classes, seed=7)
    checkpoint = ref.save_official(torch_model, tmp_path / entry.filename)
    x = np.random.default_rng(8).standard_normal((1, entry.resolution, entry.resolution, 3))
    x = x.astype(np.float32)
    want = ref.hf_outputs(torch_model, x)["logits"]
    del torch_model
    results = ex.export_named(
        name, tmp_path / "out", list(ex.FORMATS), weights=str(checkpoint), verify_batch=1
    )
    for result in results:
        assert result.input_shape == (None, entry.resolution, entry.resolution, 3)
        assert result.max_abs_diff <= ex.TOLERANCE[result.format], result.checks
        # the export against PyTorch, through the same loader the verification used
        (_, _, got), *_ = verify._RUNNERS[result.format](result.path, _plan_of(result), [x])
        assert np.asarray(got["logits"]).shape == (1, entry.num_classes)
        assert _diff(got["logits"], want) <= ex.TOLERANCE[result.format], result.format


def _plan_of(result):
    return planning._Plan(
        result.format, result.input_shape[1], False, False, None, result.outputs, 1, 0
    )


# ----------------------------------------------------------------------------------------------
# ConvNeXt V2: every format, the feature extractor fine-tuned the TF-Hub way, the metadata


@needs_tf
def test_v2_model_in_every_format_and_its_fe_fine_tunes_with_tf_hub(tmp_path):
    """ConvNeXt V2-atto (GRN) through `convnext export`: SavedModel, ONNX (the library's own
    graph), TFLite and .keras, each verified and equal to transformers' ConvNextV2; its _fe
    SavedModel fine-tunes with hub.KerasLayer(trainable=True) (GRN's scale and shift get
    gradients); the metadata name V2's paper and the weights' licence."""
    import tensorflow as tf

    name = "convnextv2_atto_1k_224"
    spec = registry.CHECKPOINTS[name].spec
    # the file name's spelling exports under the registry name
    assert ex.default_path("convnextv2_atto_1k_224_ema_fe", "o", "onnx").name == f"{name}_fe.onnx"
    torch_model = ref.hf_v2_model(spec.depths, spec.dims, 1000, seed=8)
    checkpoint = ref.save_official(torch_model, tmp_path / "convnextv2_atto_1k_224_ema.pt")
    x = np.random.default_rng(9).standard_normal((2, 224, 224, 3)).astype(np.float32)
    want = ref.hf_outputs(torch_model, x)
    result = CliRunner().invoke(
        main,
        ["export", name, "--weights", str(checkpoint), "--out", str(tmp_path / "out")]
        + ["--format", "savedmodel", "--format", "onnx", "--format", "tflite"]
        + ["--format", "keras"],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for fmt in ex.FORMATS:
        path = ex.default_path(name, out, fmt)
        plan = planning._Plan(fmt, 224, False, False, None, ["logits"], 2, 0)
        (_, _, got), *_ = verify._RUNNERS[fmt](path, plan, [x])
        assert _diff(got["logits"], want["logits"]) <= ex.TOLERANCE[fmt], fmt
    meta = json.loads(tf.saved_model.load(str(out / name)).metadata().numpy().decode())
    assert meta["family"] == "convnextv2" and meta["licence"] is None  # a local file's weights
    assert meta["references"] == [
        "https://arxiv.org/abs/2301.00808",
        "https://github.com/facebookresearch/ConvNeXt-V2",
    ]

    fe = ex.export_named(
        name + "_fe", tmp_path / "fe", ["savedmodel"], weights=str(checkpoint), check_hub=True
    )[0]
    assert fe.max_abs_diff <= 1e-4
    features = tf.saved_model.load(str(fe.path))(x).numpy()
    assert _diff(features, want["pooled"]) <= 1e-4
    report = fe.hub_check
    assert report["none_gradients"] == 0 and report["zero_gradients"] == 0
    assert report["changed"] == report["backbone_variables"]
    assert report["backbone_variables"] == len(
        ck.load_model(name + "_fe", weights=None).trainable_variables
    )


# ---------------------------------------------------------------------------------------------
# Writing to a full disk, a read-only or a forbidden folder (simulated at the write: the tests
# run as root, where permissions do not stop a write, and may not mount a small tmpfs)


def _failing_write(code):
    def write(proto, path, *args, **kwargs):
        Path(path).write_bytes(b"half an export")  # a partial file first, as a real failure
        raise OSError(code, os.strerror(code), str(path))

    return write


def test_cli_export_to_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import onnx

    monkeypatch.setattr(onnx, "save_model", _failing_write(errno.ENOSPC))
    out = tmp_path / "out"
    args = ["export", "convnext_atto", "--weights", "none", "--format", "onnx", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output == (
        f"error: Could not write the export {out / 'convnext_atto.onnx'}: No space left on "
        "device (ENOSPC); free some space or write somewhere else. Nothing was left "
        "half-written.\n"
    )
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_export_to_a_read_only_or_forbidden_folder_names_it(atto, tmp_path, monkeypatch, code):
    import onnx

    monkeypatch.setattr(onnx, "save_model", _failing_write(code))
    with pytest.raises(WriteError) as info:
        ck.export(atto, tmp_path / "m.onnx", "onnx")
    assert info.value.errno == code and info.value.filename == str(tmp_path / "m.onnx")
    assert errno.errorcode[code] in str(info.value)
    assert list(tmp_path.iterdir()) == []


@needs_tf
def test_tensorflow_s_full_disk_error_while_writing_variables_is_a_write_error(
    atto, tmp_path, monkeypatch
):
    import tensorflow as tf

    def full(model, path, plan, metadata):
        path.mkdir()
        (path / "variables").mkdir()
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{path}/variables/variables.data-00000-of-00001.tempstate123; "
            "No space left on device"
        )  # fmt: skip

    monkeypatch.setattr(writers, "_write_savedmodel", full)
    with pytest.raises(WriteError, match=r"the export .*/sm: No space left on device"):
        ck.export(atto, tmp_path / "sm")
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(
        main, ["export", "convnext_atto", "--weights", "none", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "(ENOSPC)" in result.output, result.output


def test_cli_export_of_random_weights_says_so_once(tmp_path):
    """Several formats of a random-weights model: the banner once, then one line per file."""
    args = ["export", "convnext_atto", "--weights", "none", "--image-size", "64",
            "--format", "onnx", "--format", "keras", "--out", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("RANDOM WEIGHTS") == 1
    assert result.stdout.count("wrote ") == 2
