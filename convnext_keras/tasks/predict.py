"""Classify image files: official preprocessing, softmax, top-k ImageNet labels, Grad-CAM.

import convnext_keras as ck
results = ck.predict_files("convnext_tiny_1k_224", ["cat.jpg"], top=5)
ck.decode_predictions(logits, top=5)   # works for 1k and 21k heads
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from convnext_keras import preprocess
from convnext_keras.data import labels as labels_mod
from convnext_keras.interface import fix
from convnext_keras.tasks.graph_route import graph_route


class Prediction(NamedTuple):
    """One ranked class; unpacks like Keras' ``(wnid, name, score)`` for the first three."""

    wnid: str
    name: str
    probability: float
    index: int


def softmax(logits, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64, returned as float32."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def _as_labels(labels, num_classes: int) -> labels_mod.Labels:
    if labels is None:
        return labels_mod.for_num_classes(num_classes)
    if not isinstance(labels, labels_mod.Labels):
        names = [str(n) for n in labels]
        labels = labels_mod.Labels("custom", tuple("" for _ in names), tuple(names))
    if len(labels) != num_classes:
        raise ValueError(
            f"The model has {num_classes} classes but {len(labels)} labels were given."
        )
    return labels


def decode_predictions(
    logits, top: int = 5, *, labels=None, from_logits: bool = True
) -> list[list[Prediction]]:
    """Top-``top`` classes of each row of ``logits`` (``(n, classes)`` or ``(classes,)``).

    Probabilities are the softmax of the logits (pass ``from_logits=False`` for probabilities).
    The label list follows the head size: 1000 -> ImageNet-1k, 21841 -> ImageNet-21k; other
    heads need ``labels`` (a list of class names or a :class:`labels.Labels`).
    """
    scores = np.asarray(logits, dtype=np.float32)
    if scores.ndim == 1:
        scores = scores[None]
    if scores.ndim != 2:
        raise ValueError(f"Expected logits of shape (batch, classes), got {scores.shape}.")
    bad = np.flatnonzero(~np.isfinite(scores).all(axis=1))
    if bad.size:
        raise ValueError(
            f"Rows {bad[:10].tolist()} of the logits hold NaN or infinity: there is no ranking to "
            "decode (the model's weights or inputs are broken)."
        )
    if not isinstance(top, (int, np.integer)) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}.")
    names = _as_labels(labels, scores.shape[1])
    probs = softmax(scores) if from_logits else scores
    k = min(int(top), scores.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [Prediction(names.wnids[i], names.names[i], float(p[i]), int(i)) for i in row]
        for p, row in zip(probs, order)
    ]


