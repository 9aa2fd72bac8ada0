"""``convnext finetune`` / ``ck.finetune.run`` end to end: outputs, kill -9 + resume, faults.

The runs train a five-block ConvNeXt (``convnext_micro`` and, for the reference run that is
killed and resumed, its ConvNeXt V2 twin ``convnextv2_micro`` with GRN blocks and V2's
one-group-per-block layer decay; registered by the tests: the code paths of a real variant,
traced in half atto's time) at 32x32 on four classes of scikit-learn's digits, with EMA,
gradient accumulation and mixup/cutmix switched on so that every piece of state a resume has to
restore (EMA, accumulators, step counter, seed generators, running metrics) is in play.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_finetune_data import MICRO_CLI, digits_folder, micro_variant

from convnext_keras import preprocess
from convnext_keras.cli import main
from convnext_keras.finetune import loop, recipe, rundir, state

RECIPE = [
    "--model", "convnextv2_micro",
    "--epochs", "3",
    "--batch-size", "8",
    "--accum-steps", "2",
    "--resolution", "32",
    "--lr", "2e-3",
    "--layer-decay", "0.9",
    "--layer-decay-type", "single",
    "--weight-decay", "0.05",
    "--ema", "0.8",
    "--mixup", "0.8",
    "--cutmix", "1.0",
    "--val-fraction", "0.25",
    "--seed", "3",
]  # fmt: skip
RUNTIME = ["--checkpoint-every", "3", "--no-export", "--workers", "1"]
COMPARED = ("train_loss", "train_acc", "val_loss", "val_acc1", "lr")


@pytest.fixture(scope="session")
def digits4(tmp_path_factory):
    """64 digit images of 4 classes (48 train / 16 val): 6 steps per epoch at batch 8."""
    return digits_folder(tmp_path_factory.mktemp("digits4"), per_class=16, classes=4)


@pytest.fixture(scope="session")
def reference(digits4, tmp_path_factory):
    """An uninterrupted run through the command line (in-process)."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    with micro_variant():
        result = CliRunner().invoke(
            main, ["finetune", str(digits4), "--out", str(out)] + RECIPE + RUNTIME
        )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, result.output


def _metrics(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())


def test_cli_run_writes_every_output(reference):
    out, output = reference
    for name in (
        "run.json",
        "labels.txt",
        "checkpoint.safetensors",
        "best.weights.safetensors",
        "metrics.csv",
        "metrics.json",
        "curves.png",
        "best.keras",
        "last.keras",
    ):
        assert (out / name).is_file(), name
    assert "epoch 3/3" in output and "best: epoch" in output and "not exported" in output
    assert (out / "labels.txt").read_text().split() == [f"digit{i}" for i in range(4)]
    info = json.loads((out / "run.json").read_text())
    assert info["recipe"]["accumulation"] == 2 and info["recipe"]["ema"] == 0.8
    assert info["recipe"]["layer_decay_type"] == "single"
    assert info["recipe"]["drop_path"] == recipe.DEFAULT_DROP_PATH  # atto: no published rate
    assert info["data"]["train"] == 48 and info["data"]["val"] == 16
    history = _metrics(out)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert all(np.isfinite(row[k]) for row in history for k in COMPARED)
    csv_rows = (out / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].split(",") == list(rundir.METRIC_COLUMNS) and len(csv_rows) == 4
    assert float(csv_rows[2].split(",")[1]) == pytest.approx(history[1]["train_loss"])
    with Image.open(out / "curves.png") as png:
        assert png.format == "PNG" and png.size[0] > 400
    meta = state.read_meta(out / "checkpoint.safetensors")
    assert (meta["epoch"], meta["step"], meta["complete"]) == (3, 0, True)
    assert not list(out.glob(".*part*"))  # no temporary file left behind


