"""benchmarks/gpu_bench.py's pieces that need no GPU: the summary of stored results, and the
benchmark-only swap that runs the model's first pointwise layers as the fused Pallas kernel."""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_bench  # noqa: E402

H200 = ROOT / "benchmarks" / "results" / "gpu_h200_2026-11-27_pallas"


def test_summary_of_stored_h200_results_shows_ratios_and_spreads():
    text = gpu_bench.summarize(gpu_bench.read_results(H200 / "run1_full"))
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "15,302 (15,213-15,408)" in rows["infer"] and "| 1.02x |" in rows["infer"]
    assert "3,591 (2,839-3,984)" in rows["train"] and "| 1.03x |" in rows["train"]
    assert "| 0.74x |" in rows["infer (dw pallas)"]
    assert "peak memory, timm compiled AMP bf16 fused AdamW: 7.85 GB" in text
    assert "jax depthwise: deadline" in text  # what did not run is said, not dropped
    sweep = gpu_bench.summarize(gpu_bench.read_results(H200 / "run2_hires_depthwise"))
    assert "depthwise 7x7, stage0 256x56x56x96" in sweep
    assert "pallas warps 8 block_h 4 block_c 32 0.862 (3.1e-02)" in sweep


@pytest.mark.backends
def test_fused_pointwise_swap_computes_the_same_model(monkeypatch):
    if keras.backend.backend() != "jax":
        pytest.skip("the fused pointwise kernel is a JAX (Pallas) kernel")
    from convnext_keras import build_model
    from convnext_keras.kernels import matmul as pm

    shapes, kernel = [], pm.dense_gelu
    monkeypatch.setattr(
        pm, "dense_gelu", lambda x, *a, **k: shapes.append(x.shape) or kernel(x, *a, **k)
    )

    model = build_model("pico", input_shape=(64, 64, 3))  # widths 64.. (tiles of 128 divide)
    x = np.random.default_rng(0).random((2, 64, 64, 3), np.float32)
    expected = keras.ops.convert_to_numpy(model(x))
    gpu_bench._fuse_pointwise(model)
    assert type(model.get_layer("stage0_block0_pwconv1")).__name__ == "FusedDenseGelu"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), expected, atol=1e-5)
    # stages 0 and 1 (2 x 16 x 16 and 2 x 8 x 8 rows) ran fused; 2 and 3 are too small for a tile
    assert shapes == [(512, 64)] * 2 + [(128, 128)] * 2


def test_summary_of_the_pallas_default_runs():
    """Session 6's calls: the run with every variant, and the one whose workers ran apart
    (its summary merged here from both folders); the train row is the row without a suffix."""
    runs = ROOT / "benchmarks" / "results" / "gpu_h200_2026-11-27_session6"
    text = gpu_bench.summarize(gpu_bench.read_results(runs / "run1_all_variants"))
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "2,580 (2,555-2,630)" in rows["train"] and "| 0.62x |" in rows["train"]
    assert "| 0.94x |" in rows["train (dw pallas)"] and "| 1.07x |" in rows["infer (dw pallas)"]
    merged = gpu_bench.summarize(gpu_bench.read_results(runs / "run2_pallas16"))
    rows = {
        line.split("|")[1].strip(): line for line in merged.splitlines() if line.startswith("| ")
    }
    assert "| 0.73x |" in rows["base"] and "| 1.00x |" in rows["base (dw pallas)"]
    assert rows["train"].split("|")[6].strip() == "-"  # no default-kernel step in that call
    assert "| 0.96x |" in rows["train (dw pallas)"]


def test_pallas_launch_settings_apply_inside_the_block_only():
    pdw = pytest.importorskip("convnext_keras.kernels.depthwise")
    before = pdw.NUM_WARPS, pdw.BLOCK_H, pdw.MAX_BLOCK_W
    with gpu_bench._pallas_launch(8, None):
        assert (pdw.NUM_WARPS, pdw.BLOCK_H, pdw.MAX_BLOCK_W) == (8, before[1], before[2])
        with gpu_bench._pallas_launch(None, 8, 32):
            assert (pdw.NUM_WARPS, pdw.BLOCK_H, pdw.MAX_BLOCK_W) == (8, 8, 32)
            assert pdw._block_w(96) == 32 and pdw.default_blocks(96, 96, 96) == (8, 32)
    assert (pdw.NUM_WARPS, pdw.BLOCK_H, pdw.MAX_BLOCK_W) == before
    with pytest.raises(RuntimeError), gpu_bench._pallas_launch(4, 2, 16):
        raise RuntimeError("a failed compilation")
    assert (pdw.NUM_WARPS, pdw.BLOCK_H, pdw.MAX_BLOCK_W) == before


def test_summary_of_the_fifth_session_and_the_other_models_train_rows():
    """Session 7's second call: the default train step ("auto" kernel gradient, 8 rows per
    program) against timm, the all-Pallas kernel gradient beside it; and the train rows of
    ConvNeXt-B 224 / T-384 (jobs train_base, train_hires) get their own ratios."""
    runs = ROOT / "benchmarks" / "results" / "gpu_h200_2026-11-27_session7"
    text = gpu_bench.summarize(gpu_bench.read_results(runs / "run2_train_defaults"))
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "4,608 (4,566-4,681)" in rows["train"] and "| 1.12x |" in rows["train"]
    assert "| 1.00x |" in rows["train (kernel grad pallas)"]
    assert "jax kernel_grad: deadline" in text

    def row(worker, impl, img_per_s, peak):
        return dict(
            worker=worker,
            job="train_base",
            impl=impl,
            model="base@224",
            batch=128,
            img_per_s=img_per_s,
            slowest=img_per_s - 10,
            fastest=img_per_s + 10,
            peak_bytes=peak,
        )

    text = gpu_bench.summarize(
        [
            row("torch", "timm compiled AMP bf16 fused AdamW", 1000, 2e10),
            row("jax", "convnext_keras JAX mixed_bfloat16 AdamW", 1100, 1e10),
        ]
    )
    line = next(x for x in text.splitlines() if x.startswith("| train_base |"))
    assert "base@224" in line and "| 1.10x | >= 1.0x |" in line
    assert "peak memory, timm compiled AMP bf16 fused AdamW (base@224): 20.00 GB" in text
    assert next(x for x in text.splitlines() if x.startswith("| train |")).count("| - |") >= 3


def test_stage_jobs_name_a_bad_model_config(monkeypatch):
    monkeypatch.setenv("GPU_BENCH_KG_CONFIG", "hires")
    assert gpu_bench._model_config(gpu_bench.FULL, "GPU_BENCH_KG_CONFIG", "train") == (
        "tiny",
        384,
        128,
    )
    monkeypatch.setenv("GPU_BENCH_KG_CONFIG", "huge")
    with pytest.raises(ValueError, match="GPU_BENCH_KG_CONFIG='huge' is not a job.*'hires'"):
        gpu_bench._model_config(gpu_bench.FULL, "GPU_BENCH_KG_CONFIG", "train")
