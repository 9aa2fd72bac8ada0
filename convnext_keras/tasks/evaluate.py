"""ImageNet-1k validation accuracy, exactly as the original evaluates.

Layouts found automatically (:func:`find_dataset`):

* class folders: ``DATA/<wnid>/*.JPEG`` (or ``DATA/val/<wnid>/...``);
* the flat ILSVRC2012 layout ``DATA/ILSVRC2012_val_00000001.JPEG`` ... with its ground truth:
  Kaggle's ``LOC_val_solution.csv``, the devkit's ``ILSVRC2012_validation_ground_truth.txt``
  (+ the devkit's ``meta.mat`` beside it, read with scipy) or a text file of one wnid per image
  (TF-slim's ``imagenet_2012_validation_synset_labels.txt``), in ``DATA`` or a folder above it.

Images go through the official evaluation transform (no EXIF rotation, as the original) in a
thread pool that decodes ahead of the model.  Files that cannot be evaluated - unreadable,
without a label, a directory where an image should be, or an image whose logits are NaN/inf -
are counted and listed in the report (``unreadable``), never dropped silently and never a
crash; ``convnext eval`` exits with status 1 when there are any (``--allow-unreadable``: 0).
With several local accelerators (or virtual CPU devices) the model runs data-parallel:
``keras.distribution.DataParallel`` on JAX, ``tf.distribute.MirroredStrategy`` on TensorFlow.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from convnext_keras import preprocess, registry
from convnext_keras.data import files as files_lib
from convnext_keras.data import labels as labels_mod
from convnext_keras.interface import fix
from convnext_keras.tasks.graph_route import GraphRoute, graph_route

_WNID = re.compile(r"^n\d{8}$")
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})", re.IGNORECASE)
GROUND_TRUTH_FILES = (
    "LOC_val_solution.csv",
    "ILSVRC2012_validation_ground_truth.txt",
    "imagenet_2012_validation_synset_labels.txt",
)
#: From this many images on, ``evaluate`` decodes in worker processes instead of threads.
PROCESSES_FROM = 1000
_NON_FINITE = "the model returned NaN or infinite logits; not counted"
#: How many folders above DATA are searched for a ground-truth file.
_SEARCH_UP = 3


@dataclasses.dataclass
class EvalSet:
    """Files to evaluate and their ImageNet-1k class indices."""

    root: Path
    layout: str  # "class-folders" or "flat (<ground truth file>)"
    paths: list[Path]
    targets: np.ndarray  # int64, 1k head index of each path
    #: Entries that cannot be evaluated before reading them (no ground-truth label, a
    #: directory where an image should be).
    unlabeled: list[dict] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, limit: int | None, seed: int = 0) -> EvalSet:
        """A reproducible random subset of ``limit`` images (all classes represented evenly
        in expectation), kept in file order."""
        if limit is None or limit >= len(self.paths):
            return self
        if limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit}.")
        keep = np.sort(np.random.default_rng(seed).choice(len(self.paths), limit, replace=False))
        return dataclasses.replace(
            self, paths=[self.paths[i] for i in keep], targets=self.targets[keep]
        )


def _entries(folder: Path) -> tuple[list[Path], list[dict]]:
    """Image files of a folder (hidden ones skipped), and the other entries as "cannot be
    evaluated" records: a directory named ``x.jpg``, a FIFO or a broken link is reported, never
    silently ignored nor opened (:func:`convnext_keras.data.files.image_files`)."""
    listing = files_lib.image_files(folder, recursive=False)
    others = [
        {"file": str(s.path), "error": f"{s.reason}, not an image file"} for s in listing.skipped
    ]
    return listing.files, others


def _class_folders(root: Path) -> EvalSet | None:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and _WNID.match(p.name))
    if not dirs:
        return None
    names = labels_mod.imagenet_1k()
    unknown = [d.name for d in dirs if d.name not in names.wnids]
    if unknown:
        raise ValueError(
            f"{root}: {len(unknown)} class folder(s) are not ImageNet-1k classes "
            f"({', '.join(unknown[:5])}{'...' if len(unknown) > 5 else ''}); eval measures "
            "the 1000-class ImageNet-1k validation set."
        )
    paths, targets, others = [], [], []
    for d in dirs:
        files, not_files = _entries(d)
        paths += files
        targets += [names.index(d.name)] * len(files)
        others += not_files
    return EvalSet(root, "class-folders", paths, np.asarray(targets, np.int64), others)


def _find_ground_truth(root: Path) -> Path | None:
    folders = [root, *list(root.parents)[:_SEARCH_UP]]
    for folder in folders:
        for sub in (folder, folder / "ILSVRC2012_devkit_t12" / "data"):
            for name in GROUND_TRUTH_FILES:
                if (sub / name).is_file():
                    return sub / name
    return None


def _read_loc_csv(path: Path) -> dict[int, str]:
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            m = _VAL_NUMBER.search(row.get("ImageId", ""))
            words = (row.get("PredictionString") or "").split()
            if m and words:
                out[int(m.group(1))] = words[0]
    if not out:
        raise ValueError(
            f"{path}: no rows of the form 'ImageId,PredictionString' (Kaggle's "
            "LOC_val_solution.csv) were found."
        )
    return out


def _devkit_wnids(meta: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from the devkit's meta.mat (its IDs are not the head order)."""
    from convnext_keras.errors import require

    loadmat = require(
        "scipy.io",
        extra=None,
        purpose=f"Reading {meta}",
        alternative="or use class folders or LOC_val_solution.csv",
    ).loadmat
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    return {
        int(s["ILSVRC2012_ID"]): str(s["WNID"])
        for s in synsets
        if int(s["num_children"]) == 0 and 1 <= int(s["ILSVRC2012_ID"]) <= 1000
    }


