"""The preprocessing equals the official evaluation transform, computed here directly with PIL.

The reference below is written from the original's recipe (facebookresearch/ConvNeXt
``datasets.build_transform`` on torchvision + PIL), not from the library: shorter side to
``int(res / crop_pct)`` with PIL bicubic, torchvision's centre-crop offsets, squash at 384,
``/ 255``, ImageNet mean/std.  Inputs are real photos from the scikit-image and scikit-learn
wheels.
"""

from __future__ import annotations

import io
import pickle
import threading
from pathlib import Path

import keras
import numpy as np
import pytest
import skimage
import sklearn
from PIL import Image

from convnext_keras import preprocess as pp
from convnext_keras import registry

SKIMAGE = Path(skimage.__file__).parent / "data"
SKLEARN = Path(sklearn.__file__).parent / "datasets" / "images"
PHOTOS = [
    SKIMAGE / "astronaut.png",  # 512 x 512
    SKIMAGE / "chelsea.png",  # 451 x 300, landscape
    SKIMAGE / "coffee.png",  # 600 x 400
    SKIMAGE / "rocket.jpg",  # 640 x 427
    SKIMAGE / "hubble_deep_field.jpg",  # 1000 x 872
    SKIMAGE / "camera.png",  # grayscale
    SKLEARN / "china.jpg",
    SKLEARN / "flower.jpg",
]
CONFIGS = [(224, 0.875, "bicubic"), (384, 1.0, "bicubic"), (288, 0.95, "bilinear")]
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def reference_uint8(image: Image.Image, res: int, crop_pct: float, interp: str) -> np.ndarray:
    """Official order, directly in PIL: the uint8 image ToTensor() would see."""
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interp]
    image = image.convert("RGB")
    if res >= 384:
        return np.asarray(image.resize((res, res), resample))
    size = int(res / crop_pct)
    w, h = image.size
    if w < h:
        ow, oh = size, int(size * h / w)
    else:
        ow, oh = int(size * w / h), size
    image = image.resize((ow, oh), resample)
    # torchvision.transforms.functional.center_crop
    top = int(round((oh - res) / 2.0))
    left = int(round((ow - res) / 2.0))
    return np.asarray(image)[top : top + res, left : left + res]


def reference(image, res, crop_pct, interp) -> np.ndarray:
    x = reference_uint8(image, res, crop_pct, interp).astype(np.float32) / 255.0
    return (x - MEAN) / STD


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
def test_eval_transform_equals_official_order(photo, config):
    image = Image.open(photo)
    ours = pp.eval_transform(pp.load_image(photo), *config)
    want = reference(image, *config)
    assert ours.shape == (config[0], config[0], 3) and ours.dtype == np.float32
    # Within one 8-bit step per pixel before normalisation (in fact identical).
    step = 1.0 / 255.0 / STD
    assert np.all(np.abs(ours - want) <= step + 1e-6)
    np.testing.assert_array_equal(pp.denormalize(ours), reference_uint8(image, *config))


@pytest.mark.parametrize("width", [300, 301, 257, 290, 1000])
def test_centre_crop_rounding_matches_torchvision(width):
    """Odd margins round half to even, as torchvision's CenterCrop (Python's round)."""
    photo = Image.open(SKIMAGE / "coffee.png").convert("RGB").crop((0, 0, width, 256))
    got = pp.resize_and_crop(photo, 224, 0.875)
    np.testing.assert_array_equal(np.asarray(got), reference_uint8(photo, 224, 0.875, "bicubic"))


def test_crop_mode_overrides_the_official_rule():
    """``crop_mode`` "squash" warps at any size (DINOv3's processor: 224x224, bilinear);
    "center" crops at 384 too (timm's r384 tag: shorter side to 384, centre 384x384)."""
    photo = pp.load_image(SKIMAGE / "chelsea.png")  # 451 x 300
    squashed = pp.resize_and_crop(photo, 224, 1.0, "bilinear", "squash")
    np.testing.assert_array_equal(
        np.asarray(squashed), np.asarray(photo.resize((224, 224), Image.BILINEAR))
    )
    centred = pp.resize_and_crop(photo, 384, 1.0, "bicubic", "center")
    # shorter side 300 -> 384: 577 x 384, crop at left round(96.5) = 96 (half to even)
    want = np.asarray(photo.resize((577, 384), Image.BICUBIC))[:, 96:480]
    np.testing.assert_array_equal(np.asarray(centred), want)
    with pytest.raises(ValueError, match="crop_mode"):
        pp.as_config((224, 0.875, "bicubic", "middle"))


