"""keras-hub's API on this library's models (``convnext_keras.kerashub``, the optional extra).

The proofs: a preset (keras-hub's ``from_preset``, from a folder, a registry name or an
``hf://`` address) gives what ``ck.load_model(name)`` gives - on normalised input within 1e-5,
on raw photos through the preset's own preprocessing within 1e-4 - for ConvNeXt V1, V2,
isotropic, DINOv3 and UperNet; the image converters equal this library's transforms bit for
bit on real photos; a preset reloads in a fresh process with only ``import convnext_keras,
keras_hub``, also after a round trip through a loopback Hugging Face Hub; ``fit`` learns and
keras-hub's saving keeps the weights exactly; registry names build, check and rebuild their
cached presets; the library works without keras-hub.

The checkpoints are made here in their published layouts (random, well-spread weights): the
official ``.pth`` of ConvNeXt-atto, ConvNeXt V2-atto, isotropic ConvNeXt-S and
UperNet-ConvNeXt-T, timm's ``model.safetensors`` of ConvNeXt-atto and the Hub's DINOv3
ConvNeXt-T, the last two served by the loopback Hub.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import isotropic_reference as iref  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch_reference as ref  # noqa: E402
import upernet_reference as uref  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

import convnext_keras as ck  # noqa: E402
from convnext_keras import registry  # noqa: E402
from convnext_keras.cli import main  # noqa: E402
from convnext_keras.engines.quantization import sample_photos  # noqa: E402
from convnext_keras.kerashub import (  # noqa: E402
    ConvNeXtImageConverter,
    ConvNeXtUperNetImageConverter,
    presets,
)
from convnext_keras.preprocess import config_for, eval_transform, load_image  # noqa: E402
from convnext_keras.tasks import segment  # noqa: E402
from convnext_keras.weights import cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
#: Real photos: the examples and the ones scikit-image and scikit-learn ship (RGB and grey).
PHOTOS = sorted((ROOT / "examples" / "images").glob("*.jpg")) + sample_photos()
SEGMENTATION = "upernet_convnext_tiny_ade20k_512"
#: The UperNet test resize scaled down (short side 96) for the raw-photo check on CPUs.
SMALL_SCALE = (384, 96)


def _numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def _ragged_dataset(images, batch: int = 8):
    """Photos of different sizes as keras-hub takes them for predict: a ragged batch."""
    spec = tf.TensorSpec((None, None, 3), tf.uint8)
    return tf.data.Dataset.from_generator(lambda: iter(images), output_signature=spec).ragged_batch(
        batch
    )


# ---------------------------------------------------------------------------------------------
# The converters: this library's transforms, bit for bit


#: Every kind of evaluation transform the registry holds: crop 0.875 bicubic (ConvNeXt),
#: squash at 384 (ConvNeXt 384), DINOv3's bilinear squash at 224, timm's 0.95 crop and its
#: centre crop at 384.
CONFIGS = {
    "convnext_tiny_1k_224": (224, 0.875, "bicubic", None),
    "convnext_base_1k_384": (384, 1.0, "bicubic", None),
    "dinov3_convnext_tiny_lvd1689m": (224, 1.0, "bilinear", "squash"),
    "convnext_nano_1k_224": (224, 0.95, "bicubic", None),
    "convnext_nano_12k_1k_384": (384, 1.0, "bicubic", "center"),
}


#: The rows whose converter also runs inside tf.data here (crop and squash, both filters).
GRAPH_CHECKS = ("convnext_tiny_1k_224", "dinov3_convnext_tiny_lvd1689m")


@pytest.mark.backends
def test_converters_equal_the_library_transforms_bit_for_bit():
    """Eagerly (keras-hub's Python path) and inside tf.data (where predict and fit put
    preprocessing, on every backend): the converter of each registry row equals
    ``eval_transform(load_image(file))`` exactly on every photo, grey ones included; the
    UperNet converter equals ``tasks.segment.test_image``."""
    assert PHOTOS and len(PHOTOS) >= 10
    rgb = [np.asarray(load_image(p)) for p in PHOTOS]
    raw = [np.asarray(Image.open(p)) for p in PHOTOS]  # grey photos stay (H, W)
    assert any(r.ndim == 2 for r in raw)
    for name, config in CONFIGS.items():
        assert tuple(config_for(name)) == config, name
        converter = ConvNeXtImageConverter.for_model(name)
        expected = [eval_transform(load_image(p), *config) for p in PHOTOS]
        for image, want in zip(raw, expected):
            got = _numpy(converter(image))
            assert got.dtype == np.float32 and np.array_equal(got, want), name
        if name in GRAPH_CHECKS:  # the same numpy code, through tf.numpy_function
            graph = _ragged_dataset(rgb).map(converter)
            got = np.concatenate([b.numpy() for b in graph])
            np.testing.assert_array_equal(got, np.stack(expected), err_msg=name)
    # UperNet: keep-ratio resize to the row's image scale, one image at a time (sizes differ).
    seg = ConvNeXtUperNetImageConverter.for_model(SEGMENTATION)
    assert seg.image_scale == registry.CHECKPOINTS[SEGMENTATION].segmentation.eval.image_scale
    for image in rgb[:3]:
        want = segment.test_image(image, seg.image_scale)
        np.testing.assert_array_equal(_numpy(seg(image)), want)
        graph = tf.data.Dataset.from_tensors(image[None]).map(seg)
        np.testing.assert_array_equal(next(iter(graph)).numpy()[0], want)


def test_converter_inputs_and_errors():
    """Floats 0..255 are rounded like the uint8 they stand for, RGBA is composited on white as
    load_image does, a batch array is a batch; [0, 1] images, NaN, out-of-range pixels,
    wrong shapes and non-square sizes are refused with one clear line."""
    converter = ConvNeXtImageConverter(64, 0.875, "bicubic")
    photo = np.asarray(load_image(PHOTOS[0]))
    want = _numpy(converter(photo))
    np.testing.assert_array_equal(_numpy(converter(photo.astype(np.float32))), want)
    np.testing.assert_array_equal(_numpy(converter(photo.astype(np.int64))), want)
    np.testing.assert_array_equal(_numpy(converter(np.stack([photo, photo])))[1], want)
    rgba = np.dstack([photo, np.full(photo.shape[:2], 128, np.uint8)])
    flat = Image.alpha_composite(
        Image.new("RGBA", rgba.shape[1::-1], (255,) * 4), Image.fromarray(rgba, "RGBA")
    ).convert("RGB")
    np.testing.assert_array_equal(_numpy(converter(rgba)), eval_transform(flat, 64, 0.875))
    bad = {
        "multiply [0, 1] images by 255": photo / 255.0,
        "NaN or infinite": np.full((40, 40, 3), np.nan, np.float32),
        "Pixels must lie in 0..255": photo.astype(np.float32) * 2,
        "channels last": np.zeros((3, 40, 40), np.uint8),
        "The image is empty": np.zeros((0, 40, 3), np.uint8),
    }
    for message, image in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            converter(image)
    with pytest.raises(ValueError, match="set a size \\(n, n\\)"):
        converter.image_size = (64, 96)
    converter.image_size = (96, 96)
    assert _numpy(converter(photo)).shape == (96, 96, 3)
    assert ConvNeXtImageConverter.from_config(converter.get_config()).config == converter.config
    with pytest.raises(ValueError, match="interpolation must be one of"):
        ConvNeXtImageConverter(224, 0.875, "cubic")


def test_a_new_backbone_starts_as_the_original_does():
    """ConvNeXtBackbone draws its kernels in numpy (Keras' draws cost JAX a compilation per
    shape) from the layers' own initialiser: truncated normal, std 0.02 (the original's
    trunc_normal_), cut at 2 standard deviations; reproducible under set_random_seed; layer
    scale 1e-6, LayerNorms at 1 and 0."""
    from convnext_keras.kerashub import ConvNeXtBackbone

    keras.utils.set_random_seed(3)
    first = ConvNeXtBackbone.from_architecture("convnext_atto")
    keras.utils.set_random_seed(3)
    second = ConvNeXtBackbone.from_architecture("convnext_atto")
    layer = first.get_layer("stage3_block1_pwconv1")
    assert isinstance(layer.kernel_initializer, keras.initializers.TruncatedNormal)
    kernel = _numpy(layer.kernel)
    bound = 2 * layer.kernel_initializer.stddev
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
    assert abs(kernel.std() - registry.KERNEL_INIT_STD) < 0.001
    for a, b in zip(first.weights, second.weights):
        np.testing.assert_array_equal(_numpy(a), _numpy(b))
    np.testing.assert_array_equal(
        _numpy(first.get_layer("stage0_block0_layer_scale").weights[0]), np.float32(1e-6)
    )
    assert np.all(_numpy(first.head_norm.gamma) == 1) and np.all(_numpy(first.head_norm.beta) == 0)


# ---------------------------------------------------------------------------------------------
# Presets from checkpoints: V1, V2, isotropic, UperNet


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> a checkpoint file of that architecture in its published (official) layout."""
    folder = tmp_path_factory.mktemp("kerashub_ckpt")
    atto, atto_v2 = registry.VARIANTS["atto"], registry.VARIANTS["convnextv2_atto"]
    iso = registry.VARIANTS["iso_small"]
    return {
        "convnext_atto": ref.save_official(
            ref.hf_model(atto.depths, atto.dims, 1000, seed=31), folder / "atto.pth"
        ),
        "convnextv2_atto": ref.save_official(
            ref.hf_v2_model(atto_v2.depths, atto_v2.dims, 1000, seed=32), folder / "atto_v2.pt"
        ),
        "convnext_iso_small": iref.save_official(
            iref.model(iso.depths[0], iso.dims[0], 1000, layer_scale=False, seed=33),
            folder / "iso_small.pth",
        ),
    }


