"""The benchmark harness: its statistics, its call pattern, FLOP count, memory probe and CLI.

No test asserts on speed (the machine is shared and noisy); speed is what the benchmark
reports.  These tests prove that what it reports is computed correctly.
"""

from __future__ import annotations

import dataclasses
import json
import mmap

import numpy as np
import pytest
from click.testing import CliRunner

from convnext_keras import registry
from convnext_keras.cli import main
from convnext_keras.tasks import bench


def test_timing_statistics():
    t = bench.Timing("x", batch_size=8, seconds=[0.5, 0.25, 1.0, 0.5, 2.0])
    assert t.images_per_second == pytest.approx(16.0)  # 8 / median 0.5
    assert t.spread == (pytest.approx(4.0), pytest.approx(32.0))
    q1, q3 = np.percentile([0.25, 0.5, 0.5, 1.0, 2.0], [25, 75], method="weibull")
    assert t.iqr_percent == pytest.approx(100 * (q3 - q1) / 0.5)
    d = t.as_dict()
    assert d["images_per_second"] == pytest.approx(16.0) and d["repeats"] == 5
    assert "16.0 img/s median of 5" in t.summary()


def test_a_noisy_measurement_says_so(monkeypatch):
    """An IQR over 10 % of the median is called noisy - in the summary, the JSON and the
    command's output (which used to print a 63 % IQR without a word); a quiet one is not."""
    quiet = bench.Timing("q", batch_size=8, seconds=[1.0, 1.01, 0.99, 1.0, 1.02])
    assert quiet.noise is None and "noisy" not in quiet.summary()
    assert quiet.as_dict()["noisy"] is False
    noisy = bench.Timing("n", batch_size=8, seconds=[1.0, 1.6, 0.7, 1.9, 1.0, 0.8])
    assert noisy.iqr_percent > bench.NOISY_IQR_PERCENT and noisy.as_dict()["noisy"] is True
    assert noisy.noise.startswith("noisy: the timed calls spread over an IQR of ")
    assert noisy.noise in noisy.summary()
    result = bench.BenchResult(
        model="convnext_atto", backend="tensorflow", device="CPU", mode="infer",
        precision="fp32", resolution=32, engine="keras", timing=noisy,
    )  # fmt: skip
    monkeypatch.setattr(bench, "benchmark", lambda *a, **k: result)
    out = CliRunner().invoke(main, ["bench", "--model", "convnext_atto"])
    assert out.exit_code == 0 and out.stdout.splitlines()[-1] == (
        noisy.noise[0].upper() + noisy.noise[1:] + "."
    )
    monkeypatch.setattr(
        bench, "benchmark", lambda *a, **k: dataclasses.replace(result, timing=quiet)
    )
    assert "Noisy" not in CliRunner().invoke(main, ["bench", "--model", "convnext_atto"]).stdout


def test_resolution_help_states_the_rule_that_is_enforced():
    """--resolution's help said x>=16 while 32 was enforced for every non-isotropic model."""
    for command in ("bench", "embed", "finetune"):
        text = " ".join(CliRunner().invoke(main, [command, "--help"]).stdout.split())
        assert "x>=16" not in text
        assert "at least 32 pixels (16 for the isotropic ConvNeXts" in text, command
    small = CliRunner().invoke(
        main, ["bench", "--model", "convnext_iso_small", "--resolution", "8"]
    )
    assert small.exit_code == 2 and "smallest input, 16 pixels" in small.stderr


def test_interleave_warms_up_then_alternates():
    calls = []
    contenders = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    timings = bench.interleave(contenders, 4, warmup=2, repeats=3)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(t.seconds) for t in timings.values()] == [3, 3]
    assert all(s >= 0 for t in timings.values() for s in t.seconds)
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        bench.interleave(contenders, 4, repeats=0)
    with pytest.raises(ValueError, match="at least one contender"):
        bench.interleave({}, 4)


def test_host_memory_probe_sees_an_allocation():
    probe = bench.MemoryProbe("host")
    probe.reset()
    before = probe.peak()
    if before is None:
        pytest.skip("no /proc/self/status on this system")
    # 64 MiB of fresh pages, touched (a mapping of its own: memory an earlier test freed to
    # the allocator, still resident, would not raise the peak).
    block = mmap.mmap(-1, 64 * 2**20)
    np.frombuffer(block, dtype=np.uint8)[:] = 1
    after = probe.peak()
    assert after - before >= 48 * 2**20
    block.close()
    with pytest.raises(ValueError, match="kind must be"):
        bench.MemoryProbe("disk")


@pytest.mark.parametrize(("variant", "resolution"), [("atto", 64), ("tiny", 224)])
def test_flops_equal_pytorch_flop_counter(variant, resolution):
    """Independent count: PyTorch's FlopCounterMode on transformers' ConvNext."""
    import torch
    import torch_reference as ref
    from torch.utils.flop_counter import FlopCounterMode

    spec = registry.VARIANTS[variant]
    model = ref.hf_model(spec.depths, spec.dims, 1000)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=torch.rand(1, 3, resolution, resolution))
    assert bench.flops_per_image(variant, resolution) == counter.get_total_flops()


