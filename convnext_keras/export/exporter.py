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
need it.  SavedModel, TFLite (and tf2onnx) are written with the TensorFlow backend; under JAX or
PyTorch the model is handed (as a ``.keras`` file) to a TensorFlow-backend subprocess, which
exports it and verifies the export against the outputs of the caller's own model.  ``.keras``
export works on every backend in-process."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from convnext_keras import registry
from convnext_keras.interface import fix

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
#: ONNX opset the export targets.
ONNX_OPSET = 17
#: Name of the image input in every signature / graph.
INPUT_NAME = "images"
#: Output names by head (the model's last layer): TF-Hub's classifier and ``_fe`` outputs, and
#: a segmentation model's per-pixel logits.
OUTPUT_NAMES = {"head_fc": "logits", "head_norm": "features", "decode_resize": "logits"}
#: Where a SavedModel export keeps its human-readable metadata (TF Serving ignores the folder).
METADATA_FILE = "assets.extra/convnext_keras.json"

INPUT_CONTRACT = (
    "RGB images, NHWC (batch, height, width, 3), float32, scaled to [0, 1] and then normalised "
    "with the ImageNet mean {mean} and standard deviation {std} per channel."
)
RAW_INPUT_CONTRACT = (
    "RGB images, NHWC (batch, height, width, 3), uint8 in [0, 255], any height and width: "
    "the export does the official evaluation transform itself ({interpolation} resize, "
    "crop_pct {crop_pct}, to {size}x{size}) and normalises with the ImageNet mean/std."
)


class ExportError(RuntimeError):
    """An export that could not be written."""


class VerificationError(ExportError):
    """An export whose outputs differ from the Keras model's by more than the tolerance."""

    def __init__(self, message: str, max_abs_diff: float, tolerance: float):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance


