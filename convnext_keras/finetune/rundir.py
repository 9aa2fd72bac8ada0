"""The run directory's files: their names, the json/text/metrics writers, ``curves.png``, the
saved classifiers (``.keras``, the SavedModel export) and :func:`load_run`, which reads one back.

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

import csv
import importlib.util
import io
import json
import os
from pathlib import Path

import keras
import numpy as np

from convnext_keras import registry
from convnext_keras.finetune import recipe as recipe_lib
from convnext_keras.nets.convnext import build_model, dtype_policy
from convnext_keras.weights import cache, convert

STATE_FILE = "checkpoint.safetensors"
BEST_WEIGHTS = "best.weights.safetensors"
RUN_FILE = "run.json"
#: Files that exist only once a run has trained (beside STATE_FILE).
_TRAINED_FILES = (BEST_WEIGHTS, "metrics.csv", "best.keras", "last.keras")
#: The files a run trains and validates on (``ImageFolder.file_list``), gzipped: what a
#: ``--resume`` compares the data directory with.
DATA_FILES = "data_files.txt.gz"


def _write_json(path: Path, obj) -> None:
    with cache.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    """UTF-8, with names that are not (a class folder named in another encoding) kept as their
    bytes on disk (``surrogateescape``)."""
    with cache.atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")


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
    with cache.atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def _save_keras(model: keras.Model, path: Path) -> None:
    with cache.atomic_path(path, suffix=".keras") as tmp:  # Keras insists on the suffix
        model.save(tmp)


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
        return _inference_model(info, cache.read_converted(out / BEST_WEIGHTS))
    raise FileNotFoundError(
        f"{out} has no {which} model yet ({final.name} is written when training ends"
        + (f", {BEST_WEIGHTS} after the first validated epoch" if which == "best" else "")
        + ")."
    )


def _inference_model(info: dict, weights: dict) -> keras.Model:
    recipe = recipe_lib.Recipe.from_json(info["recipe"])
    variant = registry.resolve(recipe.model).variant
    with dtype_policy("fp32"):
        model = build_model(
            variant, num_classes=len(info["classes"]), name=f"{variant.arch_name}_finetuned"
        )
    convert.assign_weights(model, weights, source="the fine-tuned weights")
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