@pytest.fixture(scope="module")
def preset_folders(checkpoints, tmp_path_factory):
    """name -> its keras-hub preset folder (save_preset: written, reloaded, verified)."""
    out = tmp_path_factory.mktemp("kerashub_presets")
    folders = {}
    for name, path in checkpoints.items():
        result = presets.save_preset(name, out / name, weights=path)
        assert result.max_abs_diff <= presets.TOLERANCE and "bit-equal" in result.checks[-1]
        folders[name] = out / name
    return folders


def _check_classifier(classifier, reference, name, photos):
    """The keras-hub classifier against ``reference`` (ck.load_model(..., features="all") of
    the same weights): on normalised input (1e-5) and on raw photos through predict (1e-4)."""
    x = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
    assert _max_diff(_numpy(classifier(x)), _numpy(reference(x)["logits"])) <= 1e-5
    images = [np.asarray(load_image(p)) for p in photos]
    inputs = np.stack([eval_transform(load_image(p), *config_for(name)) for p in photos])
    got = classifier.predict(_ragged_dataset(images), verbose=0)
    assert _max_diff(got, _numpy(reference(inputs)["logits"])) <= 1e-4


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("convnext_atto", marks=pytest.mark.backends),
        "convnextv2_atto",
        "convnext_iso_small",
    ],
)
def test_classifier_presets_equal_load_model(name, checkpoints, preset_folders):
    """ImageClassifier.from_preset (keras-hub's base class: it finds this library's subclass
    from the preset) gives ck.load_model's logits; its backbone, the stage outputs as keras-hub's
    pyramid and the pooled features."""
    classifier = keras_hub.models.ImageClassifier.from_preset(str(preset_folders[name]))
    assert type(classifier).__name__ == "ConvNeXtImageClassifier"
    assert type(classifier.preprocessor.image_converter) is ConvNeXtImageConverter
    reference = ck.load_model(name, weights=checkpoints[name], features="all")
    _check_classifier(classifier, reference, name, PHOTOS[:4])

    backbone, spec = classifier.backbone, registry.variant(name)
    x = np.random.default_rng(2).standard_normal((1, 64, 64, 3)).astype(np.float32)
    stages = reference(x)
    keys = {4: "P2", 8: "P3", 16: "P4", 32: "P5"}
    assert list(backbone.pyramid_outputs) == [keys[s] for s in spec.strides]
    pyramid = keras.Model(backbone.inputs, backbone.pyramid_outputs)(x)
    for i, stride in enumerate(spec.strides):
        want = _numpy(stages[f"stage{i + 1}"])
        np.testing.assert_array_equal(_numpy(pyramid[keys[stride]]), want)
    pooled = keras.Model(backbone.inputs, backbone.pooled_output)(x)
    assert _max_diff(_numpy(pooled), _numpy(stages["pooled"])) <= 1e-5