def with_precision(model, precision: str):
    """``model`` computing in ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``): the model
    itself when its layers already have that dtype policy, else a copy whose layers have it
    (``nets.convnext.FLOAT32_LAYERS`` stay float32, as :func:`build_model` makes them), with the
    same weights.  For ``.keras`` files and model objects; names take ``precision`` in
    :func:`convnext_keras.load_model` directly."""
    import keras

    from convnext_keras.nets.convnext import FLOAT32_LAYERS, policy_name

    policy = policy_name(precision)

    def wanted(layer) -> str:  # as build_model would make it under ``policy``
        return "float32" if layer.name in FLOAT32_LAYERS else policy

    if all(layer.dtype_policy.name == wanted(layer) for layer in model.layers if layer.weights):
        return model

    def clone(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = wanted(layer)
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def random_weights(model, weights) -> bool:
    """True when ``model`` is a name loaded with ``weights=None``: a randomly initialised
    network, whose answers mean nothing (``convnext ... --weights none`` says so on every
    result)."""
    return weights is None and isinstance(model, (str, os.PathLike)) and not _is_keras_file(model)


def _is_keras_file(model) -> bool:
    return isinstance(model, (str, os.PathLike)) and str(model).endswith(".keras")


def labels_beside(path: str | os.PathLike) -> list[str] | None:
    """Class names from ``labels.txt`` beside a ``.keras`` file (a fine-tuning run's
    ``best.keras`` / ``last.keras``), one per line; None when there is none."""
    file = Path(path).with_name("labels.txt")
    if not file.is_file():
        return None
    text = file.read_text(encoding="utf-8", errors="surrogateescape")
    names = [line.strip() for line in text.splitlines()]
    return [n for n in names if n] or None


def load_classifier(model, *, weights="official", config=None, precision: str | None = None):
    """``(keras_model, preprocess_config)`` from a model name, a ``.keras`` file or a model.

    Names load via :func:`convnext_keras.load_model` (``weights="official"`` downloads; a path
    loads a local checkpoint; None: random weights drawn after
    ``keras.utils.set_random_seed(0)``, as ``embed`` draws them, so every run gives the same
    answers).  A ``.keras`` file or a model object takes ``config`` (default: 224 / 0.875 /
    bicubic, the original's evaluation settings).  ``precision``: None (names
    follow the global Keras dtype policy; files and objects stay as they are), ``"fp32"``, or
    Keras mixed precision ``"bf16"`` / ``"fp16"`` (float32 logits; these run on Keras, not
    onnxruntime) - see :func:`with_precision`; ``"int8"`` gives the float32 model (the engine
    quantizes it: :func:`convnext_keras.engines.runners.inference_function`).
    """
    import keras

    from convnext_keras import api
    from convnext_keras.engines import runners

    # A bad value fails before any download.
    precision = runners.split_precision(precision)[0]

    def converted(m):
        return m if precision is None else with_precision(m, precision)

    if _is_keras_file(model):
        loaded = converted(api.load_keras_file(model, compile=True))
        return loaded, preprocess.as_config(config or "convnext_tiny")
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        api.classifier_row(name)  # a segmentation model, a feature extractor: say so
        if weights is None:  # random weights, seeded (as embed's): the same answers every run
            keras.utils.set_random_seed(0)
        # load_model gets the weights (download, or fail) before it builds the network.
        loaded = api.load_model(name, weights=weights, precision=precision)
        return loaded, preprocess.as_config(config or name)
    if isinstance(model, keras.Model):
        return converted(model), preprocess.as_config(config or "convnext_tiny")
    raise ValueError(f"Expected a model name, a .keras file or a keras.Model, got {model!r}.")


def file_or_object(model, settings, eval_of, task: str, needs: str):
    """``(keras.Model, test settings)`` of a ``.keras`` file or a model object given to a task
    (segmentation, detection): ``settings`` as given, else ``eval_of(model.name)`` - the test
    settings of the registry row the model is named after.

    Raises ``ValueError`` for anything but a file or a model, and for a model named after no
    ``task`` checkpoint without ``settings`` (``needs``: what the settings give)."""
    import keras

    from convnext_keras import api, registry

    if isinstance(model, (str, os.PathLike)):
        model = api.load_keras_file(model)
    if not isinstance(model, keras.Model):
        raise ValueError(f"Expected a model name, a .keras file or a keras.Model, got {model!r}.")
    if settings is None:
        try:
            settings = eval_of(model.name)
        except (ValueError, registry.UnknownModelError):
            raise ValueError(
                f"Model {model.name!r} is not named after a {task} checkpoint: pass its test "
                f"settings ({fix('settings=NAME', '--settings NAME')}, the registry name whose "
                f"{needs} to use)."
            ) from None
    return model, settings


@dataclasses.dataclass
class ImageResult:
    """What happened to one input file."""

    path: str
    predictions: list[Prediction] | None = None
    error: str | None = None
    cam_path: str | None = None
    #: The model was a name loaded with ``weights=None``: the predictions mean nothing.
    random_weights: bool = False
    #: What computed the logits: ``"openvino"``, ``"onnxruntime"`` or ``"keras"``.
    engine: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        out: dict = {"file": self.path, "random_weights": self.random_weights}
        if self.engine is not None:
            out["engine"] = self.engine
        if self.error is not None:
            out["error"] = self.error
        else:
            out["predictions"] = [
                {"rank": r + 1, "index": p.index, "wnid": p.wnid, "label": p.name,
                 "probability": p.probability}
                for r, p in enumerate(self.predictions or [])
            ]  # fmt: skip
            if self.cam_path:
                out["cam"] = self.cam_path
        return out


def _cam_names(paths: Sequence[Path], out_dir: Path, ending: str = "_cam.png") -> list[Path]:
    """``<stem><ending>`` per input; inputs sharing a stem get ``_2``, ``_3``... suffixes."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        stem = p.stem
        seen[stem] = seen.get(stem, 0) + 1
        suffix = "" if seen[stem] == 1 else f"_{seen[stem]}"
        names.append(out_dir / f"{stem}{suffix}{ending}")
    return names


def predict_files(
    model,
    paths,
    *,
    weights="official",
    top: int = 5,
    labels=None,
    batch_size: int = 8,
    cam_dir=None,
    config=None,
    exif_transpose: bool = True,
    precision: str | None = None,
    calibration=None,
) -> list[ImageResult]:
    """Classify image files; unreadable ones (and any whose logits are not finite) come back
    with ``error`` set, never raise.

    Args:
        model: a model name (``"convnext_tiny_1k_224"``), a ``.keras`` file or a keras.Model.
        paths: image files (any format PIL reads).
        weights: for names: ``"official"`` or a local checkpoint file.
        top: classes per image.
        labels: class names for heads that are neither 1k nor 21k (default for a ``.keras``
            file: ``labels.txt`` beside it, as a fine-tuning run writes it).
        cam_dir: write a Grad-CAM overlay ``<stem>_cam.png`` of each image's top class here.
        config: preprocessing settings (default: the model name's registry entry).
        exif_transpose: turn photos upright by their EXIF orientation first (default True).
        precision: ``"fp32"`` (OpenVINO or onnxruntime on a CPU), or Keras mixed precision
            ``"bf16"`` / ``"fp16"`` (on Keras: faster on GPUs, slower on CPUs without native
            bfloat16; logits within bf16 rounding of float32's), or ``"int8"`` (opt-in:
            onnxruntime on the CPU with the model quantized to int8, see
            :func:`convnext_keras.engines.quantization.quantize_int8`; Grad-CAM stays float32).
            None (default): as :func:`load_classifier` - the global Keras policy for names, a model
            as it is.
        calibration: ``"int8"`` only: the photos that calibrate the quantization (a folder,
            files; read through ``config``'s transform); default: the sample photos of
            scikit-image and scikit-learn
            (:func:`convnext_keras.engines.quantization.sample_photos`).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    paths = [Path(p) for p in paths]
    # A named model with its official weights in float32 runs on its cached graph (no Keras
    # once the graph is cached); Grad-CAM and int8 need the Keras model.
    route = None
    if cam_dir is None and calibration is None:
        route = graph_route(model, weights, head="classifier", precision=precision)
    if route is not None:
        config = preprocess.as_config(config or route.name)
        num_classes = int(route.num_classes)
        # The graph now (built and cached on the first call): a download or conversion error
        # comes before any image is read.
        route.runner(config.resolution, config.resolution)
        run_batch, engine, cam = route, route.engine, None
    else:
        run_batch, engine, config, num_classes, cam = _keras_path(
            model, weights, config, precision, calibration, cam_dir
        )
    if labels is None and _is_keras_file(model):
        labels = labels_beside(model)
        if labels is not None and len(labels) != num_classes:
            raise ValueError(
                f"{Path(model).with_name('labels.txt')} names {len(labels)} classes but the model "
                f"has {num_classes}; pass the right names with "
                f"{fix('labels=[...]', '--labels FILE')}."
            )
    names = _as_labels(labels, num_classes)
    if cam is not None:
        from convnext_keras.tasks.gradcam import overlay, save_png

        cam_dir = Path(cam_dir)
        cam_paths = _cam_names(paths, cam_dir)
    random = random_weights(model, weights)
    results = [ImageResult(str(p), random_weights=random, engine=engine) for p in paths]
    batches = preprocess.ImageBatches(
        paths, config, batch_size, exif_transpose=exif_transpose, skip_errors=True
    )
    for images, indices in batches:
        logits = np.asarray(run_batch(images), dtype=np.float32)
        # A non-finite logit is an error for that image, never a NaN probability.
        finite = np.isfinite(logits).all(axis=1)
        for i in np.asarray(indices)[~finite]:
            results[i].error = (
                f"{results[i].path}: the model returned NaN or infinite logits (its weights are "
                "damaged or the image breaks it); no prediction"
            )
        if not finite.any():
            continue
        images, indices, logits = images[finite], np.asarray(indices)[finite], logits[finite]
        decoded = decode_predictions(logits, top, labels=names)
        for i, preds in zip(indices, decoded):
            results[i].predictions = preds
        if cam is not None:
            maps, _ = cam(images, class_index=np.argmax(logits, axis=-1))
            for i, heat in zip(indices, maps):
                photo = preprocess.load_image(paths[i], exif_transpose=exif_transpose)
                results[i].cam_path = str(save_png(overlay(photo, heat, config), cam_paths[i]))
    by_path = {e.path: str(e) for e in batches.errors}
    for r in results:
        if r.predictions is None and r.error is None:
            r.error = by_path.get(r.path, f"{r.path}: not processed")
    return results


def _keras_path(model, weights, config, precision, calibration, cam_dir):
    """``(run_batch, engine, config, num_classes, GradCAM or None)`` of a model that is loaded
    as a Keras model: the fastest correct engine for it (OpenVINO / onnxruntime on a CPU, else
    Keras; int8 on onnxruntime)."""
    from convnext_keras.engines import quantization, runners
    from convnext_keras.tasks.gradcam import GradCAM

    engine_precision = runners.engine_precision(precision, calibration)
    keras_model, config = load_classifier(
        model, weights=weights, config=config, precision=precision
    )
    num_classes = int(keras_model.output_shape[-1])
    cam = GradCAM(keras_model) if cam_dir is not None else None
    images_for_int8 = (
        quantization.calibration_images(calibration, config) if engine_precision else None
    )
    run_batch, engine = runners.inference_function(
        keras_model, precision=engine_precision, calibration=images_for_int8
    )
    return run_batch, engine, config, num_classes, cam
