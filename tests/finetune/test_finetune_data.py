"""Image folders, the validation split, augmentation and reproducible batches.

Also home of the small real data sets the other fine-tuning tests train on: scikit-learn's
handwritten digits written out as PNG files, one folder per class.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convnext_keras import preprocess, registry
from convnext_keras.finetune import data as data_lib

#: A five-block ConvNeXt for the fine-tuning runs: every code path of a registry variant (all
#: layer kinds, stage 2 spread over the layer-decay groups), traced about twice as fast as atto;
#: and its ConvNeXt V2 twin (GRN blocks), ``convnextv2_micro``.
MICRO = registry.Variant("micro", (1, 1, 2, 1), (16, 32, 48, 64))
MICRO_V2 = registry.Variant("convnextv2_micro", (1, 1, 2, 1), (16, 32, 48, 64), "convnextv2", "grn")
#: The same registrations for a subprocess (``python -c MICRO_CLI finetune ...``).
MICRO_SETUP = (
    "from convnext_keras import registry; "
    "registry.VARIANTS['micro'] = registry.Variant('micro', (1, 1, 2, 1), (16, 32, 48, 64)); "
    "registry.VARIANTS['convnextv2_micro'] = registry.Variant('convnextv2_micro', "
    "(1, 1, 2, 1), (16, 32, 48, 64), 'convnextv2', 'grn')"
)
MICRO_CLI = MICRO_SETUP + "; from convnext_keras.cli import main; main()"


@contextlib.contextmanager
def micro_variant():
    """``convnext_micro`` and ``convnextv2_micro`` are model names for the duration of the
    block."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry.VARIANTS, "micro", MICRO)
        patch.setitem(registry.VARIANTS, "convnextv2_micro", MICRO_V2)
        yield


