"""This library against its peers on the CPU, each contender in its own process.

    python benchmarks/side_by_side.py                   # ConvNeXt-T 224, batches 1, 8 and 32
    python benchmarks/side_by_side.py --runs 2 --pair-check --out DIR   # BENCHMARKS.md's tables
    python benchmarks/side_by_side.py --model convnext_atto --resolution 64 --rounds 2

Why it measures this way: with four engines taking turns in one process, the ratios depended
on the order and the method (TensorFlow's and PyTorch's thread pools stay busy after their
turn; issue 22: 0.94x in one process against 1.00x with two engines alone).  So:

* **isolation**: every contender lives in its own worker process (spawned, importing only what
  it needs), builds its model once and warms up; while one is timed, every other worker is
  stopped (``SIGSTOP``), so none of their threads can run, spinning or not;
* **turns and rounds**: each round gives every contender one turn, in an order rotated from
  round to round: one untimed call, then timed calls for at least ``--turn-seconds``; a
  contender's time in a round is the median call of its turn.  Ratios to the reference
  (onnxruntime on the PyTorch model's ONNX export) are taken **per round** (paired) and their
  median and inter-quartile range are reported;
* **quiet check**: before each turn the harness waits until other programs use at most
  ``--max-other-load`` cores (``/proc/stat``, all our workers stopped); during each turn the
  worker measures the CPU time everything else took (system busy time minus its own) and the
  hypervisor's steal time; a turn over the limit is taken again (``--retries``).
  ``--no-wait`` (for a machine that is never quiet) neither waits nor retakes, but still
  measures, and the verdict below still uses ``--max-other-load``.  The load
  average and the numpy matmul rate before and after every run are recorded, and each run is
  labelled ``quiet`` or ``NOISY`` with the reasons;
* batch sizes ``--batch-size 1,8,32``; at batch 1 the per-image latency (median and p90 of every
  timed call); per contender the share of the machine's float32 matmul rate (numpy, measured in
  its own worker in the same run);
* ``--runs 2`` repeats the whole measurement with fresh workers; ``--pair-check`` adds the
  issue's two-contender method (only this library's default engine and onnxruntime on the
  export, in one process, alternating single calls after 2 warm-up calls, median of the paired
  ratios) and a table of whether the methods agree within their spread.

Contenders: float32 - this library's default engine (the runner ``runners.inference_function``
picks: OpenVINO on this library's graph when installed, else onnxruntime on it), onnxruntime on
this library's graph (the session ``runners.onnx_session`` makes), its opt-in int8
(``quantization.quantize_int8``, calibrated on the sample photos), the same model through Keras
``predict_on_batch`` (active backend),
keras.applications ConvNeXt (opt-in: ``--keras-applications``, slow; it has no V2),
transformers' ConvNext (ConvNextV2 for ``--model convnextv2_*``)
in PyTorch eager (and ``torch.compile`` with ``--torch-compile``), onnxruntime on that model's
ONNX export, timm where importable, OpenVINO on that export (when installed); bfloat16
(``--no-bf16`` skips): this library with ``mixed_bfloat16`` against PyTorch eager with bf16
autocast, at ``--bf16-batch-size``.  Peers use random weights (speed does not depend on them);
the correctness checks (default engine against Keras, int8 and bf16 against float32 on real
photos) run once before the timing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REFERENCE = "ort_export"
DEFAULT = "ours"
#: Contenders without which a run means nothing (the matmul worker gives the rate).
REQUIRED = (DEFAULT, REFERENCE, "matmul")
#: Seconds of CPU statistics the quiet check looks at before a turn.
QUIET_WINDOW = 0.25
#: Longest wait for a quiet machine before a turn is taken anyway (and flagged).
QUIET_TIMEOUT = 10.0
#: A run whose matmul rate after the timing differs by more than this from before is NOISY.
MATMUL_DRIFT = 0.05
MATMUL_N = 2048


# ----------------------------------------------------------------------------------------------
# CPU accounting


def cpu_seconds() -> tuple[float, float]:
    """``(busy, steal)`` CPU seconds of the whole machine since boot, summed over CPUs
    (``/proc/stat``: busy = user + nice + system + irq + softirq; steal = time the hypervisor
    gave to other guests while this one was runnable)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return (user + nice + system + irq + softirq) / tick, steal / tick


#: /proc/stat counts in clock ticks (10 ms): shorter windows are not measured (None).
MIN_CPU_WINDOW = 0.2


class CpuWindow:
    """Cores used by everything but this process, and steal, between construction and
    :meth:`close` (``other_cores`` = (machine busy time - this process' CPU time) / wall;
    None for windows shorter than :data:`MIN_CPU_WINDOW`)."""

    def __init__(self):
        self._busy, self._steal = cpu_seconds()
        self._own = time.process_time()
        self._wall = time.perf_counter()

    def close(self) -> dict:
        busy, steal = cpu_seconds()
        wall = max(time.perf_counter() - self._wall, 1e-9)
        own = time.process_time() - self._own
        if wall < MIN_CPU_WINDOW:
            return {"other_cores": None, "steal_cores": None, "own_cores": None, "wall_s": wall}
        return {
            "other_cores": max(0.0, (busy - self._busy - own) / wall),
            "steal_cores": max(0.0, (steal - self._steal) / wall),
            "own_cores": own / wall,
            "wall_s": wall,
        }