def _read_line_file(path: Path) -> dict[int, str]:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if lines and all(_WNID.match(line) for line in lines):  # one wnid per image
        return {i + 1: w for i, w in enumerate(lines)}
    meta = path.parent / "meta.mat"
    if not meta.is_file():
        raise ValueError(
            f"{path} holds the devkit's ILSVRC2012_IDs, which need the devkit's meta.mat "
            f"beside it ({meta} is missing) to map to classes."
        )
    ids = _devkit_wnids(meta)
    try:
        return {i + 1: ids[int(line)] for i, line in enumerate(lines)}
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: line is not an ILSVRC2012_ID of {meta} ({e}).") from None


def _flat(root: Path, ground_truth: Path | None) -> EvalSet | None:
    files, others = _entries(root)
    files = [p for p in files if _VAL_NUMBER.search(p.name)]
    others = [o for o in others if _VAL_NUMBER.search(Path(o["file"]).name)]
    if not files:
        return None
    gt = Path(ground_truth) if ground_truth else _find_ground_truth(root)
    if gt is None:
        raise ValueError(
            f"{root} holds ILSVRC2012_val_* images but no ground truth was found in it or "
            f"the {_SEARCH_UP} folders above ({', '.join(GROUND_TRUTH_FILES)}); pass "
            f"{fix('ground_truth=FILE', '--ground-truth FILE')}."
        )
    if not gt.is_file():
        raise FileNotFoundError(f"Ground-truth file not found: {gt}")
    wnid_of = _read_loc_csv(gt) if gt.suffix.lower() == ".csv" else _read_line_file(gt)
    names = labels_mod.imagenet_1k()
    paths, targets, unlabeled = [], [], others
    for p in files:
        wnid = wnid_of.get(int(_VAL_NUMBER.search(p.name).group(1)))
        if wnid is None or wnid not in names.wnids:
            unlabeled.append({"file": str(p), "error": f"no ImageNet-1k label in {gt.name}"})
            continue
        paths.append(p)
        targets.append(names.index(wnid))
    return EvalSet(root, f"flat ({gt.name})", paths, np.asarray(targets, np.int64), unlabeled)


