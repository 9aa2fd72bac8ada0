"""``run()``: fine-tune a ConvNeXt on an image folder with the original's recipe.

The loop is Keras' own ``model.fit``, called once per epoch on a :class:`TrainBatches` that
can start mid-epoch, with one callback that shows progress, stops on a non-finite loss and
writes the training state every few steps.  Data parallelism uses the engines the backends
provide: ``tf.distribute.MirroredStrategy`` (``MultiWorkerMirroredStrategy`` when ``TF_CONFIG``
is set) on TensorFlow and ``keras.distribution.DataParallel`` on JAX.

Files in the run directory::

    run.json                 the resolved recipe, classes, data summary, versions
    labels.txt               class names, one per line, in label order
    checkpoint.safetensors   the full training state (resume from here); atomic
    best.weights.safetensors best validation weights so far (EMA when on); atomic
    metrics.csv/.json        one row per epoch; curves.png (loss and accuracy)
    best.keras, last.keras   float32 classifiers, written when training ends
    savedmodel/              SavedModel of best.keras (convnext_keras.export.exporter, verified)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import importlib.util
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from convnext_keras import preprocess, registry
from convnext_keras.api import OFFICIAL, load_model
from convnext_keras.finetune import data as data_lib
from convnext_keras.finetune import hosts, optim
from convnext_keras.finetune import state as state_lib
from convnext_keras.interface import fix
from convnext_keras.nets.convnext import PRECISIONS, build_model, dtype_policy, layer_names
from convnext_keras.weights import cache as hub
from convnext_keras.weights import convert as checkpoints

#: The drop-path rate for variants the original published no fine-tuning rate for (its
#: smallest rate, ConvNeXt-T's on ImageNet-1k).
DEFAULT_DROP_PATH = 0.1

STATE_FILE = "checkpoint.safetensors"
BEST_WEIGHTS = "best.weights.safetensors"
RUN_FILE = "run.json"
#: Files that exist only once a run has trained (beside STATE_FILE).
_TRAINED_FILES = (BEST_WEIGHTS, "metrics.csv", "best.keras", "last.keras")
#: The files a run trains and validates on (``ImageFolder.file_list``), gzipped: what a
#: ``--resume`` compares the data directory with.
DATA_FILES = "data_files.txt.gz"
#: run() settings outside the recipe, and their defaults: kept in run.json, so a resumed run
#: keeps them unless given again (``--no-export`` stays off).
RUN_SETTINGS = {
    "export": True,
    "checkpoint_every": 200,
    "checkpoint_minutes": 10.0,
    "distribution": "auto",
    "jit_compile": "auto",
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the kept checkpoint."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every setting that shapes the training result (a resumed run must keep them all).

    Defaults are the original's ImageNet-22k -> 1k fine-tuning recipe (facebookresearch/ConvNeXt
    TRAINING.md, main.py); ``None`` means "derived from the model" (see :func:`resolve_recipe`).
    ConvNeXt V2 models take ConvNeXt-V2's per-size settings instead (``registry.FINETUNE``):
    layer-decay type and rate, drop path, weight decay, and ``lr = base lr x batch / 256``.
    """

    model: str = "convnext_tiny_1k_224"
    #: "official", None (random init) or a checkpoint file; None by default for architecture
    #: names such as ``convnext_atto``.
    weights: str | None = OFFICIAL
    epochs: int = 30
    #: Global batch per step (split over devices); times ``accumulation`` per update.
    batch_size: int = 32
    accumulation: int = 1
    lr: float = 5e-5
    min_lr: float = 1e-6
    warmup_epochs: float = 0.0
    layer_decay: float = 0.8
    #: "group" (ConvNeXt's 12 groups of blocks) or "single" (one group per block, ConvNeXt V2's
    #: for atto..tiny); see finetune.optim.
    layer_decay_type: str = "group"
    weight_decay: float = 1e-8
    drop_path: float | None = None
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    #: EMA decay of the weights (the original uses 0.9999 where it uses EMA), None = off.
    ema: float | None = None
    head_init_scale: float = 0.001
    resolution: int | None = None
    crop_pct: float | None = None
    interpolation: str = "bicubic"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    #: RandAugment ops per image (0 = off); magnitude ``randaugment_magnitude`` in [0, 1].
    randaugment: int = 0
    randaugment_magnitude: float = 0.9
    precision: str = "fp32"
    remat: bool = False
    clip_grad: float | None = None
    val_fraction: float = 0.1
    seed: int = 0

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Recipe:
        d = dict(d)
        d["crop_scale"] = tuple(d["crop_scale"])
        return cls(**d)


RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))
#: Options for which None is a setting (random init, no EMA, no clipping), not "default".
_NONE_IS_A_VALUE = ("weights", "ema", "clip_grad")


def resolve_recipe(**options) -> Recipe:
    """A complete, checked :class:`Recipe` from user options (None = default)."""
    unknown = sorted(set(options) - set(RECIPE_FIELDS))
    if unknown:
        raise ValueError(
            f"Unknown fine-tuning option(s) {unknown}; valid ones: {', '.join(RECIPE_FIELDS)}."
        )
    given = {k: v for k, v in options.items() if v is not None or k in _NONE_IS_A_VALUE}
    resolved = registry.resolve(given.get("model", Recipe.model))
    given["model"] = resolved.name
    if resolved.head == "pooled":
        raise ValueError(
            f"{given['model']!r} is a feature extractor name; fine-tune the classifier name "
            f"without '{registry.FEATURE_EXTRACTOR_SUFFIX}' (its head is replaced anyway)."
        )
    if "weights" not in given:
        given["weights"] = OFFICIAL if resolved.checkpoint else None
    config = preprocess.config_for(given.get("model", Recipe.model))
    published = registry.FINETUNE.get(resolved.variant.name)
    given.setdefault("drop_path", published.drop_path if published else DEFAULT_DROP_PATH)
    if published:
        given.setdefault("layer_decay_type", published.layer_decay_type)
        for field in ("layer_decay", "weight_decay"):
            if getattr(published, field) is not None:
                given.setdefault(field, getattr(published, field))
        if published.base_lr is not None:  # the original's lr = blr * effective batch / 256
            batch = given.get("batch_size", Recipe.batch_size)
            batch *= given.get("accumulation", Recipe.accumulation)
            given.setdefault("lr", published.base_lr * batch / 256)
    given.setdefault("resolution", config.resolution)
    given.setdefault("crop_pct", config.crop_pct)
    if "crop_scale" in given:
        given["crop_scale"] = tuple(float(s) for s in given["crop_scale"])
    if given.get("weights") not in (None, OFFICIAL):
        given["weights"] = _weights_option(given["weights"])
    recipe = Recipe(**given)
    _check(recipe)
    return recipe


