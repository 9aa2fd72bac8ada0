"""Export ConvNeXt models as TF-Hub-style SavedModels, ONNX, TFLite and ``.keras`` - each verified.

    import convnext_keras as ck
    ck.export("convnext_tiny_1k_224_fe", "exports/convnext_tiny_1k_224_fe")   # SavedModel
    ck.export(model, "exports/model.onnx", format="onnx")

Every export is written into a temporary directory beside its destination, reloaded with the
runtime a user would load it with (``tf.saved_model.load``, onnxruntime, the TFLite interpreter,
``keras.saving.load_model``) and compared with the Keras model on random inputs.  Only an export
within tolerance (``TOLERANCE``) is moved to the destination; a failed one raises
:class:`VerificationError` with the measured difference and leaves nothing behind.

The SavedModel is a TF-Hub *reusable SavedModel*: its root object is callable as
``obj(images, training=False)`` and carries ``variables``, ``trainable_variables`` and
``regularization_losses``, so ``hub.KerasLayer(path, trainable=True)`` can fine-tune it; its
``serving_default`` signature takes ``images`` (float32 ``[batch, H, W, 3]``) and returns
``logits`` (classifiers) or ``features`` (``_fe`` feature extractors) for TF Serving.

The ONNX file of a ConvNeXt built by this library (any head, fixed or dynamic size) is written
straight from its weights by :func:`convnext_keras.engines.onnx_graph.build_onnx_graph` - the
graph the CPU inference engine runs, on every backend, without TensorFlow; a model with layers
of its own goes through tf2onnx instead.  TensorFlow is imported only inside the functions that
need it. SavedModel, TFLite (and tf2onnx) are written with the TensorFlow backend; under JAX or
PyTorch the model is handed (as a ``.keras`` file) to a TensorFlow-backend subprocess, which
exports it and verifies the export against the outputs of the caller's own model.  ``.keras``
export works on every backend in-process.

This module is what a caller uses: the formats and their paths, the staging of every write
(temp directory, then rename), :func:`export` and :func:`export_named`.  The plan, the errors and
the result are :mod:`~convnext_keras.export.planning`'s; the formats are written by
:mod:`~convnext_keras.export.writers`, checked by :mod:`~convnext_keras.export.verify`, and
written under another backend by :mod:`~convnext_keras.export.tf_subprocess`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

from convnext_keras import registry
from convnext_keras.export import planning, tf_subprocess, verify, writers
from convnext_keras.export.planning import ExportError, ExportResult, VerificationError
from convnext_keras.export.tf_subprocess import hub_finetune_check
from convnext_keras.interface import fix
from convnext_keras.weights.cache import temporary_dir

__all__ = [
    "FORMATS",
    "TOLERANCE",
    "ExportError",
    "ExportResult",
    "VerificationError",
    "canonical_format",
    "default_path",
    "export",
    "export_named",
    "hub_finetune_check",
    "staged",
]

#: Export formats and the file suffix each writes (a SavedModel is a directory).
FORMATS = {"savedmodel": "", "onnx": ".onnx", "tflite": ".tflite", "keras": ".keras"}
_ALIASES = {
    "saved_model": "savedmodel",
    "tf_saved_model": "savedmodel",
    "tf": "savedmodel",
    "litert": "tflite",
    "lite": "tflite",
}
#: Largest max |export - Keras| accepted on float32 inputs, per format.
TOLERANCE = {"savedmodel": 1e-4, "onnx": 1e-4, "tflite": 1e-3, "keras": 1e-4}


# ----------------------------------------------------------------------------------------------
# Argument checking and paths


def canonical_format(format: str) -> str:
    """``"SavedModel"``, ``"tf_saved_model"``, ``"litert"``... -> a key of :data:`FORMATS`."""
    key = str(format).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    return key


def default_path(name: str, directory: str | os.PathLike, format: str = "savedmodel") -> Path:
    """Where ``convnext export NAME --out DIRECTORY`` writes: ``DIRECTORY/NAME[.suffix]``, NAME
    in the registry's spelling (``convnextv2_base_22k_224`` -> ``convnextv2_base_21k_1k_224``)."""
    fmt = canonical_format(format)
    try:
        key = registry.resolve(name).name
    except registry.UnknownModelError:
        key = registry.canonical_name(name)
    return Path(directory) / (key + FORMATS[fmt])


def _check_path(path: Path, fmt: str, overwrite: bool) -> None:
    suffix = FORMATS[fmt]
    if suffix and path.suffix != suffix:
        raise ValueError(f"A {fmt} export is a file ending in {suffix}; got {path}.")
    if not suffix and path.suffix in {s for s in FORMATS.values() if s}:
        raise ValueError(
            f"A SavedModel export is a directory; {path} ends in {path.suffix}, which is the "
            f"suffix of another format. Pick a directory name, or format="
            f"{[f for f, s in FORMATS.items() if s == path.suffix][0]!r}."
        )
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists; pass {fix('overwrite=True', '--overwrite')} to replace it."
        )