def find_dataset(data, *, ground_truth=None) -> EvalSet:
    """Find the images and labels of an ImageNet-1k validation folder (layouts: module doc)."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Validation data folder not found: {root}")
    for candidate in (root, root / "val"):
        if not candidate.is_dir():
            continue
        found = _class_folders(candidate)
        if found is None:
            found = _flat(candidate, ground_truth)
        if found is not None:
            return found
    raise ValueError(
        f"{root} is not an ImageNet validation folder: expected class folders "
        "(<wnid>/*.JPEG, e.g. n01440764/) or flat ILSVRC2012_val_*.JPEG files with a "
        "ground-truth file."
    )


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalResult:
    """Accuracy and everything behind it; :meth:`to_dict` is the JSON report."""

    model: str
    data: str
    layout: str
    acc1: float
    acc5: float
    evaluated: int
    seconds: float
    #: Evaluated images / wall time of the whole run (first call's compilation included).
    images_per_s: float
    #: What the decoding threads can deliver: images / (busy thread-seconds / threads).
    preprocess_images_per_s: float | None
    #: The model alone, steady state: the first call (compilation) is left out.
    model_images_per_s: float
    #: Seconds of the first model call (tracing/compilation and the first batch).
    first_call_seconds: float
    devices: int
    per_class: dict[str, dict]
    unreadable: list[dict]
    predictions: list[dict]
    real_acc1: float | None = None
    config: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, path) -> Path:
        """Write the JSON report atomically."""
        from convnext_keras.weights.cache import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def _local_devices() -> list[str]:
    """Accelerators of the running backend, else its CPU devices (virtual ones count)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        devices = jax.local_devices()
        return [f"{d.platform}:{d.id}" for d in devices]
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    return ["default"]  # torch: one device (see docs: data-parallel eval is JAX/TF only)


@contextlib.contextmanager
def _data_parallel(devices: list[str]):
    """A scope in which models are created and run replicated over ``devices``."""
    import keras

    if len(devices) < 2:
        yield
        return
    backend = keras.backend.backend()
    if backend == "jax":
        distribution = keras.distribution.DataParallel(devices=devices)
        with distribution.scope():
            yield
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.distribute.MirroredStrategy(devices).scope():
            yield
    else:
        yield


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("eval"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        transient=False,
        console=Console(stderr=True),  # the terminal the check above saw; stdout stays clean
    )
    bar.start()
    return bar, bar.add_task("eval", total=total, status="")