def digits_folder(root: Path, *, per_class: int | None = None, size: int = 32, classes: int = 10):
    """scikit-learn's 8x8 digits (1797 labelled scans) as RGB PNGs, ``root/digit<k>/*.png``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[int, int] = {}
    for image, label in zip(digits.images, digits.target):
        label = int(label)
        if label >= classes or (per_class and counts.get(label, 0) >= per_class):
            continue
        counts[label] = counts.get(label, 0) + 1
        pixels = (image / 16.0 * 255).astype(np.uint8)
        rgb = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC)
        path = root / f"digit{label}" / f"{counts[label]:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb.convert("RGB").save(path)
    return root


def _colour_folder(root: Path, classes=("a", "b", "c"), per_class=5, size=(20, 16)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------
# Scanning and splitting


def test_scan_draws_a_seeded_stratified_split(tmp_path):
    root = digits_folder(tmp_path / "digits", per_class=20, classes=4)
    folder = data_lib.scan(root, val_fraction=0.25, seed=3)
    assert folder.classes == ["digit0", "digit1", "digit2", "digit3"]
    assert folder.layout == "split" and folder.skipped == []
    for label in range(4):
        assert sum(y == label for _, y in folder.val) == 5
        assert sum(y == label for _, y in folder.train) == 15
    everything = sorted(p for p, _ in folder.train + folder.val)
    assert everything == sorted(str(p) for p in root.glob("*/*.png"))
    assert data_lib.scan(root, val_fraction=0.25, seed=3).val == folder.val
    assert data_lib.scan(root, val_fraction=0.25, seed=4).val != folder.val
    # Labels follow the class folders.
    assert all(Path(p).parent.name == folder.classes[y] for p, y in folder.train)


def test_stratified_split_keeps_one_image_of_small_classes_for_training():
    samples = [("a0", 0), ("a1", 0), ("b0", 1)] + [(f"c{i}", 2) for i in range(10)]
    train, val = data_lib.stratified_split(samples, 0.1, seed=0)
    assert sum(y == 0 for _, y in val) == 1 and sum(y == 0 for _, y in train) == 1
    assert ("b0", 1) in train and all(y != 1 for _, y in val)
    assert sum(y == 2 for _, y in val) == 1


def test_scan_uses_train_and_val_folders(tmp_path):
    _colour_folder(tmp_path / "train", per_class=4)
    _colour_folder(tmp_path / "val", per_class=2)
    folder = data_lib.scan(tmp_path)
    assert folder.layout == "folders"
    assert (len(folder.train), len(folder.val)) == (12, 6)
    assert all("/val/" in p for p, _ in folder.val)


def test_scan_skips_unreadable_files_and_reports_them(tmp_path):
    root = _colour_folder(tmp_path, per_class=3)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b" / "empty.jpg").write_bytes(b"")
    good = (root / "c" / "0.png").read_bytes()
    (root / "c" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "a" / ".DS_Store").write_bytes(b"\0\0")  # hidden files are ignored, not reported
    folder = data_lib.scan(root, val_fraction=0.0)
    skipped = {Path(p).name: why for p, why in folder.skipped}
    assert set(skipped) == {"notes.txt", "empty.jpg", "truncated.png"}
    assert "not an image format" in skipped["notes.txt"]
    assert skipped["empty.jpg"] == "an empty file, 0 bytes"
    assert len(folder.train) == 9 and folder.summary()["skipped"] == 3


def test_scan_walks_each_folder_once_and_skips_what_is_not_a_file(tmp_path, fifo):
    """Links back up the tree (``a/sub/up -> ..`` and ``a/top -> ../..``), a link from one class
    into another and from train/ into val/, a FIFO, a name that is not UTF-8: each image once,
    in its own class and split (they made 24 images 886 samples, class b's trained as class
    a, the same files in train and validation); the FIFO reported, never opened; the odd name
    kept exactly, in the file list and its fingerprint (a run's ``--resume`` compares them)."""
    import os

    root = tmp_path / "data"
    for split in ("train", "val"):
        _colour_folder(root / split, classes=("a", "b"), per_class=3)
    train = root / "train"
    (train / "a" / "sub").mkdir()
    os.symlink("..", train / "a" / "sub" / "up")
    os.symlink("../..", train / "a" / "top")
    os.symlink("../b", train / "a" / "b_again")
    os.symlink("../../val/a", train / "a" / "val_a")
    fifo(train / "b" / "pipe.png")
    odd = os.fsdecode(b"\xe9t\xe9.png")  # Latin-1 bytes, not UTF-8
    (train / "b" / "0.png").rename(train / "b" / odd)
    folder = data_lib.scan(root, workers=2)
    assert len(folder.train) == 6 and len(folder.val) == 6
    assert sorted(Path(p).relative_to(train).as_posix() for p, _ in folder.train) == [
        "a/0.png", "a/1.png", "a/2.png", "b/1.png", "b/2.png", f"b/{odd}",
    ]  # fmt: skip
    assert folder.skipped == [
        (str(train / "b" / "pipe.png"), "a FIFO (named pipe), not an image file")
    ]
    lines = folder.file_list()
    assert data_lib.decode_lines(data_lib.encode_lines(lines)) == lines
    assert b"\xe9t\xe9.png" in data_lib.encode_lines(lines)
    assert len(folder.fingerprint()) == 64


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: (root.mkdir(), (root / "x.png").write_bytes(b"1")), "has no class folders"),
        (lambda root: _colour_folder(root, classes=("only",)), "single class"),
        (lambda root: (_colour_folder(root), (root / "d").mkdir()), r"Class folder .*d is empty"),
        (
            lambda root: (_colour_folder(root), (root / "d").mkdir(), (root / "d/x.jpg").touch()),
            r"has no readable image \(1 skipped\)",
        ),
        (
            lambda root: (
                _colour_folder(root / "train"),
                _colour_folder(root / "val", classes=("a", "b", "z")),
            ),
            r"missing \['c'\]; unexpected \['z'\]",
        ),
    ],
    ids=["missing", "no-classes", "one-class", "empty-class", "unreadable-class", "val-classes"],
)
def test_scan_errors_say_what_to_fix(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(data_lib.DataError, match=message):
        data_lib.scan(root)


# ---------------------------------------------------------------------------------------------
# Augmentation


def test_crop_box_follows_scale_and_ratio():
    rng = np.random.default_rng(0)
    width, height = 300, 200
    for _ in range(500):
        left, top, w, h = data_lib.crop_box(width, height, rng, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        # Rounding w and h moves area and aspect by at most about a pixel.
        assert 0.08 * width * height * 0.9 <= w * h <= width * height
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def test_crop_box_falls_back_to_a_centred_box_with_clamped_aspect():
    # A 100x10 strip cannot hold a box of its whole area with aspect <= 4/3: centre crop 13x10.
    rng = np.random.default_rng(0)
    assert data_lib.crop_box(100, 10, rng, (1.0, 1.0)) == ((100 - 13) // 2, 0, 13, 10)
    assert data_lib.crop_box(10, 100, rng, (1.0, 1.0)) == (0, (100 - 13) // 2, 10, 13)


def test_random_resized_crop_of_the_whole_image_is_a_plain_resize():
    pixels = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    out = data_lib.random_resized_crop(
        image, np.random.default_rng(0), 24, scale=(1.0, 1.0), ratio=(1.0, 1.0)
    )
    expected = image.resize((24, 24), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def _batch(n=6, size=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, size, 3)).astype(np.float32)
    y = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n)]
    return x, y


def _lam_from_images(x, mixed):
    """Solve ``mixed[0] = lam * x[0] + (1 - lam) * x[1]`` for lam (least squares, exact)."""
    d = x[0] - x[1]
    return float(np.sum((mixed[0] - x[1]) * d) / np.sum(d * d))


def test_mixing_partners_are_neighbours_and_the_odd_last_row_is_its_own():
    np.testing.assert_array_equal(data_lib.mix_partners(6), [1, 0, 3, 2, 5, 4])
    np.testing.assert_array_equal(data_lib.mix_partners(5), [1, 0, 3, 2, 4])


def test_mixup_blends_each_image_with_its_neighbour():
    x, y = _batch()
    mx, my = data_lib.mix_batch(x, y, np.random.default_rng(5), mixup=0.8)
    lam = _lam_from_images(x, mx)
    partner = data_lib.mix_partners(len(x))
    assert 0.0 < lam < 1.0
    np.testing.assert_allclose(mx, lam * x + (1 - lam) * x[partner], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(my, lam * y + (1 - lam) * y[partner], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(my.sum(axis=1), 1.0, rtol=1e-6)


def test_cutmix_pastes_a_box_and_weights_targets_by_its_area():
    x, y = _batch(size=16)
    partner = data_lib.mix_partners(len(x))
    mx, my = data_lib.mix_batch(x, y, np.random.default_rng(2), cutmix=1.0)
    pasted = np.all(mx == x[partner], axis=(0, 3)) & ~np.all(mx == x, axis=(0, 3))
    rows, cols = np.nonzero(pasted)
    assert pasted.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    lam = 1 - pasted.sum() / pasted.size
    np.testing.assert_allclose(my, lam * y + (1 - lam) * y[partner], rtol=1e-5)
    untouched = ~pasted
    np.testing.assert_array_equal(mx[:, untouched], x[:, untouched])


def test_mixing_off_or_skipped_returns_the_batch():
    x, y = _batch()
    for kwargs in ({}, {"mixup": 0.8, "prob": 0.0}):
        mx, my = data_lib.mix_batch(x, y, np.random.default_rng(0), **kwargs)
        assert mx is x and my is y


def test_smoothing_in_the_loss_equals_timm_smoothed_mixup_targets():
    """timm smooths both one-hot targets before mixing; Keras smooths the mixed target."""
    import keras

    x, y = _batch(classes=5)
    mx, my = data_lib.mix_batch(x, y, np.random.default_rng(5), mixup=0.8)
    lam, smoothing, k = _lam_from_images(x, mx), 0.1, 5
    smoothed = np.where(y > 0, 1 - smoothing + smoothing / k, smoothing / k)  # timm one_hot
    timm_targets = lam * smoothed + (1 - lam) * smoothed[data_lib.mix_partners(len(x))]
    logits = np.random.default_rng(1).normal(size=my.shape).astype(np.float32)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -(timm_targets * log_probs).sum(axis=1).mean()
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing)
    assert float(loss(my, logits)) == pytest.approx(float(expected), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Batches


@pytest.fixture
def colour_samples(tmp_path):
    root = _colour_folder(tmp_path, per_class=7, size=(48, 40))
    return data_lib.scan(root, val_fraction=0.0).train


def test_train_batches_are_a_function_of_seed_epoch_and_index(colour_samples):
    aug = data_lib.Augment(resolution=32, mixup=0.8, cutmix=1.0)

    def batches(**kw):
        return data_lib.TrainBatches(colour_samples, 3, aug, batch_size=4, seed=7, **kw)

    first = batches(epoch=0)
    assert len(first) == len(colour_samples) // 4 == 5  # the incomplete batch is dropped
    x, y = first[1]
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32 and y.shape == (4, 3)
    again = batches(epoch=0)
    np.testing.assert_array_equal(again[1][0], x)
    # A run resumed at batch 3 starts with the uninterrupted run's batch 3.
    resumed = batches(epoch=0, start=3)
    assert len(resumed) == 2
    np.testing.assert_array_equal(resumed[0][0], first[3][0])
    np.testing.assert_array_equal(resumed[1][1], first[4][1])
    # Another epoch: another order (each sample still seen once).
    assert not np.array_equal(batches(epoch=1).order, first.order)
    assert sorted(first.order) == list(range(len(colour_samples)))
    with pytest.raises(IndexError):
        first[5]


@pytest.mark.parametrize(("batch_size", "hosts"), [(6, 2), (6, 3), (4, 2)])
def test_each_host_s_rows_are_those_rows_of_the_whole_batch(colour_samples, batch_size, hosts):
    """Sharded batches (what each host of a multi-host run makes) are bit-equal with the rows
    of the one-host batch, mixup/cutmix partners on another host included (6 over 2: rows 2
    and 3 pair across hosts)."""
    aug = data_lib.Augment(resolution=24, mixup=0.8, cutmix=1.0, mix_switch_prob=0.5)

    def batches(shard):
        return data_lib.TrainBatches(
            colour_samples, 3, aug, batch_size=batch_size, epoch=1, seed=4, shard=shard
        )

    whole = batches((0, 1))
    for index in range(len(whole)):
        x, y = whole[index]
        parts = [batches((i, hosts))[index] for i in range(hosts)]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
    assert not np.allclose(whole[0][1].max(axis=1), 1.0)  # mixed targets: mixing was on
    with pytest.raises(ValueError, match=f"batch_size {batch_size} does not split over 5 hosts"):
        batches((0, 5))


def test_each_host_s_eval_rows_pad_like_the_whole_batch(colour_samples):
    def batches(shard):
        return data_lib.EvalBatches(
            colour_samples, resolution=24, crop_pct=0.875, interpolation="bicubic",
            batch_size=4, shard=shard,
        )  # fmt: skip

    whole = batches((0, 1))
    for i in range(len(whole)):
        parts = np.concatenate([batches((h, 2))[i][0] for h in range(2)])
        np.testing.assert_array_equal(parts, whole[i][0])


def test_train_batches_without_augmentation_are_the_normalised_resized_images(colour_samples):
    # 48x40 has aspect 1.2, inside 3/4..4/3: with crop scale 1 no drawn aspect other than
    # exactly 1.2 fits, so the crop falls back to the whole image - a plain bicubic resize.
    aug = data_lib.Augment(resolution=24, crop_scale=(1.0, 1.0), hflip=0.0)
    batches = data_lib.TrainBatches(colour_samples, 3, aug, batch_size=2, epoch=0, seed=0)
    x, y = batches[0]
    for row, i in enumerate(batches.order[:2]):
        path, label = colour_samples[i]
        resized = preprocess.load_image(path).resize((24, 24), Image.Resampling.BICUBIC)
        np.testing.assert_allclose(x[row], preprocess.normalize(np.asarray(resized)), atol=1e-6)
        assert y[row].argmax() == label and y[row].sum() == 1
    flipped = data_lib.TrainBatches(
        colour_samples,
        3,
        data_lib.Augment(24, crop_scale=(1.0, 1.0), hflip=1.0),
        batch_size=2,
        epoch=0,
        seed=0,
    )[0][0]
    np.testing.assert_array_equal(flipped, x[:, :, ::-1])


def test_randaugment_batches_are_reproducible(colour_samples):
    aug = data_lib.Augment(resolution=32, randaugment=2)
    one = data_lib.TrainBatches(colour_samples, 3, aug, batch_size=4, epoch=0, seed=1)[0][0]
    two = data_lib.TrainBatches(colour_samples, 3, aug, batch_size=4, epoch=0, seed=1)[0][0]
    plain = data_lib.TrainBatches(
        colour_samples, 3, data_lib.Augment(resolution=32), batch_size=4, epoch=0, seed=1
    )[0][0]
    np.testing.assert_array_equal(one, two)
    assert not np.array_equal(one, plain)


def test_eval_batches_use_the_official_transform_and_pad_the_last_batch(colour_samples):
    batches = data_lib.EvalBatches(
        colour_samples, resolution=32, crop_pct=0.875, interpolation="bicubic", batch_size=4
    )
    assert batches.sizes == [4, 4, 4, 4, 4, 1]
    (last,) = batches[5]
    assert last.shape == (4, 32, 32, 3)
    expected = preprocess.eval_transform(
        preprocess.load_image(colour_samples[20][0]), 32, 0.875, "bicubic"
    )
    np.testing.assert_array_equal(last[0], expected)
    np.testing.assert_array_equal(last[3], expected)  # padding repeats a real image
    np.testing.assert_array_equal(batches.labels, [y for _, y in colour_samples])


def test_the_scan_decodes_every_file_a_truncated_jpeg_is_skipped(tmp_path):
    root = _colour_folder(tmp_path, per_class=3, size=(64, 48))
    buffer = io.BytesIO()
    Image.open(root / "a" / "0.png").save(buffer, "JPEG", quality=95)
    (root / "a" / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    with Image.open(root / "a" / "cut.jpg") as image:
        image.verify()  # what the scan used to check: it passes
    folder = data_lib.scan(root, val_fraction=0.0)
    assert [Path(p).name for p, _ in folder.skipped] == ["cut.jpg"]
    assert "truncated" in folder.skipped[0][1] and len(folder.train) == 9


def test_a_file_that_stops_decoding_never_stops_a_run(colour_samples):
    aug = data_lib.Augment(resolution=32, crop_scale=(1.0, 1.0), hflip=0.0)
    before = data_lib.TrainBatches(colour_samples, 3, aug, batch_size=4, epoch=0, seed=2)
    victim = colour_samples[before.order[5]][0]  # row 1 of batch 1
    replacement = before[1][0][2]  # the next image of the epoch's order
    Path(victim).write_bytes(b"changed after the scan")
    batches = data_lib.TrainBatches(colour_samples, 3, aug, batch_size=4, epoch=0, seed=2)
    x, y = batches[1]
    np.testing.assert_array_equal(x[1], replacement)  # replaced, deterministically
    assert y[1].argmax() == colour_samples[before.order[6]][1]
    assert list(batches.failures.files) == [victim]

    evals = data_lib.EvalBatches(
        colour_samples, resolution=32, crop_pct=0.875, interpolation="bicubic", batch_size=4
    )
    for i in range(len(evals)):
        evals[i]
    assert evals.failed == {colour_samples.index((victim, colour_samples[before.order[5]][1]))}
    assert victim in evals.failures.files


def test_a_change_of_files_is_described():
    before = ["train\ta\tx/1.png", "train\ta\tx/2.png", "val\tb\ty/3.png"]
    after = ["train\ta\tx/1.png", "train\tb\ty/3.png", "train\tb\ty/4.png"]
    assert data_lib.describe_change(before, after) == (
        "1 gone (x/2.png); 1 new (y/4.png); 1 moved to another split or class (y/3.png)"
    )
