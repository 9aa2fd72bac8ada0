"""predict / decode / Grad-CAM against an independent reference, and ``convnext predict``.

The reference is Hugging Face transformers' PyTorch ConvNext with the same random weights
(tests/references/torch_reference.py), fed by the PIL preprocessing written in
tests/preprocess/test_preprocess.py.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
import torch_reference as ref
from click.testing import CliRunner
from PIL import Image
from test_preprocess import SKIMAGE, reference

import convnext_keras as ck
from convnext_keras import decode_predictions, preprocess, registry
from convnext_keras.cli import main
from convnext_keras.data import labels
from convnext_keras.engines import quantization, runners
from convnext_keras.nets.convnext import FLOAT32_LAYERS, PRECISIONS, non_float32_layer, precision_of
from convnext_keras.tasks.gradcam import GradCAM
from convnext_keras.tasks.predict import load_classifier, predict_files, softmax, with_precision

EXAMPLES = Path(__file__).parents[2] / "examples" / "images"
PHOTOS = sorted(EXAMPLES.glob("*.jpg"))
ATTO = registry.VARIANTS["atto"]


@pytest.fixture(scope="module")
def atto(tmp_path_factory):
    """A transformers ConvNext-atto (1000 classes, random weights) and its official file."""
    model = ref.hf_model(ATTO.depths, ATTO.dims, 1000, seed=3)
    path = ref.save_official(model, tmp_path_factory.mktemp("atto") / "atto.pth")
    return model, path


@pytest.fixture(scope="module")
def keras_atto(atto):
    """The same network converted by the library (built once for the tests that can share it)."""
    return load_classifier("convnext_atto", weights=atto[1])[0]


def _reference_probs(model, photos) -> np.ndarray:
    batch = np.stack([reference(preprocess.load_image(p), 224, 0.875, "bicubic") for p in photos])
    return softmax(ref.hf_outputs(model, batch)["logits"])


# --- decode_predictions -------------------------------------------------------------------------


def test_decode_predictions_1k():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 1000)).astype(np.float32)
    logits[0, 281] = 9.0  # tabby
    logits[1, 967] = 9.0  # espresso
    decoded = decode_predictions(logits, top=5)
    assert [len(d) for d in decoded] == [5, 5]
    assert decoded[0][0].name == "tabby" and decoded[0][0].wnid == "n02123045"
    assert decoded[1][0].name == "espresso" and decoded[1][0].index == 967
    expected = np.exp(logits[0].astype(np.float64)) / np.exp(logits[0].astype(np.float64)).sum()
    order = np.argsort(-expected)[:5]
    assert [p.index for p in decoded[0]] == order.tolist()
    np.testing.assert_allclose([p.probability for p in decoded[0]], expected[order], rtol=1e-5)
    wnid, name, score = decoded[0][0][:3]  # Keras' (wnid, name, score) order
    assert (wnid, name) == ("n02123045", "tabby") and score == decoded[0][0].probability
    # A single row and probabilities.
    probs = expected.astype(np.float32)
    single = decode_predictions(probs, top=2, from_logits=False)[0]
    np.testing.assert_allclose([p.probability for p in single], expected[order[:2]], rtol=1e-6)


def test_decode_predictions_21k():
    names = labels.imagenet_21k()
    logits = np.zeros((1, 21841), np.float32)
    logits[0, names.index("n02123045")] = 20.0
    logits[0, names.index("n07920052")] = 19.0
    top = decode_predictions(logits, top=3)[0]
    assert [p.wnid for p in top[:2]] == ["n02123045", "n07920052"]
    assert top[0].name == "tabby" and top[1].name == "espresso"
    assert top[0].probability > top[1].probability > top[2].probability


def test_decode_predictions_errors_and_custom_labels():
    logits = np.array([[0.0, 3.0, 1.0]], np.float32)
    with pytest.raises(ValueError, match="labels="):
        decode_predictions(logits)
    top = decode_predictions(logits, top=10, labels=["ant", "bee", "cat"])[0]
    assert [p.name for p in top] == ["bee", "cat", "ant"]
    with pytest.raises(ValueError, match="3 classes but 2 labels"):
        decode_predictions(logits, labels=["a", "b"])
    with pytest.raises(ValueError, match="top"):
        decode_predictions(logits, top=0, labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="batch, classes"):
        decode_predictions(np.zeros((1, 2, 3)))


# --- predict_files ------------------------------------------------------------------------------


@pytest.mark.backends
def test_predict_files_equals_reference(atto, tmp_path):
    model, ckpt = atto
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"GIF89a but not really")
    paths = [*PHOTOS, broken, SKIMAGE / "camera.png"]
    results = predict_files("convnext_atto", paths, weights=ckpt, top=5, batch_size=3)
    assert [r.path for r in results] == [str(p) for p in paths]
    assert not results[len(PHOTOS)].ok and "broken.jpg" in results[len(PHOTOS)].error
    good = [r for r in results if r.ok]
    want = _reference_probs(model, [Path(r.path) for r in good])
    for r, probs in zip(good, want):
        order = np.argsort(-probs)[:5]
        assert [p.index for p in r.predictions] == order.tolist(), r.path
        np.testing.assert_allclose([p.probability for p in r.predictions], probs[order], atol=1e-5)
        assert r.predictions[0].name == labels.imagenet_1k().names[order[0]]


def test_predict_honours_exif_orientation(keras_atto, tmp_path):
    upright = Image.open(EXAMPLES / "cat.jpg")
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned; "rotate 270 CW to view"
    upright.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "phone.png", exif=exif)
    a, b = predict_files(keras_atto, [tmp_path / "upright.png", tmp_path / "phone.png"], top=1000)
    (c,) = predict_files(keras_atto, [tmp_path / "phone.png"], top=1000, exif_transpose=False)

    def probs(result):
        return np.array([p.probability for p in sorted(result.predictions, key=lambda p: p.index)])

    np.testing.assert_allclose(probs(a), probs(b), rtol=1e-4, atol=1e-7)
    assert np.abs(probs(c) - probs(a)).max() > 100 * np.abs(probs(b) - probs(a)).max()


# --- Grad-CAM -----------------------------------------------------------------------------------


def _reference_cam(model, images: np.ndarray, classes) -> np.ndarray:
    """Grad-CAM computed on the PyTorch reference with torch.autograd."""
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    out = model(pixel_values=x, output_hidden_states=True)
    stage4 = out.hidden_states[-1]
    target = out.logits.gather(1, torch.as_tensor(classes)[:, None]).sum()
    (grad,) = torch.autograd.grad(target, stage4)
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((alpha * stage4).sum(dim=1)).detach().numpy()
    peak = cam.max(axis=(1, 2), keepdims=True)
    return cam / np.where(peak > 0, peak, 1)


@pytest.mark.backends
def test_gradcam_equals_torch_reference(atto, keras_atto):
    model, keras_model = atto[0], keras_atto
    images = np.stack(
        [reference(preprocess.load_image(p), 224, 0.875, "bicubic") for p in PHOTOS[:3]]
    )
    cams, classes = GradCAM(keras_model)(images)
    top1 = np.argmax(ref.hf_outputs(model, images)["logits"], axis=1)
    np.testing.assert_array_equal(classes, top1)
    assert cams.shape == (3, 7, 7) and cams.dtype == np.float32
    np.testing.assert_allclose(cams, _reference_cam(model, images, top1), atol=2e-3)
    assert np.allclose(cams.max(axis=(1, 2)), 1.0)
    # An explicit class (the same for every image).
    cams_c, classes_c = GradCAM(keras_model)(images, class_index=967)
    assert classes_c.tolist() == [967] * 3
    np.testing.assert_allclose(cams_c, _reference_cam(model, images, [967] * 3), atol=2e-3)


def test_gradcam_refuses_other_models():
    import keras

    inputs = keras.Input((32, 32, 3))
    other = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Flatten()(inputs)))
    with pytest.raises(ValueError, match="head_pool"):
        GradCAM(other)


def test_cam_pictures_are_written(keras_atto, tmp_path):
    twin = tmp_path / "b" / "cat.jpg"
    twin.parent.mkdir()
    twin.write_bytes((EXAMPLES / "cat.jpg").read_bytes())
    results = predict_files(keras_atto, [EXAMPLES / "cat.jpg", twin], cam_dir=tmp_path / "cams")
    assert [Path(r.cam_path).name for r in results] == ["cat_cam.png", "cat_2_cam.png"]
    picture = Image.open(results[0].cam_path)
    assert picture.format == "PNG" and picture.mode == "RGB"
    # The region the model saw, at the photo's own resolution (224/256 of the shorter side).
    box = preprocess.crop_box((451, 300), "convnext_atto")
    assert picture.size == (round(box[2]) - round(box[0]), round(box[3]) - round(box[1]))
    assert all(abs(side - 224 / 256 * 300) <= 1 for side in picture.size)
    mode = stat.S_IMODE(os.stat(results[0].cam_path).st_mode)
    assert mode & 0o044, "CAM pictures are user files, readable as the umask allows"
    assert not list((tmp_path / "cams").glob(".*"))  # no temp files left


# --- opt-in bfloat16 inference (issue 6) -------------------------------------------------------


@pytest.mark.backends
def test_bf16_logits_within_bf16_tolerance_of_pytorch_float32(atto, keras_atto):
    """``precision="bf16"``: logits within relative error 1e-2 of the PyTorch reference's float32
    logits on real photos, and the same top-1 wherever the reference's top-1 margin is larger
    than bf16's error (a random network's ranking is only defined there)."""
    model, ckpt = atto
    photos = [*PHOTOS, SKIMAGE / "chelsea.png", SKIMAGE / "coffee.png"]
    batch = np.stack([reference(preprocess.load_image(p), 224, 0.875, "bicubic") for p in photos])
    want = ref.hf_outputs(model, batch)["logits"]
    bf16, _ = load_classifier("convnext_atto", weights=ckpt, precision="bf16")
    got = np.asarray(bf16.predict_on_batch(batch))
    assert got.dtype == np.float32
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-2
    top2 = np.sort(want, axis=-1)[:, -2:]
    sure = top2[:, 1] - top2[:, 0] > 2 * np.abs(got - want).max(axis=-1)
    assert sure.sum() >= len(photos) // 2
    np.testing.assert_array_equal(got.argmax(-1)[sure], want.argmax(-1)[sure])
    pinned = {x.name for x in bf16.layers[1:] if x.dtype_policy.name == "float32"}  # no input
    assert pinned == FLOAT32_LAYERS

    # A model object (or .keras file) in float32 -> the same bf16 network, weights shared.
    again = with_precision(keras_atto, "bf16")
    np.testing.assert_array_equal(np.asarray(again.predict_on_batch(batch)), got)
    assert with_precision(again, "bf16") is again
    assert all(layer.dtype_policy.name == "float32" for layer in keras_atto.layers)
    # Mixed precision never goes to the float32-only onnxruntime graph.
    assert runners.inference_function(again)[1] == "keras"
    with pytest.raises(ValueError, match="computes in bfloat16"):
        runners.inference_function(again, "onnxruntime")


def test_precision_none_follows_the_global_policy_and_a_value_overrides_it():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        follows = ck.load_model("convnext_atto", weights=None)
        forced = ck.load_model("convnext_atto", weights=None, precision="fp32")
        assert keras.config.dtype_policy().name == "mixed_bfloat16"  # left as it was
    finally:
        keras.config.set_dtype_policy(previous)
    assert precision_of(follows) == "bf16" and precision_of(forced) == "fp32"
    fp16 = ck.load_model("convnext_atto", weights=None, precision="fp16")
    assert precision_of(fp16) == "fp16" and keras.config.dtype_policy().name == previous.name
    assert non_float32_layer(forced) is None
    assert non_float32_layer(fp16)[1] == "float16"


def test_bad_precision_fails_before_any_download():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, int8, got"):
        load_classifier("convnext_tiny_1k_224", precision="fp8")
    with pytest.raises(ValueError, match="precision must be one of"):
        predict_files("convnext_tiny_1k_224", PHOTOS, precision="int4")
    with pytest.raises(ValueError, match="calibration photos are for precision 'int8'"):
        predict_files("convnext_tiny_1k_224", PHOTOS, calibration=EXAMPLES)
    with pytest.raises(FileNotFoundError, match="No such calibration image or folder"):
        predict_files("convnext_tiny_1k_224", PHOTOS, precision="int8", calibration="missing/")


def test_cli_precision_choices_are_the_model_precisions():
    from convnext_keras.cli import _app

    assert _app.PRECISIONS == (*PRECISIONS, quantization.INT8)


# --- the command line ---------------------------------------------------------------------------


def _invoke(args, env=None):
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def test_cli_predict_json_and_failures(atto, tmp_path, fifo):
    """... and a FIFO named ``pipe.jpg`` among them (predict hung on it forever, the good
    images got no answer): that file's error, at once."""
    _, ckpt = atto
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    pipe = fifo(tmp_path / "pipe.jpg")
    args = ["predict", str(PHOTOS[0]), str(notes), str(PHOTOS[1]), str(pipe)]
    result = _invoke(
        [*args, "--model", "convnext_atto", "--weights", str(ckpt), "--top", "3", "--json"]
    )
    assert result.exit_code == 1, result.output
    rows = json.loads(result.stdout)
    assert [r["file"] for r in rows] == [str(PHOTOS[0]), str(notes), str(PHOTOS[1]), str(pipe)]
    assert "error" in rows[1] and "notes.jpg" in rows[1]["error"]
    assert "a FIFO (named pipe), not an image file" in rows[3]["error"]
    assert [len(r["predictions"]) for r in (rows[0], rows[2])] == [3, 3]
    first = rows[0]["predictions"][0]
    assert set(first) == {"rank", "index", "wnid", "label", "probability"}
    assert first["label"] == labels.imagenet_1k().names[first["index"]]
    assert "skipped:" in result.stderr and "2 of 4 images" in result.stderr

    ok = _invoke(["predict", str(PHOTOS[0]), "--model", "convnext_atto", "--weights", str(ckpt)])
    assert ok.exit_code == 0, ok.output
    lines = ok.stdout.splitlines()
    assert lines[0] == str(PHOTOS[0]) and len(lines) == 6
    assert lines[1].lstrip().startswith("1. ") and "%" in lines[1]