@pytest.fixture(scope="module")
def upernet(tmp_path_factory):
    """The UperNet row on a ConvNeXt-atto with a 64-channel decoder (the official ones are
    ConvNeXt-T and larger with 512 channels: the same code, which tests/tasks/test_segmentation.py
    proves against PyTorch at full size), its mmseg checkpoint and its preset folder."""
    row = registry.CHECKPOINTS[SEGMENTATION]
    head = registry.UperNetHead(64, row.segmentation.head.pool_scales)
    small = dataclasses.replace(
        row, variant="atto", segmentation=dataclasses.replace(row.segmentation, head=head)
    )
    folder = tmp_path_factory.mktemp("kerashub_upernet")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry.CHECKPOINTS, SEGMENTATION, small)
        torch_model = uref.hf_upernet(registry.VARIANTS["atto"], seed=34, channels=64)
        path = uref.save_mmseg(torch_model, folder / "upernet_atto.pth")
        result = presets.save_preset(SEGMENTATION, folder / "preset", weights=path)
        assert result.max_abs_diff <= presets.TOLERANCE and "bit-equal" in result.checks[-1]
        yield path, folder / "preset"


def test_segmenter_preset_equals_load_model(upernet):
    """ImageSegmenter.from_preset gives ck.load_model's UperNet logits, on normalised input and
    on a raw photo through its converter (mmseg's test resize; scaled down here)."""
    path, folder = upernet
    segmenter = keras_hub.models.ImageSegmenter.from_preset(str(folder))
    assert type(segmenter).__name__ == "ConvNeXtUperNetImageSegmenter"
    assert segmenter.channels == 64
    reference = ck.load_model(SEGMENTATION, weights=path)
    x = np.random.default_rng(3).standard_normal((1, 64, 96, 3)).astype(np.float32)
    assert _max_diff(_numpy(segmenter(x)), _numpy(reference(x))) <= 1e-5
    segmenter.preprocessor.image_converter.image_scale = SMALL_SCALE
    photo = np.asarray(load_image(PHOTOS[1]))
    got = segmenter.predict(photo[None], verbose=0)
    expected = _numpy(reference(segment.test_image(photo, SMALL_SCALE)[None]))
    assert got.shape == expected.shape and _max_diff(got, expected) <= 1e-4


