"""keras-hub image converters that run each checkpoint's own evaluation transform, exactly.

keras-hub's ``ImageConverter`` resizes with ``keras.layers.Resizing`` (``keras.ops.image``
kernels) and normalises with ``x * scale + offset``.  Neither equals the originals' transform:
ConvNeXt evaluates with torchvision on PIL images (shorter side to ``int(res / crop_pct)``, then
a centre crop, or a squash at 384 and above; PIL's antialiased bicubic with 8-bit rounding
after each pass; :mod:`convnext_keras.preprocess.transforms`).  keras-hub's converter has no
crop fraction (it squashes, or crops the largest window of the target's aspect ratio), and
Keras' antialiased bicubic differs from PIL's by up to 5-8 8-bit steps on photos even with the
official geometry (``docs/predict_eval.md``).  So these converters do not approximate it: they
call the very functions the rest of this library uses, on each image,

* :class:`ConvNeXtImageConverter`: :func:`convnext_keras.preprocess.eval_transform` (PIL), the
  transform of ``ck.predict_files`` / ``ck.load_model`` users;
* :class:`ConvNeXtUperNetImageConverter`: :func:`convnext_keras.tasks.segment.test_image`, the
  single-scale test resize of the UperNet checkpoints (mmseg's keep-ratio ``Resize`` to the
  row's ``image_scale``, bilinear without antialiasing),

so their output equals this library's preprocessing bit for bit.  Eagerly (``converter(x)``,
keras-hub's Python preprocessing) they run in numpy; inside a ``tf.data`` pipeline or a
``tf.function`` (where keras-hub's ``predict`` / ``fit`` put preprocessing, on every backend) the
same numpy code runs through ``tf.numpy_function``.  The price: the transform runs on the CPU
in Python (PIL releases the GIL while it resamples), and a graph that contains it cannot be
serialised into a SavedModel; ``convnext export --include-preprocessing`` is the in-graph
alternative (Keras resampling, close but not bit-equal).

Inputs: one image ``(H, W, C)`` or a batch ``(B, H, W, C)`` (a list of images of different
sizes, or a ``tf.RaggedTensor``), ``C`` = 3 (RGB), 1 (grey, replicated) or 4 (RGBA,
composited on white as :func:`convnext_keras.preprocess.load_image` does), pixels 0..255:
``uint8``, another integer type, or floats (rounded to the nearest integer, since PIL
resamples 8-bit images).  Float images whose values lie in [0, 1] with fractions (images
already scaled to [0, 1]) and values outside 0..255, NaN or infinity are refused with a
``ValueError``.  Output: float32 ``(..., res, res, 3)`` normalised with the ImageNet mean/std
(segmentation: ``(..., h, w, 3)`` at the rescaled size).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops
from keras_hub.layers import ImageConverter
from PIL import Image

from convnext_keras import registry
from convnext_keras._registration import PACKAGE
from convnext_keras.kerashub.backbone import ConvNeXtBackbone
from convnext_keras.preprocess.transforms import (
    DEFAULT_CROP_PCT,
    DEFAULT_INTERPOLATION,
    DEFAULT_RESOLUTION,
    PreprocessConfig,
    _to_rgb,
    as_config,
    eval_transform,
)
from convnext_keras.tasks.segment import test_image

#: PIL filter names -> the nearest ``keras.layers.Resizing`` interpolation (keras-hub's base
#: class builds such a layer; these converters never call it).
_KERAS_INTERPOLATION = {
    "nearest": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "lanczos": "lanczos3",
    "box": "area",
    "hamming": "bilinear",
}
#: Arguments of keras-hub's ``ImageConverter`` these converters derive from their own settings
#: (a saved config may carry them; they are recomputed, not read).
_DERIVED = (
    "image_size",
    "scale",
    "offset",
    "crop_to_aspect_ratio",
    "pad_to_aspect_ratio",
    "antialias",
    "bounding_box_format",
)
_CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _uint8(image: np.ndarray) -> np.ndarray:
    """Pixels 0..255 of any numeric dtype as uint8 (floats rounded); ``ValueError`` otherwise."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.bool_ or not np.issubdtype(image.dtype, np.number):
        raise ValueError(f"Expected numeric pixels 0..255, got dtype {image.dtype}.")
    if image.size == 0:
        return image.astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError("The image holds NaN or infinite pixels; pass pixels 0..255.")
        low, high = float(image.min()), float(image.max())
        if high <= 1.0 and not np.array_equal(image, np.round(image)):
            raise ValueError(
                "The image's pixels lie in [0, 1] with fractions: this converter takes raw "
                "pixels 0..255 (uint8, or floats); multiply [0, 1] images by 255 first."
            )
        image = np.rint(image)
    else:
        low, high = int(image.min()), int(image.max())
    if low < 0 or high > 255:
        raise ValueError(
            f"Pixels must lie in 0..255, got values from {low:g} to {high:g}; pass uint8 RGB "
            "images (or floats 0..255)."
        )
    return image.astype(np.uint8)


