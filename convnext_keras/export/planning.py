"""What an export is before anything is written: the plan every export module shares.

The input contract and output names, the errors (:class:`ExportError`,
:class:`VerificationError`) and the :class:`ExportResult` of an export, and the plan: the
options of :func:`convnext_keras.export.exporter.export` checked against the model and fixed
as a :class:`_Plan` (shapes, dtype, output names, the evaluation transform, the verification
inputs).  :mod:`~convnext_keras.export.writers` writes what it says,
:mod:`~convnext_keras.export.verify` checks it, :mod:`~convnext_keras.export.tf_subprocess`
hands it to a TensorFlow-backend child.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from convnext_keras import registry
from convnext_keras.interface import fix

#: Name of the image input in every signature / graph.
INPUT_NAME = "images"
#: Output names by head (the model's last layer): TF-Hub's classifier and ``_fe`` outputs, and
#: a segmentation model's per-pixel logits.
OUTPUT_NAMES = {"head_fc": "logits", "head_norm": "features", "decode_resize": "logits"}

INPUT_CONTRACT = (
    "RGB images, NHWC (batch, height, width, 3), float32, scaled to [0, 1] and then normalised "
    "with the ImageNet mean {mean} and standard deviation {std} per channel."
)
DETECTION_CONTRACT = (
    "images: RGB images, NHWC (batch, height, width, 3), float32, normalised with the ImageNet "
    "mean {mean} and standard deviation {std} on 0-255 pixels, padded with zeros at the bottom "
    "and right (to a multiple of 32 in the original's pipeline); image_sizes: (batch, 2) int32, "
    "the (height, width) of each resized image before padding; scale_factors: (batch, 2) "
    "float32, the resized (height, width) over the photo's (ones for boxes in input pixels)."
)
#: The inputs of a detector (convnext_keras.nets.detection.model.build_detector), in order.
DETECTION_INPUTS = ("images", "image_sizes", "scale_factors")
#: The formats a detector exports to: its NMS, top-k and RoIAlign over data-dependent counts are
#: written, reloaded and verified as a SavedModel (or a ``.keras`` file); ONNX and TFLite are
#: refused (:func:`detection_refusal`).
DETECTION_FORMATS = ("savedmodel", "keras")
#: The smallest image a detector runs on (its coarsest pyramid level, stride 32).
DETECTION_MIN_SIZE = 32

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
# The plan


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
    if _detection(model):
        inputs = inputs[:1]  # images; image_sizes and scale_factors are the detector's own
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

    #: A detector (three inputs, five outputs: :mod:`convnext_keras.nets.detection.model`).
    detection: bool = False

    def contract(self) -> str:
        if self.detection:
            return DETECTION_CONTRACT.format(mean=registry.IMAGENET_MEAN, std=registry.IMAGENET_STD)
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

    def inputs(self) -> list:
        """The verification inputs, one per size: arrays, or a detector's dicts of three."""
        rng = np.random.default_rng(self.seed)
        shapes = [(self.verify_batch, h, w, 3) for h, w in self.check_sizes()]
        if self.detection:
            return [_detection_inputs(rng, s) for s in shapes]
        if self.preprocessing:
            return [rng.integers(0, 256, s).astype("uint8") for s in shapes]
        return [rng.standard_normal(s).astype("float32") for s in shapes]


def _detection_inputs(rng, shape) -> dict:
    """A detector's verification batch: images padded with zeros past each ``image_sizes``
    (the first image fills the batch's size, the others are smaller), and scale factors of
    one and below (boxes in the photo's pixels)."""
    b, h, w, _ = shape
    sizes = np.array([[h, w]] + [[max(32, h - 16 * i), max(32, w - 8 * i)] for i in range(1, b)])
    images = rng.standard_normal(shape).astype("float32")
    for i, (ih, iw) in enumerate(sizes):
        images[i, ih:] = 0.0
        images[i, :, iw:] = 0.0
    scales = rng.uniform(0.5, 1.0, (b, 2)).astype("float32")
    scales[0] = 1.0
    return {"images": images, "image_sizes": sizes.astype("int32"), "scale_factors": scales}


def _detection(model) -> bool:
    """Whether ``model`` is a Mask R-CNN / Cascade Mask R-CNN
    (:func:`convnext_keras.nets.detection.model.build_detector`)."""
    names = {layer.name for layer in model.layers}
    return {"rpn_proposals", "detections"} <= names


def detection_refusal(fmt: str) -> str:
    """The one-line error of a detector exported to a format it does not support."""
    savedmodel = fix("format='savedmodel'", "--format savedmodel")
    why = {
        "onnx": "tf2onnx has no conversion for the TensorFlow operations of its RoIAlign and "
        "box refinement",
    }.get(fmt, "only its SavedModel and .keras exports are verified")
    return (
        f"{fmt} export of a detector (Mask R-CNN / Cascade Mask R-CNN) is not supported "
        f"({why}); a detector exports as a TensorFlow SavedModel: use {savedmodel}."
    )


def _segmentation(model) -> bool:
    """Whether ``model`` is a UperNet (convnext_keras.nets.upernet): per-pixel logits."""
    return any(layer.name == "decode_conv_seg" for layer in model.layers)


def _plan(model, fmt, image_size, dynamic_size, include_preprocessing, verify_batch, seed):
    if _detection(model):
        return _detection_plan(
            model, fmt, image_size, dynamic_size, include_preprocessing, verify_batch, seed
        )
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


def _detection_plan(
    model, fmt, image_size, dynamic_size, include_preprocessing, verify_batch, seed
):
    """A detector's plan: images of any size (padded per batch, as the model takes them),
    verified at ``image_size`` (default: the registry row's shorter test side, 800) and at a
    second, non-square size."""
    if fmt not in DETECTION_FORMATS:
        raise ValueError(detection_refusal(fmt))
    if include_preprocessing:
        raise ValueError(
            f"{fix('include_preprocessing', '--include-preprocessing')} is for classifiers: a "
            "detector's test-time procedure (keep-ratio resize, padding, mask pasting) runs "
            "around the model (convnext_keras.tasks.detect); its export takes the model's "
            "three inputs."
        )
    if dynamic_size is False:
        raise ValueError(
            "A detector's export takes padded images of any size: drop "
            f"{fix('dynamic_size=False', '--fixed-size')}."
        )
    if image_size is None:
        image_size = _default_image_size(model)
    if image_size is None:
        raise ValueError(
            f"Cannot tell the image size to verify {model.name!r} at (its name is not in the "
            f"registry); pass {fix('image_size=N', '--image-size N')}."
        )
    if not isinstance(image_size, int) or image_size < DETECTION_MIN_SIZE:
        raise ValueError(
            f"image_size must be an integer >= {DETECTION_MIN_SIZE}, got {image_size!r}."
        )
    if not isinstance(verify_batch, int) or verify_batch < 1:
        raise ValueError(f"verify_batch must be a positive integer, got {verify_batch!r}.")
    return _Plan(
        fmt,
        image_size,
        True,
        False,
        _eval_config(model.name, image_size),
        _output_names(model),
        verify_batch,
        seed,
        detection=True,
    )
