"""Throughput measurement: images per second of inference or a training step, and peak memory.

    result = ck.bench.benchmark("convnext_tiny", batch_size=8, precision="fp32")
    print(result.summary())   # median img/s, spread over the timed repeats, peak memory

How it measures:

* warm-up calls first (graph tracing, XLA/JIT compilation and autotuning stay out of the
  numbers), then ``repeats`` timed calls of one batch each; every call waits until the result
  exists (numpy output, ``block_until_ready``, or a device synchronisation);
* the result is the **median** images/s with the spread (slowest and fastest call, and the
  inter-quartile range in percent) - a busy machine shows up as a wide spread, and an IQR over
  :data:`NOISY_IQR_PERCENT` is said to be noisy (:attr:`Timing.noise`);
* :func:`interleave` times several contenders round-robin in one process, so that load from
  other programs hits all of them alike; compare ratios from one such run, never numbers from
  different runs;
* peak memory: the device allocator's peak on a GPU (JAX, PyTorch, TensorFlow), the
  process's peak resident memory on a CPU (Linux ``VmHWM``, reset before each measurement).

The inference path is the one :mod:`convnext_keras.engines.onnx_graph` picks by default
(OpenVINO, else onnxruntime, on a CPU for float32 models, else Keras); on a JAX accelerator,
a jitted ``stateless_call`` on device-resident inputs (no host transfer inside the timed region, as
the PyTorch peers are timed).  A training step is AdamW on sparse cross-entropy, in one
compiled step (JAX: ``stateless_call`` + ``stateless_apply`` in ``jax.jit``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from convnext_keras import registry

MODES = ("infer", "train")
#: An inter-quartile range of the call times above this percent of their median makes a
#: measurement noisy (:attr:`Timing.noise`): another program was busy, or too few repeats.
NOISY_IQR_PERCENT = 10.0


# ----------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class Timing:
    """Seconds per call of one contender, and what a call processes."""

    name: str
    batch_size: int
    seconds: list[float]
    peak_memory_bytes: int | None = None
    memory_kind: str = ""
    details: dict = dataclasses.field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        """Median throughput over the timed calls."""
        return self.batch_size / statistics.median(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        """(slowest, fastest) call as images/s."""
        return self.batch_size / max(self.seconds), self.batch_size / min(self.seconds)

    @property
    def iqr_percent(self) -> float:
        """Inter-quartile range of the call times, in percent of the median."""
        if len(self.seconds) < 4:
            return 100.0 * (max(self.seconds) - min(self.seconds)) / statistics.median(self.seconds)
        q1, _, q3 = statistics.quantiles(self.seconds, n=4)
        return 100.0 * (q3 - q1) / statistics.median(self.seconds)

    @property
    def noise(self) -> str | None:
        """Why the median is not a figure to compare (None when the calls agree): an IQR over
        :data:`NOISY_IQR_PERCENT` of the median, as the benchmark harness labels a run NOISY."""
        if self.iqr_percent <= NOISY_IQR_PERCENT:
            return None
        return (
            f"noisy: the timed calls spread over an IQR of {self.iqr_percent:.0f}% of their "
            f"median (over {NOISY_IQR_PERCENT:.0f}%: another program was busy, or too few "
            "repeats); measure again on a quiet machine, with more repeats, before comparing"
        )

    def summary(self) -> str:
        low, high = self.spread
        text = (
            f"{self.name}: {self.images_per_second:,.1f} img/s median of {len(self.seconds)} "
            f"(range {low:,.1f}-{high:,.1f}, IQR {self.iqr_percent:.0f}%)"
        )
        if self.peak_memory_bytes is not None:
            text += f", peak {self.memory_kind} memory {format_bytes(self.peak_memory_bytes)}"
        if self.noise:
            text += f" [{self.noise}]"
        return text

    def as_dict(self) -> dict:
        low, high = self.spread
        return {
            "name": self.name,
            "batch_size": self.batch_size,
            "images_per_second": self.images_per_second,
            "slowest": low,
            "fastest": high,
            "iqr_percent": self.iqr_percent,
            "noisy": self.noise is not None,
            "repeats": len(self.seconds),
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_kind": self.memory_kind,
            **self.details,
        }


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def _check_counts(warmup: int, repeats: int) -> None:
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}.")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}.")


def measure(
    fn: Callable[[], object],
    batch_size: int,
    *,
    name: str = "",
    warmup: int = 2,
    repeats: int = 10,
    memory: MemoryProbe | None = None,
) -> Timing:
    """Time ``fn()`` (which must return only when its batch is computed)."""
    return interleave({name: fn}, batch_size, warmup=warmup, repeats=repeats, memory=memory)[name]


def interleave(
    contenders: dict[str, Callable[[], object]],
    batch_size: int,
    *,
    warmup: int = 2,
    repeats: int = 10,
    memory: MemoryProbe | None = None,
) -> dict[str, Timing]:
    """Time several contenders round-robin: warm-up each, then ``repeats`` rounds of one call each.

    Interleaving spreads the machine's background load evenly over the contenders, which is
    what makes their ratios meaningful on a busy machine.
    """
    _check_counts(warmup, repeats)
    if not contenders:
        raise ValueError("interleave needs at least one contender.")
    peaks: dict[str, int | None] = {}
    for name, fn in contenders.items():
        if memory:
            memory.reset()
        for _ in range(warmup):
            fn()
        if memory:
            fn()
            peaks[name] = memory.peak()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {
        name: Timing(
            name,
            batch_size,
            seconds[name],
            peaks.get(name),
            memory.kind if memory else "",
        )
        for name in contenders
    }


# ----------------------------------------------------------------------------------------------
# Memory


class MemoryProbe:
    """Peak memory of what runs between :meth:`reset` and :meth:`peak`.

    ``kind="device"`` reads the accelerator allocator of the active Keras backend; ``"host"``
    the process's peak resident set (Linux; None elsewhere).  :func:`memory_probe` picks.
    """

    def __init__(self, kind: str, backend: str | None = None):
        if kind not in ("host", "device"):
            raise ValueError(f"kind must be 'host' or 'device', got {kind!r}.")
        self.kind, self.backend = kind, backend

    def reset(self) -> None:
        if self.kind == "host":
            with contextlib.suppress(OSError):
                # "5" resets the peak resident set size (VmHWM) to the current one.
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
        elif self.backend == "torch":
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self.backend == "tensorflow":
            import tensorflow as tf

            tf.config.experimental.reset_memory_stats("GPU:0")
        # JAX keeps no resettable peak: its "peak_bytes_in_use" is the process' peak so far.

    def peak(self) -> int | None:
        if self.kind == "host":
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) * 1024
            except OSError:
                return None
            return None
        if self.backend == "jax":
            import jax

            stats = jax.devices()[0].memory_stats() or {}
            return stats.get("peak_bytes_in_use")
        if self.backend == "torch":
            import torch

            return int(torch.cuda.max_memory_allocated())
        if self.backend == "tensorflow":
            import tensorflow as tf

            return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])
        return None


def accelerator() -> str | None:
    """See :func:`convnext_keras.engines.runners.accelerator`."""
    from convnext_keras.engines.runners import accelerator as _accelerator

    return _accelerator()


def memory_probe() -> MemoryProbe:
    """A device probe on an accelerator, else a host probe."""
    import keras

    return MemoryProbe("device" if accelerator() else "host", keras.backend.backend())


# ----------------------------------------------------------------------------------------------
# Models and the functions timed


def bench_model(
    name: str,
    *,
    resolution: int | None = None,
    precision: str = "fp32",
    mode: str = "infer",
    drop_path_rate: float | None = None,
):
    """A randomly initialised model for timing (weights do not change the speed)."""
    from convnext_keras.api import load_model

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    resolved = registry.resolve(name)
    res = resolution or resolved.resolution
    if drop_path_rate is None:
        drop_path_rate = 0.1 if mode == "train" else 0.0
    model = load_model(
        name,
        weights=None,
        input_shape=(res, res, 3),
        drop_path_rate=drop_path_rate,
        precision=precision,
    )
    return model, res


def random_batch(batch_size: int, resolution: int, seed: int = 0) -> np.ndarray:
    """Normalised-looking NHWC float32 images (never zeros: they can run faster than data)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch_size, resolution, resolution, 3), dtype=np.float32)