def test_best_model_reproduces_the_best_validation_accuracy(reference, digits4):
    """best.keras (EMA weights) on the validation images gives the recorded val acc@1."""
    import keras

    out, _ = reference
    info = json.loads((out / "run.json").read_text())
    history = _metrics(out)
    best = max(history, key=lambda r: r["val_acc1"])
    model = keras.saving.load_model(out / "best.keras", compile=False)
    folder = loop.data_lib.scan(digits4, val_fraction=0.25, seed=3)
    x = np.stack(
        [preprocess.eval_transform(preprocess.load_image(p), 32, 0.875) for p, _ in folder.val]
    )
    logits = keras.ops.convert_to_numpy(model(x, training=False))
    accuracy = float((logits.argmax(axis=1) == [y for _, y in folder.val]).mean())
    assert accuracy == pytest.approx(best["val_acc1"])
    assert model.output_shape == (None, len(info["classes"]))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(rundir.load_run(out)(x[:2])), logits[:2], rtol=1e-5, atol=1e-5
    )


def _cli_process(*args: str) -> list[str]:
    return [sys.executable, "-c", MICRO_CLI, "finetune", *args]


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_finishes_with_the_same_metrics(reference, digits4, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "killed"
    env = {**os.environ, "CONVNEXT_NO_PROGRESS": "1"}
    proc = subprocess.Popen(
        _cli_process(str(digits4), "--out", str(out), *RECIPE, *RUNTIME),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    checkpoint = out / rundir.STATE_FILE
    meta, deadline = None, time.monotonic() + 600
    try:
        # Wait for a checkpoint in the middle of epoch 2 (3 of its 6 batches done: one update
        # done, one gradient waiting in the accumulators), then kill without warning.
        while time.monotonic() < deadline and proc.poll() is None:
            meta = state.read_meta(checkpoint) if checkpoint.exists() else None
            if meta and (meta["epoch"], meta["step"]) >= (1, 3):
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    kept = state.read_meta(checkpoint)
    assert kept["epoch"] == 1 and 0 < kept["step"] < 6, kept  # really mid-epoch
    assert len(kept["history"]) == 1
    # A temporary file a kill left behind is never read.
    (out / ".checkpoint.safetensors.abc123.part").write_bytes(b"half a checkpoint")

    with micro_variant():
        result = CliRunner().invoke(
            main, ["finetune", str(digits4), "--resume", str(out)] + RUNTIME
        )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"epoch {kept['epoch'] + 1}, step {kept['step']}" in result.output
    resumed, uninterrupted = _metrics(out), _metrics(ref_out)
    assert len(resumed) == len(uninterrupted) == 3
    for got, want in zip(resumed, uninterrupted):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["epoch"], key)
    a = loop.cache.load_converted(out / rundir.BEST_WEIGHTS)
    b = loop.cache.load_converted(ref_out / rundir.BEST_WEIGHTS)
    for layer in b:
        for x, y in zip(a[layer], b[layer]):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=layer)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(digits4, tmp_path):
    out = tmp_path / "diverged"
    args = ["finetune", str(digits4), "--out", str(out), "--model", "convnext_micro"]
    args += ["--epochs", "1", "--batch-size", "8", "--resolution", "32", "--val-fraction", "0.25"]
    # An absurd learning rate: the first update blows the weights up to ~1e30 (still finite),
    # the second forward pass overflows.
    args += ["--lr", "1e30", "--min-lr", "0", "--layer-decay", "1", "--no-export"]
    args += ["--checkpoint-every", "1", "--workers", "1"]
    with micro_variant():
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 3, result.output
    assert "loss became nan at epoch 1, step 2 (of 6)" in result.output
    assert "last good checkpoint" in result.output and "(epoch 1, step 1)" in result.output
    arrays, meta = state.load(out / rundir.STATE_FILE)
    assert (meta["epoch"], meta["step"]) == (0, 1)
    assert not state.non_finite(arrays)
    assert not (out / "best.keras").exists()


