"""Keras layers for preprocessing inside a model: :class:`Normalize` (ImageNet mean/std) and
:class:`EvalPreprocessing` (resize + crop + normalise; close to, not bit-equal with,
:func:`.transforms.eval_transform`), and the helpers that put them in front of a model.
"""

from __future__ import annotations

import keras
from keras import ops

from convnext_keras._registration import PACKAGE
from convnext_keras.preprocess.transforms import (
    _MEAN,
    _STD,
    DEFAULT_CROP_PCT,
    DEFAULT_INTERPOLATION,
    DEFAULT_RESOLUTION,
    as_config,
)

#: The subset of interpolations the Keras layer supports (``keras.ops.image.resize``).
_KERAS_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def _normalize_ops(x, input_scale: float):
    x = ops.cast(x, "float32") / input_scale
    return (x - ops.convert_to_tensor(_MEAN)) / ops.convert_to_tensor(_STD)


@keras.saving.register_keras_serializable(package=PACKAGE)
class Normalize(keras.layers.Layer):
    """Pixels in 0..``input_scale`` (``uint8`` images: 255) -> the model's normalised float32
    input, as :func:`normalize` (up to float rounding).  Feeding ``uint8`` to a model that
    starts with this layer moves 4x fewer bytes to the accelerator than float32."""

    def __init__(self, input_scale: float = 255.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not input_scale > 0:
            raise ValueError(f"input_scale must be positive, got {input_scale!r}.")
        self.input_scale = float(input_scale)

    def call(self, inputs):
        return _normalize_ops(inputs, self.input_scale)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "input_scale": self.input_scale}


def with_normalization(model, resolution: int | None = None, input_scale: float = 255.0):
    """``model`` behind a :class:`Normalize` layer: takes ``uint8`` (or 0..255) images."""
    shape = (resolution, resolution, 3) if resolution else model.input_shape[1:]
    inputs = keras.Input(shape, dtype="uint8" if input_scale == 255.0 else "float32")
    outputs = model(Normalize(input_scale, name="normalize")(inputs))
    return keras.Model(inputs, outputs, name=model.name)


@keras.saving.register_keras_serializable(package=PACKAGE)
class EvalPreprocessing(keras.layers.Layer):
    """Resize + centre crop + normalise inside a Keras model (any backend).

    Takes ``(batch, H, W, 3)`` (or one ``(H, W, 3)``) RGB pixels in 0..255 (any dtype;
    set ``input_scale=1.0`` for [0, 1] floats) and returns the model's normalised float32
    ``(batch, res, res, 3)`` input.  Geometry is the official evaluation's (shorter side to
    ``int(res / crop_pct)``, centre crop; squash at 384 and above, or as ``crop_mode`` says:
    the arguments are :class:`PreprocessConfig`'s, in its order).  Resampling is
    ``keras.ops.image.resize`` with antialiasing, so results are close to, but not
    bit-equal with, PIL's (see docs/predict_eval.md for the measured difference); use
    :func:`eval_transform` where exactness matters.
    """

    def __init__(
        self,
        resolution: int = DEFAULT_RESOLUTION,
        crop_pct: float = DEFAULT_CROP_PCT,
        interpolation: str = DEFAULT_INTERPOLATION,
        crop_mode: str | None = None,
        input_scale: float = 255.0,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        config = as_config((int(resolution), float(crop_pct), interpolation, crop_mode))
        if config.interpolation not in _KERAS_INTERPOLATIONS:
            raise ValueError(
                f"EvalPreprocessing supports interpolation {_KERAS_INTERPOLATIONS}, got "
                f"{interpolation!r}."
            )
        if not input_scale > 0:
            raise ValueError(f"input_scale must be positive, got {input_scale!r}.")
        self.config = config
        self.input_scale = float(input_scale)

    def _resize_crop(self, x):
        """Shorter side to ``resize_size``, then the centre ``res`` square (as torchvision)."""
        size, res = self.config.resize_size, self.config.resolution
        shape = ops.shape(x)
        h, w = shape[-3], shape[-2]
        if isinstance(h, int) and isinstance(w, int):
            new_h, new_w = (size * h // w, size) if w <= h else (size, size * w // h)
            top, left = int(round((new_h - res) / 2.0)), int(round((new_w - res) / 2.0))
        else:  # TensorFlow graph with unknown height/width: the same arithmetic on tensors
            h, w = ops.cast(h, "int32"), ops.cast(w, "int32")
            new_h = ops.where(w <= h, size * h // w, size)
            new_w = ops.where(w <= h, size, size * w // h)
            # ops.round rounds half to even, as Python's round in torchvision's CenterCrop.
            top = ops.cast(ops.round(ops.cast(new_h - res, "float32") / 2.0), "int32")
            left = ops.cast(ops.round(ops.cast(new_w - res, "float32") / 2.0), "int32")
            # keras.ops.image.resize wants Python ints; only TensorFlow gets here.
            import tensorflow as tf

            x = tf.image.resize(x, (new_h, new_w), method=self.config.interpolation, antialias=True)
            return x[..., top : top + res, left : left + res, :]
        x = ops.image.resize(
            x,
            (new_h, new_w),
            interpolation=self.config.interpolation,
            antialias=True,
            data_format="channels_last",
        )
        return x[..., top : top + res, left : left + res, :]

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        res = self.config.resolution
        if self.config.squash:
            x = ops.image.resize(
                x,
                (res, res),
                interpolation=self.config.interpolation,
                antialias=True,
                data_format="channels_last",
            )
        else:
            x = self._resize_crop(x)
        return _normalize_ops(ops.clip(x, 0.0, self.input_scale), self.input_scale)

    def compute_output_shape(self, input_shape):
        res = self.config.resolution
        return (*input_shape[:-3], res, res, 3)

    def get_config(self):
        return {
            **super().get_config(),
            "resolution": self.config.resolution,
            "crop_pct": self.config.crop_pct,
            "interpolation": self.config.interpolation,
            "crop_mode": self.config.crop_mode,
            "input_scale": self.input_scale,
        }


def preprocessing_layer(name_or_config, *, input_scale: float = 255.0, **kwargs):
    """A :class:`EvalPreprocessing` layer with a model name's (or a config's) settings."""
    config = as_config(name_or_config)
    return EvalPreprocessing(*config, input_scale=input_scale, **kwargs)
