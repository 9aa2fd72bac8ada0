"""`convnext list` and `convnext convert`."""

from __future__ import annotations

import json

import keras
import numpy as np
from click.testing import CliRunner

import convnext_keras as ck
from convnext_keras.cli import main


def test_list_shows_the_whole_collection():
    result = CliRunner().invoke(main, ["list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 21
    tiny = next(r for r in rows if r["name"] == "convnext_tiny_1k_224")
    assert tiny == {
        "name": "convnext_tiny_1k_224",
        "params": 28_589_128,
        "resolution": 224,
        "classes": 1000,
        "dataset": "imagenet-1k",
        "acc1": 82.1,
        "cached": False,
        "url": "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth",
    }
    table = CliRunner().invoke(main, ["list", "xlarge"])
    assert table.exit_code == 0
    assert "convnext_xlarge_21k_1k_384" in table.output and "tiny" not in table.output
    assert "87.8" in table.output


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