def other_load(window: float = QUIET_WINDOW) -> dict:
    """:class:`CpuWindow` over ``window`` seconds of sleep: what other programs use now."""
    w = CpuWindow()
    time.sleep(window)
    return w.close()


def wait_until_quiet(max_other: float, timeout: float = QUIET_TIMEOUT) -> dict:
    """Sample :func:`other_load` until it is at most ``max_other`` cores or ``timeout`` passes;
    the last sample, with ``waited_s`` and ``quiet``."""
    start = time.perf_counter()
    while True:
        sample = other_load()
        waited = time.perf_counter() - start
        if sample["other_cores"] <= max_other or waited >= timeout:
            return {**sample, "waited_s": waited, "quiet": sample["other_cores"] <= max_other}


def loadavg() -> list[float]:
    with contextlib.suppress(OSError):
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    return []


# ----------------------------------------------------------------------------------------------
# The contenders, built inside their worker processes


def _inputs(params: dict, batch_size: int, layout: str) -> np.ndarray:
    """The batch every contender gets (``bench.random_batch``, written by the preparation, so
    that workers of other engines need not import this library), NHWC or NCHW."""
    x = np.load(Path(params["folder"]) / f"batch{batch_size}.npy")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "nchw" else x


def _ort_calls(params: dict) -> dict:
    import onnxruntime as ort

    data = Path(params["graph"]).read_bytes()
    if params["session"] == "library":  # exactly the session the default engine makes
        from convnext_keras.engines import runners

        session = runners.onnx_session(data, params["threads"])
    else:  # onnxruntime's defaults, with the same thread count
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = params["threads"], 1
        if params.get("no_spinning"):
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    calls = {}
    for bs in params["batch_sizes"]:
        feed = {name: _inputs(params, bs, params["layout"])}
        calls[bs] = lambda feed=feed: session.run(None, feed)
    return calls


def _openvino_calls(params: dict) -> dict:
    """OpenVINO (CPU plugin, float32, latency hint) on an ONNX graph, one compiled model per
    batch size, each checked against onnxruntime on the same file (a wrong engine is not
    timed)."""
    import onnxruntime as ort
    import openvino as ov

    core = ov.Core()
    config = {
        "INFERENCE_NUM_THREADS": params["threads"],
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }
    reference = ort.InferenceSession(params["graph"], providers=["CPUExecutionProvider"])
    calls = {}
    for bs in params["batch_sizes"]:
        batch = _inputs(params, bs, params["layout"])
        model = core.read_model(params["graph"])
        model.reshape({model.inputs[0].get_any_name(): list(batch.shape)})
        request = core.compile_model(model, "CPU", config).create_infer_request()
        expected = reference.run(None, {reference.get_inputs()[0].name: batch})[0]
        got = request.infer({0: batch})[0]
        if not np.allclose(got, expected, rtol=1e-3, atol=1e-3):
            raise AssertionError(
                f"OpenVINO differs from onnxruntime on {params['graph']} by "
                f"{np.abs(got - expected).max():.3g}; not timing a wrong engine."
            )
        calls[bs] = lambda r=request, b=batch: r.infer({0: b})
    return calls


def _keras_calls(params: dict) -> dict:
    import keras

    from convnext_keras.tasks import bench

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # A fresh worker sets it; in a process where TensorFlow already ran (tests) it stays.
        with contextlib.suppress(RuntimeError):
            tf.config.threading.set_intra_op_parallelism_threads(params["threads"])
    if params.get("applications"):
        model = keras_applications_peer(params["variant"], params["resolution"])
    else:
        model, _ = bench.bench_model(
            params["model"], resolution=params["resolution"], precision=params["precision"]
        )
    calls = {}
    for bs in params["batch_sizes"]:
        x = _inputs(params, bs, "nhwc")
        calls[bs] = lambda x=x: model.predict_on_batch(x)
    return calls


def _torch_calls(params: dict) -> dict:
    import torch

    torch.set_num_threads(params["threads"])
    mode = params["mode"]
    if mode == "timm":
        import timm

        net = timm.create_model(params["arch_name"], pretrained=False).eval()
    else:
        net = hf_peer(params["depths"], params["dims"], params["grn"])
    if mode == "compile":
        net = torch.compile(net)

    def forward(x):
        with torch.inference_mode():
            if mode == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return net(x)
            return net(x)

    calls = {}
    for bs in params["batch_sizes"]:
        x = torch.from_numpy(_inputs(params, bs, "nchw"))
        calls[bs] = lambda x=x: forward(x)
    return calls


def _engine_calls(params: dict) -> dict:
    """This library's default CPU engine exactly as ``predict`` / ``eval`` run it: the runner
    ``runners.inference_function`` picks for a float32 ConvNeXt (OpenVINO, else onnxruntime,
    on this library's graph; threads from ``CONVNEXT_THREADS``, which the harness sets)."""
    from convnext_keras.engines import runners
    from convnext_keras.tasks import bench

    model, _ = bench.bench_model(params["model"], resolution=params["resolution"])
    fn, engine = runners.inference_function(model)
    if engine != params["engine"]:
        raise RuntimeError(f"the default engine is {engine!r} here, {params['engine']!r} there")
    calls = {}
    for bs in params["batch_sizes"]:
        x = _inputs(params, bs, "nhwc")
        calls[bs] = lambda x=x: fn(x)
    return calls