def _jax_sync(out):
    import jax

    return jax.block_until_ready(out)


def inference_fn(
    model, images: np.ndarray, engine: str = "auto", *, precision: str | None = None
) -> tuple[Callable, str]:
    """A no-argument callable running one inference batch to completion, and its engine name.

    ``engine="auto"``: on an accelerator, Keras (below); on a CPU,
    :func:`convnext_keras.engines.runners.inference_function` (onnxruntime for float32 models
    when installed, else ``predict_on_batch``).  ``"keras"`` on the JAX backend is a jitted
    ``stateless_call`` on a device-resident batch (what ``predict_on_batch`` runs, without
    the host transfers); on TensorFlow / PyTorch it is ``predict_on_batch``.
    ``precision="int8"``: onnxruntime with the model quantized to int8, calibrated on the
    sample photos (:func:`convnext_keras.engines.quantization.quantize_int8`), on the CPU
    everywhere.
    """
    import keras

    from convnext_keras import preprocess
    from convnext_keras.engines import quantization, runners

    runners.check_engine(engine, precision)
    if precision == quantization.INT8:
        # Calibrated on the sample photos at the size timed (the ranges do not change the speed).
        side = min(images.shape[1:3])
        photos = quantization.calibration_images(None, (side, preprocess.DEFAULT_CROP_PCT))
        fn, name = runners.inference_function(
            model, engine, precision=precision, calibration=photos
        )
        fn.session(*images.shape[1:3])  # quantize before the timing starts
        return (lambda: fn(images)), name
    if engine == "auto" and accelerator():
        engine = "keras"
    if engine == "keras" and keras.backend.backend() == "jax":
        forward = jax_forward(model)
        import jax

        x = jax.device_put(images)
        return (lambda: _jax_sync(forward(x))), "keras-jax-jit"
    fn, name = runners.inference_function(model, engine)
    return (lambda: fn(images)), name