def _check(r: Recipe) -> None:
    def need(ok, message):
        if not ok:
            raise ValueError(message)

    need(r.epochs >= 1, f"epochs must be >= 1, got {r.epochs}.")
    need(r.batch_size >= 1, f"batch_size must be >= 1, got {r.batch_size}.")
    need(r.accumulation >= 1, f"accumulation must be >= 1, got {r.accumulation}.")
    need(r.lr > 0, f"lr must be positive, got {r.lr}.")
    need(0 <= r.min_lr <= r.lr, f"min_lr must be in [0, lr={r.lr}], got {r.min_lr}.")
    need(r.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {r.warmup_epochs}.")
    need(r.warmup_epochs < r.epochs, "warmup_epochs must be shorter than the training.")
    need(0 < r.layer_decay <= 1, f"layer_decay must be in (0, 1], got {r.layer_decay}.")
    need(
        r.layer_decay_type in optim.LAYER_DECAY_TYPES,
        f"layer_decay_type must be one of {', '.join(optim.LAYER_DECAY_TYPES)}, got "
        f"{r.layer_decay_type!r}.",
    )
    need(r.weight_decay >= 0, f"weight_decay must be >= 0, got {r.weight_decay}.")
    need(0 <= r.drop_path < 1, f"drop_path must be in [0, 1), got {r.drop_path}.")
    need(0 <= r.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {r.label_smoothing}.")
    need(r.mixup >= 0 and r.cutmix >= 0, "mixup and cutmix alphas must be >= 0 (0 = off).")
    need(r.ema is None or 0 < r.ema < 1, f"ema decay must be in (0, 1), got {r.ema}.")
    need(r.head_init_scale > 0, f"head_init_scale must be positive, got {r.head_init_scale}.")
    minimum = registry.resolve(r.model).variant.min_input_size
    need(
        r.resolution >= minimum,
        f"resolution must be at least {minimum} pixels, got {r.resolution}.",
    )
    need(0 < r.crop_pct <= 1, f"crop_pct must be in (0, 1], got {r.crop_pct}.")
    need(
        r.interpolation in preprocess.INTERPOLATIONS,
        f"interpolation must be one of {', '.join(preprocess.INTERPOLATIONS)}.",
    )
    lo, hi = r.crop_scale
    need(0 < lo <= hi <= 1, f"crop_scale must be 0 < min <= max <= 1, got {r.crop_scale}.")
    need(0 <= r.hflip <= 1, f"hflip is a probability in [0, 1], got {r.hflip}.")
    need(r.randaugment >= 0, f"randaugment (ops per image) must be >= 0, got {r.randaugment}.")
    need(0 <= r.randaugment_magnitude <= 1, "randaugment_magnitude must be in [0, 1].")
    need(
        r.precision in PRECISIONS,
        f"precision must be one of {', '.join(PRECISIONS)}, got {r.precision!r}.",
    )
    need(r.clip_grad is None or r.clip_grad > 0, f"clip_grad must be > 0, got {r.clip_grad}.")
    need(0 <= r.val_fraction < 1, f"val_fraction must be in [0, 1), got {r.val_fraction}.")
    if r.weights not in (None, OFFICIAL) and not str(r.weights).startswith(hub.HF_SCHEME):
        if not Path(r.weights).is_file():
            raise FileNotFoundError(f"Weights file {r.weights} does not exist.")


def _weights_option(value) -> str:
    """A ``weights`` value other than None / official: a Hub address as it is, a path expanded."""
    if str(value).startswith(hub.HF_SCHEME):
        return str(value)
    return str(Path(value).expanduser())


@dataclasses.dataclass
class RunResult:
    """What :func:`run` produced."""

    out: Path
    classes: list[str]
    history: list[dict]
    best_epoch: int | None
    best_val_acc1: float | None
    files: dict[str, Path]
    #: Path of the SavedModel export, or None (``export_note`` says why).
    export: Path | None
    export_note: str
    data: dict
    skipped: list[tuple[str, str]]


# ---------------------------------------------------------------------------------------------
# Devices


@dataclasses.dataclass
class _Devices:
    scope: contextlib.AbstractContextManager
    replicas: int
    description: str
    chief: bool = True
    #: Processes (hosts) of the run, and this one's index: it trains on rows
    #: ``data.shard_rows(batch, (index, processes))`` of every global batch.
    processes: int = 1
    index: int = 0
    #: ``gather(local) -> (processes, *local.shape)``, a collective (multi-host runs).
    gather: Callable | None = None
    #: ``fit`` keywords for a TrainBatches (``x=`` it, or the engine's per-worker dataset).
    fit_input: Callable = lambda batches: {"x": batches}
    #: Adjusts the compiled model for the engine (TF multi-worker: Keras 3 workarounds).
    prepare: Callable = lambda model: None


def _tf_devices(mode: str) -> _Devices:
    import tensorflow as tf

    config = hosts.tf_config()
    if mode == "off" and config is not None and config[1] > 1:
        raise ValueError(
            f"distribution 'off' (one device) cannot train the {config[1]} workers TF_CONFIG "
            "names; use --distribution auto, or unset TF_CONFIG for a single process."
        )
    if mode != "off" and config is not None:
        index, workers = config
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return _Devices(
            strategy.scope(),
            strategy.num_replicas_in_sync,
            f"MultiWorkerMirroredStrategy over {workers} workers "
            f"({strategy.num_replicas_in_sync} replicas; this is worker {index})",
            chief=index == 0,
            processes=workers,
            index=index,
            gather=lambda local: hosts.tf_gather(strategy, local),
            fit_input=lambda batches: {
                "x": hosts.tf_worker_dataset(strategy, batches, index, workers),
                "steps_per_epoch": len(batches),
            },
            prepare=hosts.tf_multi_worker_model,
        )
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if mode == "off" or len(devices) < 2:
        return _Devices(contextlib.nullcontext(), 1, f"one device ({devices[0].name})")
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
    return _Devices(
        strategy.scope(),
        len(devices),
        f"MirroredStrategy over {len(devices)} devices ({', '.join(d.name for d in devices)})",
    )


@contextlib.contextmanager
def _global(get, set_, value):
    """Set a Keras global (dtype policy, distribution) for the block, then restore it."""
    previous = get()
    set_(value)
    try:
        yield
    finally:
        set_(previous)


def _jax_distribution(distribution):
    return _global(
        keras.distribution.distribution, keras.distribution.set_distribution, distribution
    )


def _jax_devices(mode: str) -> _Devices:
    import jax

    devices = keras.distribution.list_devices()
    processes = jax.process_count()
    if processes > 1 and mode == "off":
        raise ValueError(
            f"distribution 'off' (one device) cannot train a run of {processes} hosts; use "
            "--distribution auto, or start a single process without --multi-host."
        )
    if mode == "off" or len(devices) < 2:
        return _Devices(contextlib.nullcontext(), 1, f"one device ({devices[0]})")
    # Each process hands Keras its own rows of the global batch (auto_shard_dataset is for
    # tf.data inputs, which Keras would shard itself).
    distribution = keras.distribution.DataParallel(
        devices=devices, auto_shard_dataset=processes == 1
    )
    index = jax.process_index()
    return _Devices(
        _jax_distribution(distribution),
        len(devices),
        f"keras.distribution.DataParallel over {len(devices)} devices"
        + (f" on {processes} hosts (this is process {index})" if processes > 1 else ""),
        index == 0,
        processes=processes,
        index=index,
        gather=hosts.jax_gather,
    )


def _nothing():
    return contextlib.nullcontext()


def _local_forward(model: keras.Model) -> Callable:
    """``f(images) -> logits`` running ``model`` on this process's own device, outside any
    distribution (its current weights at every call): a jitted ``stateless_call`` on JAX, a
    ``tf.function`` on TensorFlow."""
    if keras.backend.backend() == "jax":
        import jax

        @jax.jit
        def forward(trainable, non_trainable, x):
            return model.stateless_call(trainable, non_trainable, x, training=False)[0]

        return lambda x: forward(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            x,
        )
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        return lambda x: forward(x).numpy()
    return lambda x: keras.ops.convert_to_numpy(model(x, training=False))


def _devices(mode: str) -> _Devices:
    if mode not in ("auto", "off"):
        raise ValueError(
            f"distribution must be 'auto' (every local device) or 'off', got {mode!r}."
        )
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tf_devices(mode)
    if backend == "jax":
        return _jax_devices(mode)
    return _Devices(contextlib.nullcontext(), 1, f"one device ({backend} backend)")


# ---------------------------------------------------------------------------------------------
# Files


def _write_json(path: Path, obj) -> None:
    with hub.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    with hub.atomic_path(path) as tmp:
        tmp.write_text(text)


METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc1",
    "val_acc5",
    "lr",
    "images_per_s",
    "epoch_time_s",
)


def _write_metrics(out: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in METRIC_COLUMNS})
    _write_text(out / "metrics.csv", buffer.getvalue())
    _write_json(out / "metrics.json", history)