@pytest.mark.backends
@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto_1k_224"])
def test_benchmark_inference_runs_the_default_engine(name):
    result = bench.benchmark(
        name, batch_size=2, resolution=64, warmup=1, repeats=2, precision="fp32"
    )
    assert result.engine in ("openvino", "onnxruntime", "keras", "keras-jax-jit")
    assert result.mode == "infer" and result.resolution == 64
    assert len(result.timing.seconds) == 2 and result.timing.images_per_second > 0
    d = result.as_dict()
    assert d["model"] == name and d["batch_size"] == 2


@pytest.mark.backends
def test_benchmark_train_step_learns():
    """The timed JAX train step (stateless_call + stateless_apply in one jit) really trains:
    the loss on its fixed batch goes down.  TensorFlow and PyTorch use Keras' own
    train_on_batch, tested by Keras."""
    import keras

    if keras.backend.backend() != "jax":
        pytest.skip("the hand-written train step is the JAX one")

    model, res = bench.bench_model("convnext_atto", resolution=32, mode="train")
    for layer in model.layers:  # the cuDNN/XLA convolution compiles in half the time on a CPU
        if hasattr(layer, "implementation"):
            layer.implementation = "native"
    images = bench.random_batch(4, res)
    labels = np.arange(4)
    step = bench.train_step_fn(model, images, labels, learning_rate=1e-3)
    before = [v.value for v in model.trainable_variables]
    # Copies: a zero-copy numpy view of a CPU buffer would keep JAX from donating it.
    initial = [np.array(a, copy=True) for a in before]
    losses = [float(keras.ops.convert_to_numpy(step())) for _ in range(6)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    # The state is donated (one copy of parameters + moments at the peak, as in Keras' fit) ...
    assert all(a.is_deleted() for a in before)
    # ... and sync() gives the model the trained values back.
    step.sync()
    after = [np.asarray(v.value) for v in model.trainable_variables]
    assert max(np.abs(a - b).max() for a, b in zip(after, initial)) > 0
    logits = model.predict_on_batch(images)
    assert np.isfinite(logits).all()


def test_benchmark_int8_is_the_onnxruntime_engine():
    result = bench.benchmark("convnext_atto", batch_size=2, resolution=64, warmup=0, repeats=1,
                             precision="int8")  # fmt: skip
    assert result.engine == "onnxruntime" and result.precision == "int8"
    assert result.timing.images_per_second > 0
    with pytest.raises(ValueError, match="'int8' is an inference path"):
        bench.benchmark("convnext_atto", precision="int8", mode="train", resolution=32)
    with pytest.raises(ValueError, match="int8' runs on the onnxruntime engine only"):
        bench.benchmark("convnext_atto", precision="int8", engine="keras", resolution=32)


def test_benchmark_rejects_bad_arguments():
    with pytest.raises(ValueError, match="precision must be one of"):
        bench.benchmark("convnext_atto", precision="fp8", resolution=32, repeats=1)
    with pytest.raises(ValueError, match="mode must be one of"):
        bench.benchmark("convnext_atto", mode="serve", resolution=32, repeats=1)
    with pytest.raises(ValueError, match="Unknown model name"):
        bench.benchmark("convnext_tinny", resolution=32, repeats=1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        bench.random_batch(0, 32)


def test_preprocessing_rate_counts_every_photo():
    from pathlib import Path

    import skimage

    data = Path(skimage.__file__).parent / "data"
    photos = [data / "astronaut.png", data / "coffee.png", data / "chelsea.png"]
    t = bench.preprocessing_rate(photos * 2, "convnext_atto")
    assert t.details["images"] == 6 and t.images_per_second > 0
    with pytest.raises(ValueError, match="at least one image"):
        bench.preprocessing_rate([])


def test_cli_bench_json():
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--model",
            "convnext_atto",
            "--resolution",
            "64",
            "--batch-size",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"] == "convnext_atto" and data["repeats"] == 2
    assert data["images_per_second"] > 0 and data["precision"] == "fp32"


def test_cli_bench_table_and_errors():
    runner = CliRunner()
    result = runner.invoke(
        main, ["bench", "--model", "convnext_atto", "--resolution", "64", "--repeats", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "img/s (median)" in result.output and "convnext_atto infer fp32" in result.output
    bad = runner.invoke(main, ["bench", "--precision", "fp8"])
    assert bad.exit_code == 2 and "fp8" in bad.output
    unknown = runner.invoke(main, ["bench", "--model", "convnext_tinny", "--repeats", "1"])
    assert unknown.exit_code == 2 and "error: Unknown model name" in unknown.output