@dataclasses.dataclass
class ExportResult:
    """What was written and how it was verified."""

    path: Path
    format: str
    #: Input shape of the export (None = dynamic), dtype and the output names.
    input_shape: tuple
    input_dtype: str
    outputs: list[str]
    #: Largest |export - Keras model| over every check, and the tolerance it was held to.
    max_abs_diff: float
    tolerance: float
    #: One line per check: which loader, which input shape, the measured difference.
    checks: list[str]
    seconds: float
    #: What :func:`hub_finetune_check` reported, when it was run (SavedModel only).
    hub_check: dict | None = None
    #: A named model exported with ``weights=None``: random initialisation, not a trained model.
    random_weights: bool = False

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ExportResult:
        return cls(**{**d, "path": Path(d["path"]), "input_shape": tuple(d["input_shape"])})


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
def staged(dest: str | os.PathLike, overwrite: bool = False):
    """Yield a path inside a temp directory beside ``dest``; move it onto ``dest`` on success.

    Works for files and directories.  The temp directory (``.NAME.XXXX.part``) is removed in
    every case, so a failure leaves neither a partial export nor a stray folder, and an existing
    ``dest`` is only replaced (``overwrite=True``) by a complete one.  A failed write - a full
    disk (also TensorFlow's ``ResourceExhaustedError`` while writing variables), a read-only or
    forbidden folder - raises :class:`convnext_keras.errors.WriteError` naming ``dest``.
    """
    from convnext_keras.errors import writing

    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(
            f"{dest} exists; pass {fix('overwrite=True', '--overwrite')} to replace it."
        )
    with writing(dest, "the export"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
        try:
            yield tmp / dest.name
            _replace(tmp / dest.name, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _output_names(model) -> list[str]:
    """Names of a model's outputs: ``logits``/``features`` by head, or the dict's keys."""
    if isinstance(model.output, dict):
        return list(model.output)
    if isinstance(model.output, (list, tuple)):
        raise ValueError(
            f"Model {model.name!r} has {len(model.output)} unnamed outputs; export a model with "
            "one output or a dict of named outputs."
        )
    last = model.output._keras_history.operation.name
    if last == "head_norm" and len(model.output.shape) == 4:
        return ["dense"]  # the head LayerNorm at every position (features="dense")
    return [OUTPUT_NAMES.get(last, "output")]


def _check_model(model) -> None:
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(
            f"export() takes a keras.Model or a model name (str), got {type(model).__name__}."
        )
    inputs = model.inputs
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[-1] != 3:
        raise ValueError(
            f"Model {model.name!r} must take one NHWC RGB image input (batch, H, W, 3); its "
            f"inputs are {[tuple(i.shape) for i in inputs]}."
        )
    from convnext_keras.nets.convnext import non_float32_layer

    compute = keras.config.dtype_policy().compute_dtype
    mixed = non_float32_layer(model)
    if mixed or compute != "float32":
        where = f"layer {mixed[0]!r} computes in {mixed[1]}" if mixed else "its layers are float32"
        raise ValueError(
            f"Export a float32 model: in {model.name!r} {where} (global policy {compute}). "
            "Call keras.config.set_dtype_policy('float32') before building or loading it, or "
            "load it with precision='fp32'."
        )


def _default_image_size(model) -> int | None:
    """The model's static input size, else its registry resolution, else None."""
    h, w = model.inputs[0].shape[1:3]
    if h is not None and w is not None:
        if h != w:
            raise ValueError(
                f"Model {model.name!r} has a non-square input {h}x{w}; pass "
                f"{fix('image_size=N', '--image-size N')} to export it at a square size."
            )
        return int(h)
    try:
        resolved = registry.resolve(model.name)
    except registry.UnknownModelError:
        return None
    return resolved.resolution


def _eval_config(model_name: str, image_size: int):
    """The official evaluation transform of ``model_name``, at ``image_size``."""
    from convnext_keras import preprocess

    try:
        config = preprocess.config_for(model_name)
    except registry.UnknownModelError:
        config = preprocess.PreprocessConfig(
            image_size, preprocess.DEFAULT_CROP_PCT, preprocess.DEFAULT_INTERPOLATION
        )
    return config._replace(resolution=image_size)


@dataclasses.dataclass
class _Plan:
    """Everything decided before writing: shapes, names, the contract."""

    fmt: str
    image_size: int | None
    dynamic_size: bool
    preprocessing: bool
    #: The official evaluation transform at ``image_size`` (resolution, crop_pct, interpolation).
    transform: tuple
    outputs: list[str]
    verify_batch: int
    seed: int

    @property
    def input_shape(self) -> tuple:
        side = None if (self.dynamic_size or self.preprocessing) else self.image_size
        return (None, side, side, 3)

    @property
    def input_dtype(self) -> str:
        return "uint8" if self.preprocessing else "float32"

    def contract(self) -> str:
        if self.preprocessing:
            return RAW_INPUT_CONTRACT.format(
                interpolation=self.transform.interpolation,
                crop_pct=self.transform.crop_pct,
                size=self.image_size,
            )
        return INPUT_CONTRACT.format(mean=registry.IMAGENET_MEAN, std=registry.IMAGENET_STD)

    def check_sizes(self) -> list[tuple[int, int]]:
        """Spatial sizes verified: the export's size, plus another when it is dynamic."""
        if self.preprocessing:  # raw images of arbitrary size: one portrait, one landscape
            return [(self.image_size + 45, self.image_size + 13), (self.image_size - 21, 300)]
        if self.dynamic_size:
            return [(self.image_size, self.image_size), (self.image_size + 32, self.image_size)]
        return [(self.image_size, self.image_size)]

    def inputs(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        shapes = [(self.verify_batch, h, w, 3) for h, w in self.check_sizes()]
        if self.preprocessing:
            return [rng.integers(0, 256, s).astype("uint8") for s in shapes]
        return [rng.standard_normal(s).astype("float32") for s in shapes]


def _segmentation(model) -> bool:
    """Whether ``model`` is a UperNet (convnext_keras.nets.upernet): per-pixel logits."""
    return any(layer.name == "decode_conv_seg" for layer in model.layers)


def _plan(model, fmt, image_size, dynamic_size, include_preprocessing, verify_batch, seed):
    if _segmentation(model) and fmt == "tflite":
        # TFLite's converter writes the UperNet graph with tensors it then cannot allocate
        # ("BytesRequired number of elements overflowed"), at 512 and at 64 pixels.
        raise ValueError(
            "TFLite export of a segmentation model is not supported (TFLite's converter "
            "breaks the UperNet graph): export it as savedmodel or onnx."
        )
    if dynamic_size is None:  # segmentation models take images of any size
        dynamic_size = _segmentation(model)
    if include_preprocessing and _segmentation(model):
        raise ValueError(
            f"{fix('include_preprocessing', '--include-preprocessing')} is for classifiers: a "
            "segmentation model's test-time procedure (keep-ratio resize, sliding windows, "
            "resize back) runs around the model (convnext_keras.tasks.segment); its export takes "
            "normalised float32 images of any size and returns per-pixel logits."
        )
    if image_size is None:
        image_size = _default_image_size(model)
    if image_size is None:
        raise ValueError(
            f"Cannot tell the image size of {model.name!r} (its input is dynamic and its name "
            f"is not in the registry); pass {fix('image_size=N', '--image-size N')}."
        )
    from convnext_keras.nets.convnext import variant_of

    spec = variant_of(model)
    minimum = spec.min_input_size if spec is not None else registry.MIN_INPUT_SIZE
    if not isinstance(image_size, int) or image_size < minimum:
        raise ValueError(f"image_size must be an integer >= {minimum}, got {image_size!r}.")
    static = model.inputs[0].shape[1:3]
    if None not in static and tuple(static) != (image_size, image_size):
        raise ValueError(
            f"Model {model.name!r} takes {static[0]}x{static[1]} images; it cannot be exported "
            f"at image_size={image_size}. Build it with input_shape=(None, None, 3) instead."
        )
    if include_preprocessing and fmt not in ("savedmodel", "keras"):
        raise ValueError(
            f"{fix('include_preprocessing', '--include-preprocessing')} is available for "
            f"savedmodel and keras exports, not {fmt}: feed {fmt} models normalised float32 images."
        )
    if dynamic_size and fmt == "tflite":
        raise ValueError(
            "TFLite exports need a fixed image size: drop "
            f"{fix('dynamic_size', '--dynamic-size')} and choose one with "
            f"{fix('image_size=N', '--image-size N')}."
        )
    if not isinstance(verify_batch, int) or verify_batch < 1:
        raise ValueError(f"verify_batch must be a positive integer, got {verify_batch!r}.")
    return _Plan(
        fmt,
        image_size,
        bool(dynamic_size),
        bool(include_preprocessing),
        _eval_config(model.name, image_size),
        _output_names(model),
        verify_batch,
        seed,
    )


# ----------------------------------------------------------------------------------------------
# The Keras model that is exported


def _with_preprocessing(model, plan: _Plan):
    """uint8 RGB images of any size -> the official eval resize/crop + normalisation -> model.

    The preprocessing is :class:`convnext_keras.preprocess.EvalPreprocessing` (Keras ops,
    antialiased resize; close to, not bit-equal with, the PIL pipeline).
    """
    import keras

    from convnext_keras import preprocess

    inputs = keras.Input((None, None, 3), dtype="uint8", name=INPUT_NAME)
    x = preprocess.preprocessing_layer(plan.transform, name="preprocess")(inputs)
    return keras.Model(inputs, model(x), name=model.name)


def _keras_outputs(model, x, names) -> dict[str, np.ndarray]:
    import keras

    out = model(x, training=False)
    if not isinstance(out, dict):
        out = {names[0]: out}
    return {k: np.asarray(keras.ops.convert_to_numpy(v)) for k, v in out.items()}


def _max_diff(got: dict, expected: dict) -> float:
    if set(got) != set(expected):
        raise ExportError(f"Export outputs {sorted(got)} instead of {sorted(expected)}.")
    worst = 0.0
    for k, v in expected.items():
        g = np.asarray(got[k])
        if g.shape != v.shape:
            raise ExportError(f"Export output {k!r} has shape {g.shape}, expected {v.shape}.")
        worst = max(worst, float(np.max(np.abs(g.astype(np.float64) - v.astype(np.float64)))))
    return worst


# ----------------------------------------------------------------------------------------------
# Writers (TensorFlow backend)


def _tensor_spec(plan: _Plan):
    import tensorflow as tf

    return tf.TensorSpec(plan.input_shape, tf.as_dtype(plan.input_dtype), name=INPUT_NAME)


def _describe_weights(name: str, weights) -> str:
    """Provenance of a named model's weights, for the metadata and model cards."""
    if weights is None:
        return "random initialisation"
    if isinstance(weights, str) and weights == "official":
        ckpt = registry.resolve(name).checkpoint
        return ckpt.url if ckpt else "official"
    return str(Path(weights).expanduser())


def _metadata(model, plan: _Plan, source: str | None) -> dict:
    import keras

    from convnext_keras import __version__

    try:
        resolved = registry.resolve(model.name)
    except registry.UnknownModelError:
        resolved = None
    ckpt = resolved.checkpoint if resolved else None
    # A model name the registry does not know is a ConvNeXt built by this library (the only
    # models exported); its family defaults to ConvNeXt's.  A checkpoint's own family (DINOv3,
    # timm) comes before its architecture's.
    family_name = ckpt.family if ckpt else resolved.variant.family if resolved else "convnext"
    family = registry.FAMILIES[family_name]
    return {
        "model": model.name,
        "outputs": plan.outputs,
        "input": {
            "name": INPUT_NAME,
            "dtype": plan.input_dtype,
            "shape": list(plan.input_shape),
            "layout": "NHWC",
            "channels": "RGB",
            "resolution": plan.image_size,
            "contract": plan.contract(),
            "mean": list(registry.IMAGENET_MEAN),
            "std": list(registry.IMAGENET_STD),
            "preprocessing_included": plan.preprocessing,
        },
        "dataset": ckpt.dataset if ckpt else None,
        "reported_acc1": ckpt.reported_acc1 if ckpt else None,
        "task": "segmentation" if _segmentation(model) else "classification",
        "reported_miou": ckpt.segmentation.reported_miou if ckpt and ckpt.segmentation else None,
        "weights": source,
        "family": family.name,
        # The official weights' licence (None: other weights, whose licence is their owner's).
        "licence": ckpt.licence if ckpt and source == ckpt.url else None,
        "references": [family.paper, family.original],
        "convnext_keras": __version__,
        "keras": keras.__version__,
    }


def _save_context(options):
    """Trace inside TensorFlow's save context, so that saving reuses the traces.

    ``tf.saved_model.save`` retraces every function traced outside it (the variable policy is
    part of the trace key), which doubles the export time of a ConvNeXt.  The context manager
    is TensorFlow-internal; without it the export is the same, only slower.
    """
    try:
        from tensorflow.python.saved_model import save_context

        return save_context.save_context(options)
    except (ImportError, AttributeError):
        return contextlib.nullcontext()


def _write_savedmodel(model, path: Path, plan: _Plan, metadata: dict) -> None:
    """A reusable SavedModel (TF Hub) with a ``serving_default`` signature (TF Serving).

    The root object is tracked with TensorFlow's AutoTrackable, as Keras' own ExportArchive
    does, so the Keras variables are saved once and shared by every function:

    * ``__call__(images, training=False)``: traced for both values of ``training``, returns
      the output tensor; what ``hub.KerasLayer(path, trainable=True)`` calls.
    * ``variables`` / ``trainable_variables`` / ``regularization_losses`` (none: ConvNeXt is
      trained with weight decay in the optimiser, not with regularisation losses).
    * ``serving_default``: ``images`` -> ``{"logits"|"features": ...}``.
    * ``metadata()``: the input contract and provenance as a JSON string.
    """
    import tensorflow as tf

    spec = _tensor_spec(plan)
    names = plan.outputs
    root = tf.__internal__.tracking.AutoTrackable()
    root.variables = list(model.variables)
    root.trainable_variables = list(model.trainable_variables)
    root.non_trainable_variables = list(model.non_trainable_variables)
    root.regularization_losses = []

    def call(images, training=False):
        return model(images, training=training)

    def serve(images):
        out = root.__call__(images, training=False)
        return dict(out) if isinstance(out, dict) else {names[0]: out}

    root.__call__ = tf.function(call, autograph=False)
    root.serve = tf.function(serve, input_signature=[spec], autograph=False)
    text = json.dumps(metadata, indent=2)
    root.metadata = tf.function(lambda: tf.constant(text), input_signature=[])
    options = tf.saved_model.SaveOptions()
    with _save_context(options):
        for training in (False, True):
            root.__call__.get_concrete_function(spec, training=training)
        root.serve.get_concrete_function()
    tf.saved_model.save(
        root, str(path), signatures={"serving_default": root.serve}, options=options
    )
    extra = path / METADATA_FILE
    extra.parent.mkdir(parents=True, exist_ok=True)
    extra.write_text(text + "\n")


def _named(model, plan: _Plan):
    """The model with a named input and a dict of named outputs (names survive ONNX/TFLite)."""
    import keras

    if isinstance(model.output, dict):
        return model
    inputs = keras.Input(plan.input_shape[1:], dtype=plan.input_dtype, name=INPUT_NAME)
    return keras.Model(inputs, {plan.outputs[0]: model(inputs)}, name=model.name)


def _register_onnx_erfc() -> None:
    """Teach tf2onnx TensorFlow's ``Erfc`` (exact GELU uses it): ``erfc(x) = 1 - erf(x)``.

    tf2onnx 1.17 converts ``Erf`` but not ``Erfc``; this registers the missing handler through
    tf2onnx's own ``tf_op`` extension decorator (once per process).
    """
    from tf2onnx import handler, utils

    if "Erfc" in handler.tf_op.get_opsets().get("", [{}])[-1]:
        return

    @handler.tf_op("Erfc")
    class _Erfc:
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            dtype = ctx.get_dtype(node.input[0])
            one = ctx.make_const(
                utils.make_name("erfc_one"), np.ones((), utils.map_onnx_to_numpy_type(dtype))
            )
            node.type = "Erf"
            sub = ctx.insert_new_node_on_output(
                "Sub",
                node.output[0],
                name=utils.make_name(node.name),
                inputs=[one.output[0], node.output[0]],
            )
            ctx.copy_shape(node.output[0], sub.output[0])
            ctx.set_dtype(sub.output[0], dtype)

    handler.tf_op._MAPPING = None  # rebuild the cached op mapping with the new handler


def _write_onnx(model, path: Path, plan: _Plan) -> None:
    import logging
    import warnings

    _register_onnx_erfc()
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # Keras' numpy-2 shim for tf2onnx touches np.object
        warnings.simplefilter("ignore", FutureWarning)
        _named(model, plan).export(
            str(path),
            format="onnx",
            verbose=False,
            input_signature=[_tensor_spec(plan)],
            opset_version=ONNX_OPSET,
        )


def _onnx_graph_builder(model):
    """The function writing ``model``'s ONNX graph from its weights (a ConvNeXt:
    :func:`runtime.build_onnx_graph`; a UperNet: :func:`upernet_onnx.build_onnx_graph`), or
    None for a model with layers of its own (tf2onnx then)."""
    from convnext_keras.engines import graph as runtime
    from convnext_keras.engines import upernet_graph as upernet_onnx

    if _segmentation(model):
        return upernet_onnx.build_onnx_graph if not upernet_onnx.unsupported_reason(model) else None
    return runtime.build_onnx_graph if runtime.graph_unsupported_reason(model) is None else None


def _write_onnx_graph(model, path: Path, plan: _Plan) -> None:
    """The ONNX graph built from the weights
    (:func:`convnext_keras.engines.onnx_graph.build_onnx_graph`): the same operators the CPU engine
    runs, opset ``ONNX_OPSET``, dynamic batch."""
    import onnx

    from convnext_keras.nets.convnext import variant_of

    side = None if plan.dynamic_size else plan.image_size
    build = _onnx_graph_builder(model)
    proto = build(model, side, side, opset=ONNX_OPSET, output_names=plan.outputs)
    props = {"convnext_keras.nets.convnext": model.name, "convnext_keras.input": plan.contract()}
    # A dynamic-size graph cannot refuse small images itself (ONNX has no assertion): say it.
    props["convnext_keras.min_input_size"] = str(variant_of(model).min_input_size)
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))


def _write_tflite(model, path: Path, plan: _Plan) -> None:
    _named(model, plan).export(
        str(path), format="litert", verbose=False, input_signature=[_tensor_spec(plan)]
    )


# ----------------------------------------------------------------------------------------------
# Loaders used for verification: each yields (loader description, input index, {name: array})


def _run_savedmodel(path: Path, plan: _Plan, inputs):
    import tensorflow as tf

    obj = tf.saved_model.load(str(path))
    signature = obj.signatures["serving_default"]
    for i, x in enumerate(inputs):
        out = obj(tf.constant(x), training=False)
        out = dict(out) if isinstance(out, dict) else {plan.outputs[0]: out}
        yield "tf.saved_model.load(path)(images)", i, out
        yield "serving_default signature", i, signature(**{INPUT_NAME: tf.constant(x)})


def _run_onnx(path: Path, plan: _Plan, inputs):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for i, x in enumerate(inputs):
        yield "onnxruntime", i, dict(zip(names, session.run(None, {INPUT_NAME: x})))


def _tflite_interpreter(path: Path):
    import tensorflow as tf

    if hasattr(tf, "lite") and hasattr(tf.lite, "Interpreter"):
        import warnings

        with warnings.catch_warnings():  # "deprecated, use ai_edge_litert": still works
            warnings.simplefilter("ignore", UserWarning)
            return tf.lite.Interpreter(model_path=str(path))
    from ai_edge_litert.interpreter import Interpreter  # TensorFlow without tf.lite

    return Interpreter(model_path=str(path))


def _run_tflite(path: Path, plan: _Plan, inputs):
    runner = _tflite_interpreter(path).get_signature_runner()
    for i, x in enumerate(inputs):
        yield "TFLite interpreter", i, runner(**{INPUT_NAME: x})


def _run_keras(path: Path, plan: _Plan, inputs):
    import keras

    from convnext_keras.nets import layers  # noqa: F401  (registers LayerScale / StochasticDepth)

    reloaded = keras.saving.load_model(str(path), compile=False)
    for i, x in enumerate(inputs):
        yield "keras.saving.load_model(path)", i, _keras_outputs(reloaded, x, plan.outputs)


_RUNNERS = {
    "savedmodel": _run_savedmodel,
    "onnx": _run_onnx,
    "tflite": _run_tflite,
    "keras": _run_keras,
}


def _compare(what: str, got: dict, expected: dict, x: np.ndarray, tolerance: float) -> tuple:
    got = {k: np.asarray(v) for k, v in got.items()}
    diff = _max_diff(got, expected)
    line = f"{what} on {x.dtype.name}{list(x.shape)}: max |diff| = {diff:.3g}"
    if not diff <= tolerance:  # `not <=` also catches NaN
        raise VerificationError(
            f"{line} > tolerance {tolerance:g}; the export was discarded, nothing was written.",
            diff,
            tolerance,
        )
    return diff, line


def _verify(path: Path, plan: _Plan, inputs, expected, tolerance: float) -> tuple[float, list]:
    worst, checks = 0.0, []
    for what, i, got in _RUNNERS[plan.fmt](path, plan, inputs):
        diff, line = _compare(what, got, expected[i], inputs[i], tolerance)
        worst, checks = max(worst, diff), checks + [line]
    return worst, checks


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
    source = _source
    if isinstance(model, str):
        from convnext_keras.api import load_model

        source = _describe_weights(model, weights)
        model = load_model(model, weights=weights)
    elif weights != "official":
        raise ValueError(
            "weights= applies to model names only; a keras.Model is exported with the weights "
            "it has (load them with convnext_keras.load_model(name, weights=...))."
        )
    _check_model(model)
    plan = _plan(model, fmt, image_size, dynamic_size, include_preprocessing, verify_batch, seed)

    import keras

    # ONNX of a ConvNeXt or UperNet built by this library: the graph is written from the
    # weights (no TensorFlow, any backend); tf2onnx only for models with layers of their own.
    direct_onnx = fmt == "onnx" and _onnx_graph_builder(model) is not None
    if fmt != "keras" and not direct_onnx and keras.backend.backend() != "tensorflow":
        return _export_via_tensorflow(model, path, plan, overwrite, source)

    start = time.time()
    checks, worst = [], 0.0
    if _transfer is not None:  # the caller's model, exported from another backend
        x, expected = _transfer
        diff, line = _compare(
            f"Keras model in TensorFlow vs the {expected['backend']} original",
            _keras_outputs(model, x, plan.outputs),
            {k: v for k, v in expected.items() if k != "backend"},
            x,
            TOLERANCE["keras"],
        )
        checks, worst = [line], diff
    exported = _with_preprocessing(model, plan) if plan.preprocessing else model
    inputs = plan.inputs()
    expected = [_keras_outputs(exported, x, plan.outputs) for x in inputs]
    with staged(path, overwrite) as tmp:
        if fmt == "savedmodel":
            _write_savedmodel(exported, tmp, plan, _metadata(model, plan, source))
        elif direct_onnx:
            _write_onnx_graph(exported, tmp, plan)
        elif fmt == "onnx":
            _write_onnx(exported, tmp, plan)
        elif fmt == "tflite":
            _write_tflite(exported, tmp, plan)
        else:
            exported.save(tmp)
        diff, lines = _verify(tmp, plan, inputs, expected, TOLERANCE[fmt])
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

    fmts = [canonical_format(f) for f in formats]
    paths = [default_path(name, out_dir, f) for f in fmts]
    for fmt, path in zip(fmts, paths):
        _check_path(path, fmt, overwrite)
    model = load_model(name, weights=weights)
    source = _describe_weights(name, weights)
    results = []
    for fmt, path in zip(fmts, paths):
        result = export(model, path, fmt, overwrite=overwrite, _source=source, **options)
        result.random_weights = weights is None
        if check_hub and fmt == "savedmodel":
            result.hub_check = hub_finetune_check(path)
        results.append(result)
    return results


# ----------------------------------------------------------------------------------------------
# Other backends: export in a TensorFlow-backend subprocess

_RESULT_MARK = "CONVNEXT_EXPORT_RESULT "
_ERRORS = {
    "VerificationError": VerificationError,
    "ExportError": ExportError,
    "ValueError": ValueError,
    "FileExistsError": FileExistsError,
    "FileNotFoundError": FileNotFoundError,
}
#: The child reports a failed write as ``WriteError`` with its errno; the parent re-raises it.


def _tensorflow_env() -> dict:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _parse_child(proc: subprocess.CompletedProcess, what: str) -> dict:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK) :])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise ExportError(f"{what} failed (exit status {proc.returncode}):\n{tail}")