def plot_curves(history: list[dict], path: Path) -> Path | None:
    """Loss and accuracy per epoch, train vs val, as a PNG; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(9, 3.6), tight_layout=True)
    FigureCanvasAgg(fig)
    for ax, (train_key, val_key, title) in zip(
        fig.subplots(1, 2),
        (("train_loss", "val_loss", "loss"), ("train_acc", "val_acc1", "accuracy (top-1)")),
    ):
        for key, label in ((train_key, "train"), (val_key, "val")):
            points = [(e, r[key]) for e, r in zip(epochs, history) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    with hub.atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def _save_keras(model: keras.Model, path: Path) -> None:
    with hub.atomic_path(path) as tmp:
        keras_tmp = tmp.with_name(tmp.name + ".keras")  # Keras insists on the suffix
        try:
            model.save(keras_tmp)
            os.replace(keras_tmp, tmp)
        finally:
            keras_tmp.unlink(missing_ok=True)


def _layer_weights(model: keras.Model, values_by_path: dict | None = None) -> dict:
    """``{layer: [arrays]}`` (the converted-weights layout), optionally with other values."""
    out = {}
    for layer in model.layers:
        if layer.weights:
            out[layer.name] = [
                values_by_path[w.path]
                if values_by_path is not None and w.path in values_by_path
                else np.array(keras.ops.convert_to_numpy(w))
                for w in layer.weights
            ]
    return out


def load_run(out: str | os.PathLike, which: str = "best") -> keras.Model:
    """The fine-tuned classifier of a run directory (``which``: "best" or "last").

    Reads ``best.keras``/``last.keras`` when training has finished, otherwise builds the model
    from ``run.json`` and the best weights written so far.
    """
    out = Path(out)
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}.")
    final = out / f"{which}.keras"
    if final.is_file():
        return keras.saving.load_model(final, compile=False)
    if which == "best" and (out / BEST_WEIGHTS).is_file():
        info = json.loads((out / RUN_FILE).read_text())
        return _inference_model(info, hub.read_converted(out / BEST_WEIGHTS))
    raise FileNotFoundError(
        f"{out} has no {which} model yet ({final.name} is written when training ends"
        + (f", {BEST_WEIGHTS} after the first validated epoch" if which == "best" else "")
        + ")."
    )


def _inference_model(info: dict, weights: dict) -> keras.Model:
    recipe = Recipe.from_json(info["recipe"])
    variant = registry.resolve(recipe.model).variant
    with dtype_policy("fp32"):
        model = build_model(
            variant, num_classes=len(info["classes"]), name=f"{variant.arch_name}_finetuned"
        )
    checkpoints.assign_weights(model, weights, source="the fine-tuned weights")
    return model


def _export(model_path: Path, out: Path, resolution: int) -> tuple[Path | None, str]:
    """SavedModel of the classifier with convnext_keras.export.exporter (the verified exporter)."""
    if importlib.util.find_spec("convnext_keras.export.exporter") is None:
        return None, (
            "convnext_keras.export.exporter is not available in this version; the classifier is "
            f"saved as {model_path.name} (load it with keras.saving.load_model)."
        )
    # (the package's `export` attribute is the function; the module is imported by name)
    export_lib = importlib.import_module("convnext_keras.export.exporter")

    try:
        result = export_lib.export(
            keras.saving.load_model(model_path, compile=False),
            out / "savedmodel",
            "savedmodel",
            image_size=resolution,
            overwrite=True,
        )
    except Exception as e:  # the export is a bonus; the training results stand without it
        return None, f"SavedModel export failed ({type(e).__name__}: {e}); kept {model_path.name}."
    return Path(result.path), (
        f"SavedModel {result.path} verified against Keras (max |diff| {result.max_abs_diff:.1e})."
    )


# ---------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """A rich progress bar on a terminal (loss, accuracy, lr, img/s); silent otherwise."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty() and not os.environ.get("CONVNEXT_NO_PROGRESS"):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                "{task.fields[stats]}",
                transient=True,
                console=Console(stderr=True),  # on the terminal checked above, not stdout
            )
            self.bar.start()
            self.task = None

    def epoch(self, epoch: int, epochs: int, done: int, total: int):
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(
                f"epoch {epoch + 1}/{epochs}", total=total, completed=done, stats=""
            )

    def update(self, done: int, stats: str):
        if self.bar is not None:
            self.bar.update(self.task, completed=done, stats=stats)

    def close(self):
        if self.bar is not None:
            self.bar.stop()