def test_geometry_of_a_landscape_photo():
    # 451 x 300 at 224/0.875: shorter side 256 -> 384 x 256, crop at left 80, top 16.
    photo = pp.load_image(SKIMAGE / "chelsea.png")
    resized = photo.resize((384, 256), Image.BICUBIC)
    want = np.asarray(resized)[16:240, 80:304]
    np.testing.assert_array_equal(np.asarray(pp.resize_and_crop(photo, 224, 0.875)), want)


def test_config_for_reads_the_registry():
    for name, ckpt in registry.CHECKPOINTS.items():
        cfg = pp.config_for(name)
        assert cfg == (ckpt.resolution, ckpt.crop_pct, ckpt.interpolation, ckpt.crop_mode)
        if ckpt.segmentation is None and ckpt.detection is None:  # no _fe twin for these
            assert pp.config_for(name + "_fe") == cfg
    assert pp.config_for("convnext_tiny_1k_224") == (224, 0.875, "bicubic", None)
    assert pp.config_for("convnext_base_22k_1k_384") == (384, 1.0, "bicubic", None)
    assert pp.config_for("convnext_base_22k_1k_384").squash
    assert pp.config_for("convnext_atto") == (224, 0.875, "bicubic", None)
    res, crop, interp, mode = pp.config_for("convnext_large_21k_224")
    assert (res, crop, interp, mode) == (224, 0.875, "bicubic", None)
    # A row's crop mode overrides the official rule: timm's centre crop at 384 (shorter side to
    # 384), DINOv3's squash at 224.
    timm384 = pp.config_for("convnext_nano_12k_1k_384")
    assert (timm384.squash, timm384.resize_size) == (False, 384)
    dinov3 = pp.config_for("dinov3_convnext_tiny_lvd1689m")
    assert (dinov3.squash, dinov3.interpolation) == (True, "bilinear")
    assert pp.config_for("convnext_tiny_1k_224").resize_size == 256
    with pytest.raises(registry.UnknownModelError, match="convnext_tiny"):
        pp.config_for("convnext_tinny_1k_224")


@pytest.mark.parametrize(
    "bad, match",
    [
        ((224, 0.0), "crop_pct"),
        ((224, 1.5), "crop_pct"),
        ((0, 0.875), "resolution"),
        ((224, 0.875, "cubic"), "interpolation must be one of"),
        (3.5, "Expected a model name"),
    ],
)
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        pp.as_config(bad)


def test_eval_transform_needs_a_pil_image():
    with pytest.raises(ValueError, match="load_image"):
        pp.eval_transform(np.zeros((8, 8, 3), np.uint8), 224, 0.875)


# --- load_image: every mode becomes RGB ---------------------------------------------------------


def test_grayscale_and_palette_become_rgb():
    gray = pp.load_image(SKIMAGE / "camera.png")
    assert gray.mode == "RGB"
    arr = np.asarray(gray)
    np.testing.assert_array_equal(arr[..., 0], np.asarray(Image.open(SKIMAGE / "camera.png")))
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    gif = pp.load_image(SKIMAGE / "no_time_for_that_tiny.gif")
    assert gif.mode == "RGB"
    np.testing.assert_array_equal(
        np.asarray(gif),
        np.asarray(Image.open(SKIMAGE / "no_time_for_that_tiny.gif").convert("RGB")),
    )