def evaluate(
    model,
    data,
    *,
    weights="official",
    batch_size: int = 32,
    limit: int | None = None,
    ground_truth=None,
    real: bool = False,
    workers: int | None = None,
    processes: bool | None = None,
    progress: bool | None = None,
    config=None,
    data_parallel: bool = True,
    engine: str = "auto",
    precision: str | None = None,
    calibration=None,
) -> EvalResult:
    """acc@1 / acc@5 of a 1000-class model on ImageNet-1k validation data.

    Args:
        model: a model name (``"convnext_tiny_1k_224"``), a ``.keras`` file or a keras.Model.
        data: the validation folder (class folders or the flat ILSVRC2012 layout).
        weights: for names: ``"official"`` (downloaded once) or a local checkpoint.
        batch_size: images per model call (split over the devices when data-parallel).
        limit: evaluate a reproducible random subset of this many images.
        ground_truth: the flat layout's ground-truth file when not found automatically.
        real: also report ImageNet-ReaL acc@1 (needs ILSVRC2012_val_<number> file names).
        workers: decoding workers (default: the usable CPUs).
        processes: decode in worker processes rather than threads (scales past Python's GIL;
            a few seconds to start).  Default: processes from 1000 images on.
        progress: show a progress bar (default: when stderr is a terminal).
        config: preprocessing settings (default: the model name's registry entry).
        data_parallel: replicate the model over all local devices when there are several.
        engine: ``"auto"`` runs the model as ``predict`` does: OpenVINO, else onnxruntime,
            on a single CPU device when installed
            (:func:`convnext_keras.engines.runners.inference_function`), Keras otherwise (always
            when data-parallel); ``"keras"``, ``"openvino"`` or ``"onnxruntime"`` insist.  The
            report's ``config["engine"]`` says which ran.
        precision: ``"fp32"``, or Keras mixed precision ``"bf16"`` / ``"fp16"`` (runs on
            Keras; ``engine="onnxruntime"`` refuses it); None (default): as
            :func:`convnext_keras.tasks.predict.load_classifier`; ``"int8"`` (opt-in): onnxruntime
            on one CPU device with the model quantized to int8
            (:func:`convnext_keras.engines.quantization.quantize_int8`).  The precision the model
            ran in is recorded in ``config["precision"]``.
        calibration: ``"int8"`` only: the photos that calibrate the quantization (a folder or
            files, read through the model's transform; default: the sample photos of
            scikit-image and scikit-learn).  Calibrate on photos that are not in ``data``.
    """
    from convnext_keras.tasks.predict import random_weights

    route = None
    if calibration is None:
        route = graph_route(model, weights, head="classifier", engine=engine, precision=precision)
    if route is not None and data_parallel and not _one_device_without_keras():
        route = None  # several devices: the task's Keras path decides
    if route is None:
        from convnext_keras.engines import runners

        engine_precision = runners.engine_precision(precision, calibration)
        runners.check_engine(engine, engine_precision)
    dataset = find_dataset(data, ground_truth=ground_truth).subset(limit)
    if len(dataset) == 0:
        raise ValueError(f"{data}: no images to evaluate.")
    real_labels = _real_targets(dataset) if real else None
    if route is not None:
        model_name, config, devices, backend, model_precision = _graph_model(route, config)
        run_batch, engine_used, scope = route, route.engine, contextlib.nullcontext()
    else:
        import keras

        # int8 is onnxruntime on the CPU: one device.
        devices = _local_devices() if data_parallel and not engine_precision else ["default"]
        if len(devices) > 1 and engine in runners.GRAPH_ENGINES:
            raise ValueError(
                fix(f"engine={engine!r}", f"--engine {engine}")
                + f" runs on one device; pass {fix('data_parallel=False', '--single-device')} or "
                + fix("engine='auto'", "--engine auto")
                + "."
            )
        scope = _data_parallel(devices)
    with scope:
        if route is None:
            run_batch, engine_used, model_name, config, model_precision = _keras_model(
                model, weights, config, precision, engine, engine_precision, calibration, devices
            )
            backend = keras.backend.backend()
        if processes is None:
            processes = len(dataset) >= PROCESSES_FROM
        batches = preprocess.ImageBatches(
            dataset.paths,
            config,
            batch_size,
            workers=workers,
            processes=processes,
            skip_errors=True,
            normalized=engine_used != "keras",
        )
        show = sys.stderr.isatty() if progress is None else progress
        bar = _progress(len(dataset), show)
        top5 = np.full((len(dataset), 5), -1, np.int64)
        done = np.zeros(len(dataset), bool)
        # Every call gets the same batch shape (padded; a multiple of the device count), so
        # compiled backends compile once.  The first call (compilation) is timed apart.
        call_size = -(-batch_size // len(devices)) * len(devices)
        model_seconds, first_call, first_images = 0.0, None, 0
        non_finite: list[dict] = []
        start = time.perf_counter()
        try:
            for images, indices in batches:
                t = time.perf_counter()
                logits = _predict(run_batch, images, call_size)
                elapsed = time.perf_counter() - t
                if first_call is None:
                    first_call, first_images = elapsed, len(images)
                else:
                    model_seconds += elapsed
                finite = np.isfinite(logits).all(axis=1)  # NaN/inf: that image failed
                indices = np.asarray(indices)
                non_finite += [{"file": str(dataset.paths[i]), "error": _NON_FINITE} for i in
                               indices[~finite]]  # fmt: skip
                top5[indices[finite]] = _top5(logits[finite])
                done[indices[finite]] = True
                if bar:
                    n = int(done.sum())
                    correct = int((top5[done, 0] == dataset.targets[done]).sum())
                    bar[0].update(
                        bar[1],
                        completed=n + len(batches.errors),
                        status=f"acc@1 {100 * correct / n:.2f}%",
                    )
        finally:
            if bar:
                bar[0].stop()
        seconds = time.perf_counter() - start
    timing = {
        "seconds": seconds,
        # Steady state: all calls but the first; with a single call, that one.
        "first_call_seconds": first_call or 0.0,
        "model_seconds": model_seconds if model_seconds else (first_call or 0.0),
        "model_images": int(done.sum()) - first_images if model_seconds else int(done.sum()),
        "devices": len(devices),
        "preprocess_images_per_s": batches.images_per_second,
    }
    unreadable = (
        dataset.unlabeled
        + [{"file": e.path, "error": e.reason} for e in batches.errors]
        + non_finite
    )
    settings = {
        **config._asdict(),
        "backend": backend,
        "engine": engine_used,
        "precision": model_precision,
        "random_weights": random_weights(model, weights),
    }
    return _result(
        model_name, str(data), dataset, top5, done, real_labels, unreadable, settings, timing
    )


def _one_device_without_keras() -> bool:
    """Whether evaluation runs on one device, decided without importing Keras where it is not
    imported yet: several devices need an accelerator (``graph_route`` sends those to Keras)
    or virtual CPU devices (JAX's ``XLA_FLAGS``; TensorFlow's need TensorFlow imported)."""
    if "keras" in sys.modules:
        return len(_local_devices()) == 1
    return "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")


