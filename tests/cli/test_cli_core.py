"""`convnext list` and `convnext convert`."""

from __future__ import annotations

import errno
import json
import os

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import convnext_keras as ck
from convnext_keras.cli import main
from convnext_keras.errors import WriteError, plain


def test_list_shows_the_whole_collection():
    result = CliRunner().invoke(main, ["list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    # V1, V2, isotropic, DINOv3, timm, UperNet, Mask R-CNN / Cascade Mask R-CNN
    assert len(rows) == 21 + 26 + 3 + 4 + 6 + 6 + 7
    tiny = next(r for r in rows if r["name"] == "convnext_tiny_1k_224")
    assert tiny == {
        "name": "convnext_tiny_1k_224",
        "family": "convnext",
        "params": 28_589_128,
        "resolution": 224,
        "classes": 1000,
        "dataset": "imagenet-1k",
        "acc1": 82.1,
        "miou": None,
        "box_ap": None,
        "mask_ap": None,
        "reported": "82.1 acc@1",
        "licence": "MIT",
        "cached": False,
        "cached_from": None,
        "url": "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth",
        "source": "official",
    }
    detection = next(r for r in rows if r["name"] == "cascade_mask_rcnn_convnext_tiny_coco")
    assert (detection["box_ap"], detection["mask_ap"], detection["classes"]) == (50.4, 43.7, 80)
    assert detection["reported"] == "50.4 box / 43.7 mask AP"
    upernet = next(r for r in rows if r["family"] == "upernet_convnext")
    assert upernet["reported"].endswith(" mIoU") and upernet["acc1"] is None
    table = CliRunner().invoke(main, ["list", "xlarge"])
    assert table.exit_code == 0
    assert "convnext_xlarge_21k_1k_384" in table.output and "tiny" not in table.output
    assert "87.8" in table.output


def test_list_shows_convnext_v2_with_its_licence():
    result = CliRunner().invoke(main, ["list", "convnextv2*", "--json"])
    rows = json.loads(result.output)
    assert len(rows) == 26 and {r["licence"] for r in rows} == {"CC-BY-NC-4.0"}
    tiny = next(r for r in rows if r["name"] == "convnextv2_tiny_1k_224")
    assert (tiny["params"], tiny["acc1"], tiny["family"]) == (28_635_496, 83.0, "convnextv2")
    encoder = next(r for r in rows if r["name"] == "convnextv2_tiny_fcmae")
    assert encoder["classes"] is None and encoder["acc1"] is None
    table = CliRunner().invoke(main, ["list", "convnextv2*", "--markdown"])
    lines = table.output.splitlines()
    assert len(lines) == 2 + 26 and lines[0].endswith("| licence |")
    assert "| convnextv2_huge_21k_1k_512 | 660.3M | 512 | 1000 |" in table.output
    assert "| convnextv2_atto_fcmae | 3.4M | 224 | - | fcmae imagenet-1k | - | CC-BY-NC-4.0 |" in (
        table.output
    )


def test_list_shows_the_other_families_with_their_sources_and_licences():
    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(main, ["list", "--json"]).output)}
    iso = rows["convnext_iso_large_1k_224"]
    assert (iso["params"], iso["acc1"], iso["licence"]) == (305_942_504, 82.6, "MIT")
    assert iso["url"].endswith("/convnext/convnext_iso_large_1k_224_ema.pth")
    dino = rows["dinov3_convnext_base_lvd1689m"]
    assert (dino["family"], dino["licence"], dino["classes"]) == (
        "dinov3",
        "LicenseRef-DINOv3",
        None,
    )
    assert dino["url"] == (
        "https://huggingface.co/facebook/dinov3-convnext-base-pretrain-lvd1689m/resolve/main/"
        "model.safetensors"
    )
    assert dino["source"] == "hf://facebook/dinov3-convnext-base-pretrain-lvd1689m"
    assert iso["source"] == "official"
    timm = rows["convnext_nano_12k_1k_384"]
    assert (timm["family"], timm["licence"], timm["dataset"]) == (
        "timm",
        "Apache-2.0",
        "imagenet-12k -> imagenet-1k",
    )
    table = CliRunner().invoke(main, ["list", "dinov3*"])
    assert table.exit_code == 0 and "LicenseRef-DINOv3" in table.output
    assert "DINOv3 License" in table.output  # the title says what it means
    assert "hf://facebook/dinov3-convnext-tiny-pretrain-lvd1689m" in table.output