def test_rgba_is_composited_on_white(tmp_path):
    photo = np.asarray(Image.open(SKIMAGE / "chelsea.png").convert("RGB"))
    h, w = photo.shape[:2]
    alpha = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    alpha[:, : w // 4] = 0  # a fully transparent left quarter
    Image.fromarray(np.dstack([photo, alpha]), "RGBA").save(tmp_path / "rgba.png")
    got = np.asarray(pp.load_image(tmp_path / "rgba.png")).astype(np.float64)
    a = alpha[..., None] / 255.0
    want = photo * a + 255.0 * (1 - a)
    assert np.max(np.abs(got - want)) <= 1.0
    assert np.all(got[:, : w // 4] == 255)


def test_palette_transparency_and_la(tmp_path):
    base = Image.open(SKIMAGE / "chelsea.png").convert("RGB").resize((64, 48))
    pal = base.quantize(16)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    got = np.asarray(pp.load_image(tmp_path / "p.png"))
    index = np.asarray(pal)
    assert (index == 0).any() and np.all(got[index == 0] == 255)
    la = Image.merge("LA", [base.convert("L"), Image.new("L", base.size, 0)])
    la.save(tmp_path / "la.png")
    assert np.all(np.asarray(pp.load_image(tmp_path / "la.png")) == 255)


def test_cmyk_jpeg(tmp_path):
    photo = Image.open(SKIMAGE / "coffee.png").convert("RGB")
    photo.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    got = np.asarray(pp.load_image(tmp_path / "cmyk.jpg")).astype(float)
    assert np.mean(np.abs(got - np.asarray(photo))) < 4.0  # JPEG loss only


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    camera = np.asarray(Image.open(SKIMAGE / "camera.png")).astype(np.uint16)
    Image.fromarray(camera * 257).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    got = np.asarray(pp.load_image(tmp_path / "deep.png"))
    np.testing.assert_array_equal(got[..., 1], camera.astype(np.uint8))


def test_exif_orientation(tmp_path):
    photo = Image.open(SKIMAGE / "chelsea.png").convert("RGB")  # 451 x 300
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    photo.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert pp.load_image(tmp_path / "phone.jpg").size == (451, 300)  # as stored (official)
    upright = pp.load_image(tmp_path / "phone.jpg", exif_transpose=True)
    assert upright.size == (300, 451)
    want = np.asarray(photo.transpose(Image.Transpose.ROTATE_270)).astype(float)
    assert np.mean(np.abs(np.asarray(upright).astype(float) - want)) < 4.0


def _truncated_jpeg(tmp_path) -> Path:
    buf = io.BytesIO()
    Image.open(SKIMAGE / "coffee.png").convert("RGB").save(buf, "JPEG")
    path = tmp_path / "truncated.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    return path


def test_unreadable_files_raise_image_error_naming_the_file(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    empty = tmp_path / "interrupted.jpg"
    empty.write_bytes(b"")
    cases = {
        text: "not an image format",
        empty: "an empty file, 0 bytes",
        tmp_path / "missing.jpg": "no such file",
        _truncated_jpeg(tmp_path): "truncated",
        tmp_path: "directory",
    }
    for path, reason in cases.items():
        with pytest.raises(pp.ImageError, match=reason) as info:
            pp.load_image(path)
        assert str(path) in str(info.value)
        assert isinstance(info.value, ValueError)
        clone = pickle.loads(pickle.dumps(info.value))
        assert str(clone) == str(info.value)


def test_a_fifo_is_reported_never_opened_and_costs_no_other_image(tmp_path, fifo):
    """``pipe.jpg``, a named pipe: opening it waits forever for a writer (``predict`` hung on
    it, the good image got no answer).  It is an error naming what it is, at once; the batch
    pipeline answers the other image."""
    pipe = fifo(tmp_path / "pipe.jpg")
    good = tmp_path / "good.png"
    Image.open(PHOTOS[1]).save(good)
    done = {}

    def run():
        with pytest.raises(pp.ImageError, match="a FIFO .named pipe., not an image file"):
            pp.load_image(pipe)
        batches = pp.ImageBatches([pipe, good], (64, 0.875), 2, skip_errors=True)
        done["batches"] = [indices.tolist() for _, indices in batches]
        done["errors"] = [e.reason for e in batches.errors]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the FIFO was opened"
    assert done["batches"] == [[1]] and done["errors"] == ["a FIFO (named pipe), not an image file"]


def test_a_thin_image_costs_the_output_s_work_not_gigabytes(tmp_path):
    """A 113-byte 1x60000 PNG: resized whole first (the original's order) it is 256 x
    15,360,000 pixels, about 19 GB; the crop's region alone is resampled instead.  Run in a
    child with its address space capped at 2 GiB, so that a regression fails with a
    MemoryError here instead of exhausting the machine.  A strip below that size keeps the
    original's order, bit for bit (the equality tests above), and both orders agree within a
    level or two on a real photo's strip."""
    import subprocess
    import sys

    strip = tmp_path / "strip.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60000, 1, 3), np.uint8)).save(strip)
    script = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30));"
        "import numpy as np; from convnext_keras import preprocess as pp;"
        f"x = pp.transform_file({str(strip)!r}, (224, 0.875, 'bicubic'));"
        "print(x.shape, bool(np.isfinite(x).all()))"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip() == "(224, 224, 3) True"

    photo = Image.open(PHOTOS[0]).convert("RGB").crop((0, 0, 3, 512))  # 3x512: 256 x 43690
    exact = np.asarray(pp.resize_and_crop(photo, 224))
    np.testing.assert_array_equal(exact, reference_uint8(photo, 224, 0.875, "bicubic"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pp.transforms, "MAX_RESIZED_PIXELS", 1000)
        bounded = np.asarray(pp.resize_and_crop(photo, 224))
    assert np.abs(bounded.astype(int) - exact.astype(int)).max() <= 2


# --- normalize ----------------------------------------------------------------------------------


def test_normalize_uint8_and_float_agree_and_invert():
    x = np.asarray(Image.open(SKIMAGE / "astronaut.png"))[:32, :32]
    a = pp.normalize(x)
    b = pp.normalize(x.astype(np.float64) / 255.0)
    assert a.dtype == np.float32 and b.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a[0, 0], (x[0, 0] / 255.0 - MEAN) / STD, atol=1e-6)
    np.testing.assert_array_equal(pp.denormalize(a), x)
    with pytest.raises(ValueError, match="uint8"):
        pp.normalize(x.astype(np.int32))
    with pytest.raises(ValueError, match="3 channels"):
        pp.normalize(np.zeros((4, 4), np.uint8))


# --- the Keras layer ----------------------------------------------------------------------------


def _layer_vs_pil(layer, photo, config):
    image = pp.load_image(photo)
    out = keras.ops.convert_to_numpy(layer(np.asarray(image)[None]))[0]
    diff = np.abs(pp.denormalize(out).astype(float) - reference_uint8(image, *config).astype(float))
    return diff


@pytest.mark.backends
@pytest.mark.parametrize("config", CONFIGS[:2], ids=lambda c: str(c[0]))
def test_keras_layer_is_close_to_pil(config):
    layer = pp.EvalPreprocessing(*config)
    for photo in PHOTOS[:5]:
        diff = _layer_vs_pil(layer, photo, config)
        # Measured on every backend: mean <= 0.2, 99th percentile <= 1, max <= 8 steps.
        assert diff.mean() < 0.5, photo
        assert np.percentile(diff, 99) <= 1.0, photo
        assert diff.max() <= 16, photo


@pytest.mark.backends
def test_keras_layer_in_front_of_a_model_and_serialised(tmp_path):
    import convnext_keras as ck

    layer = pp.preprocessing_layer((64, 0.875))  # small, to keep the test fast
    inputs = keras.Input((None, None, 3), dtype="uint8")
    net = ck.build_model("atto", num_classes=5)
    model = keras.Model(inputs, net(layer(inputs)))
    assert model.output_shape == (None, 5)
    photo = np.asarray(pp.load_image(SKIMAGE / "chelsea.png"))[None]
    direct = keras.ops.convert_to_numpy(net(pp.eval_transform(Image.fromarray(photo[0]), 64)[None]))
    through = keras.ops.convert_to_numpy(model(photo))
    assert np.max(np.abs(direct - through)) < 0.1 * np.max(np.abs(direct))
    assert pp.preprocessing_layer("convnext_base_1k_384").config == (384, 1.0, "bicubic", None)
    assert pp.preprocessing_layer("dinov3_convnext_tiny_lvd1689m").config.squash
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(again(photo)), through, atol=1e-5)
    with pytest.raises(ValueError, match="interpolation"):
        pp.EvalPreprocessing(224, 0.875, "box")


@pytest.mark.backends
def test_normalize_layer_and_uint8_model_input():
    import convnext_keras as ck

    x = np.asarray(pp.load_image(SKIMAGE / "coffee.png").resize((64, 48)))[None]
    got = keras.ops.convert_to_numpy(pp.Normalize()(x))
    np.testing.assert_allclose(got, pp.normalize(x), atol=1e-6)
    net = ck.build_model("atto", num_classes=3)
    wrapped = pp.with_normalization(net, 64)
    assert wrapped.input_shape == (None, 64, 64, 3) and wrapped.inputs[0].dtype == "uint8"
    square = np.asarray(pp.load_image(SKIMAGE / "coffee.png").resize((64, 64)))[None]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(wrapped(square)),
        keras.ops.convert_to_numpy(net(pp.normalize(square))),
        atol=1e-5,
    )