def _graph_model(route: GraphRoute, config):
    """``(model name, preprocessing, devices, backend, precision)`` of a model on its cached
    graph: one device, no Keras backend, float32; a head of another size than ImageNet-1k's
    is refused (before any image is read)."""
    if route.num_classes != registry.NUM_CLASSES_1K:
        _not_1k(route.num_classes)
    config = preprocess.as_config(config or route.name)
    route.runner(config.resolution, config.resolution)  # built and cached on the first call
    return route.name, config, ["default"], None, "fp32"


def _not_1k(classes: int):
    raise ValueError(
        f"eval measures ImageNet-1k accuracy, but the model has {classes} classes; "
        "use a 1k model (for the 21k-pre-trained ones: convnext_*_21k_1k_*)."
    )


def _keras_model(model, weights, config, precision, engine, engine_precision, calibration, devices):
    """``(run_batch, engine, model name, preprocessing, precision)`` of a model loaded into
    Keras (inside the data-parallel scope): the engine ``inference_function`` picks on one
    device, else Keras replicated over ``devices``."""
    import keras

    from convnext_keras.engines import quantization, runners
    from convnext_keras.nets.convnext import precision_of
    from convnext_keras.tasks.predict import load_classifier

    keras_model, config = load_classifier(
        model, weights=weights, config=config, precision=precision
    )
    classes = int(keras_model.output_shape[-1])
    if classes != registry.NUM_CLASSES_1K:
        _not_1k(classes)
    run_batch, engine_used = (
        runners.inference_function(
            keras_model,
            engine,
            precision=engine_precision,
            calibration=(
                quantization.calibration_images(calibration, config) if engine_precision else None
            ),
        )
        if len(devices) == 1
        else (None, "keras")
    )
    if engine_used == "keras":
        # uint8 crops go to the device and are normalised there: 4x fewer bytes to move,
        # and no float pass over every batch on the host.
        runner = preprocess.with_normalization(keras_model, config.resolution)
        if len(devices) > 1 and keras.backend.backend() == "tensorflow":
            # predict_on_batch would run the whole batch on every replica; predict()
            # splits it over the MirroredStrategy's replicas.
            def run_batch(images):
                return runner.predict(images, batch_size=len(images), verbose=0)

        else:
            run_batch = runner.predict_on_batch
    precision_used = engine_precision or precision_of(keras_model)
    return run_batch, engine_used, keras_model.name, config, precision_used