# ---------------------------------------------------------------------------------------------
# Registry names as presets (built in the cache from the library's load path)


def _serve(hub_server, row, path):
    folder = hub_server.root / row.source.repo
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, folder / row.source.path)


def test_registry_names_are_presets(hub_server, isolated_cache, tmp_path, caplog):
    """``ImageClassifier.from_preset("convnext_atto_1k_224")`` and
    ``Backbone.from_preset("dinov3_convnext_tiny_lvd1689m")``: each name's file comes from its
    (loopback) Hub repository through load_model, the preset is built, verified and cached; the
    next load reads the cache alone; a damaged cached file is moved aside and rebuilt.  DINOv3's
    features equal load_model's on normalised input (1e-5) and on raw photos through the
    preset's converter (1e-4)."""
    atto, dino = (
        registry.CHECKPOINTS[n] for n in ("convnext_atto_1k_224", "dinov3_convnext_tiny_lvd1689m")
    )
    spec = atto.spec
    atto_file = ref.save_timm(
        ref.hf_model(spec.depths, spec.dims, 1000, seed=41), tmp_path / "atto.safetensors", True
    )
    tiny = registry.VARIANTS["tiny"]
    dino_file = ref.save_dinov3_hub(
        ref.hf_dinov3_model(tiny.depths, tiny.dims, seed=42), tmp_path / "dino.safetensors"
    )
    _serve(hub_server, atto, atto_file)
    _serve(hub_server, dino, dino_file)
    assert {atto.name, dino.name, SEGMENTATION} <= set(keras_hub.models.ImageClassifier.presets)

    classifier = keras_hub.models.ImageClassifier.from_preset(atto.name)
    reference = ck.load_model(atto.name, weights=atto_file, features="all")
    _check_classifier(classifier, reference, atto.name, PHOTOS[4:6])
    folder = isolated_cache / "keras-hub" / atto.name
    assert (folder / "task.weights.h5").is_file() and (folder / presets.MANIFEST).is_file()

    # DINOv3: an encoder without head -> a backbone preset (its pooled features are DINOv3's
    # global descriptor); ImageClassifier.from_preset gives it a new head.
    backbone = keras_hub.models.Backbone.from_preset(dino.name)
    x = np.random.default_rng(4).standard_normal((1, 64, 64, 3)).astype(np.float32)
    features = keras.Model(backbone.inputs, backbone.pooled_output)
    dino_reference = ck.load_model(dino.name, weights=dino_file, features="pooled")
    assert _max_diff(_numpy(features(x)), _numpy(dino_reference(x))) <= 1e-5
    converter = keras_hub.layers.ImageConverter.from_preset(dino.name)
    assert converter.config == config_for(dino.name)
    # Raw photos through the preset's converter (DINOv3's bilinear squash at 224) and the
    # backbone: ck.load_model's features on this library's transform of the same photos.
    photos = PHOTOS[6:8]
    converted = np.stack([_numpy(converter(np.asarray(load_image(p)))) for p in photos])
    transformed = np.stack([eval_transform(load_image(p), *config_for(dino.name)) for p in photos])
    assert _max_diff(_numpy(features(converted)), _numpy(dino_reference(transformed))) <= 1e-4
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        keras_hub.models.ImageClassifier.from_preset(dino.name)
    fresh = keras_hub.models.ImageClassifier.from_preset(dino.name, num_classes=3)
    assert fresh.output_dense.units == 3
    assert _max_diff(_numpy(fresh.head_norm.gamma), _numpy(backbone.head_norm.gamma)) == 0

    # Cached: no request to the Hub; damaged: moved aside, rebuilt, same outputs.
    requests = len(hub_server.requests)
    again = keras_hub.models.ImageClassifier.from_preset(atto.name)
    assert len(hub_server.requests) == requests
    weights = folder / "model.weights.h5"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    rebuilt = keras_hub.models.ImageClassifier.from_preset(atto.name)
    assert "differs from its SHA-256 record; rebuilding" in caplog.text
    assert list(isolated_cache.glob(f"keras-hub/{atto.name}.corrupt-*"))
    np.testing.assert_array_equal(_numpy(rebuilt(x)), _numpy(again(x)))