def _matmul_calls(params: dict) -> dict:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
    b = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
    return {bs: (lambda: a @ b) for bs in params["batch_sizes"]}


_KINDS = {
    "engine": _engine_calls,
    "onnxruntime": _ort_calls,
    "openvino": _openvino_calls,
    "keras": _keras_calls,
    "torch": _torch_calls,
    "matmul": _matmul_calls,
}


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the harness dies (even while it is stopped)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker(conn, kind: str, params: dict) -> None:
    """A contender's process: build, warm up, then answer ``("turn", batch, seconds, warm)``."""
    _die_with_parent()
    try:
        if ":" in kind:  # "module:function": another benchmark's contender (segment_side_by_side)
            module, function = kind.split(":")
            calls = getattr(importlib.import_module(module), function)(params)
        else:
            calls = _KINDS[kind](params)
        for fn in calls.values():
            for _ in range(params["warmup"]):
                fn()
    except ImportError as e:
        conn.send(("unavailable", f"{type(e).__name__}: {e}"))
        return
    except Exception as e:  # noqa: BLE001 - reported to the harness
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        message = conn.recv()
        if message[0] == "quit":
            return
        _, batch_size, min_seconds, warm = message
        fn = calls[batch_size]
        for _ in range(warm):
            fn()
        seconds = []
        window = CpuWindow()
        while not seconds or sum(seconds) < min_seconds:
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        conn.send(("done", seconds, window.close()))


# ----------------------------------------------------------------------------------------------
# Preparation (own process): graphs, exports and correctness checks


def hf_class(grn: bool) -> str:
    """The transformers model class of the family: ConvNextV2 for GRN blocks, else ConvNext."""
    return "ConvNextV2" if grn else "ConvNext"


def hf_peer(depths, dims, grn: bool = False):
    """transformers' ConvNext, or ConvNextV2 for GRN blocks (PyTorch), with these depths and
    widths (the registry's, passed in so that the worker need not import this library), random
    weights."""
    import torch
    import transformers

    kind = hf_class(grn)
    config = getattr(transformers, f"{kind}Config")(
        depths=list(depths), hidden_sizes=list(dims), num_labels=1000
    )
    torch.manual_seed(0)
    return getattr(transformers, f"{kind}ForImageClassification")(config).eval()


def onnx_export(torch_model, x_nchw, path: Path):
    import torch

    torch.onnx.export(
        torch_model,
        (x_nchw,),
        str(path),
        input_names=["pixel_values"],
        output_names=["logits"],
        opset_version=17,
        dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )


def keras_applications_peer(variant: str, resolution: int):
    import keras

    if "_" in variant:  # a family-qualified key (convnextv2_tiny): keras.applications has V1 only
        raise ImportError(f"keras.applications has no {variant}")
    fn = getattr(keras.applications, f"ConvNeXt{variant.capitalize()}", None)
    if fn is None:
        raise ImportError(f"keras.applications has no ConvNeXt{variant.capitalize()}")
    return fn(weights=None, input_shape=(resolution, resolution, 3), include_preprocessing=False)


def _prepare(conn, params: dict) -> None:
    """Write the three ONNX graphs (this library's float32 and int8, the PyTorch export) and
    run the correctness checks; send a dict back."""
    try:
        import torch

        from convnext_keras import preprocess
        from convnext_keras.engines import onnx_graph, quantization, runners
        from convnext_keras.tasks import bench

        torch.set_num_threads(params["threads"])
        folder, res = Path(params["folder"]), params["resolution"]
        ours, _ = bench.bench_model(params["model"], resolution=res)
        (folder / "ours.onnx").write_bytes(
            onnx_graph.build_onnx_graph(ours, res, res).SerializeToString()
        )
        photos = quantization.calibration_images(None, (res, preprocess.DEFAULT_CROP_PCT))
        int8 = quantization.quantize_int8(ours, photos)
        (folder / "int8.onnx").write_bytes(int8.SerializeToString())
        for bs in {*params["batch_sizes"], 2}:
            np.save(folder / f"batch{bs}.npy", bench.random_batch(bs, res))
        hf = hf_peer(params["depths"], params["dims"], params["grn"])
        x = bench.random_batch(2, res)
        onnx_export(hf, torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                    folder / "hf.onnx")  # fmt: skip
        fp32_runner, _ = runners.inference_function(ours)
        int8_runner = runners.OnnxRunner(ours, precision="int8", calibration=photos)
        want, got = fp32_runner(photos), int8_runner(photos)
        checks = {
            "default_engine_vs_keras_max_abs_diff": float(
                np.abs(fp32_runner(x) - np.asarray(ours.predict_on_batch(x))).max()
            ),
            "int8_vs_fp32_relative_error_random_weights": float(
                np.linalg.norm(got - want) / np.linalg.norm(want)
            ),
            "int8_quantization": int8_runner.quantization,
            "gflop_per_image": bench.flops_per_image(params["variant"], res) / 1e9,
        }
        if params["bf16"]:
            ours16, _ = bench.bench_model(params["model"], resolution=res, precision="bf16")
            ours16.set_weights(ours.get_weights())
            checks["bf16_accuracy"] = bf16_accuracy(ours, ours16, res)
        sample = quantization.sample_photos()
        pre = bench.preprocessing_rate(sample * 4, params["arch_name"])
        checks["preprocessing_img_per_s"] = pre.images_per_second
        checks["preprocessing"] = pre.name
        conn.send(("ok", checks))
    except Exception as e:  # noqa: BLE001 - reported to the harness
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"))


