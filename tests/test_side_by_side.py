"""``benchmarks/side_by_side.py`` end to end at a tiny size (ConvNeXt V2-atto: the V2 peers,
transformers' ConvNextV2 and onnxruntime on its ONNX export; ConvNeXt's differ only by the
transformers class): every contender runs, the default engine equals Keras, the ratios are to
onnxruntime on the PyTorch export, and the bf16 row carries its accuracy check.  Speed itself
is never asserted (BENCHMARKS.md holds the numbers)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_side_by_side_runs_every_contender(tmp_path):
    out = tmp_path / "out"
    args = ["--model", "convnextv2_atto", "--resolution", "64", "--batch-size", "2",
            "--repeats", "1", "--warmup", "1", "--bf16-repeats", "1", "--threads", "2",
            "--no-keras-applications", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "side_by_side.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["model"] == "convnextv2_atto @ 64, batch 2, 2 threads"
    assert report["default_engine_vs_keras_max_abs_diff"] < 1e-4
    rows = {(r["group"], r["name"]): r for r in report["rows"]}
    names = {name for group, name in rows if group == "fp32"}
    reference = "onnxruntime, PyTorch model's ONNX export"
    assert {
        "convnext_keras default (onnxruntime)",
        "convnext_keras Keras predict_on_batch (tensorflow)",
        "transformers ConvNextV2, PyTorch eager",
        reference,
    } <= names
    if importlib.util.find_spec("openvino"):
        assert {
            "OpenVINO, this library's ONNX graph",
            "OpenVINO, PyTorch model's ONNX export",
        } <= names
        assert "openvino" in report["versions"]
    assert rows[("fp32", reference)]["vs_onnxruntime"] == 1.0
    assert all(r["img_per_s"] > 0 and r["slowest"] <= r["fastest"] for r in rows.values())
    assert len([g for g, _ in rows if g == "bf16"]) == 2 and report["bf16_vs_pytorch_bf16"] > 0
    accuracy = report["bf16_accuracy"]
    assert accuracy["photos"] == 5 and accuracy["relative_error"] <= 1e-2
    assert report["preprocessing_img_per_s"] > 0
    assert (out / "results.md").read_text().startswith("Date: ")
