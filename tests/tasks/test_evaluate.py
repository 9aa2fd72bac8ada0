"""``evaluate`` / ``convnext eval`` against an independent reference, and the dataset layouts.

The agreement test builds an ImageNet-style class-folder set from real photos (scikit-image,
scikit-learn), labels it from the reference model's own ranking (a third right at top-1, a third
at rank 3, a third at rank 500, so acc@1 and acc@5 are neither 0 nor 1), and requires the
library's top-1 predictions and accuracies to equal those of transformers' PyTorch ConvNext-T
with the same random weights fed by the PIL preprocessing of tests/preprocess/test_preprocess.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import torch_reference as ref
from click.testing import CliRunner
from PIL import Image, ImageOps
from test_preprocess import SKIMAGE, SKLEARN, reference

import convnext_keras as ck
from convnext_keras.cli import main
from convnext_keras.data import labels
from convnext_keras.engines import runners
from convnext_keras.tasks.evaluate import evaluate, find_dataset

WNIDS = labels.imagenet_1k().wnids
SOURCES = [
    SKIMAGE / "astronaut.png",
    SKIMAGE / "chelsea.png",
    SKIMAGE / "coffee.png",
    SKIMAGE / "rocket.jpg",
    SKIMAGE / "hubble_deep_field.jpg",
    SKIMAGE / "motorcycle_left.png",
    SKIMAGE / "camera.png",
    SKLEARN / "china.jpg",
    SKLEARN / "flower.jpg",
]


def _photos(tmp_path: Path) -> list[Path]:
    """18 distinct real photos (the sources and their mirror images) as JPEG files."""
    out = []
    for i, src in enumerate(SOURCES):
        image = Image.open(src).convert("RGB")
        for j, variant in enumerate((image, ImageOps.mirror(image))):
            path = tmp_path / f"photo_{2 * i + j:02d}.jpg"
            variant.save(path, quality=90)
            out.append(path)
    return out


@pytest.fixture(scope="module")
def val_set(tiny_reference, tmp_path_factory):
    """Class-folder val set + the reference's predictions and accuracy on it."""
    model, ckpt = tiny_reference
    tmp = tmp_path_factory.mktemp("val")
    photos = _photos(tmp)
    batch = np.stack([reference(Image.open(p), 224, 0.875, "bicubic") for p in photos])
    logits = ref.hf_outputs(model, batch)["logits"]
    ranking = np.argsort(-logits, axis=1)
    targets = np.array([ranking[i, (0, 2, 499)[i % 3]] for i in range(len(photos))])
    root = tmp / "imagenet" / "val"
    files = []
    for i, (photo, target) in enumerate(zip(photos, targets)):
        folder = root / WNIDS[target]
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        dest.write_bytes(photo.read_bytes())
        files.append(dest)
    broken = root / WNIDS[targets[0]] / "ILSVRC2012_val_00000099.JPEG"
    broken.write_bytes(photo.read_bytes()[:300])  # truncated JPEG
    acc1 = 100 * np.mean(ranking[:, 0] == targets)
    acc5 = 100 * np.mean((ranking[:, :5] == targets[:, None]).any(axis=1))
    assert 0 < acc1 < 100 and acc1 < acc5 < 100
    return {
        "root": root,
        "ckpt": ckpt,
        "files": files,
        "broken": broken,
        "top1": dict(zip(map(str, files), ranking[:, 0].tolist())),
        "targets": targets,
        "acc1": acc1,
        "acc5": acc5,
    }


@pytest.mark.slow
def test_eval_agrees_with_the_pytorch_reference(val_set, tmp_path):
    result = evaluate(
        "convnext_tiny_1k_224",
        val_set["root"].parent,  # DATA/val/<wnid> is found too
        weights=val_set["ckpt"],
        batch_size=4,
        workers=2,
    )
    assert result.layout == "class-folders"
    # The default engine is predict's: OpenVINO, else onnxruntime, on one CPU device.
    expected_engine = runners.cpu_graph_engine() or "keras"
    if result.devices == 1:
        assert result.config["engine"] == expected_engine
    assert result.evaluated == len(val_set["files"])
    got = {p["file"]: p["top5"][0] for p in result.predictions}
    assert got == val_set["top1"]
    assert result.acc1 == pytest.approx(val_set["acc1"])
    assert result.acc5 == pytest.approx(val_set["acc5"])
    assert result.unreadable == [
        {"file": str(val_set["broken"]), "error": result.unreadable[0]["error"]}
    ]
    assert (
        "truncated" in result.unreadable[0]["error"] or "OSError" in result.unreadable[0]["error"]
    )
    # Per-class accuracy adds up to the total.
    per_class = result.per_class
    assert sum(c["images"] for c in per_class.values()) == result.evaluated
    hits = sum(c["acc1"] * c["images"] / 100 for c in per_class.values())
    assert hits == pytest.approx(result.acc1 * result.evaluated / 100)
    assert result.images_per_s > 0 and result.model_images_per_s > 0
    assert result.preprocess_images_per_s > 0
    report = json.loads(result.write(tmp_path / "r.json").read_text())
    assert report["acc1"] == result.acc1 and report["config"]["resolution"] == 224