class _StepCallback(keras.callbacks.Callback):
    """Per-step work inside fit(): progress, the NaN guard, step checkpoints, metric restore."""

    def __init__(self, trainer: _Trainer, epoch: int, start: int, restore_metrics: list | None):
        super().__init__()
        self.trainer, self.epoch, self.start = trainer, epoch, start
        self.restore_metrics = restore_metrics
        self.diverged = None
        #: Steps of the epoch done so far.
        self.done = start
        self.logs: dict = {}
        self.began = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        # fit() has just reset the metrics; continue the interrupted epoch's running means.
        if self.restore_metrics is not None:
            variables = self.model.metrics_variables
            if len(variables) != len(self.restore_metrics):
                raise state_lib.StateError(
                    f"The checkpoint holds {len(self.restore_metrics)} metric variables, the run "
                    f"has {len(variables)}; it was written by another version of this library."
                )
            for v, value in zip(variables, self.restore_metrics):
                v.assign(value)
        self.began = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        t = self.trainer
        done = self.done = self.start + batch + 1
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.logs = logs
        loss = logs.get("loss", float("nan"))
        if not math.isfinite(loss):
            self.diverged = (done, loss)
            self.model.stop_training = True
            return
        if t.progress.bar is not None:
            elapsed = time.perf_counter() - self.began
            rate = (batch + 1) * t.recipe.batch_size / max(elapsed, 1e-9)
            t.progress.update(
                done,
                f"loss {loss:.4f}  acc {logs.get('accuracy', 0):.3f}  "
                f"lr {t.lr_at(self.epoch, done - 1):.2e}  {rate:.1f} img/s",
            )
        if done < t.steps and t.checkpoint_due():
            # Non-finite weights are not saved; alone the run stops here, on several hosts
            # at the next step's loss (the same on every host, so all of them stop together).
            if not t.save_state(self.epoch, done) and t.devices.processes == 1:
                self.diverged = (done, float("nan"))
                self.model.stop_training = True


# ---------------------------------------------------------------------------------------------
# The run