def _replace(src: Path, dest: Path) -> None:
    """Move ``src`` onto ``dest`` (file or directory); the old ``dest`` survives any failure."""
    if not dest.exists() and not dest.is_symlink():
        os.replace(src, dest)
        return
    if src.is_file() and dest.is_file():
        os.replace(src, dest)
        return
    aside = src.with_name(src.name + ".old")
    os.replace(dest, aside)
    try:
        os.replace(src, dest)
    except BaseException:
        os.replace(aside, dest)
        raise
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


@contextlib.contextmanager
def staged(dest: str | os.PathLike, overwrite: bool = False, companion: str | None = None):
    """Yield a path inside a temp directory beside ``dest``; move it onto ``dest`` on success.

    Works for files and directories.  The temp directory (``.NAME.XXXX.part``, the library's
    one temporary name: :func:`convnext_keras.weights.cache.temporary_dir`) is removed in
    every case, so a failure leaves neither a partial export nor a stray folder (one a
    ``kill -9`` left is removed by the next export into the folder), and an existing
    ``dest`` is only replaced (``overwrite=True``) by a complete one.  A failed write - a full
    disk (also TensorFlow's ``ResourceExhaustedError`` while writing variables), a read-only or
    forbidden folder - raises :class:`convnext_keras.errors.WriteError` naming ``dest``.

    ``companion``: the suffix of a file that belongs to ``dest`` (ONNX's external data:
    ``".data"``, ``NAME.onnx.data``).  Written beside the yielded path, it is moved before
    ``dest`` (a reader never finds ``dest`` without it); an old one that the new export does
    not have is removed.
    """
    from convnext_keras.errors import writing

    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(
            f"{dest} exists; pass {fix('overwrite=True', '--overwrite')} to replace it."
        )
    with writing(dest, "the export"), temporary_dir(dest) as tmp:
        yield tmp / dest.name
        if companion:
            side = dest.with_name(dest.name + companion)
            if (tmp / side.name).exists():
                _replace(tmp / side.name, side)
            elif side.is_file():
                side.unlink()
        _replace(tmp / dest.name, dest)


# ----------------------------------------------------------------------------------------------
# The entry point