def test_cli_predict_bf16(atto, keras_atto):
    _, ckpt = atto
    args = ["predict", str(PHOTOS[0]), "--model", "convnext_atto", "--weights", str(ckpt)]
    result = _invoke([*args, "--precision", "bf16", "--top", "1", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)[0]["predictions"][0]
    batch = preprocess.transform_file(PHOTOS[0], preprocess.as_config("convnext_atto"))[None]
    probs = softmax(np.asarray(keras_atto.predict_on_batch(batch)))[0]
    assert got["index"] == int(probs.argmax())
    assert got["probability"] == pytest.approx(float(probs.max()), rel=2e-2)
    bad = _invoke([*args, "--precision", "fp8"])
    assert bad.exit_code == 2 and "'fp8' is not one of 'fp32', 'bf16', 'fp16'" in bad.output


def test_cli_predict_int8(atto, keras_atto):
    """``--precision int8 --calibration DIR``: the int8 engine calibrated on DIR's photos
    through the model's official transform (the same logits as that runner made by hand)."""
    _, ckpt = atto
    args = ["predict", str(PHOTOS[0]), "--model", "convnext_atto", "--weights", str(ckpt)]
    result = _invoke([*args, "--precision", "int8", "--calibration", str(EXAMPLES), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)[0]["predictions"]
    config = preprocess.as_config("convnext_atto")
    runner = runners.OnnxRunner(
        keras_atto, precision="int8", calibration=quantization.calibration_images(EXAMPLES, config)
    )
    probs = softmax(runner(preprocess.transform_file(PHOTOS[0], config)[None]))[0]
    assert [p["index"] for p in got] == list(np.argsort(-probs)[:5])
    assert got[0]["probability"] == pytest.approx(float(probs.max()), rel=1e-5)
    bad = _invoke([*args, "--calibration", str(EXAMPLES)])
    assert bad.exit_code == 2 and bad.output == (  # said before a backend would load
        "error: --calibration is for --precision int8 (got --precision fp32); add --precision "
        "int8 or leave --calibration out.\n"
    )


def test_cli_predict_cam(atto, tmp_path):
    _, ckpt = atto
    out = tmp_path / "cams"
    result = _invoke(
        ["predict", str(EXAMPLES / "rocket.jpg"), "--model", "convnext_atto", "--weights",
         str(ckpt), "--top", "1", "--cam", str(out)]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "rocket_cam.png").is_file()
    assert f"Grad-CAM: {out / 'rocket_cam.png'}" in result.stdout


def test_make_demo_fails_fast_offline(loopback_server, monkeypatch):
    """The README's main job without reachable weights: the download error, never random
    weights."""
    monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)
    args = ["predict", *map(str, PHOTOS), "--model", "convnext_tiny_1k_224", "--top", "3"]
    result = _invoke(args)
    assert result.exit_code == 2
    assert result.stdout == ""  # no predictions at all
    message = result.stderr
    url = loopback_server.url + "convnext_tiny_1k_224_ema.pth"
    assert message.startswith("error: Could not download " + url)
    assert "404" in message and "--weights FILE" in message and "CONVNEXT_BASE_URL" in message
    assert loopback_server.requests == ["/convnext_tiny_1k_224_ema.pth"]


# --- ConvNeXt V2 --------------------------------------------------------------------------------

ATTO_V2 = registry.VARIANTS["convnextv2_atto"]


@pytest.fixture(scope="module")
def atto_v2(tmp_path_factory):
    """A transformers ConvNextV2-atto (GRN far from the identity) and its official file."""
    model = ref.reference(ATTO_V2, seed=3)
    return model, ref.save_official(model, tmp_path_factory.mktemp("atto_v2") / "atto_v2.pt")


@pytest.mark.backends
def test_v2_predict_gradcam_and_bf16_equal_pytorch(atto_v2):
    """ConvNeXt V2 by name: predictions (official V2 transform), Grad-CAM and bf16 logits
    against transformers' ConvNextV2 (bf16: relative error <= 1e-2, same top-1 wherever the
    reference's margin exceeds bf16's error)."""
    model, ckpt = atto_v2
    name = "convnextv2_atto_1k_224"
    results = predict_files(name, PHOTOS, weights=ckpt, top=3, batch_size=4)
    want = _reference_probs(model, PHOTOS)
    for r, probs in zip(results, want):
        order = np.argsort(-probs)[:3]
        assert [p.index for p in r.predictions] == order.tolist(), r.path
        np.testing.assert_allclose([p.probability for p in r.predictions], probs[order], atol=1e-5)

    keras_model, config = load_classifier(name, weights=ckpt)
    assert tuple(config) == (224, 0.875, "bicubic", None)
    images = np.stack([reference(preprocess.load_image(p), 224, 0.875, "bicubic") for p in PHOTOS])
    logits = ref.hf_outputs(model, images)["logits"]
    cams, classes = GradCAM(keras_model)(images[:2])
    np.testing.assert_array_equal(classes, logits[:2].argmax(-1))
    np.testing.assert_allclose(cams, _reference_cam(model, images[:2], classes), atol=2e-3)

    bf16, _ = load_classifier(name, weights=ckpt, precision="bf16")
    got = np.asarray(bf16.predict_on_batch(images))
    assert np.linalg.norm(got - logits) / np.linalg.norm(logits) <= 1e-2
    top2 = np.sort(logits, axis=-1)[:, -2:]
    sure = top2[:, 1] - top2[:, 0] > 2 * np.abs(got - logits).max(axis=-1)
    assert sure.sum() >= len(PHOTOS) // 2
    np.testing.assert_array_equal(got.argmax(-1)[sure], logits.argmax(-1)[sure])


def test_v2_cli_predict_with_cam_and_encoders_refused(atto_v2, tmp_path):
    _, ckpt = atto_v2
    out = tmp_path / "cams"
    result = _invoke(
        ["predict", str(EXAMPLES / "cat.jpg"), "--model", "convnextv2_atto_1k_224_ema",
         "--weights", str(ckpt), "--top", "2", "--cam", str(out)]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "cat_cam.png").is_file() and "2. " in result.stdout
    for name, what in (
        ("convnextv2_atto_fcmae", "an encoder"),
        ("convnextv2_atto_1k_224_fe", "a feature extractor"),
    ):
        bad = _invoke(["predict", str(EXAMPLES / "cat.jpg"), "--model", name])
        assert bad.exit_code == 2, bad.output
        assert f"is {what} without a classification head" in bad.stderr
        assert "convnextv2_atto_1k_224" in bad.stderr


def test_cli_predict_never_prints_nan_a_non_finite_logit_fails_that_image(
    atto, monkeypatch, tmp_path
):
    tiny = tmp_path / "tiny.png"  # 16x16: predict owns the resize, so the network can take it
    Image.open(PHOTOS[0]).resize((16, 16)).save(tiny)

    real = runners.inference_function

    def broken(model, engine="auto", **options):  # the second image of every batch is NaN
        run, name = real(model, engine, **options)

        def run_batch(images):
            logits = np.array(run(images), dtype=np.float32)
            logits[1:2] = np.nan
            return logits

        return run_batch, name

    monkeypatch.setattr(runners, "inference_function", broken)
    args = ["predict", str(tiny), str(PHOTOS[1]), "--model", "convnext_atto", "--json"]
    result = _invoke([*args, "--weights", str(atto[1])])
    assert result.exit_code == 1, result.output
    assert "NaN" not in result.stdout.replace("NaN or infinite", "")
    rows = json.loads(result.stdout)  # valid JSON
    assert "predictions" in rows[0] and "NaN or infinite logits" in rows[1]["error"]
    assert "1 of 2 images could not be classified" in result.stderr
    with pytest.raises(ValueError, match=r"Rows \[1\] of the logits hold NaN"):
        decode_predictions(np.array([[1.0, 2.0], [np.nan, 0.0]]), labels=["a", "b"])


def test_cli_predict_with_a_keras_file_safe_mode_refuses_is_one_line(tmp_path):
    import zipfile

    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x)(inputs)).save(tmp_path / "ok.keras")
    with zipfile.ZipFile(tmp_path / "ok.keras") as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    config = json.loads(files["config.json"])
    for module, function in (("os", "system"), ("builtins", "exec")):
        config["config"]["layers"][1]["config"]["function"] = {
            "module": module, "class_name": "function", "config": function,
            "registered_name": "function",
        }  # fmt: skip
        evil = tmp_path / f"{function}.keras"
        with zipfile.ZipFile(evil, "w") as archive:
            for name, data in files.items():
                archive.writestr(name, json.dumps(config) if name == "config.json" else data)
        result = CliRunner().invoke(main, ["predict", str(PHOTOS[0]), "--model", str(evil)])
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: {evil} could not be loaded as a Keras model")
        assert f"'{function}'" in result.output and result.output.count("\n") == 1