def _export_via_tensorflow(model, path: Path, plan: _Plan, overwrite: bool, source) -> ExportResult:
    import importlib.util

    import keras

    backend = keras.backend.backend()
    try:
        has_tensorflow = importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        has_tensorflow = False
    if not has_tensorflow:
        raise ExportError(
            f"{plan.fmt} export needs TensorFlow, which is not installed here (Keras backend: "
            f"{backend}). Install it (pip install tensorflow-cpu) or export to .keras "
            "(format='keras') and convert on a machine with TensorFlow."
        )
    rng = np.random.default_rng(plan.seed + 1)
    x = rng.standard_normal((1, plan.image_size, plan.image_size, 3)).astype("float32")
    expected = _keras_outputs(model, x, plan.outputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.", suffix=".part") as d:
        d = Path(d)
        model.save(d / "model.keras")
        np.savez(d / "reference.npz", x=x, **expected)
        request = {
            "model": str(d / "model.keras"),
            "reference": str(d / "reference.npz"),
            "backend": backend,
            "path": str(path),
            "format": plan.fmt,
            "image_size": plan.image_size,
            "dynamic_size": plan.dynamic_size,
            "include_preprocessing": plan.preprocessing,
            "overwrite": overwrite,
            "verify_batch": plan.verify_batch,
            "seed": plan.seed,
            "source": source,
        }
        (d / "request.json").write_text(json.dumps(request))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "convnext_keras.export.exporter",
                "export",
                str(d / "request.json"),
            ],
            env=_tensorflow_env(),
            capture_output=True,
            text=True,
        )
    reply = _parse_child(proc, f"{plan.fmt} export in a TensorFlow subprocess")
    if reply.get("error") == "WriteError":
        from convnext_keras.errors import WriteError

        raise WriteError(reply["errno"], path, "the export")
    if "error" in reply:
        cls = _ERRORS.get(reply["error"], ExportError)
        if cls is VerificationError:
            raise VerificationError(reply["message"], reply["max_abs_diff"], reply["tolerance"])
        raise cls(reply["message"])
    return ExportResult.from_dict(reply)


