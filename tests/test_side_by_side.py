"""``benchmarks/side_by_side.py`` at a tiny size: the isolated harness end to end (workers,
rounds, paired ratios, latency, the quiet check, the two-contender cross-check, no worker left
behind) on ConvNeXt V2-atto (its peers: transformers' ConvNextV2 and onnxruntime on its ONNX
export, GRN in the library's graph and in int8), every other contender's worker code in this
process on ConvNeXt-atto, and the load probe seeing load.  Speed itself is never asserted
(BENCHMARKS.md holds the numbers)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "side_by_side.py"


def _script():
    spec = importlib.util.spec_from_file_location("side_by_side", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args, out):
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def test_isolated_harness_end_to_end(tmp_path):
    out = tmp_path / "out"
    args = ["--model", "convnextv2_atto", "--resolution", "64", "--batch-size", "1,2",
            "--rounds", "2", "--turn-seconds", "0", "--warmup", "1", "--threads", "2",
            "--contenders", "ours,int8,ort_export", "--no-bf16", "--pair-check",
            "--pair-repeats", "2", "--no-wait"]  # fmt: skip
    done = _run(args, out)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["model"] == "convnextv2_atto @ 64, 2 threads"
    assert report["batch_sizes"] == [1, 2]
    if Path("/proc/cpuinfo").exists():
        assert "family" in report["machine"] and "cores" in report["machine"]
    checks = report["checks"]
    assert checks["default_engine_vs_keras_max_abs_diff"] < 1e-4
    assert checks["int8_vs_fp32_relative_error_random_weights"] < 0.1
    assert checks["int8_quantization"]["convnext_keras.precision"] == "int8"
    (run,) = report["runs"]
    assert isinstance(run["quiet"], bool) and isinstance(run["noise"], list)
    assert run["quiet"] == (not run["noise"])
    assert run["matmul_gflops_before"] > 0 and run["matmul_gflops_after"] > 0
    rows = {(r["key"], r["batch_size"]): r for r in run["rows"]}
    assert set(rows) == {(k, b) for k in ("ours", "int8", "ort_export") for b in (1, 2)}
    for (key, bs), row in rows.items():
        assert row["rounds"] == 2 and row["slowest"] <= row["img_per_s"] <= row["fastest"]
        assert (row.get("share_of_matmul_rate", 0) > 0) == (key != "int8")
        assert ("latency_ms_median" in row) == (bs == 1)
        assert row["paired_q1"] <= row["vs_reference_paired"] <= row["paired_q3"]
    assert rows[("ort_export", 1)]["vs_reference_paired"] == 1.0
    assert rows[("ours", 1)]["latency_ms_p90"] >= rows[("ours", 1)]["latency_ms_median"] > 0
    assert rows[("int8", 2)]["speedup_over_fp32_paired"] > 0
    for bs in ("1", "2"):
        pair = report["pair_check"][bs]
        assert pair["calls"] == 2 and pair["vs_reference_paired"] > 0
        methods = report["agreement"][bs]["methods"]
        assert list(methods) == ["run 1", "two contenders, one process"]
        assert isinstance(report["agreement"][bs]["agree"], bool)
    # Every worker is gone (none left stopped behind the harness).
    for pid in run["workers"].values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    text = (out / "results.md").read_text()
    assert text.startswith("Date: ") and "### Run 1: " in text and "by method" in text

    bad = _run(["--model", "convnext_atto", "--batch-size", "1,x"], tmp_path / "bad")
    assert bad.returncode == 2 and "--batch-size takes positive integers" in bad.stderr


def test_every_contender_builds_and_runs_in_this_process(tmp_path):
    """The worker code of the contenders the end-to-end test leaves out (Keras - in bf16, the
    same code as fp32 -, PyTorch eager and bf16 autocast, OpenVINO with its check against
    onnxruntime), one call each."""
    import keras

    from convnext_keras import registry
    from convnext_keras.engines import onnx_graph, runners
    from convnext_keras.tasks import bench

    sbs = _script()
    spec = registry.VARIANTS["atto"]
    model, _ = bench.bench_model("convnext_atto", resolution=64)
    np.save(tmp_path / "batch2.npy", bench.random_batch(2, 64))
    (tmp_path / "ours.onnx").write_bytes(
        onnx_graph.build_onnx_graph(model, 64, 64).SerializeToString()
    )
    common = {"resolution": 64, "threads": 2, "folder": str(tmp_path), "batch_sizes": [2],
              "model": "convnext_atto", "variant": "atto", "arch_name": spec.arch_name,
              "grn": False, "depths": list(spec.depths),
              "dims": list(spec.dims)}  # fmt: skip
    kinds = [("engine", {"engine": runners.cpu_graph_engine()}), ("keras", {"precision": "bf16"}),
             ("torch", {"mode": "eager"}), ("torch", {"mode": "bf16"}),
             ("onnxruntime", {"graph": str(tmp_path / "ours.onnx"), "session": "plain",
                              "layout": "nhwc"})]  # fmt: skip
    if importlib.util.find_spec("openvino"):
        kinds.append(("openvino", {"graph": str(tmp_path / "ours.onnx"), "layout": "nhwc"}))
    for kind, extra in kinds:
        calls = sbs._KINDS[kind]({**common, **extra})
        assert list(calls) == [2], kind
        calls[2]()
    assert keras.config.dtype_policy().name == "float32"


def test_the_load_probe_sees_another_program():
    sbs = _script()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        sample = sbs.other_load(0.5)
        assert sample["other_cores"] >= 0.5, sample
        waited = sbs.wait_until_quiet(max_other=0.05, timeout=0.6)
        assert waited["quiet"] is False and waited["waited_s"] >= 0.5
    finally:
        busy.kill()
        busy.wait()