class _Trainer:
    def __init__(self, recipe: Recipe, folder, out: Path, options: dict, meta: dict | None):
        self.recipe, self.folder, self.out = recipe, folder, out
        self.options = options
        self.meta = meta or {}
        self.state_path = out / STATE_FILE
        self.history: list[dict] = list(self.meta.get("history", []))
        self.best = self.meta.get("best")
        self.devices: _Devices | None = None
        self.progress = _Progress(options["verbose"] > 0)
        self.last_save = time.monotonic()
        self.steps = len(folder.train) // recipe.batch_size
        self.warned = False
        #: Files that stopped decoding during the run: {path: reason}.
        self.failed: dict[str, str] = {}

    # -- schedule -----------------------------------------------------------------------------
    def lr_at(self, epoch: int, done: int) -> float:
        micro = epoch * self.steps + done
        return float(keras.ops.convert_to_numpy(self.schedule(micro)))

    def checkpoint_due(self) -> bool:
        every, minutes = self.options["checkpoint_every"], self.options["checkpoint_minutes"]
        if self.devices.processes > 1:
            minutes = 0  # hosts' clocks would not agree on the step; every host must save
        self.since_save = getattr(self, "since_save", 0) + 1
        return (every and self.since_save >= every) or (
            minutes and time.monotonic() - self.last_save >= 60 * minutes
        )

    # -- state --------------------------------------------------------------------------------
    def save_state(self, epoch: int, step: int) -> bool:
        """Write the state (the chief only); False, writing nothing, if the weights are not
        finite.  Every host reads the state at the same steps: on TensorFlow reading a variable
        synchronised on read (the metrics' sums) is a collective."""
        arrays = state_lib.collect(self.model, self.model.optimizer)
        bad = state_lib.non_finite({k: a for k, a in arrays.items() if k.startswith("model/")})
        if bad:
            return False
        if self.devices.chief:
            meta = {
                "epoch": epoch,
                "step": step,
                "history": self.history,
                "best": self.best,
                "recipe": self.recipe.to_json(),
                "classes": self.folder.classes,
                "model_paths": state_lib.variable_paths(self.model),
                "complete": epoch >= self.recipe.epochs,
            }
            state_lib.save(self.state_path, arrays, meta)
        self.last_save, self.since_save = time.monotonic(), 0
        return True

    # -- build --------------------------------------------------------------------------------
    def build(self):
        r = self.recipe
        num_classes = len(self.folder.classes)
        keras.utils.set_random_seed(r.seed)
        # Rematerialise the layers that compute (convolutions, norms, MLPs), not stochastic
        # depth: jax.checkpoint would trace its Python `training` flag.
        remat = (
            keras.RematScope(
                mode="list_of_layers",
                layer_names=[
                    n
                    for group in layer_names(registry.resolve(r.model).variant).values()
                    for n in group
                ],
            )
            if r.remat
            else contextlib.nullcontext()
        )
        with remat:
            self.model = load_model(
                r.model,
                weights=r.weights,
                num_classes=num_classes,
                input_shape=(r.resolution, r.resolution, 3),
                drop_path_rate=r.drop_path,
                head_init_scale=r.head_init_scale,
            )
        updates_per_epoch = max(1, self.steps // r.accumulation)
        total = max(1, r.epochs * self.steps // r.accumulation)
        warmup = min(round(r.warmup_epochs * updates_per_epoch), total - 1)
        self.schedule = optim.schedule(
            r.lr, total, warmup_steps=warmup, min_lr=r.min_lr, accumulation=r.accumulation
        )
        opt = optim.optimizer(
            self.model,
            lr=self.schedule,
            layer_decay=r.layer_decay,
            layer_decay_type=r.layer_decay_type,
            weight_decay=r.weight_decay,
            ema=r.ema,
            accumulation=r.accumulation,
            global_clipnorm=r.clip_grad,
        )
        self.model.compile(
            optimizer=opt,
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=r.label_smoothing
            ),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            jit_compile=self.options["jit_compile"],
        )
        self.devices.prepare(self.model)
        self.model.optimizer.build(self.model.trainable_variables)
        # Create the metric variables now (Keras builds them lazily, inside the first traced
        # step on TensorFlow), so that a resumed epoch can restore their running sums.
        res = r.resolution
        self.model._symbolic_build(
            data_batch=(
                np.zeros((r.batch_size, res, res, 3), np.float32),
                np.zeros((r.batch_size, num_classes), np.float32),
            )
        )
        self.inner_opt = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)

    def note_failures(self, failures, what: str) -> None:
        """Report files that stopped decoding after the scan (once each) and keep them."""
        new = {p: why for p, why in failures.files.items() if p not in self.failed}
        if new:
            self.failed.update(new)
            shown = "; ".join(f"{p} ({why})" for p, why in list(new.items())[:3])
            self.options["say"](
                f"{len(new)} file(s) no longer decode ({what}): {shown}"
                + (f" and {len(new) - 3} more" if len(new) > 3 else "")
            )

    # -- evaluation ---------------------------------------------------------------------------
    def build_eval_model(self) -> None:
        """A second copy of the network, outside the multi-host distribution, that each host
        runs on its share of the validation images (:meth:`evaluate`)."""
        r = self.recipe
        with _jax_distribution(None) if keras.backend.backend() == "jax" else _nothing():
            self.eval_model = build_model(
                registry.resolve(r.model).variant,
                num_classes=len(self.folder.classes),
                input_shape=(r.resolution, r.resolution, 3),
                name="convnext_validation",
            )
        self.eval_forward = _local_forward(self.eval_model)

    def _sharded_logits(self, batches: data_lib.EvalBatches) -> np.ndarray:
        """Validation logits of every host, in batch order: each host runs the evaluated
        weights on its rows of each batch, then the rows are gathered (a collective)."""
        checkpoints.assign_weights(self.eval_model, self.evaluated_weights())
        local = []
        with _jax_distribution(None) if keras.backend.backend() == "jax" else _nothing():
            for i in range(len(batches)):
                logits = np.array(self.eval_forward(batches[i][0]), dtype=np.float32)
                first = i * batches.batch_size
                for row, r in enumerate(batches.rows):  # rows that no longer decode: NaN
                    if r < batches.sizes[i] and first + r in batches.failed:
                        logits[row] = np.nan
                local.append(logits)
        gathered = self.devices.gather(np.stack(local))  # (hosts, batches, rows, classes)
        logits = gathered.transpose(1, 0, 2, 3).reshape(len(batches) * batches.batch_size, -1)
        batches.failed.update(
            int(i) for i in np.flatnonzero(np.isnan(logits).any(axis=1)) if i < len(batches.labels)
        )
        return logits

    def evaluate(self) -> dict:
        r = self.recipe
        if not self.folder.val:
            return {"val_loss": None, "val_acc1": None, "val_acc5": None}
        batches = data_lib.EvalBatches(
            self.folder.val,
            resolution=r.resolution,
            crop_pct=r.crop_pct,
            interpolation=r.interpolation,
            batch_size=r.batch_size,
            workers=self.options["workers"],
            shard=(self.devices.index, self.devices.processes),
        )
        if self.devices.processes > 1:
            logits = self._sharded_logits(batches)
        else:
            with self.ema_weights():
                logits = self.model.predict(batches, verbose=0)
        keep = np.concatenate(
            [np.arange(n) + i * r.batch_size for i, n in enumerate(batches.sizes)]
        )
        logits = np.asarray(logits, dtype=np.float64)[keep]
        labels = batches.labels
        self.note_failures(batches.failures, "validation: left out")
        if batches.failed:  # files that stopped decoding: not counted either way
            good = np.setdiff1d(np.arange(len(labels)), sorted(batches.failed))
            if not good.size:
                return {"val_loss": None, "val_acc1": None, "val_acc5": None}
            logits, labels = logits[good], labels[good]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        top5 = np.argsort(-logits, axis=1)[:, :5]
        return {
            "val_loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
            "val_acc1": float((top5[:, 0] == labels).mean()),
            "val_acc5": float((top5 == labels[:, None]).any(axis=1).mean())
            if logits.shape[1] > 5
            else None,
        }

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights in the model for the block (when EMA is on), then the raw ones."""
        ema = self.inner_opt.ema_values()
        if ema is None:
            yield
            return
        variables = self.model.trainable_variables
        raw = [np.array(keras.ops.convert_to_numpy(v)) for v in variables]
        for v, value in zip(variables, ema):
            v.assign(value)
        try:
            yield
        finally:
            for v, value in zip(variables, raw):
                v.assign(value)

    def evaluated_weights(self) -> dict:
        """``{layer: [arrays]}`` of the weights validation uses (EMA when on)."""
        ema = self.inner_opt.ema_values()
        values = None
        if ema is not None:
            values = {v.path: a for v, a in zip(self.model.trainable_variables, ema)}
        return _layer_weights(self.model, values)

    @contextlib.contextmanager
    def host_failures(self, epoch: int, callback: _StepCallback, during: str = "training"):
        """On several hosts: an engine error that reports a lost peer becomes
        :class:`hosts.HostLost`, naming the checkpoint every host resumes from."""
        try:
            yield
        except Exception as e:
            if self.devices.processes == 1 or not hosts.is_host_failure(e):
                raise
            kept = state_lib.read_meta(self.state_path)
            where = (
                f"The last complete checkpoint {self.state_path} (epoch {kept['epoch'] + 1}, "
                f"step {kept['step']}) is kept"
                if kept
                else "No checkpoint had been written yet"
            )
            raise hosts.HostLost(
                f"Lost contact with another host during {during} (epoch {epoch + 1}, after step "
                f"{callback.done} of {self.steps}; this is host {self.devices.index} of "
                f"{self.devices.processes}): {hosts.first_line(e).rstrip('.')}. {where}; start "
                f"the same command with --resume {self.out} on every host."
            ) from None

    # -- the loop -----------------------------------------------------------------------------
    def train(self, restored_metrics: list | None):
        r = self.recipe
        epoch, start = self.meta.get("epoch", 0), self.meta.get("step", 0)
        say = self.options["say"]
        while epoch < r.epochs:
            batches = data_lib.TrainBatches(
                self.folder.train,
                len(self.folder.classes),
                self.augment,
                batch_size=r.batch_size,
                epoch=epoch,
                seed=r.seed,
                start=start,
                workers=self.options["workers"],
                shard=(self.devices.index, self.devices.processes),
            )
            callback = _StepCallback(self, epoch, start, restored_metrics if start else None)
            self.progress.epoch(epoch, r.epochs, start, self.steps)
            began = time.perf_counter()
            with self.host_failures(epoch, callback):
                self.model.fit(
                    **self.devices.fit_input(batches),
                    epochs=epoch + 1,
                    initial_epoch=epoch,
                    verbose=0,
                    callbacks=[callback, *self.options["callbacks"]],
                    shuffle=False,
                )
            self.note_failures(batches.failures, "training: each replaced by the next image")
            if callback.diverged:
                step, loss = callback.diverged
                kept = state_lib.read_meta(self.state_path)
                where = (
                    f"the last good checkpoint {self.state_path} (epoch {kept['epoch'] + 1}, "
                    f"step {kept['step']}) is kept"
                    if kept
                    else "no checkpoint had been written yet"
                )
                raise TrainingDiverged(
                    f"Training diverged: the loss became {loss} at epoch {epoch + 1}, step "
                    f"{step} (of {self.steps}); {where}. Lower --lr, raise --warmup-epochs, "
                    "set --clip-grad, or train in --precision fp32."
                )
            seconds = time.perf_counter() - began
            with self.host_failures(epoch, callback, "validation"):
                validation = self.evaluate()
            row = {
                "epoch": epoch + 1,
                "train_loss": callback.logs.get("loss"),
                "train_acc": callback.logs.get("accuracy"),
                **validation,
                "lr": self.lr_at(epoch, self.steps - 1),
                "images_per_s": round((self.steps - start) * r.batch_size / seconds, 2),
                "epoch_time_s": round(seconds, 2),
            }
            self.history.append(row)
            improved = row["val_acc1"] is not None and (
                self.best is None or row["val_acc1"] > self.best["val_acc1"]
            )
            if improved or (row["val_acc1"] is None):
                self.best = {"epoch": epoch + 1, "val_acc1": row["val_acc1"]}
                if self.devices.chief:
                    hub.save_converted(
                        self.evaluated_weights(),
                        self.out / BEST_WEIGHTS,
                        {"epoch": str(epoch + 1), "val_acc1": str(row["val_acc1"])},
                    )
            epoch, start, restored_metrics = epoch + 1, 0, None
            if not self.save_state(epoch, 0):
                raise TrainingDiverged(
                    f"The weights became NaN/inf during epoch {epoch}; the checkpoint of the "
                    "previous epoch is kept. Lower --lr or train in --precision fp32."
                )
            if self.devices.chief:
                _write_metrics(self.out, self.history)
                if plot_curves(self.history, self.out / "curves.png") is None and not self.warned:
                    say("no curves.png: matplotlib is missing (pip install 'convnext-keras[viz]')")
                    self.warned = True
            say(_epoch_line(row, r.epochs))


def _epoch_line(row: dict, epochs: int) -> str:
    def f(key, fmt):
        return "-" if row.get(key) is None else format(row[key], fmt)

    return (
        f"epoch {row['epoch']}/{epochs}  train loss {f('train_loss', '.4f')} "
        f"acc {f('train_acc', '.4f')}  val loss {f('val_loss', '.4f')} "
        f"acc@1 {f('val_acc1', '.4f')} acc@5 {f('val_acc5', '.4f')}  "
        f"lr {f('lr', '.2e')}  {f('images_per_s', '.1f')} img/s"
    )


def _read_gzip_lines(path: Path) -> list[str]:
    return gzip.decompress(path.read_bytes()).decode().splitlines()


def _check_resume(out: Path, recipe_options: dict) -> tuple[dict, dict | None]:
    """The saved run info and state header of ``out``; errors for what cannot be resumed."""
    info_path = out / RUN_FILE
    if not info_path.is_file():
        raise FileNotFoundError(
            f"Nothing to resume in {out}: no {RUN_FILE} (start the run without --resume)."
        )
    info = json.loads(info_path.read_text())
    saved = info["recipe"]
    explicit = {k: v for k, v in recipe_options.items() if v is not None or k in _NONE_IS_A_VALUE}
    if "model" in explicit:
        explicit["model"] = registry.resolve(explicit["model"]).name
    if "weights" in explicit and explicit["weights"] not in (None, OFFICIAL):
        explicit["weights"] = _weights_option(explicit["weights"])
    if "crop_scale" in explicit:
        explicit["crop_scale"] = [float(s) for s in explicit["crop_scale"]]
    differ = {k: (saved.get(k), v) for k, v in explicit.items() if saved.get(k) != v}
    if differ:
        listed = ", ".join(f"{k}: run has {a!r}, asked {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
            f"--resume continues {out} with its own settings, which differ from the ones given "
            f"({listed}). Drop those options, or start a new run with another --out."
        )
    state_path = out / STATE_FILE
    meta = state_lib.read_meta(state_path) if state_path.is_file() else None
    if state_path.is_file() and meta is None:
        state_lib.load(state_path)  # raises the explanatory StateError
    return info, meta


def run(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    distribution: str | None = None,
    workers: int | None = None,
    checkpoint_every: int | None = None,
    checkpoint_minutes: float | None = None,
    export: bool | None = None,
    jit_compile: bool | str | None = None,
    callbacks: list | None = None,
    verbose: int = 1,
    **options,
) -> RunResult:
    """Fine-tune a ConvNeXt on ``data_dir`` (one folder per class) into the run directory ``out``.

    Args:
        data_dir: ``<class>/<images>`` folders, optionally under ``train/`` and ``val/``.
        out: the run directory (created). An existing run is only continued with ``resume``.
        resume: continue the run in ``out`` from its last complete checkpoint, with its own
            settings (options given here must agree with them) on the same files (a data
            directory whose files changed is refused, naming the difference).
        distribution, checkpoint_every, checkpoint_minutes, export, jit_compile: None means
            the run's own value when resuming (kept in run.json), else the default
            (:data:`RUN_SETTINGS`); a value given explicitly is used and kept.
        distribution: ``"auto"`` trains data-parallel over every local device
            (MirroredStrategy / keras.distribution.DataParallel); ``"off"`` uses one.
        workers: loader threads (default: up to 8, one per CPU).
        checkpoint_every / checkpoint_minutes: write the training state after this many steps
            or minutes, whichever comes first (and at the end of every epoch).
        export: write a SavedModel of the best classifier with ``convnext_keras.export.exporter``.
        jit_compile: XLA compilation of the train step (Keras' ``compile(jit_compile=)``).
            ``"auto"``: on with JAX and on TensorFlow with a GPU/TPU; off for TensorFlow on CPU
            only, where XLA made ConvNeXt training steps 3-5x slower here.
        callbacks: more ``keras.callbacks.Callback`` objects for ``fit`` (TensorBoard...); they
            see every training step (``fit`` runs once per epoch).
        verbose: 0 silent, 1 a line per epoch (and a progress bar on a terminal).
        options: the recipe, see :class:`Recipe` (``model``, ``weights``, ``epochs``,
            ``batch_size``, ``lr``, ``layer_decay``, ``ema``, ``precision``...).

    Returns:
        A :class:`RunResult` with the history, the best epoch and the files written.

    Raises:
        DataError: unusable data (no/one class, empty class folder, classes differing from the
            run being resumed). TrainingDiverged: NaN/inf loss (the last good state is kept).
    """
    out = Path(out).expanduser()
    say = print if verbose > 0 else (lambda *a, **k: None)
    state_path = out / STATE_FILE
    if resume:
        info, meta = _check_resume(out, options)
        recipe = Recipe.from_json(info["recipe"])
    else:
        # A run that never saved a training step (its start failed: no weights, bad data) is
        # no run: a new one may take its place.  Nothing is written before that point anyway.
        if state_path.exists() or any((out / f).exists() for f in _TRAINED_FILES):
            raise FileExistsError(
                f"{out} already holds a fine-tuning run; continue it with "
                f"{fix('resume=True', '--resume')} or choose another "
                f"{fix('out directory', '--out')}."
            )
        recipe = resolve_recipe(**options)
        info, meta = None, None
    if recipe.remat and keras.backend.backend() == "tensorflow":
        raise ValueError(
            "remat (--remat) does not work on the TensorFlow backend: Keras' rematerialisation "
            "fails in graph mode (keras-team/keras#21207). Use the JAX backend (--backend jax), "
            "or save memory with a smaller --batch-size and --accum-steps."
        )
    given = {
        "export": export,
        "checkpoint_every": checkpoint_every,
        "checkpoint_minutes": checkpoint_minutes,
        "distribution": distribution,
        "jit_compile": jit_compile,
    }
    saved = (info or {}).get("settings", {})
    settings = {k: v if v is not None else saved.get(k, RUN_SETTINGS[k]) for k, v in given.items()}
    checkpoint_every, export = settings["checkpoint_every"], settings["export"]
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if checkpoint_every is not None and checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 steps, got {checkpoint_every}.")

    folder = data_lib.scan(
        data_dir, val_fraction=recipe.val_fraction, seed=recipe.seed, workers=workers
    )
    if info is not None and folder.classes != info["classes"]:
        missing = sorted(set(info["classes"]) - set(folder.classes))
        extra = sorted(set(folder.classes) - set(info["classes"]))
        raise data_lib.DataError(
            f"The classes in {data_dir} do not match the run being resumed "
            f"({len(info['classes'])} classes): missing {missing or 'none'}, new "
            f"{extra or 'none'}. Resume with the same data, or start a new run."
        )
    if info is not None and info["data"].get("fingerprint") not in (None, folder.fingerprint()):
        saved_list = out / DATA_FILES
        before = _read_gzip_lines(saved_list) if saved_list.is_file() else None
        raise data_lib.DataError(
            f"The files in {data_dir} changed since the run in {out} started"
            + (f": {data_lib.describe_change(before, folder.file_list())}" if before else "")
            + ". --resume continues only on the same files (the split, the data order and the "
            "steps per epoch depend on them): restore them, or start a new run with another "
            "--out."
        )
    if folder.skipped:
        shown = "; ".join(f"{p} ({why})" for p, why in folder.skipped[:5])
        more = f" and {len(folder.skipped) - 5} more" if len(folder.skipped) > 5 else ""
        say(f"skipped {len(folder.skipped)} unreadable file(s): {shown}{more}")
    if len(folder.train) < recipe.batch_size:
        raise data_lib.DataError(
            f"The training split has {len(folder.train)} images, fewer than one batch "
            f"({recipe.batch_size}); lower --batch-size or add images."
        )
    if meta is not None and meta.get("complete"):
        say(f"{out} is already complete ({recipe.epochs} epochs).")

    trainer = _Trainer(
        recipe,
        folder,
        out,
        {
            "workers": workers,
            "checkpoint_every": checkpoint_every,
            "checkpoint_minutes": settings["checkpoint_minutes"],
            "verbose": verbose,
            "jit_compile": settings["jit_compile"],
            "callbacks": list(callbacks or []),
            "say": say,
        },
        meta,
    )
    trainer.augment = data_lib.Augment(
        resolution=recipe.resolution,
        interpolation=recipe.interpolation,
        crop_scale=recipe.crop_scale,
        hflip=recipe.hflip,
        randaugment=recipe.randaugment,
        randaugment_magnitude=recipe.randaugment_magnitude,
        mixup=recipe.mixup,
        cutmix=recipe.cutmix,
    )
    devices = _devices(settings["distribution"])
    trainer.devices = devices
    if settings["jit_compile"] == "auto" and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        trainer.options["jit_compile"] = bool(
            tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")
        )
    if keras.backend.backend() == "tensorflow" and devices.replicas > 1 and recipe.accumulation > 1:
        raise ValueError(
            f"Gradient accumulation (--accum-steps {recipe.accumulation}) fails under "
            f"tf.distribute with Keras 3 (its conditional update synchronises replicas inside a "
            f"cond); on {devices.replicas} devices use --accum-steps 1 with a larger "
            "--batch-size, or the JAX backend"
            + (", or --distribution off." if devices.processes == 1 else ".")
        )
    if recipe.batch_size % devices.replicas:
        raise ValueError(
            f"batch_size {recipe.batch_size} does not split over {devices.replicas} devices; "
            f"use a multiple of {devices.replicas}."
        )
    try:
        if devices.processes > 1:
            with dtype_policy(recipe.precision):  # outside the engine's scope: one host's model
                trainer.build_eval_model()
        with dtype_policy(recipe.precision), devices.scope:
            trainer.build()  # the weights are in hand (downloaded, read) from here on
            if info is None and devices.chief:
                # The run's first files: only now that the model and the data are ready.
                out.mkdir(parents=True, exist_ok=True)
                info = {
                    "out": str(out),
                    "recipe": recipe.to_json(),
                    "classes": folder.classes,
                    "data": folder.summary(),
                    "skipped": [list(s) for s in folder.skipped],
                    "backend": keras.backend.backend(),
                    "keras": keras.__version__,
                    "settings": settings,
                }
                _write_json(out / RUN_FILE, info)
                _write_text(out / "labels.txt", "\n".join(folder.classes) + "\n")
                with hub.atomic_path(out / DATA_FILES) as tmp:
                    tmp.write_bytes(gzip.compress("\n".join(folder.file_list()).encode() + b"\n"))
            elif devices.chief and info.get("settings") != settings:  # given again: kept
                info = {**info, "settings": settings}
                _write_json(out / RUN_FILE, info)
            say(
                f"fine-tuning {recipe.model} on {len(folder.train)} images / "
                f"{len(folder.classes)} classes ({len(folder.val)} for validation), "
                f"{trainer.steps} steps per epoch, {devices.description}"
            )
            restored_metrics = None
            if meta is not None:
                arrays, meta = state_lib.load(state_path)
                restored_metrics = state_lib.restore(
                    trainer.model, trainer.model.optimizer, arrays, meta, state_path
                )
                say(f"resumed from {state_path}: epoch {meta['epoch'] + 1}, step {meta['step']}")
            trainer.train(restored_metrics)
            final = trainer.evaluated_weights()
    finally:
        trainer.progress.close()

    files = {
        "run": out / RUN_FILE,
        "state": state_path,
        "metrics_csv": out / "metrics.csv",
        "metrics_json": out / "metrics.json",
        "curves": out / "curves.png",
        "best_weights": out / BEST_WEIGHTS,
        "best": out / "best.keras",
        "last": out / "last.keras",
    }
    export_path, note = None, "not exported (export=False)."
    if devices.chief:
        classifier = _inference_model(info, final)
        _save_keras(classifier, files["last"])
        checkpoints.assign_weights(classifier, hub.read_converted(out / BEST_WEIGHTS))
        _save_keras(classifier, files["best"])
        if export:
            export_path, note = _export(files["best"], out, recipe.resolution)
        say(f"wrote {files['best']} and {files['last']}; {note}")
    best = trainer.best or {}
    return RunResult(
        out=out,
        classes=folder.classes,
        history=trainer.history,
        best_epoch=best.get("epoch"),
        best_val_acc1=best.get("val_acc1"),
        files={k: p for k, p in files.items() if p.exists()},
        export=export_path,
        export_note=note,
        data=folder.summary(),
        skipped=folder.skipped + list(trainer.failed.items()),
    )