# ---------------------------------------------------------------------------------------------
# Fresh processes, the Hub, training, saving


FRESH = """
import json, sys
import keras
import numpy as np
import keras_hub  # first, without convnext_keras: keras cannot know the classes
folder, address, out = sys.argv[1:4]
try:
    keras_hub.models.ImageClassifier.from_preset(folder)
    error = None
except Exception as e:
    error = str(e)
import convnext_keras  # after keras_hub: registers at once
x = np.load(out + ".x.npy")
got = {}
for key, preset in (("folder", folder), ("hub", address)):
    model = keras_hub.models.ImageClassifier.from_preset(preset)
    got[key] = np.asarray(keras.ops.convert_to_numpy(model(x)))
np.savez(out, **got)
print(json.dumps({"error": error}))
"""


@pytest.mark.backends
@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="the fresh-process round trip is proved on TensorFlow and JAX (CI time)",
)
def test_fresh_process_and_hugging_face_hub_round_trip(preset_folders, hub_server, tmp_path):
    """keras_hub.upload_preset to the (loopback) Hub, then in a fresh process: without
    ``import convnext_keras`` keras-hub says which class it lacks; with it, the folder and
    ``hf://org/name`` load and give the outputs of this process."""
    folder = tmp_path / "preset"
    shutil.copytree(preset_folders["convnextv2_atto"], folder)
    os.environ["HF_TOKEN"] = hub_server.token  # huggingface_hub wants one to write
    try:
        keras_hub.upload_preset("hf://org/convnextv2_atto", str(folder))
    finally:
        del os.environ["HF_TOKEN"]
    uploaded = {path for repo, path in hub_server.uploads if repo == "org/convnextv2_atto"}
    assert {"config.json", "model.weights.h5", "task.json", "image_converter.json"} <= uploaded

    x = np.random.default_rng(5).standard_normal((2, 64, 64, 3)).astype(np.float32)
    out = tmp_path / "outputs"
    np.save(f"{out}.x.npy", x)
    expected = _numpy(keras_hub.models.ImageClassifier.from_preset(str(folder))(x))
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(FRESH),
            str(folder),
            "hf://org/convnextv2_atto",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    error = json.loads(run.stdout.strip().splitlines()[-1])["error"]
    assert "convnext_keras>ConvNeXt" in error and "register" in error
    got = np.load(f"{out}.npz")
    np.testing.assert_array_equal(got["folder"], expected)
    np.testing.assert_array_equal(got["hub"], expected)


def test_upload_keeps_the_model_card(preset_folders, hub_server, tmp_path, monkeypatch):
    """keras-hub replaces a preset's README.md by a generic card on a new Hub repository (and
    deletes the local one); kerashub.upload_preset uploads the model card first, so it stays,
    there and here."""
    folder = tmp_path / "preset"
    shutil.copytree(preset_folders["convnext_atto"], folder)
    card = (folder / presets.CARD).read_text()
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    presets.upload_preset("hf://org/atto", folder)
    assert (folder / presets.CARD).read_text() == card
    assert (hub_server.root / "org/atto" / presets.CARD).read_text() == card
    assert (hub_server.root / "org/atto" / "model.weights.h5").is_file()