def _predict(run_batch, images: np.ndarray, call_size: int) -> np.ndarray:
    """Logits of ``images``, run as a batch of ``call_size`` (padded, then trimmed)."""
    n = len(images)
    pad = call_size - n
    if pad:
        images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
    return np.asarray(run_batch(images), dtype=np.float32)[:n]


def _top5(logits: np.ndarray) -> np.ndarray:
    """Indices of the 5 largest logits per row, largest first, ties to the lower index (as a
    stable full sort; much faster on 1000 classes)."""
    neg = -logits
    fifth = np.partition(neg, 4, axis=1)[:, 4:5]
    out = np.empty((len(logits), 5), np.int64)
    for row, (values, limit) in enumerate(zip(neg, fifth)):
        candidates = np.flatnonzero(values <= limit)  # the top 5 and anything tied with #5
        order = np.lexsort((candidates, values[candidates]))[:5]
        out[row] = candidates[order]
    return out


def _real_targets(dataset: EvalSet) -> list[tuple[int, ...]]:
    real = labels_mod.imagenet_real()
    out = []
    for p in dataset.paths:
        m = _VAL_NUMBER.search(p.name)
        if not m or not 1 <= int(m.group(1)) <= len(real):
            raise ValueError(
                f"ImageNet-ReaL labels are indexed by the validation file number; {p.name} "
                "has none (expected ILSVRC2012_val_<8 digits>.JPEG)."
            )
        out.append(real[int(m.group(1)) - 1])
    return out


def _result(
    model_name, data, dataset, top5, done, real_labels, unreadable, config, timing
) -> EvalResult:
    names = labels_mod.imagenet_1k()
    targets = dataset.targets
    hit1 = top5[:, 0] == targets
    hit5 = (top5 == targets[:, None]).any(axis=1)
    n = int(done.sum())
    per_class = {}
    for c in np.unique(targets[done]):
        mask = done & (targets == c)
        per_class[names.wnids[c]] = {
            "name": names.names[c],
            "images": int(mask.sum()),
            "acc1": float(100 * hit1[mask].mean()),
            "acc5": float(100 * hit5[mask].mean()),
        }
    real_acc1 = None
    if real_labels is not None:
        scored = [i for i in np.flatnonzero(done) if real_labels[i]]
        if scored:
            real_acc1 = float(100 * np.mean([top5[i, 0] in real_labels[i] for i in scored]))
    predictions = [
        {"file": str(dataset.paths[i]), "label": int(targets[i]), "top5": top5[i].tolist()}
        for i in np.flatnonzero(done)
    ]
    seconds, model_seconds = timing["seconds"], timing["model_seconds"]
    return EvalResult(
        model=model_name,
        data=data,
        layout=dataset.layout,
        acc1=float(100 * hit1[done].mean()) if n else 0.0,
        acc5=float(100 * hit5[done].mean()) if n else 0.0,
        evaluated=n,
        seconds=seconds,
        images_per_s=n / seconds if seconds > 0 else 0.0,
        preprocess_images_per_s=timing["preprocess_images_per_s"],
        model_images_per_s=timing["model_images"] / model_seconds if model_seconds > 0 else 0.0,
        first_call_seconds=timing["first_call_seconds"],
        devices=timing["devices"],
        per_class=per_class,
        unreadable=unreadable,
        predictions=predictions,
        real_acc1=real_acc1,
        config=config,
    )