def jax_forward(model) -> Callable:
    """``f(x) -> outputs``: the model's inference as one jitted JAX function (JAX backend)."""
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def forward(trainable, non_trainable, x):
        return model.stateless_call(trainable, non_trainable, x, training=False)[0]

    return lambda x: forward(trainable, non_trainable, x)


def train_step_fn(model, images: np.ndarray, labels: np.ndarray, learning_rate: float = 1e-4):
    """A no-argument callable doing one AdamW training step (forward, backward, update).

    On JAX the step is one jitted function whose state (parameters, AdamW moments) is donated,
    as in Keras' own ``fit``: the update reuses the buffers, so peak memory holds one copy of
    the state. The model's variables are therefore stale from the first call on; call
    ``step.sync()`` to write the trained values back before using the model again (a no-op on
    TensorFlow/PyTorch, where ``train_on_batch`` updates them in place).
    """
    import keras

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.AdamW(learning_rate)
    if keras.backend.backend() == "jax":
        import jax

        optimizer.build(model.trainable_variables)
        state = {
            "trainable": [v.value for v in model.trainable_variables],
            "non_trainable": [v.value for v in model.non_trainable_variables],
            "optimizer": [v.value for v in optimizer.variables],
        }

        def loss_of(trainable, non_trainable, x, y):
            logits, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
            return loss_fn(y, logits), non_trainable

        # The state is donated, as Keras' own JAX trainer (model.fit) does: the new parameters
        # and AdamW moments reuse the old buffers instead of doubling them at the peak.
        @functools.partial(jax.jit, donate_argnums=0)
        def step(state, x, y):
            grad_fn = jax.value_and_grad(loss_of, has_aux=True)
            (loss, non_trainable), grads = grad_fn(state["trainable"], state["non_trainable"], x, y)
            trainable, opt_vars = optimizer.stateless_apply(
                state["optimizer"], grads, state["trainable"]
            )
            return loss, {
                "trainable": trainable,
                "non_trainable": non_trainable,
                "optimizer": opt_vars,
            }

        x, y = jax.device_put(images), jax.device_put(labels)

        def run():
            nonlocal state
            loss, state = step(state, x, y)
            return _jax_sync(loss)

        def sync():
            # From the first step on, the model's variables hold donated (deleted) buffers.
            for v, a in zip(model.trainable_variables, state["trainable"]):
                v.assign(a)
            for v, a in zip(model.non_trainable_variables, state["non_trainable"]):
                v.assign(a)

        run.sync = sync
        return run
    # TensorFlow / PyTorch: Keras' compiled train step; XLA only on an accelerator (XLA on a
    # CPU measured 5x slower for this network).
    model.compile(optimizer=optimizer, loss=loss_fn, jit_compile=bool(accelerator()))
    if keras.backend.backend() == "torch":

        def run():
            return float(model.train_on_batch(images, labels))

    else:
        import tensorflow as tf

        x, y = tf.constant(images), tf.constant(labels)

        def run():
            return float(model.train_on_batch(x, y))

    run.sync = lambda: None  # train_on_batch updates the model's variables in place
    return run