def test_fit_lowers_the_loss_and_saving_keeps_the_weights(tmp_path):
    """ImageClassifier.from_preset(..., num_classes=2) (a new head on the preset's backbone,
    its head norm kept) trained for two epochs on real photos with keras-hub's compile defaults
    lowers the loss; save_to_preset / from_preset keeps every weight exactly.  The preset is
    the original's initialisation (weights=None: layer scale 1e-6), as training starts from; the
    test checkpoints' well-spread random weights make a chaotic network that 4 steps of Adam
    at 5e-5 do not reliably improve."""
    keras.utils.set_random_seed(0)
    folder = tmp_path / "init"
    presets.save_preset("convnext_atto", folder, weights=None)
    original = keras_hub.models.Backbone.from_preset(str(folder))
    classifier = keras_hub.models.ImageClassifier.from_preset(str(folder), num_classes=2)
    np.testing.assert_array_equal(
        _numpy(classifier.head_norm.gamma), _numpy(original.head_norm.gamma)
    )
    images = [np.asarray(load_image(p)) for p in PHOTOS[:8]]
    labels = np.array([0, 1] * 4)
    data = tf.data.Dataset.zip(
        tf.data.Dataset.from_generator(
            lambda: iter(images), output_signature=tf.TensorSpec((None, None, 3), tf.uint8)
        ),
        tf.data.Dataset.from_tensor_slices(labels),
    ).ragged_batch(4)
    before = classifier.evaluate(data, verbose=0, return_dict=True)["loss"]
    history = classifier.fit(data, epochs=2, verbose=0)
    after = classifier.evaluate(data, verbose=0, return_dict=True)["loss"]
    assert np.isfinite(history.history["loss"]).all()
    assert after < before, (before, after)

    classifier.save_to_preset(str(tmp_path / "tuned"))
    reloaded = keras_hub.models.ImageClassifier.from_preset(str(tmp_path / "tuned"))
    assert len(reloaded.weights) == len(classifier.weights)
    for a, b in zip(classifier.weights, reloaded.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(_numpy(a), _numpy(b), err_msg=a.path)
    assert not np.array_equal(_numpy(reloaded.backbone.weights[0]), _numpy(original.weights[0]))


def test_cli_export_writes_a_verified_preset_with_a_model_card(checkpoints, tmp_path):
    """``convnext export NAME --format keras-hub --out DIR``: DIR/NAME, reloaded and checked
    before it is moved in, with a model card and this library's manifest; an existing folder
    is kept without --overwrite."""
    args = ["export", "convnextv2_atto", "--format", "keras-hub", "--out", str(tmp_path)]
    args += ["--weights", str(checkpoints["convnextv2_atto"])]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.output)
    folder = tmp_path / "convnextv2_atto"
    assert report["format"] == "keras-hub" and report["path"] == str(folder)
    assert report["max_abs_diff"] <= presets.TOLERANCE
    card = (folder / "README.md").read_text()
    assert "library_name: keras-hub" in card and "import convnext_keras, keras_hub" in card
    manifest = json.loads((folder / presets.MANIFEST).read_text())
    digest = cache.file_sha256(checkpoints["convnextv2_atto"])
    assert manifest["weights"] == f"the checkpoint file atto_v2.pt (SHA-256 {digest})"
    assert str(tmp_path.parent) not in card  # no path of this machine in what may be published
    assert set(manifest["files"]) >= {"config.json", "model.weights.h5", "task.weights.h5"}
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "exists; pass --overwrite" in again.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# An optional extra


def test_the_library_works_without_keras_hub():
    """With keras-hub installed, ``import convnext_keras, keras`` does not import it; with it
    unimportable, convnext_keras imports, builds and predicts, and convnext_keras.kerashub says
    how to install it."""
    code = """
    import sys
    import convnext_keras as ck
    import keras
    print("imported:", "keras_hub" in sys.modules)
    sys.modules["keras_hub"] = None  # as if not installed
    import numpy as np
    model = ck.load_model("convnext_atto", weights=None)
    assert np.isfinite(model.predict_on_batch(np.zeros((1, 32, 32, 3), "float32"))).all()
    try:
        import convnext_keras.kerashub
    except ImportError as e:
        print("kerashub:", e)
    """
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "imported: False" in run.stdout
    assert "pip install 'convnext-keras[keras-hub]'" in run.stdout