# --- layouts and bookkeeping, with a model whose answer is known --------------------------------


def fixed_model(classes: int = 1000) -> keras.Model:
    """Predicts the same ranking for every image: 970, 0, 1, 2, 3, then the rest."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    head = keras.layers.Dense(classes, name="fixed")
    model = keras.Model(inputs, head(x), name="fixed")
    bias = np.zeros(classes, np.float32)
    bias[[970, 0, 1, 2, 3]] = [10, 9, 8, 7, 6]
    head.set_weights([np.zeros((3, classes), np.float32), bias])
    return model


def _flat(tmp_path: Path, numbers, wnids) -> Path:
    root = tmp_path / "flat"
    root.mkdir()
    photo = (SKIMAGE / "rocket.jpg").read_bytes()
    for n in numbers:
        (root / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(photo)
    rows = ["ImageId,PredictionString"] + [
        f"ILSVRC2012_val_{n:08d},{w} 10 10 50 50 {w} 1 2 3 4" for n, w in zip(numbers, wnids)
    ]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


def test_flat_layout_accuracy_and_real(tmp_path):
    # ReaL labels: #1 none, #2 (970, 795), #3 (230, 231), #4 ... (see test_labels)
    root = _flat(tmp_path, [1, 2, 3, 4], [WNIDS[970], WNIDS[5], WNIDS[2], WNIDS[600]])
    (root / "ILSVRC2012_val_00000005.JPEG").write_bytes(b"no label and no image")
    result = evaluate(fixed_model(), root, real=True, batch_size=3)
    assert result.layout == "flat (LOC_val_solution.csv)"
    assert result.evaluated == 4
    assert result.acc1 == 25.0  # #1
    assert result.acc5 == 50.0  # #1 and #3 (class 2 is ranked 4th)
    real = labels.imagenet_real()
    scored = [n for n in (1, 2, 3, 4) if real[n - 1]]
    want = 100 * np.mean([970 in real[n - 1] for n in scored])
    assert result.real_acc1 == pytest.approx(want)
    assert [u["file"] for u in result.unreadable] == [str(root / "ILSVRC2012_val_00000005.JPEG")]
    assert result.per_class[WNIDS[970]] == {
        "name": "alp",
        "images": 1,
        "acc1": 100.0,
        "acc5": 100.0,
    }


def test_devkit_ground_truth_with_meta_mat(tmp_path):
    from scipy.io import savemat

    root = _flat(tmp_path, [1, 2, 3], [WNIDS[0]] * 3)
    (tmp_path / "LOC_val_solution.csv").unlink()
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    # The devkit numbers classes in its own order: here ID k is head class 999 - (k - 1).
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children"]
    rows = [(k, WNIDS[1000 - k], "w", "g", 0) for k in range(1, 1001)]
    rows.append((1001, "n00001740", "entity", "g", 3))  # an inner node
    synsets = np.array(rows, dtype=[(f, object) for f in fields])
    savemat(devkit / "meta.mat", {"synsets": synsets})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n500\n1000\n")
    found = find_dataset(root)
    assert found.layout == "flat (ILSVRC2012_validation_ground_truth.txt)"
    assert found.targets.tolist() == [999, 500, 0]
    (devkit / "meta.mat").unlink()
    with pytest.raises(ValueError, match="meta.mat"):
        find_dataset(root)


def test_wnid_per_line_ground_truth_and_explicit_file(tmp_path):
    root = _flat(tmp_path, [1, 2], [WNIDS[0]] * 2)
    gt = tmp_path / "synsets.txt"
    gt.write_text(f"{WNIDS[7]}\n{WNIDS[8]}\n")
    found = find_dataset(root, ground_truth=gt)
    assert found.targets.tolist() == [7, 8]


def test_top5_equals_a_stable_full_sort_with_ties():
    from convnext_keras.tasks.evaluate import _top5

    rng = np.random.default_rng(0)
    for _ in range(50):
        logits = rng.integers(0, 4, (6, 1000)).astype(np.float32)  # many ties
        np.testing.assert_array_equal(
            _top5(logits), np.argsort(-logits, axis=1, kind="stable")[:, :5]
        )


def test_bad_data_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        find_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an ImageNet validation folder"):
        find_dataset(tmp_path / "empty")
    odd = tmp_path / "odd"
    (odd / "n99999999").mkdir(parents=True)
    with pytest.raises(ValueError, match="n99999999"):
        find_dataset(odd)
    flat = tmp_path / "flat_no_gt"
    flat.mkdir()
    (flat / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")
    with pytest.raises(ValueError, match="ground_truth=FILE"):
        find_dataset(flat)


def test_limit_is_a_reproducible_subset(tmp_path):
    root = _flat(tmp_path, range(1, 11), [WNIDS[i] for i in range(10)])
    full = find_dataset(root)
    a, b = full.subset(4), full.subset(4)
    assert a.paths == b.paths and len(a) == 4
    assert a.paths == sorted(a.paths) and set(a.paths) <= set(full.paths)
    assert [full.targets[full.paths.index(p)] for p in a.paths] == a.targets.tolist()
    assert full.subset(None) is full and full.subset(50) is full


def test_eval_refuses_a_21k_head(tmp_path):
    root = _flat(tmp_path, [1], [WNIDS[0]])
    with pytest.raises(ValueError, match="21k_1k"):
        evaluate(fixed_model(21841), root)


def test_eval_engine_choice(tmp_path):
    root = _flat(tmp_path, [1, 2], [WNIDS[970], WNIDS[5]])
    with pytest.raises(ValueError, match="engine must be one of"):
        evaluate(fixed_model(), root, engine="tensorrt")
    # A model onnxruntime's graph builder does not know runs on Keras under "auto" ...
    result = evaluate(fixed_model(), root, data_parallel=False)
    assert result.config["engine"] == "keras" and result.acc1 == 50.0
    assert result.config["precision"] == "fp32"
    # ... and "onnxruntime" insists, with the reason.
    with pytest.raises(ValueError, match="OnnxRunner cannot run 'fixed'"):
        evaluate(fixed_model(), root, data_parallel=False, engine="onnxruntime")
    # Opt-in mixed precision runs on Keras; the report records it.
    bf16 = evaluate(fixed_model(), root, data_parallel=False, precision="bf16")
    assert bf16.config["precision"] == "bf16" and bf16.config["engine"] == "keras"
    assert bf16.acc1 == 50.0
    with pytest.raises(ValueError, match="precision must be one of"):
        evaluate(fixed_model(), root, precision="fp64")


def test_eval_int8_runs_on_onnxruntime_on_one_device(tmp_path):
    root = _flat(tmp_path, [1, 2], [WNIDS[970], WNIDS[5]])
    model = ck.build_model("atto")
    result = evaluate(model, root, precision="int8", calibration=SOURCES[:2])
    assert result.config["engine"] == "onnxruntime" and result.config["precision"] == "int8"
    assert result.devices == 1 and result.evaluated == 2
    with pytest.raises(ValueError, match="int8' runs on the onnxruntime engine only"):
        evaluate(model, root, precision="int8", engine="keras")
    with pytest.raises(ValueError, match="calibration photos are for precision 'int8'"):
        evaluate(model, root, calibration=SOURCES[:2])


def test_cli_eval_report(tmp_path):
    root = _flat(tmp_path, [1, 2, 3, 4], [WNIDS[970], WNIDS[5], WNIDS[2], WNIDS[600]])
    model_file = tmp_path / "fixed.keras"
    fixed_model().save(model_file)
    report = tmp_path / "out" / "report.json"
    result = CliRunner().invoke(
        main,
        ["eval", str(root), "--model", str(model_file), "--batch-size", "2", "--real",
         "--report", str(report)],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "acc@1     25.000%" in result.stdout and "acc@5     50.000%" in result.stdout
    assert "4 evaluated, 0 unreadable" in result.stdout
    data = json.loads(report.read_text())
    assert data["acc1"] == 25.0 and data["evaluated"] == 4 and data["unreadable"] == []
    assert len(data["predictions"]) == 4 and data["predictions"][0]["top5"] == [970, 0, 1, 2, 3]
    assert WNIDS[970] in data["per_class"]
    assert not [p for p in report.parent.iterdir() if p.name.startswith(".")]
    bf16 = CliRunner().invoke(
        main, ["eval", str(root), "--model", str(model_file), "--precision", "bf16"]
    )
    assert bf16.exit_code == 0, bf16.output
    assert "engine keras, bf16)" in bf16.stdout and "acc@1     25.000%" in bf16.stdout


# --- data-parallel over two virtual CPU devices ------------------------------------------------

_PARALLEL = """
import os, sys, json
if os.environ["KERAS_BACKEND"] == "tensorflow":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from convnext_keras.tasks.evaluate import _local_devices, evaluate
result = evaluate("convnext_atto", sys.argv[1], weights=sys.argv[2], batch_size=3)
print(json.dumps({"devices": _local_devices(), "used": result.devices, "acc1": result.acc1,
                  "top1": {p["file"]: p["top5"][0] for p in result.predictions}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_data_parallel_over_two_devices_agrees_with_reference(backend, tmp_path):
    """Two virtual CPU devices; batches of 3 split 2 + 1 (padded), answers as the reference."""
    pytest.importorskip(backend)
    spec = ck.registry.VARIANTS["atto"]
    model = ref.hf_model(spec.depths, spec.dims, 1000, seed=5)
    ckpt = ref.save_official(model, tmp_path / "atto.pth")
    root = tmp_path / "val"
    root.mkdir()
    files = []
    for n, src in enumerate(SOURCES[:5], 1):
        files.append(root / f"ILSVRC2012_val_{n:08d}.JPEG")
        Image.open(src).convert("RGB").save(files[-1], quality=90)
    gt = tmp_path / "imagenet_2012_validation_synset_labels.txt"  # TF-slim style, found above
    gt.write_text("".join(f"{WNIDS[i]}\n" for i in range(5)))
    batch = np.stack([reference(Image.open(p), 224, 0.875, "bicubic") for p in files])
    top1 = np.argmax(ref.hf_outputs(model, batch)["logits"], axis=1)
    env = {**os.environ, "KERAS_BACKEND": backend, "CONVNEXT_HOME": str(tmp_path / "home")}
    if backend == "jax":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PARALLEL), str(root), str(ckpt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["devices"]) == 2 and out["used"] == 2
    assert out["top1"] == {str(f): int(c) for f, c in zip(files, top1)}
    assert out["acc1"] == pytest.approx(100 * np.mean(top1 == np.arange(5)))


def test_cli_eval_fails_when_files_could_not_be_evaluated(tmp_path, fifo):
    root = tmp_path / "val"
    photo = (SKIMAGE / "rocket.jpg").read_bytes()
    for wnid in (WNIDS[970], WNIDS[0]):
        (root / wnid).mkdir(parents=True)
        (root / wnid / "a.JPEG").write_bytes(photo)
    (root / WNIDS[0] / "x.jpg").mkdir()  # a directory where an image should be
    fifo(root / WNIDS[0] / "pipe.JPEG")  # a named pipe: reported, never opened
    (root / WNIDS[0] / "cut.JPEG").write_bytes(photo[: len(photo) // 3])  # truncated JPEG
    model_file = tmp_path / "fixed.keras"
    fixed_model().save(model_file)
    args = ["eval", str(root), "--model", str(model_file), "--report", str(tmp_path / "r.json")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "2 evaluated, 3 unreadable" in result.stdout
    assert "x.jpg: a directory, not an image file" in result.stderr
    assert "pipe.JPEG: a FIFO (named pipe), not an image file" in result.stderr
    assert "cut.JPEG" in result.stderr and "3 file(s) could not be evaluated" in result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    names = {Path(u["file"]).name for u in report["unreadable"]}
    assert names == {"x.jpg", "pipe.JPEG", "cut.JPEG"}
    allowed = CliRunner().invoke(main, [*args, "--allow-unreadable"])
    assert allowed.exit_code == 0, allowed.output
    # Nothing evaluable is an error, not "acc@1 0.000%", even with --allow-unreadable.
    for wnid in (WNIDS[970], WNIDS[0]):
        (root / wnid / "a.JPEG").write_bytes(b"not a photo")
    nothing = CliRunner().invoke(main, [*args, "--allow-unreadable"])
    assert nothing.exit_code == 2, nothing.output
    assert "error: None of the 5 file(s)" in nothing.stderr and "acc@1" not in nothing.stdout
    for wnid in (WNIDS[970], WNIDS[0]):
        (root / wnid / "a.JPEG").write_bytes(photo)

    # NaN logits are a failure of that image, not a prediction.
    broken = fixed_model()
    broken.get_layer("fixed").set_weights(
        [np.zeros((3, 1000), np.float32), np.full(1000, np.nan, np.float32)]
    )
    result = evaluate(broken, root, engine="keras")
    assert result.evaluated == 0
    assert sum("NaN or infinite" in u["error"] for u in result.unreadable) == 2