def _child_export(request_file: str) -> dict:
    import keras

    from convnext_keras.nets import layers  # noqa: F401

    req = json.loads(Path(request_file).read_text())
    ref = np.load(req["reference"])
    expected = {k: ref[k] for k in ref.files if k != "x"}
    expected["backend"] = req["backend"]
    model = keras.saving.load_model(req["model"], compile=False)
    result = export(
        model,
        req["path"],
        req["format"],
        image_size=req["image_size"],
        dynamic_size=req["dynamic_size"],
        include_preprocessing=req["include_preprocessing"],
        overwrite=req["overwrite"],
        verify_batch=req["verify_batch"],
        seed=req["seed"],
        _transfer=(ref["x"], expected),
        _source=req["source"],
    )
    return result.to_dict()


# ----------------------------------------------------------------------------------------------
# TF-Hub fine-tuning check (tf-keras, in a subprocess)


def hub_finetune_check(
    path: str | os.PathLike, *, num_classes: int = 3, batch: int = 2, seed: int = 0
) -> dict:
    """Fine-tune a SavedModel export one step the TF-Hub way and report what happened.

    Runs, in a subprocess with ``TF_USE_LEGACY_KERAS=1`` (tf-keras, as TF-Hub requires):
    ``hub.KerasLayer(path, trainable=True)`` + a new ``Dense(num_classes)`` head, one
    ``GradientTape`` SGD step on random images.  Needs the ``export`` extra (tensorflow-hub,
    tf-keras).

    Returns a dict: ``backbone_variables`` (trainable variables of the hub layer),
    ``none_gradients`` / ``zero_gradients`` (backbone variables whose gradient is None / all
    zero), ``changed`` (backbone variables the step changed), ``regularization_losses``,
    ``loss``, ``output_shape`` and ``warnings`` (log lines about variables or checkpoints).
    """
    env = _tensorflow_env()
    env["TF_USE_LEGACY_KERAS"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "1"  # keep TensorFlow's warnings: the check looks at them
    args = [str(path), str(num_classes), str(batch), str(seed)]
    proc = subprocess.run(
        [sys.executable, "-m", "convnext_keras.export.exporter", "hub-check", *args],
        env=env,
        capture_output=True,
        text=True,
    )
    reply = _parse_child(proc, "hub.KerasLayer fine-tuning check")
    if "error" in reply:
        raise ExportError(f"hub.KerasLayer fine-tuning check failed: {reply['message']}")
    suspicious = ("variable", "checkpoint", "unresolved", "not found", "zero trainable")
    # absl INFO lines ("I0000 00:00:... port.cc:153] oneDNN ... environment variable ...") are
    # start-up notes that TensorFlow >= 2.16 prints whatever TF_CPP_MIN_LOG_LEVEL says.
    info = re.compile(r"I\d{4} [\d:.]+ +\d+ \S+:\d+\] ")
    reply["warnings"] += [
        line
        for line in proc.stderr.splitlines()
        if any(word in line.lower() for word in suspicious) and not info.match(line)
    ]
    return reply


def _child_hub_check(path: str, num_classes: int, batch: int, seed: int) -> dict:
    import warnings

    import tensorflow as tf
    import tensorflow_hub as hub
    import tf_keras

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = hub.KerasLayer(path, trainable=True)
        meta = json.loads(tf.saved_model.load(path).metadata().numpy().decode())
        shape = meta["input"]["shape"][1:]
        size = meta["input"]["resolution"]
        shape = [size if d is None else d for d in shape]
        model = tf_keras.Sequential(
            [tf_keras.Input(shape, dtype=meta["input"]["dtype"]), layer]
            + [tf_keras.layers.Dense(num_classes)]
        )
        rng = np.random.default_rng(seed)
        if meta["input"]["dtype"] == "uint8":
            x = rng.integers(0, 256, (batch, *shape)).astype("uint8")
        else:
            x = rng.standard_normal((batch, *shape)).astype("float32")
        y = np.arange(batch) % num_classes
        loss_fn = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        backbone = list(layer.trainable_weights)
        before = [v.numpy().copy() for v in backbone]
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(y, logits) + tf.add_n([0.0] + list(model.losses))
        grads = tape.gradient(loss, model.trainable_weights)
        tf_keras.optimizers.SGD(0.1).apply_gradients(zip(grads, model.trainable_weights))
        backbone_grads = grads[: len(backbone)]
    return {
        "backbone_variables": len(backbone),
        "none_gradients": sum(g is None for g in backbone_grads),
        "zero_gradients": sum(g is not None and not np.any(g.numpy()) for g in backbone_grads),
        "changed": sum(not np.array_equal(b, v.numpy()) for b, v in zip(before, backbone)),
        "regularization_losses": len(model.losses),
        "loss": float(loss),
        "output_shape": list(logits.shape),
        "warnings": [str(w.message) for w in caught if "variable" in str(w.message).lower()],
    }


def _main(argv: list[str]) -> int:
    """``python -m convnext_keras.export.exporter export REQUEST.json``, or
    ``... hub-check PATH N BATCH SEED``."""
    command, *args = argv
    try:
        if command == "export":
            reply = _child_export(*args)
        elif command == "hub-check":
            path, classes, batch, seed = args
            reply = _child_hub_check(path, int(classes), int(batch), int(seed))
        else:
            raise ValueError(f"unknown command {command!r}")
    except (ExportError, ValueError, OSError) as e:
        from convnext_keras.errors import WriteError

        reply = {"error": type(e).__name__, "message": str(e)}
        if isinstance(e, VerificationError):
            reply.update(max_abs_diff=e.max_abs_diff, tolerance=e.tolerance)
        if isinstance(e, WriteError):
            reply["errno"] = e.errno
    print(_RESULT_MARK + json.dumps(reply), flush=True)
    return 1 if "error" in reply else 0


if __name__ == "__main__":
    # Run the package's copy of this module, so its exception classes are the ones raised.
    from convnext_keras.export.exporter import _main as main

    sys.exit(main(sys.argv[1:]))