def bf16_accuracy(model32, model16, resolution: int) -> dict:
    """bf16 vs float32 logits of the same weights on real photos: relative error, top-1."""
    from convnext_keras import preprocess
    from convnext_keras.engines import quantization

    images = quantization.calibration_images(None, (resolution, preprocess.DEFAULT_CROP_PCT))
    ref = np.asarray(model32.predict_on_batch(images), np.float64)
    out = np.asarray(model16.predict_on_batch(images), np.float64)
    return {
        "photos": len(images),
        "relative_error": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
        "top1_same": int((out.argmax(-1) == ref.argmax(-1)).sum()),
    }


def _pair_check(conn, params: dict) -> None:
    """The issue's two-contender method: this library's default engine and onnxruntime on the
    export in one process, alternating single calls after 2 warm-up calls each.  When the
    default engine is another runtime (OpenVINO), the reference's threads do not spin after
    its call: spinning, they took the next call's cores from OpenVINO (0.74x at batch 1 in one
    process, 1.07x with spinning off, 1.05-1.11x in separate processes; BENCHMARKS.md)."""
    _die_with_parent()
    try:
        folder = Path(params["folder"])
        ours = _engine_calls(params)
        ref = _ort_calls({**params, "graph": str(folder / "hf.onnx"), "session": "plain",
                          "layout": "nchw",
                          "no_spinning": params["engine"] != "onnxruntime"})  # fmt: skip
        out = {}
        for bs in params["batch_sizes"]:
            for _ in range(2):
                ours[bs]()
                ref[bs]()
            times = {"ours": [], "ref": []}
            window = CpuWindow()
            for _ in range(params["repeats"]):
                for key, fn in (("ours", ours[bs]), ("ref", ref[bs])):
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)
            out[bs] = {"seconds": times, "cpu": window.close()}
        conn.send(("ok", out))
    except Exception as e:  # noqa: BLE001 - reported to the harness
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"))