def export(
    model,
    path: str | os.PathLike,
    format: str = "savedmodel",
    *,
    weights="official",
    image_size: int | None = None,
    dynamic_size: bool | None = None,
    include_preprocessing: bool = False,
    overwrite: bool = False,
    verify_batch: int = 2,
    seed: int = 0,
    _transfer: tuple | None = None,
    _source: str | None = None,
) -> ExportResult:
    """Export ``model`` to ``path`` in ``format``, verified against the Keras model.

    Args:
        model: a ``keras.Model`` (e.g. from :func:`convnext_keras.load_model`) or a model
            name; a name is loaded with ``weights`` (``"official"`` when not given).
        path: destination; a directory for ``"savedmodel"``, a ``.onnx`` / ``.tflite`` /
            ``.keras`` file otherwise.  :func:`default_path` gives ``DIR/NAME[.suffix]``.
        format: ``"savedmodel"`` (TF-Hub-style reusable SavedModel with a
            ``serving_default`` signature), ``"onnx"`` (opset 17, dynamic batch), ``"tflite"``
            (float32) or ``"keras"``.
        weights: for a model name: ``"official"`` (default), ``None`` (random
            initialisation) or a checkpoint file in any layout the core reads.
        image_size: spatial size of the exported input.  Default: the model's static input
            size, else the registry resolution of its name (224 for architecture names).
        dynamic_size: export height and width as dynamic (savedmodel, onnx, keras); checked at
            two sizes.  Default (None): dynamic for segmentation models (per-pixel logits at
            the input's size; ``image_size`` is then the size verified first), else fixed.
        include_preprocessing: savedmodel / keras only: the export takes uint8 RGB images of
            any size and does the official crop, resize and ImageNet normalisation itself.
        overwrite: replace an existing ``path`` (only once the new export is verified).
        verify_batch: batch size of the random verification inputs (>= 2 also proves the
            dynamic batch axis).
        seed: seed of the random verification inputs.

    Returns:
        An :class:`ExportResult` with the path and the measured differences.

    Raises:
        ValueError: unknown format or bad option; FileExistsError: ``path`` exists;
        VerificationError: the reloaded export differs from Keras by more than ``TOLERANCE``.
    """
    fmt = canonical_format(format)
    path = Path(path)
    _check_path(path, fmt, overwrite)
    writers.check_dependencies(fmt)
    source = _source
    if isinstance(model, str):
        from convnext_keras.api import load_model

        source = writers._describe_weights(model, weights)
        model = load_model(model, weights=weights)
    elif weights != "official":
        raise ValueError(
            "weights= applies to model names only; a keras.Model is exported with the weights "
            "it has (load them with convnext_keras.load_model(name, weights=...))."
        )
    planning._check_model(model)
    plan = planning._plan(
        model, fmt, image_size, dynamic_size, include_preprocessing, verify_batch, seed
    )

    import keras

    # ONNX of a ConvNeXt or UperNet built by this library: the graph is written from the
    # weights (no TensorFlow, any backend); tf2onnx only for models with layers of their own.
    direct_onnx = fmt == "onnx" and writers._onnx_graph_builder(model) is not None
    if plan.detection and fmt != "keras" and keras.backend.backend() != "tensorflow":
        raise ExportError(
            f"A detector's SavedModel is written with the TensorFlow backend (Keras backend "
            f"here: {keras.backend.backend()}): run the export with KERAS_BACKEND=tensorflow, "
            "or export format='keras' on this backend."
        )
    if fmt != "keras" and not direct_onnx and keras.backend.backend() != "tensorflow":
        return tf_subprocess._export_via_tensorflow(model, path, plan, overwrite, source)

    start = time.time()
    checks, worst = [], 0.0
    if _transfer is not None:  # the caller's model, exported from another backend
        x, expected = _transfer
        diff, line = verify._compare(
            f"Keras model in TensorFlow vs the {expected['backend']} original",
            verify._keras_outputs(model, x, plan.outputs),
            {k: v for k, v in expected.items() if k != "backend"},
            x,
            TOLERANCE["keras"],
        )
        checks, worst = [line], diff
    exported = writers._with_preprocessing(model, plan) if plan.preprocessing else model
    inputs = plan.inputs()
    expected = [verify._keras_outputs(exported, x, plan.outputs) for x in inputs]
    with staged(path, overwrite, ".data" if fmt == "onnx" else None) as tmp:
        if fmt == "savedmodel":
            writers._write_savedmodel(exported, tmp, plan, writers._metadata(model, plan, source))
        elif direct_onnx:
            writers._write_onnx_graph(exported, tmp, plan)
        elif fmt == "onnx":
            writers._write_onnx(exported, tmp, plan)
        elif fmt == "tflite":
            writers._write_tflite(exported, tmp, plan)
        else:
            exported.save(tmp)
        diff, lines = verify._verify(tmp, plan, inputs, expected, TOLERANCE[fmt])
    return ExportResult(
        path=path,
        format=fmt,
        input_shape=plan.input_shape,
        input_dtype=plan.input_dtype,
        outputs=plan.outputs,
        max_abs_diff=max(worst, diff),
        tolerance=TOLERANCE[fmt],
        checks=checks + lines,
        seconds=round(time.time() - start, 1),
    )


def check_named(
    name: str, out_dir, formats, *, overwrite: bool = False, check_hub: bool = False
) -> tuple[list[str], list[Path]]:
    """What :func:`export_named` checks before it loads anything: the name, each format (and
    the extras it needs: ``pip install "convnext-keras[export]"``) and each path (an existing
    export needs ``overwrite``).  Returns ``(formats, paths)``.  Keras-free: the command line
    runs it before a backend loads."""
    resolved = registry.resolve(name)  # an unknown name, with the close ones
    fmts = [canonical_format(f) for f in formats]
    if resolved.head == "detection":
        for fmt in fmts:
            if fmt not in planning.DETECTION_FORMATS:
                raise ValueError(planning.detection_refusal(fmt))
    paths = [default_path(name, out_dir, f) for f in fmts]
    for fmt, path in zip(fmts, paths):
        _check_path(path, fmt, overwrite)
        writers.check_dependencies(fmt, check_hub=check_hub)
    return fmts, paths


def export_named(
    name: str,
    out_dir: str | os.PathLike,
    formats=("savedmodel",),
    *,
    weights="official",
    overwrite: bool = False,
    check_hub: bool = False,
    **options,
) -> list[ExportResult]:
    """Export model ``name`` in each of ``formats`` to ``out_dir`` (what ``convnext export`` does).

    Paths are :func:`default_path` (``OUT/NAME`` for a SavedModel, ``OUT/NAME.onnx`` ...); all
    of them are checked before the model is loaded.  ``check_hub`` also runs
    :func:`hub_finetune_check` on each SavedModel.  ``options`` go to :func:`export`.
    """
    from convnext_keras.api import load_model

    fmts, paths = check_named(name, out_dir, formats, overwrite=overwrite, check_hub=check_hub)
    model = load_model(name, weights=weights)
    source = writers._describe_weights(name, weights)
    results = []
    for fmt, path in zip(fmts, paths):
        result = export(model, path, fmt, overwrite=overwrite, _source=source, **options)
        result.random_weights = weights is None
        if check_hub and fmt == "savedmodel":
            result.hub_check = hub_finetune_check(path)
        results.append(result)
    return results
