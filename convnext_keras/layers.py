"""The two layers ConvNeXt needs beyond ``keras.layers``, registered for ``.keras`` files.

Both are written with ``keras.ops`` only, so they run on the TensorFlow, JAX and PyTorch
backends.  They are registered under the ``convnext_keras`` package, so
``keras.saving.load_model("m.keras")`` needs no ``custom_objects`` once this package is imported.
"""

from __future__ import annotations

import keras
from keras import ops

PACKAGE = "convnext_keras"


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerScale(keras.layers.Layer):
    """Multiplies the last axis by a learned per-channel scale ``gamma`` (CaiT's layer scale).

    The weight is stored in the variable dtype (float32 under mixed precision) and cast to the
    compute dtype by Keras' autocasting, so float16/bfloat16 policies work without dtype errors.
    """

    def __init__(self, init_value: float, **kwargs):
        super().__init__(**kwargs)
        self.init_value = float(init_value)

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma",
            shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.init_value),
            trainable=True,
        )

    def call(self, inputs):
        return inputs * ops.cast(self.gamma, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value}


@keras.saving.register_keras_serializable(package=PACKAGE)
class StochasticDepth(keras.layers.Layer):
    """Drops the whole residual branch per sample with probability ``rate`` while training.

    Kept samples are scaled by ``1 / (1 - rate)`` so the expected output is unchanged; at
    inference (``training=False``) the layer is the identity, as in the original ``DropPath``.
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"StochasticDepth rate must be in [0, 1), got {rate}.")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if rate > 0 else None

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        keep = 1.0 - self.rate
        # One draw per sample, broadcast over every other axis.
        shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        noise = keras.random.uniform(shape, dtype=inputs.dtype, seed=self.seed_generator)
        mask = ops.floor(keep + noise)
        return inputs * (mask / ops.cast(keep, inputs.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}