def _run_process(target, params: dict, timeout: float = 3600.0):
    """Run ``target(conn, params)`` in a spawned process and return what it sends."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(child, params), daemon=True)
    process.start()
    try:
        if not parent.poll(timeout):
            raise RuntimeError(f"{target.__name__} did not answer within {timeout:.0f} s")
        status, value = parent.recv()
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
    if status != "ok":
        raise RuntimeError(f"{target.__name__} failed: {value}")
    return value


# ----------------------------------------------------------------------------------------------
# The harness


class Contender:
    def __init__(self, key, label, group, kind, params, batch_sizes):
        self.key, self.label, self.group, self.kind = key, label, group, kind
        self.params, self.batch_sizes = params, list(batch_sizes)
        self.process = self.conn = self.pid = None


class Harness:
    """Worker processes started one at a time (each warms up alone), then all stopped; a turn
    continues one worker, times it and stops it again."""

    def __init__(self, contenders: list[Contender], max_other: float, retries: int, wait=True):
        self.contenders = contenders
        self.max_other, self.retries, self.wait = max_other, retries, wait
        self.unavailable: dict[str, str] = {}
        self.turns: list[dict] = []

    def __enter__(self):
        ctx = multiprocessing.get_context("spawn")
        started = []
        for c in self.contenders:
            parent, child = ctx.Pipe()
            c.process = ctx.Process(target=_worker, args=(child, c.kind, c.params), daemon=True)
            c.process.start()
            c.conn = parent
            status, value = parent.recv() if parent.poll(1800) else ("error", "no answer")
            if status == "ready":
                c.pid = value
                os.kill(c.pid, signal.SIGSTOP)
                started.append(c)
                print(f"  ready: {c.label}", flush=True)
                continue
            c.process.join(30)
            if c.key in REQUIRED:
                self.contenders = started
                self.__exit__(None, None, None)
                raise RuntimeError(f"{c.label} could not be set up: {value}")
            self.unavailable[c.label] = value.splitlines()[0]
            print(f"  not measured: {c.label}: {value}", flush=True)
        self.contenders = started
        return self

    def __exit__(self, *exc):
        for c in self.contenders:
            with contextlib.suppress(Exception):
                os.kill(c.pid, signal.SIGCONT)
                c.conn.send(("quit",))
        for c in self.contenders:
            c.process.join(30)
            if c.process.is_alive():
                c.process.kill()

    def turn(self, c: Contender, batch_size: int, min_seconds: float, warm: int) -> dict:
        attempts = 0
        while True:
            attempts += 1
            before = wait_until_quiet(self.max_other) if self.wait else other_load()
            os.kill(c.pid, signal.SIGCONT)
            try:
                c.conn.send(("turn", batch_size, min_seconds, warm))
                status, seconds, cpu = c.conn.recv()
            finally:
                os.kill(c.pid, signal.SIGSTOP)
            noisy = cpu["other_cores"] is not None and cpu["other_cores"] > self.max_other
            if not noisy or not self.wait or attempts > self.retries:
                break
        record = {
            "key": c.key,
            "batch_size": batch_size,
            "seconds": seconds,
            "cpu": cpu,
            "before": before,
            "attempts": attempts,
            "noisy": noisy,
        }
        self.turns.append(record)
        return record


def contenders_for(args, shared: dict, batch_sizes) -> list[Contender]:
    """Every contender the options ask for (``--contenders`` keeps only the keys it lists, and
    always the rate reference, the default engine and the reference)."""
    import keras

    common = {**shared, "warmup": args.warmup}
    folder = Path(shared["folder"])
    backend = keras.backend.backend()
    hf = hf_class(shared["grn"])
    out = [
        Contender("matmul", f"numpy float32 matmul {MATMUL_N}^2 (rate reference)", "rate",
                  "matmul", common, [0]),
        Contender(DEFAULT, f"convnext_keras default ({common['engine']}, this library's graph)",
                  "fp32", "engine", common, batch_sizes),
        Contender("ort_ours", "onnxruntime, this library's graph (the engine without OpenVINO)",
                  "fp32", "onnxruntime", {**common, "graph": str(folder / "ours.onnx"),
                                          "session": "library", "layout": "nhwc"}, batch_sizes),
        Contender("int8", "convnext_keras --precision int8 (onnxruntime, static int8)", "fp32",
                  "onnxruntime", {**common, "graph": str(folder / "int8.onnx"),
                                  "session": "library", "layout": "nhwc"}, batch_sizes),
        Contender("keras", f"convnext_keras Keras predict_on_batch ({backend})", "fp32", "keras",
                  {**common, "precision": "fp32"}, batch_sizes),
        Contender("torch_eager", f"transformers {hf}, PyTorch eager", "fp32", "torch",
                  {**common, "mode": "eager"}, batch_sizes),
        Contender(REFERENCE, "onnxruntime, PyTorch model's ONNX export", "fp32", "onnxruntime",
                  {**common, "graph": str(folder / "hf.onnx"), "session": "plain",
                   "layout": "nchw"}, batch_sizes),
        Contender("timm", "timm, PyTorch eager", "fp32", "torch", {**common, "mode": "timm"},
                  batch_sizes),
    ]  # fmt: skip
    if args.keras_applications:
        out.append(Contender("keras_applications", f"keras.applications ConvNeXt ({backend})",
                             "fp32", "keras", {**common, "applications": True},
                             batch_sizes))  # fmt: skip
    if args.torch_compile:
        out.append(Contender("torch_compile", f"transformers {hf}, torch.compile", "fp32",
                             "torch", {**common, "mode": "compile"}, batch_sizes))  # fmt: skip
    if not args.no_openvino:
        for key, graph, layout, label in (
            ("openvino_export", "hf.onnx", "nchw", "PyTorch model's ONNX export"),
        ):
            out.append(Contender(key, f"OpenVINO, {label}", "fp32", "openvino",
                                 {**common, "graph": str(folder / graph), "layout": layout},
                                 batch_sizes))  # fmt: skip
    if not args.no_bf16:
        bf16_sizes = [args.bf16_batch_size]
        out += [
            Contender("keras_bf16", "convnext_keras --precision bf16 (Keras mixed_bfloat16)",
                      "bf16", "keras", {**common, "precision": "bf16"}, bf16_sizes),
            Contender("torch_bf16", f"transformers {hf}, PyTorch eager bf16 autocast", "bf16",
                      "torch", {**common, "mode": "bf16"}, bf16_sizes),
        ]  # fmt: skip
    if args.contenders:
        wanted = set(args.contenders.split(",")) | set(REQUIRED)
        unknown = wanted - {c.key for c in out}
        if unknown:
            raise SystemExit(
                f"--contenders: unknown {', '.join(sorted(unknown))}; choose from "
                f"{', '.join(c.key for c in out)}"
            )
        out = [c for c in out if c.key in wanted]
    for c in out:
        c.params = {**c.params, "batch_sizes": c.batch_sizes}
    return out


def measure_run(args, contenders: list[Contender], batch_sizes, index: int) -> dict:
    """One run: fresh workers, the matmul rate, every round at every batch size, the rate again."""
    started = time.perf_counter()
    load_before = loadavg()
    print(f"run {index}: starting {len(contenders)} workers one at a time ...", flush=True)
    with Harness(contenders, args.max_other_load, args.retries, wait=not args.no_wait) as h:
        rate = next(c for c in h.contenders if c.key == "matmul")
        flops = 2 * MATMUL_N**3

        def matmul_gflops():
            return flops / statistics.median(h.turn(rate, 0, 1.0, 1)["seconds"]) / 1e9

        matmul_before = matmul_gflops()
        timed = [c for c in h.contenders if c.key != "matmul"]
        rounds: dict[int, list[dict]] = {bs: [] for bs in batch_sizes}
        for bs in batch_sizes:
            members = [c for c in timed if bs in c.batch_sizes]
            for r in range(args.rounds):
                order = members[r % len(members) :] + members[: r % len(members)]
                entry = {}
                for c in order:
                    entry[c.key] = h.turn(c, bs, args.turn_seconds, args.turn_warmup)
                rounds[bs].append(entry)
                print(f"  batch {bs}, round {r + 1}/{args.rounds} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
        bf16_sizes = sorted({bs for c in timed for bs in c.batch_sizes} - set(batch_sizes))
        for bs in bf16_sizes:
            rounds[bs] = []
            members = [c for c in timed if bs in c.batch_sizes]
            for r in range(args.bf16_rounds):
                order = members[r % len(members) :] + members[: r % len(members)]
                rounds[bs].append(
                    {c.key: h.turn(c, bs, args.turn_seconds, args.turn_warmup) for c in order}
                )
        matmul_after = matmul_gflops()
        labels = {c.key: c.label for c in h.contenders}
        groups = {c.key: c.group for c in h.contenders}
        workers = {c.key: c.pid for c in h.contenders}
        unavailable = dict(h.unavailable)
        turns = list(h.turns)
    return summarize_run(args, rounds, labels, groups, workers, unavailable, turns,
                         matmul_before, matmul_after, load_before,
                         time.perf_counter() - started)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Statistics and the report


def quartiles(values) -> tuple[float, float]:
    values = sorted(values)
    if len(values) < 4:
        return values[0], values[-1]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def _measured(values) -> list[float]:
    return [v for v in values if v is not None]


def summarize_run(args, rounds, labels, groups, workers, unavailable, turns, matmul_before,
                  matmul_after, load_before, seconds) -> dict:  # fmt: skip
    matmul = (matmul_before + matmul_after) / 2
    rows = []
    for bs, entries in rounds.items():
        keys = [k for k in labels if all(k in e for e in entries) and entries]
        group_ref = {"fp32": REFERENCE, "bf16": "torch_bf16"}
        for key in keys:
            per_round = [statistics.median(e[key]["seconds"]) for e in entries]
            calls = [s for e in entries for s in e[key]["seconds"]]
            other = _measured(e[key]["cpu"]["other_cores"] for e in entries)
            steal = _measured(e[key]["cpu"]["steal_cores"] for e in entries)
            ref = group_ref.get(groups[key])
            row = {
                "key": key,
                "name": labels[key],
                "group": groups[key],
                "batch_size": bs,
                "rounds": len(entries),
                "img_per_s": bs / statistics.median(per_round),
                "slowest": bs / max(per_round),
                "fastest": bs / min(per_round),
                "iqr_percent": 100
                * (quartiles(per_round)[1] - quartiles(per_round)[0])
                / statistics.median(per_round),
                "other_cores_median": statistics.median(other) if other else None,
                "other_cores_max": max(other) if other else None,
                "steal_cores_median": statistics.median(steal) if steal else None,
                "retried_turns": sum(e[key]["attempts"] > 1 for e in entries),
                "noisy_turns": sum(e[key]["noisy"] for e in entries),
            }
            if groups[key] == "fp32" and key != "int8":  # of the float32 rate: not for int8
                row["share_of_matmul_rate"] = row["img_per_s"] * args.gflop_per_image / matmul
            if bs == 1:
                row["latency_ms_median"] = 1000 * statistics.median(calls)
                row["latency_ms_p90"] = 1000 * float(np.percentile(calls, 90))
            if ref in keys:
                ref_round = [statistics.median(e[ref]["seconds"]) for e in entries]
                paired = [a / b for a, b in zip(ref_round, per_round)]
                row["reference"] = ref
                row["vs_reference"] = statistics.median(ref_round) / statistics.median(per_round)
                row["vs_reference_paired"] = statistics.median(paired)
                row["paired_q1"], row["paired_q3"] = quartiles(paired)
                row["paired_min"], row["paired_max"] = min(paired), max(paired)
            if key == "int8" and DEFAULT in keys:
                fp32_round = [statistics.median(e[DEFAULT]["seconds"]) for e in entries]
                row["speedup_over_fp32_paired"] = statistics.median(
                    [a / b for a, b in zip(fp32_round, per_round)]
                )
            rows.append(row)
    other_all = _measured(t["cpu"]["other_cores"] for t in turns)
    noise = []
    if other_all and statistics.median(other_all) > args.max_other_load:
        noise.append(f"median load of other programs {statistics.median(other_all):.2f} cores")
    noisy = sum(t["noisy"] for t in turns)
    if noisy:
        retakes = "without retakes (--no-wait)" if args.no_wait else f"after {args.retries} retakes"
        noise.append(f"{noisy} of {len(turns)} turns over {args.max_other_load} cores of other "
                     f"load {retakes}")  # fmt: skip
    drift = matmul_after / matmul_before - 1
    if abs(drift) > MATMUL_DRIFT:
        noise.append(f"matmul rate moved {100 * drift:+.0f}% between the start and the end")
    steal = _measured(t["cpu"]["steal_cores"] for t in turns)
    if steal and statistics.median(steal) > args.max_other_load:
        noise.append(f"hypervisor steal {statistics.median(steal):.2f} cores (median)")
    return {
        "seconds": seconds,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "matmul_gflops_before": matmul_before,
        "matmul_gflops_after": matmul_after,
        "other_cores_median": statistics.median(other_all) if other_all else None,
        "other_cores_max": max(other_all) if other_all else None,
        "turns": len(turns),
        "quiet": not noise,
        "noise": noise,
        "rows": rows,
        "unavailable": unavailable,
        "workers": workers,
    }


def summarize_pair(raw: dict) -> dict:
    out = {}
    for bs, value in raw.items():
        ours, ref = value["seconds"]["ours"], value["seconds"]["ref"]
        paired = [b / a for a, b in zip(ours, ref)]
        q1, q3 = quartiles(paired)
        out[int(bs)] = {
            "vs_reference_paired": statistics.median(paired),
            "paired_q1": q1,
            "paired_q3": q3,
            "paired_min": min(paired),
            "paired_max": max(paired),
            "calls": len(paired),
            "img_per_s": {"ours": bs / statistics.median(ours), "ref": bs / statistics.median(ref)},
            "other_cores": value["cpu"]["other_cores"],
        }
    return out


def agreement(runs: list[dict], pair: dict | None, batch_sizes) -> dict:
    """Per batch size: the default engine's paired ratio to the reference by each method, and
    whether their inter-quartile ranges overlap (all of them pairwise)."""
    out = {}
    for bs in batch_sizes:
        methods = {}
        for i, run in enumerate(runs, 1):
            row = next((r for r in run["rows"] if r["key"] == DEFAULT and r["batch_size"] == bs
                        and "vs_reference_paired" in r), None)  # fmt: skip
            if row:
                methods[f"run {i}"] = row
        if pair and bs in pair:
            methods["two contenders, one process"] = pair[bs]
        if not methods:
            continue
        low = max(m["paired_q1"] for m in methods.values())
        high = min(m["paired_q3"] for m in methods.values())
        medians = [m["vs_reference_paired"] for m in methods.values()]
        out[bs] = {
            "methods": {
                k: {f: m[f] for f in ("vs_reference_paired", "paired_q1", "paired_q3")}
                for k, m in methods.items()
            },
            "agree": low <= high,
            "median_spread": max(medians) - min(medians),
            "all_at_least_1": min(medians) >= 1.0,
        }
    return out


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    packages = (
        "keras", "tensorflow", "jax", "torch", "onnxruntime", "openvino", "transformers", "timm",
        "numpy",
    )  # fmt: skip
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _cores(value) -> str:
    return "-" if value is None else f"{value:.2f} cores"


def _ratio(row: dict) -> str:
    if "vs_reference_paired" not in row:
        return "-"
    return f"{row['vs_reference_paired']:.3f}x ({row['paired_q1']:.3f}-{row['paired_q3']:.3f})"


def markdown(report: dict) -> str:
    lines = [
        f"Date: {report['date']}. CPU: {report['machine']}. Model: {report['model']}.",
        f"Command: `{report['command']}`.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
    ]
    checks = report["checks"]
    for i, run in enumerate(report["runs"], 1):
        verdict = "quiet" if run["quiet"] else "NOISY: " + "; ".join(run["noise"])
        lines += [
            f"### Run {i}: {verdict}",
            "",
            f"Load average before {run['loadavg_before']}, after {run['loadavg_after']}; other "
            f"programs during the turns: median {_cores(run['other_cores_median'])}, max "
            f"{_cores(run['other_cores_max'])}; numpy matmul rate "
            f"{run['matmul_gflops_before']:.1f} "
            f"GFLOP/s before, {run['matmul_gflops_after']:.1f} after; {run['turns']} turns in "
            f"{run['seconds']:.0f} s.",
            "",
            "| batch | contender | img/s (median) | range | IQR | vs onnxruntime on export, "
            "paired (IQR) | share of matmul rate | latency b1 median / p90 | other load |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in run["rows"]:
            share = row.get("share_of_matmul_rate")
            latency = (f"{row['latency_ms_median']:.1f} / {row['latency_ms_p90']:.1f} ms"
                       if "latency_ms_median" in row else "")  # fmt: skip
            ratio = _ratio(row)
            if row["key"] == "int8" and "speedup_over_fp32_paired" in row:
                ratio += f"; {row['speedup_over_fp32_paired']:.2f}x the default fp32"
            if row["group"] == "bf16" and "vs_reference_paired" in row:
                ratio = f"{row['vs_reference_paired']:.2f}x PyTorch bf16 autocast"
            lines.append(
                f"| {row['batch_size']} | {row['name']} | {row['img_per_s']:.2f} | "
                f"{row['slowest']:.2f}-{row['fastest']:.2f} | {row['iqr_percent']:.0f}% | "
                f"{ratio} | "
                + (f"{100 * share:.0f}%" if share is not None else "")
                + f" | {latency} | {_cores(row['other_cores_median'])} |"
            )
        for name, why in run["unavailable"].items():
            lines.append(f"\nNot measured: {name} ({why}).")
        lines.append("")
    if report.get("agreement"):
        lines += [
            "### This library's default engine / onnxruntime on the PyTorch export, by method",
            "",
            "| batch | "
            + " | ".join(next(iter(report["agreement"].values()))["methods"])
            + " | IQRs overlap | all >= 1.0x |",
            "|---:|" + "---:|" * (len(next(iter(report["agreement"].values()))["methods"]) + 2),
        ]
        for bs, a in report["agreement"].items():
            cells = [f"{m['vs_reference_paired']:.3f}x ({m['paired_q1']:.3f}-{m['paired_q3']:.3f})"
                     for m in a["methods"].values()]  # fmt: skip
            lines.append(
                f"| {bs} | "
                + " | ".join(cells)
                + f" | {'yes' if a['agree'] else 'NO'} | {'yes' if a['all_at_least_1'] else 'no'} |"
            )
        lines.append("")
    lines.append(
        f"{checks['gflop_per_image']:.2f} GFLOP per image. Default engine vs Keras "
        f"predict_on_batch, same weights: max |diff| "
        f"{checks['default_engine_vs_keras_max_abs_diff']:.2e}. int8 vs float32 logits on the "
        f"sample photos (random weights, speed only): relative error "
        f"{checks['int8_vs_fp32_relative_error_random_weights']:.2e}; settings "
        f"{checks['int8_quantization']}."
    )
    acc = checks.get("bf16_accuracy")
    if acc:
        lines.append(
            f"bf16 vs float32 logits on {acc['photos']} photos: relative error "
            f"{acc['relative_error']:.2e}, same top-1 on {acc['top1_same']}/{acc['photos']}."
        )
    lines.append(
        f"Input pipeline ({checks['preprocessing']}): {checks['preprocessing_img_per_s']:.1f} "
        "img/s (not isolated)."
    )
    return "\n".join(lines) + "\n"


def write_results(folder, report: dict, text: str) -> None:
    """``results.json`` and ``results.md`` in ``folder``, each written whole (temp + rename)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in (("results.json", json.dumps(report, indent=2)), ("results.md", text)):
        part = out / f".{name}.part"
        part.write_text(content)
        part.replace(out / name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--batch-size", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=8, help="turns per contender and batch")
    parser.add_argument("--runs", type=int, default=1, help="whole measurements, fresh workers")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls when a worker starts")
    parser.add_argument("--turn-warmup", type=int, default=1, help="untimed calls per turn")
    parser.add_argument(
        "--turn-seconds",
        type=float,
        default=1.0,
        help="timed calls per turn until this many seconds (at least one)",
    )
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.15,
        help="cores other programs may use during a turn (more: the turn is retaken, and "
        "the run is NOISY if it stays so)",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="neither wait for a quiet machine nor retake noisy turns (still measured)",
    )
    parser.add_argument("--retries", type=int, default=2, help="retakes of a noisy turn")
    parser.add_argument("--threads", type=int, default=None, help="default: all usable cores")
    parser.add_argument(
        "--pair-check",
        action="store_true",
        help="also the two-contender method, and whether the methods agree",
    )
    parser.add_argument("--pair-repeats", type=int, default=12)
    parser.add_argument("--contenders", default=None,
                        help="comma-separated keys to time (default: all; the default engine "
                        "and the reference are always timed)")  # fmt: skip
    parser.add_argument("--torch-compile", action="store_true", help="add torch.compile (slow)")
    parser.add_argument(
        "--keras-applications", action="store_true", help="add keras.applications ConvNeXt (slow)"
    )
    parser.add_argument("--no-openvino", action="store_true", help="skip OpenVINO")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 pair")
    parser.add_argument("--bf16-batch-size", type=int, default=8)
    parser.add_argument("--bf16-rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for results.json and results.md")
    args = parser.parse_args()  # fmt: skip
    try:
        batch_sizes = [int(b) for b in args.batch_size.split(",")]
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--batch-size takes positive integers separated by commas, got "
                     f"{args.batch_size!r}")  # fmt: skip
    if args.rounds < 1 or args.runs < 1 or args.pair_repeats < 1:
        parser.error("--rounds, --runs and --pair-repeats must be at least 1")
    if not Path("/proc/stat").exists():
        parser.error("the quiet check reads /proc/stat: run this on Linux")

    threads = args.threads or len(os.sched_getaffinity(0))
    # Inherited by every worker before it imports numpy / torch / TensorFlow.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "CONVNEXT_THREADS"):
        os.environ[var] = str(threads)
    from convnext_keras import registry
    from convnext_keras.engines import runners
    from convnext_keras.tasks import bench

    spec = registry.resolve(args.model).variant
    variant = spec.name
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="side_by_side_") as tmp:
        folder = Path(tmp)
        common = {"resolution": args.resolution, "threads": threads, "folder": str(folder),
                  "model": args.model, "variant": variant, "arch_name": spec.arch_name,
                  "grn": spec.block == "grn", "depths": list(spec.depths),
                  "dims": list(spec.dims), "bf16": not args.no_bf16,
                  "engine": runners.cpu_graph_engine(),
                  "batch_sizes": sorted({*batch_sizes, args.bf16_batch_size})}  # fmt: skip
        print("preparing graphs and checks ...", flush=True)
        checks = _run_process(_prepare, common)
        print(f"  done ({time.perf_counter() - t0:.0f} s)", flush=True)
        args.gflop_per_image = checks["gflop_per_image"]
        runs = []
        for index in range(1, args.runs + 1):
            contenders = contenders_for(args, common, batch_sizes)
            runs.append(measure_run(args, contenders, batch_sizes, index))
        pair = None
        if args.pair_check:
            print("two-contender check ...", flush=True)
            raw = _run_process(_pair_check, {**common, "batch_sizes": batch_sizes,
                                             "repeats": args.pair_repeats})  # fmt: skip
            pair = summarize_pair(raw)
            print(f"  done ({time.perf_counter() - t0:.0f} s)", flush=True)
    report = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": bench.cpu_description(),
        "command": "python " + " ".join(sys.argv),
        "versions": versions(),
        "model": f"{variant} @ {args.resolution}, {threads} threads",
        "batch_sizes": batch_sizes,
        "checks": checks,
        "runs": runs,
        "pair_check": pair,
        "agreement": agreement(runs, pair, batch_sizes),
    }
    text = markdown(report)
    print(text)
    if args.out:
        write_results(args.out, report, text)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f}s)")