@dataclasses.dataclass
class BenchResult:
    """One ``convnext bench`` measurement and how it was made."""

    model: str
    backend: str
    device: str
    mode: str
    precision: str
    resolution: int
    engine: str
    timing: Timing

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "backend": self.backend,
            "device": self.device,
            "mode": self.mode,
            "precision": self.precision,
            "resolution": self.resolution,
            "engine": self.engine,
            **self.timing.as_dict(),
        }


#: CPU flags that decide which kernels the engines run (named in :func:`device_description`).
CPU_FLAGS_OF_NOTE = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
)  # fmt: skip


def cpu_description() -> str:
    """The CPU as ``lscpu`` names it: model name, family and model, the flags of
    :data:`CPU_FLAGS_OF_NOTE` it has, and the cores this process may use (Linux
    ``/proc/cpuinfo``; the model name and cores alone elsewhere)."""
    fields = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "flags") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break  # the first processor's block is enough
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    name = fields.get("model name", "CPU")
    details = []
    if "cpu family" in fields:
        details.append(f"family {fields['cpu family']} model {fields.get('model', '?')}")
    flags = set(fields.get("flags", "").split())
    if flags:
        details.append(" ".join(f for f in CPU_FLAGS_OF_NOTE if f in flags) or "no AVX2")
    details.append(f"{cores} cores")
    return f"{name} ({', '.join(details)})"


def device_description() -> str:
    """What the backend computes on, in words (GPU name, or :func:`cpu_description`)."""
    import keras

    if accelerator() and keras.backend.backend() == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    if accelerator() and keras.backend.backend() == "torch":
        import torch

        return torch.cuda.get_device_name()
    if accelerator():
        return "GPU"
    return cpu_description()