def test_convert_cli(tmp_path, tiny_reference):
    _, path = tiny_reference
    out = tmp_path / "fe.keras"
    args = ["convert", str(path), "--model", "convnext_tiny_1k_224_fe", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    model = keras.saving.load_model(out)
    x = np.zeros((1, 64, 64, 3), "float32")
    expected = ck.load_model("convnext_tiny_1k_224_fe", weights=path).predict_on_batch(x)
    np.testing.assert_allclose(model.predict_on_batch(x), expected, atol=1e-5)

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2
    assert "exists" in again.output and "--overwrite" in again.output
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0


def test_convert_cli_reports_a_mismatch(tmp_path, tiny_reference):
    _, path = tiny_reference
    result = CliRunner().invoke(
        main, ["convert", str(path), "--model", "convnext_small_1k_224", "--out", "x.keras"]
    )
    assert result.exit_code == 2
    assert "error: The checkpoint is not a ConvNeXt-small" in result.output
    assert "convnext_tiny_1k_224" in result.output


class _ResourceExhaustedError(Exception):
    """Stands in for tensorflow's: a write failure reported in a library's own terms."""

    __module__ = "tensorflow.python.framework.errors_impl"


@pytest.mark.parametrize(
    "error, expected",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/m.onnx"), "(ENOSPC): /out/m.onnx"),
        (OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/x"), "read-only"),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/x"), "no permission"),
        (WriteError(errno.ENOSPC, "/out/m", "the savedmodel export"), "Could not write the sav"),
        (_ResourceExhaustedError("save failed; No space left on device\nmore"), "No space left"),
        (ValueError("\x1b[1mbold\x1b[0m \x07words"), "bold words"),
        (ck.CheckpointError("not a checkpoint"), "not a checkpoint"),
    ],
)
def test_the_error_boundary_gives_one_line_and_status_2(monkeypatch, error, expected):
    from convnext_keras import api

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(api, "model_table", fail)
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and expected in result.output
    assert result.output.count("\n") == 1 and "\x1b" not in result.output
    assert "Traceback" not in result.output


def test_a_bug_keeps_its_traceback(monkeypatch):
    from convnext_keras import api

    monkeypatch.setattr(api, "model_table", lambda *a, **k: {}["missing"])
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)
    # Only the writing libraries' messages are read for a failed write: not a plain bug's.
    bug = RuntimeError("Permission denied")
    monkeypatch.setattr(api, "model_table", lambda *a, **k: _raise(bug))
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def _raise(error):
    raise error


def test_plain_strips_terminal_codes():
    text = "\x1b[1mWeightsUnpickler error:\x1b[0m \x1b]8;;http://x\x07link\x1b]8;;\x07\r\n\tok\x9b"
    assert plain(text) == "WeightsUnpickler error: link\n\tok"


def test_list_title_has_only_the_notes_of_the_rows_shown_and_a_pattern_must_match():
    segmentation = CliRunner().invoke(main, ["list", "upernet"])
    assert segmentation.exit_code == 0 and "(6 checkpoints)" in segmentation.output
    assert "'_fe'" not in segmentation.output  # segmentation models have no _fe twin
    assert "non-commercial" not in segmentation.output and "DINOv3" not in segmentation.output
    v2 = CliRunner().invoke(main, ["list", "convnextv2_atto_1k*"])
    assert "(1 checkpoint; add '_fe'" in v2.output and "non-commercial" in v2.output
    assert "DINOv3 License" not in v2.output
    nothing = CliRunner().invoke(main, ["list", "convnxt_tiny_1k_224"])
    assert nothing.exit_code == 2 and nothing.output.count("\n") == 1, nothing.output
    assert "matches no model name. Did you mean convnext_tiny_1k_224" in nothing.output


@pytest.mark.parametrize(
    "args, expected, command",
    [
        (["predict", "x.jpg", "--model", "m", "--top", "0"], "'--top': 0 is not in", "predict"),
        (["predict", "x.jpg", "--model", "m", "--bogus"], "No such option '--bogus'", "predict"),
        (["eval", "/no/such/folder", "--model", "m"], "does not exist", "eval"),
        (["segment", "x.jpg", "--model", "m", "--slide", "--whole"], "exclude each", "segment"),
        (["nosuchcommand"], "No such command 'nosuchcommand'", ""),
        (["--bogus"], "No such option '--bogus'", ""),
    ],
)
def test_a_bad_command_line_is_one_line_naming_the_help(args, expected, command):
    result = CliRunner().invoke(main, args, prog_name="convnext")
    assert result.exit_code == 2 and result.output.startswith("error: "), result.output
    assert expected in result.output and result.output.count("\n") == 1, result.output
    assert f"(see `{' '.join(['convnext', command]).strip()} --help`)" in result.output


def test_a_bare_convnext_still_shows_the_help():
    result = CliRunner().invoke(main, [])
    assert "Commands:" in result.output and "segment" in result.output