def to_rgb(image) -> Image.Image:
    """One image array ``(H, W)`` / ``(H, W, 1|3|4)`` -> an RGB PIL image (see the module
    docstring for what is accepted)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in _CHANNEL_MODES:
        raise ValueError(
            f"Expected an image (height, width, 3) with channels last (or 1 grey, 4 RGBA), got "
            f"shape {image.shape}."
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"The image is empty (shape {image.shape}).")
    pixels = _uint8(image)
    channels = pixels.shape[-1]
    mode = _CHANNEL_MODES[channels]
    return _to_rgb(Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode))


def _to_numpy(x) -> np.ndarray:
    """An array, a TensorFlow tensor (whatever the backend) or a backend tensor -> numpy."""
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("tensorflow"):
        return np.asarray(x)
    if ops.is_tensor(x):
        return np.asarray(ops.convert_to_numpy(x))
    return np.asarray(x)


def _unragged(flat: np.ndarray, splits: list[np.ndarray]) -> list[np.ndarray]:
    """The images of a ragged batch (``tf.RaggedTensor``'s flat values and nested row
    splits, outermost first)."""
    items = [flat[a:b] for a, b in zip(splits[-1][:-1], splits[-1][1:])]
    for outer in reversed(splits[:-1]):
        items = [
            np.stack(items[a:b]) if b > a else np.empty((0,)) for a, b in zip(outer[:-1], outer[1:])
        ]
    return items


class _ExactImageConverter(ImageConverter):
    """The machinery of both converters: images -> ``self.transform(rgb)`` each, in numpy
    (eager) or through ``tf.numpy_function`` (graphs).  Subclasses give ``transform`` and
    ``_output_hw``."""

    def _rebuild_args(self, kwargs: dict, interpolation: str) -> dict:
        for key in _DERIVED:
            kwargs.pop(key, None)
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("name", "image_converter")
        return {
            **kwargs,
            "image_size": None,
            "interpolation": _KERAS_INTERPOLATION.get(interpolation, "bilinear"),
            "antialias": True,
            "crop_to_aspect_ratio": False,
        }

    # What a subclass defines.
    def transform(self, rgb: Image.Image) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _output_hw(self) -> tuple[int | None, int | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    # The numpy side.
    def _stack(self, images: list) -> np.ndarray:
        outputs = [self.transform(to_rgb(image)) for image in images]
        shapes = {o.shape for o in outputs}
        if len(shapes) > 1:
            raise ValueError(
                f"The images of this batch give model inputs of different sizes "
                f"({', '.join(str(s[:2]) for s in sorted(shapes))}); convert them one at a time."
            )
        if not outputs:
            hw = tuple(d or 0 for d in self._output_hw())
            return np.zeros((0, *hw, 3), np.float32)
        return np.stack(outputs).astype(np.float32, copy=False)

    def convert_numpy(self, inputs) -> np.ndarray:
        """The converter on numpy data: one image -> ``(h, w, 3)``, a batch (array, list, or a
        ``tf.RaggedTensor``) -> ``(B, h, w, 3)``, float32."""
        if type(inputs).__name__ == "RaggedTensor":
            flat = _to_numpy(inputs.flat_values)
            splits = [_to_numpy(s) for s in inputs.nested_row_splits]
            return self._stack(_unragged(flat, splits))
        if isinstance(inputs, (list, tuple)):
            return self._stack([_to_numpy(x) for x in inputs])
        array = _to_numpy(inputs)
        if array.ndim == 4:
            return self._stack(list(array))
        if array.ndim in (2, 3):
            return self._stack([array])[0]
        raise ValueError(
            f"Expected an image (height, width, 3) or a batch (batch, height, width, 3), got "
            f"shape {array.shape}."
        )

    # keras-hub's two paths.
    def __call__(self, inputs, **kwargs):
        """:meth:`call` directly: the converter holds no weights and no symbolic graph, and
        Keras' ``Layer.__call__`` would wrap a bad input's one-line error in a dump of the
        whole image."""
        if isinstance(inputs, keras.KerasTensor):
            raise ValueError(
                f"{type(self).__name__} runs on images (arrays, tensors, tf.data), not on "
                "symbolic Keras inputs: apply it before the model (keras-hub's preprocessor "
                "does)."
            )
        return self.call(inputs)

    def call(self, inputs):
        if isinstance(inputs, dict):
            raise ValueError(
                f"{type(self).__name__} converts images only (no bounding boxes); pass the "
                "images themselves."
            )
        if self._use_tf_workflow():
            return self._call_tf(inputs)
        return ops.convert_to_tensor(self.convert_numpy(inputs))

    def _call_tf(self, inputs):
        import tensorflow as tf

        h, w = self._output_hw()
        if isinstance(inputs, tf.RaggedTensor):
            splits = list(inputs.nested_row_splits)

            def run(flat, *row_splits):
                return self._stack(_unragged(flat, list(row_splits)))

            args, shape = [inputs.flat_values, *splits], [None, h, w, 3]
        else:
            inputs = tf.convert_to_tensor(inputs)
            rank = inputs.shape.rank
            if rank not in (3, 4):
                raise ValueError(
                    "Expected images (height, width, 3) or (batch, height, width, 3), got "
                    f"shape {inputs.shape}."
                )

            def run(images):
                return self.convert_numpy(images)

            args, shape = [inputs], ([None, h, w, 3] if rank == 4 else [h, w, 3])
        out = tf.numpy_function(run, args, tf.float32, stateful=False)
        out.set_shape(shape)
        return out


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtImageConverter(_ExactImageConverter):
    """A checkpoint's evaluation transform (:func:`convnext_keras.preprocess.eval_transform`):
    below ``squash``: resize the shorter side to ``int(resolution / crop_pct)`` with
    ``interpolation`` (PIL, antialiased), centre crop ``resolution`` square; at 384 and above
    (or ``crop_mode="squash"``): resize to ``resolution`` square; then ``(x / 255 - mean) /
    std`` with the ImageNet mean/std, in float32.

    Args:
        resolution: the model's input size.
        crop_pct: the centre-crop fraction (0.875: 224 from 256).
        interpolation: PIL's filter: ``"bicubic"`` (ConvNeXt), ``"bilinear"`` (DINOv3),
            ``"lanczos"``, ``"box"``, ``"hamming"``, ``"nearest"``.
        crop_mode: ``"center"``, ``"squash"`` or None (the official rule: squash at 384 and
            above).

    ``image_size`` reads ``(resolution, resolution)``; setting a square size changes the
    resolution (the crop rule stays).
    """

    backbone_cls = ConvNeXtBackbone

    def __init__(
        self,
        resolution: int = DEFAULT_RESOLUTION,
        crop_pct: float = DEFAULT_CROP_PCT,
        interpolation: str = DEFAULT_INTERPOLATION,
        crop_mode: str | None = None,
        **kwargs,
    ):
        config = as_config((int(resolution), float(crop_pct), interpolation, crop_mode))
        super().__init__(**self._rebuild_args(kwargs, config.interpolation))
        self.config = config
        self.resizing.height = self.resizing.width = config.resolution

    @classmethod
    def for_model(cls, name: str, **kwargs):
        """The converter of a model name of this library (its registry row's transform)."""
        from convnext_keras.preprocess.transforms import config_for

        return cls(*config_for(name), **kwargs)

    @property
    def image_size(self):
        """``(resolution, resolution)``."""
        return (self.config.resolution, self.config.resolution)

    @image_size.setter
    def image_size(self, value):
        if value is None or len(value) != 2 or value[0] != value[1]:
            raise ValueError(
                f"{type(self).__name__} makes square model inputs (the centre crop or squash "
                f"of the official transform); set a size (n, n), got {value!r}."
            )
        self.config = as_config(self.config._replace(resolution=int(value[0])))
        self.resizing.height = self.resizing.width = self.config.resolution

    def transform(self, rgb: Image.Image) -> np.ndarray:
        return eval_transform(rgb, *self.config)

    def _output_hw(self):
        return self.config.resolution, self.config.resolution

    def get_config(self):
        config = super().get_config()
        for key in _DERIVED:
            config.pop(key, None)
        config.update(
            {
                "resolution": self.config.resolution,
                "crop_pct": self.config.crop_pct,
                "interpolation": self.config.interpolation,
                "crop_mode": self.config.crop_mode,
            }
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtUperNetImageConverter(_ExactImageConverter):
    """The UperNet checkpoints' single-scale test transform
    (:func:`convnext_keras.tasks.segment.test_image`): resize keeping the aspect ratio to fit
    ``image_scale`` = (long-side limit, short side) (mmcv ``imrescale``), bilinear without
    antialiasing (OpenCV's ``INTER_LINEAR`` geometry), rounded to 8 bits; then the ImageNet
    mean/std.  The output's size follows each image's aspect ratio, so a batch must hold
    images of one size; ``image_size`` is None.

    The reported mIoU adds sliding-window inference over that image and resizes the logits
    back to the photo: ``ck.segment_files`` does the whole procedure.
    """

    backbone_cls = ConvNeXtBackbone

    def __init__(self, image_scale=(2048, 512), **kwargs):
        scale = tuple(int(s) for s in image_scale)
        if len(scale) != 2 or min(scale) < 1:
            raise ValueError(
                f"image_scale must be (long-side limit, short side) in pixels, got {image_scale!r}."
            )
        super().__init__(**self._rebuild_args(kwargs, "bilinear"))
        self.image_scale = scale

    @classmethod
    def for_model(cls, name: str, **kwargs):
        """The converter of a segmentation model name (its registry row's ``image_scale``)."""
        row = registry.resolve(name).checkpoint
        if row is None or row.segmentation is None:
            raise ValueError(f"{name!r} is not a segmentation model of this library.")
        return cls(row.segmentation.eval.image_scale, **kwargs)

    @property
    def image_size(self):
        """None: the output size follows the image's aspect ratio."""
        return None

    @image_size.setter
    def image_size(self, value):
        if value is not None:
            raise ValueError(
                f"{type(self).__name__} keeps each image's aspect ratio (mmseg's test resize); "
                "set image_scale instead of image_size."
            )

    def transform(self, rgb: Image.Image) -> np.ndarray:
        return test_image(np.asarray(rgb, dtype=np.uint8), self.image_scale)

    def _output_hw(self):
        return None, None

    def get_config(self):
        config = super().get_config()
        for key in (*_DERIVED, "interpolation"):
            config.pop(key, None)
        config["image_scale"] = list(self.image_scale)
        return config


__all__ = ["ConvNeXtImageConverter", "ConvNeXtUperNetImageConverter", "PreprocessConfig", "to_rgb"]