def test_names_that_are_not_utf8_train_and_resume_and_leftovers_are_removed(digits4, tmp_path):
    """A class folder and a file whose names are Latin-1 bytes (not UTF-8): the run trains, its
    file list, fingerprint and labels.txt keep the names exactly (the fingerprint failed with
    'surrogates not allowed'), and ``--resume`` finds the same files.  What a killed run left
    in the run folder - this library's temporary and safetensors' own ``.tmpXXXXXX`` of older
    versions, both stale - is removed when the run is resumed."""
    data = tmp_path / "data"
    for digit, name in (("digit1", "one"), ("digit2", os.fsdecode(b"deux-\xe9"))):
        shutil.copytree(digits4 / digit, data / name)
    odd = os.fsdecode(b"\xe9t\xe9.png")
    (data / "one" / "0001.png").rename(data / "one" / odd)
    out = tmp_path / "run"
    args = ["finetune", str(data), "--out", str(out), "--model", "convnext_micro", "--epochs", "1"]
    args += ["--batch-size", "8", "--resolution", "32", "--val-fraction", "0.25", "--no-export"]
    args += ["--workers", "1"]
    with micro_variant():
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    labels = (out / "labels.txt").read_bytes().splitlines()
    assert labels == [b"deux-\xe9", b"one"]
    listed = gzip.decompress((out / rundir.DATA_FILES).read_bytes())
    assert b"one/\xe9t\xe9.png" in listed
    old = time.time() - 3600
    leftovers = [out / ".checkpoint.safetensors.k1ll3d.part", out / ".tmpAb3dE9"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a checkpoint")
        os.utime(leftover, (old, old))
    with micro_variant():
        again = CliRunner().invoke(main, ["finetune", str(data), "--resume", str(out)])
    assert again.exit_code == 0, again.output + repr(again.exception)
    assert "already complete" in again.output
    assert not [p for p in leftovers if p.exists()]


# ---------------------------------------------------------------------------------------------
# Errors before any training


def test_bad_data_errors_come_before_training(tmp_path):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "cats" / "a.png")
    result = CliRunner().invoke(
        main, ["finetune", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    assert "error:" in result.output and "single class ('cats')" in result.output
    assert not (tmp_path / "out").exists()


def test_batch_larger_than_the_data_is_refused(digits4, tmp_path):
    with pytest.raises(loop.data_lib.DataError, match="fewer than one batch"):
        loop.run(digits4, tmp_path / "o", model="convnext_atto", batch_size=512, verbose=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": -1.0}, "lr must be positive"),
        ({"precision": "fp8"}, "precision must be one of fp32, bf16, fp16"),
        ({"crop_scale": (0.5, 0.2)}, "crop_scale must be"),
        ({"layer_decay": 2.0}, "layer_decay must be in"),
        ({"warmup_epochs": 40}, "warmup_epochs must be shorter"),
        ({"model": "convnext_tiny_1k_224_fe"}, "feature extractor name"),
        ({"model": "convnext_tyni"}, "Did you mean"),
        ({"weights": "missing.pth"}, "does not exist"),
        ({"lr_decay": 0.5}, r"Unknown fine-tuning option\(s\) \['lr_decay'\]"),
    ],
)
def test_bad_options_are_refused_with_the_fix(options, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        recipe.resolve_recipe(**options)


def test_recipe_defaults_are_the_original_fine_tuning_recipe():
    r = recipe.resolve_recipe(model="convnext_base_21k_1k_224")
    assert (r.lr, r.layer_decay, r.weight_decay, r.head_init_scale) == (5e-5, 0.8, 1e-8, 1e-3)
    assert (r.epochs, r.warmup_epochs, r.mixup, r.cutmix, r.label_smoothing) == (30, 0, 0, 0, 0.1)
    assert (r.drop_path, r.resolution, r.crop_pct, r.weights) == (0.2, 224, 0.875, "official")
    large = recipe.resolve_recipe(model="convnext_large_21k_1k_384")
    assert (large.drop_path, large.resolution, large.crop_pct) == (0.3, 384, 1.0)
    assert recipe.resolve_recipe(model="convnext_atto").weights is None
    assert r.layer_decay_type == large.layer_decay_type == "group"


def test_v2_models_take_the_v2_recipe():
    """ConvNeXt-V2 TRAINING.md: atto (single, 0.9, drop path 0.1, blr 2e-4, wd 0.3), tiny
    (single, 0.9, 0.2, 8e-4, 0.05), base (group, 0.6, 0.1, 6.25e-4, 0.05); lr = blr * batch /
    256 with the effective batch (batch x accumulation)."""
    atto = recipe.resolve_recipe(model="convnextv2_atto_fcmae")
    assert (atto.layer_decay_type, atto.layer_decay, atto.drop_path, atto.weight_decay) == (
        "single",
        0.9,
        0.1,
        0.3,
    )
    assert atto.lr == pytest.approx(2e-4 * 32 / 256) and atto.weights == "official"
    tiny = recipe.resolve_recipe(model="convnextv2_tiny_1k_224", batch_size=64, accumulation=2)
    assert (tiny.layer_decay_type, tiny.layer_decay, tiny.drop_path) == ("single", 0.9, 0.2)
    assert tiny.lr == pytest.approx(8e-4 * 128 / 256)
    base = recipe.resolve_recipe(model="convnextv2_base_21k_1k_384", lr=1e-4, layer_decay=0.7)
    assert (base.layer_decay_type, base.layer_decay, base.lr, base.resolution) == (
        "group",
        0.7,
        1e-4,
        384,
    )
    assert (base.drop_path, base.weight_decay, base.crop_pct) == (0.1, 0.05, 1.0)
    with pytest.raises(ValueError, match="layer_decay_type must be one of group, single"):
        recipe.resolve_recipe(model="convnextv2_atto", layer_decay_type="block")


def _copy_run(reference, tmp_path) -> Path:
    out = tmp_path / "copy"
    out.mkdir()
    shutil.copy(reference[0] / "run.json", out / "run.json")
    return out


def test_resume_refuses_other_settings_other_classes_and_damaged_state(reference, tmp_path):
    out = _copy_run(reference, tmp_path)
    with pytest.raises(ValueError, match=r"lr: run has 0.002, asked 0.1"):
        loop.run(tmp_path, out, resume=True, lr=0.1, verbose=0)
    other = digits_folder(tmp_path / "other", per_class=3, classes=5)
    with pytest.raises(loop.data_lib.DataError, match=r"missing none, new \['digit4'\]"):
        loop.run(other, out, resume=True, verbose=0)
    (out / rundir.STATE_FILE).write_bytes(b"\0" * 100)
    with pytest.raises(state.StateError, match="not a readable fine-tuning state"):
        loop.run(other, out, resume=True, verbose=0)
    with pytest.raises(FileNotFoundError, match="Nothing to resume"):
        loop.run(other, tmp_path / "nothing", resume=True, verbose=0)
    with pytest.raises(FileExistsError, match="already holds a fine-tuning run"):
        loop.run(other, reference[0], model="convnext_atto", verbose=0)


def test_cli_requires_out_or_resume(tmp_path):
    result = CliRunner().invoke(main, ["finetune", str(tmp_path)])
    assert result.exit_code == 2 and "Give --out DIR" in result.output
    result = CliRunner().invoke(main, ["finetune", str(tmp_path), "--out", "a", "--resume", "b"])
    assert result.exit_code == 2 and "drop --out" in result.output


def test_new_head_starts_small():
    import keras

    import convnext_keras as ck

    model = ck.load_model("convnext_atto", weights=None, num_classes=7, head_init_scale=1e-3)
    kernel = keras.ops.convert_to_numpy(model.get_layer("head_fc").kernel)
    assert 0 < kernel.std() < 0.02 * 1e-3 * 1.5


@pytest.mark.slow
def test_bf16_run_with_randaugment_writes_float32_classifiers(digits4, tmp_path):
    import keras

    with micro_variant():
        result = loop.run(
            digits4,
            tmp_path / "bf16",
            model="convnext_micro",
            epochs=1,
            batch_size=8,
            resolution=32,
            precision="bf16",
            randaugment=2,
            val_fraction=0.25,
            checkpoint_every=0,
            export=False,
            verbose=0,
        )
    row = result.history[0]
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"])
    model = keras.saving.load_model(result.files["best"])
    assert model.dtype_policy.name == "float32"
    assert {str(w.dtype) for w in model.weights} == {"float32"}
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored


def test_remat_on_tensorflow_is_refused_with_the_reason(digits4, tmp_path):
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("remat works on JAX; the refusal concerns the TensorFlow backend")
    with pytest.raises(ValueError, match="keras-team/keras#21207"):
        loop.run(digits4, tmp_path / "r", model="convnext_atto", remat=True, verbose=0)


@pytest.mark.slow
def test_export_writes_a_verified_savedmodel_of_the_best_classifier(reference, tmp_path):
    pytest.importorskip("convnext_keras.export.exporter")
    path, note = rundir._export(reference[0] / "best.keras", tmp_path, 32)
    assert path is not None, note
    assert (path / "saved_model.pb").is_file() and "verified against Keras" in note


def test_predict_with_a_run_s_model_reads_its_labels(reference, digits4, tmp_path):
    """`convnext predict --model RUN/best.keras` names the run's classes (labels.txt beside it)
    without --labels."""
    out, _ = reference
    image = sorted((digits4 / "digit2").iterdir())[0]
    result = CliRunner().invoke(
        main, ["predict", str(image), "--model", str(out / "best.keras"), "--json", "--top", "4"]
    )
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert sorted(p["label"] for p in row["predictions"]) == [f"digit{i}" for i in range(4)]
    assert row["random_weights"] is False

    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    shutil.copy(out / "best.keras", elsewhere / "best.keras")
    (elsewhere / "labels.txt").write_text("cat\ndog\n")
    wrong = CliRunner().invoke(
        main, ["predict", str(image), "--model", str(elsewhere / "best.keras")]
    )
    assert wrong.exit_code == 2
    assert (
        "labels.txt names 2 classes but the model has 4; pass the right names with --labels FILE"
        in wrong.stderr
    )


def test_a_failed_start_writes_nothing_and_a_never_trained_folder_can_start_again(
    digits4, tmp_path, loopback_server, monkeypatch
):
    """Offline, the official weights cannot be had: the run stops before writing anything (and
    before announcing itself), so the same --out takes other options next time; so does a folder
    whose run never trained a step (as earlier versions left one)."""
    monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)  # serves nothing
    out = tmp_path / "run"
    args = ["finetune", str(digits4), "--out", str(out), "--model", "convnext_tiny_1k_224"]
    result = CliRunner().invoke(main, [*args, "--batch-size", "8", "--resolution", "32"])
    assert result.exit_code == 2 and "Could not download" in result.stderr
    assert "fine-tuning" not in result.stdout and not out.exists()

    out.mkdir()
    (out / "run.json").write_text(json.dumps({"recipe": {"weights": "official"}}))
    (out / "labels.txt").write_text("digit0\n")
    again = CliRunner().invoke(main, [*args, "--weights", str(tmp_path / "mine.pth")])
    assert again.exit_code == 2 and "mine.pth" in again.stderr
    assert "already holds" not in again.stderr


def test_resume_refuses_a_data_set_whose_files_changed(reference, digits4, tmp_path):
    out = _copy_run(reference, tmp_path)
    shutil.copy(reference[0] / rundir.DATA_FILES, out / rundir.DATA_FILES)
    data = tmp_path / "data"
    shutil.copytree(digits4, data)
    (data / "digit1" / "0003.png").unlink()
    shutil.copy(data / "digit2" / "0001.png", data / "digit2" / "extra.png")
    with pytest.raises(loop.data_lib.DataError, match="changed since the run") as info:
        loop.run(data, out, resume=True, verbose=0)
    text = str(info.value)
    assert "1 gone (digit1/0003.png)" in text and "1 new (digit2/extra.png)" in text
    assert "start a new run" in text


def test_resume_of_a_finished_run_changes_nothing(reference, digits4, tmp_path):
    """The reference run is complete (and was made with --no-export): --resume says so and
    leaves every file as it was - not one byte or modification time (it used to say "resumed
    from ... epoch 4" and write best.keras again)."""
    out = tmp_path / "again"
    shutil.copytree(reference[0], out)
    info = json.loads((out / "run.json").read_text())
    assert info["settings"] == {**loop.RUN_SETTINGS, "export": False, "checkpoint_every": 3}
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    with micro_variant():
        result = CliRunner().invoke(main, ["finetune", str(digits4), "--resume", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "already complete (3 epochs); nothing to do, nothing changed" in result.output
    assert "not exported" in result.output and "resumed from" not in result.output
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    best = state.read_meta(out / "checkpoint.safetensors")["best"]
    assert f"best: epoch {best['epoch']}, val acc@1 {best['val_acc1']:.4f}" in result.output
    done = loop.run(digits4, out, resume=True, verbose=0)
    assert [row["epoch"] for row in done.history] == [1, 2, 3]
    assert done.files["best"] == out / "best.keras" and done.export is None


def test_run_files_get_the_umask_s_permissions(reference):
    out = reference[0]
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o666 & ~mask}, sorted(modes.items())