def test_keras_layer_traced_with_unknown_size_equals_eager():
    tf = pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("graph tracing with unknown image size is TensorFlow's")
    layer = pp.EvalPreprocessing(224, 0.875)
    traced = tf.function(
        layer.__call__, input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8)]
    )
    for photo in (SKIMAGE / "chelsea.png", SKIMAGE / "rocket.jpg"):
        x = np.asarray(pp.load_image(photo))[None]
        np.testing.assert_allclose(traced(x).numpy(), layer(x).numpy(), atol=1e-5)


# --- batched pipelines --------------------------------------------------------------------------


def test_image_batches_equal_the_transform_in_order(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    paths = PHOTOS[:3] + [broken] + PHOTOS[3:6]
    want = {i: pp.transform_file(p, "convnext_tiny_1k_224") for i, p in enumerate(paths) if i != 3}
    batches = pp.ImageBatches(paths, "convnext_tiny_1k_224", 2, workers=2, skip_errors=True)
    assert len(batches) == 4
    seen = []
    for images, indices in batches:
        assert images.shape == (len(indices), 224, 224, 3)
        for image, index in zip(images, indices):
            np.testing.assert_array_equal(image, want[int(index)])
            seen.append(int(index))
    assert seen == [0, 1, 2, 4, 5, 6]
    assert [e.path for e in batches.errors] == [str(broken)]
    assert batches.images_per_second and batches.images_per_second > 0
    with pytest.raises(pp.ImageError, match="broken.jpg"):
        list(pp.ImageBatches(paths, (224, 0.875), 2, workers=2))
    with pytest.raises(ValueError, match="batch_size"):
        pp.ImageBatches(paths, "convnext_atto", 0)


def test_image_batches_in_processes_and_early_stop(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths = [*PHOTOS[:4], broken, *PHOTOS[4:7]]
    batches = pp.ImageBatches(
        paths, (224, 0.875), 3, workers=2, processes=True, skip_errors=True, normalized=False
    )
    got = {int(i): image for images, indices in batches for i, image in zip(indices, images)}
    assert sorted(got) == [0, 1, 2, 3, 5, 6, 7]
    for i, image in got.items():
        assert image.dtype == np.uint8
        np.testing.assert_array_equal(
            pp.normalize(image), pp.transform_file(paths[i], (224, 0.875))
        )
    assert [e.path for e in batches.errors] == [str(broken)]
    assert batches.busy_seconds > 0
    # A consumer that stops early leaves no thread or worker behind.
    before = threading.active_count()
    stream = iter(pp.ImageBatches(PHOTOS * 4, (224, 0.875), 2, workers=2))
    assert next(stream).images.shape == (2, 224, 224, 3)
    stream.close()
    assert threading.active_count() <= before


def test_tf_dataset_equals_the_transform(tmp_path):
    pytest.importorskip("tensorflow")
    paths = PHOTOS[:5]
    ds = pp.image_dataset(paths, "convnext_base_1k_384", 2, labels=[3, 1, 4, 1, 5])
    images, labels = [], []
    for x, y in ds:
        images.append(x.numpy())
        labels.append(y.numpy())
    images = np.concatenate(images)
    assert images.shape == (5, 384, 384, 3)
    assert np.concatenate(labels).tolist() == [3, 1, 4, 1, 5]
    for image, path in zip(images, paths):
        np.testing.assert_array_equal(image, pp.transform_file(path, "convnext_base_1k_384"))
    with pytest.raises(ValueError, match="labels"):
        pp.image_dataset(paths, "convnext_atto", 2, labels=[1])