def benchmark(
    model: str = "convnext_tiny",
    *,
    batch_size: int = 8,
    resolution: int | None = None,
    precision: str = "fp32",
    mode: str = "infer",
    engine: str = "auto",
    warmup: int = 2,
    repeats: int = 10,
    seed: int = 0,
) -> BenchResult:
    """Time inference or a training step of a model (random weights) on the active backend.

    Args:
        model: a model name (``convnext_tiny_1k_224``) or architecture (``convnext_tiny``).
        batch_size, resolution: batch shape (resolution default: the checkpoint's).
        precision: ``"fp32"``, ``"bf16"`` (``mixed_bfloat16``), ``"fp16"`` (``mixed_float16``)
            or ``"int8"`` (inference only: onnxruntime with the model quantized to int8).
        mode: ``"infer"`` or ``"train"`` (AdamW step, stochastic depth 0.1).
        engine: inference engine (``"auto"``, ``"onnxruntime"``, ``"keras"``), see
            :func:`convnext_keras.engines.runners.inference_function`.
        warmup, repeats: untimed and timed calls.
    """
    import keras

    from convnext_keras.engines.runners import split_precision

    _check_counts(warmup, repeats)
    keras_precision, engine_precision = split_precision(precision)
    if engine_precision and mode != "infer":
        raise ValueError(
            f"precision {precision!r} is an inference path (onnxruntime); train in fp32, bf16 "
            "or fp16."
        )
    built, res = bench_model(model, resolution=resolution, precision=keras_precision, mode=mode)
    images = random_batch(batch_size, res, seed)
    if mode == "infer":
        fn, engine_name = inference_fn(built, images, engine, precision=engine_precision)
    else:
        if engine not in ("auto", "keras"):
            raise ValueError(f"engine {engine!r} runs inference only; train uses Keras.")
        labels = np.random.default_rng(seed).integers(0, built.outputs[0].shape[-1], batch_size)
        fn, engine_name = train_step_fn(built, images, labels), "keras"
    label = f"{registry.canonical_name(model)} {mode} {precision} bs{batch_size} @{res}"
    timing = measure(
        fn, batch_size, name=label, warmup=warmup, repeats=repeats, memory=memory_probe()
    )
    return BenchResult(
        model=registry.canonical_name(model),
        backend=keras.backend.backend(),
        device=device_description(),
        mode=mode,
        precision=precision,
        resolution=res,
        engine=engine_name,
        timing=timing,
    )


# ----------------------------------------------------------------------------------------------
# Reference rates


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """The machine's float32 matrix-product rate in GFLOP/s (numpy's BLAS, ``n x n``, median)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(seconds) / 1e9


def flops_per_image(variant: str | registry.Variant, resolution: int) -> float:
    """Forward FLOPs (2 per multiply-add) of one image: convolutions, matmuls and the head."""
    spec = registry.variant(variant)
    side = resolution // spec.patch_size
    macs = side * side * spec.patch_size**2 * 3 * spec.dims[0]
    k2 = registry.DWCONV_KERNEL**2
    for stage, (depth, dim) in enumerate(zip(spec.depths, spec.dims)):
        if stage > 0:
            side //= registry.DOWNSAMPLE_STRIDE
            prev = spec.dims[stage - 1]
            macs += side * side * registry.DOWNSAMPLE_STRIDE**2 * prev * dim
        per_pixel = k2 * dim + 2 * registry.MLP_RATIO * dim * dim
        macs += depth * side * side * per_pixel
    macs += spec.num_features * registry.NUM_CLASSES_1K
    return 2.0 * macs


def preprocessing_rate(paths, name: str = "convnext_tiny_1k_224", batch_size: int = 8) -> Timing:
    """Images/s of the evaluation input pipeline (decode + resize + crop + normalise).

    Runs :class:`convnext_keras.preprocess.ImageBatches` over ``paths`` once, end to end.
    """
    from convnext_keras import preprocess

    paths = list(paths)
    if not paths:
        raise ValueError("preprocessing_rate needs at least one image file.")
    batches = preprocess.ImageBatches(paths, preprocess.config_for(name), batch_size)
    start = time.perf_counter()
    count = sum(len(b.indices) for b in batches)
    elapsed = time.perf_counter() - start
    return Timing(
        f"preprocess {name} ({batches.workers} threads)",
        count,
        [elapsed],
        details={"images": count},
    )
