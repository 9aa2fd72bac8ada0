"""The layers (and the activation) ConvNeXt needs beyond Keras', registered for ``.keras`` files.

All are written with ``keras.ops`` only, so they run on the TensorFlow, JAX and PyTorch
backends.  They are registered under the ``convnext_keras`` package, so
``keras.saving.load_model("m.keras")`` needs no ``custom_objects`` once this package is imported
(``_registration`` imports this module as soon as Keras is imported).
"""

from __future__ import annotations

import os

import keras
from keras import ops

from convnext_keras import registry
from convnext_keras._registration import PACKAGE


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
class GlobalResponseNormalization(keras.layers.Layer):
    """Global Response Normalization (GRN) of ConvNeXt V2, on NHWC inputs.

    Per sample and channel ``G = ||x||_2`` over height and width, ``N = G / (mean_c G + eps)``
    and ``out = gamma * (x * N) + beta + x`` with per-channel ``gamma`` and ``beta``, both
    initialised to zero (the block starts as without GRN).  Source: Woo et al., "ConvNeXt V2"
    (arXiv:2301.00808), eq. 1-3; facebookresearch/ConvNeXt-V2 ``models/utils.py``, ``GRN``.

    Input and output: ``(batch, height, width, channels)`` in the compute dtype.  The norms and
    the whole affine step are computed in float32 under every dtype policy: a sum of squares
    over a 56x56 map overflows float16 (and loses most digits in bfloat16).  The gradient is
    finite for an all-zero channel (whose output is zero either way), where ``d sqrt / d s``
    at ``s = 0`` would be infinite.
    """

    #: Sums of squares below this count as this when taking the square root (keeps the
    #: gradient finite; ``sqrt(1e-30) = 1e-15`` changes no output that is not zero anyway).
    _TINY = 1e-30

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        channels = input_shape[-1]
        self.gamma = self.add_weight(
            name="gamma", shape=(channels,), initializer="zeros", trainable=True
        )
        self.beta = self.add_weight(
            name="beta", shape=(channels,), initializer="zeros", trainable=True
        )

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        squares = ops.sum(ops.square(x), axis=(1, 2), keepdims=True)
        norm = ops.sqrt(ops.maximum(squares, self._TINY))
        scale = norm / (ops.mean(norm, axis=-1, keepdims=True) + self.epsilon)
        gamma = ops.cast(self.gamma, "float32")
        beta = ops.cast(self.beta, "float32")
        return ops.cast(gamma * (x * scale) + beta + x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


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


def too_small_message(height, width, minimum: int) -> str:
    """The error for an input smaller than ConvNeXt takes (every entry point says the same)."""
    why = (
        "its stride-4 stem and three stride-2 downsamplings leave no pixel below that"
        if minimum > registry.ISOTROPIC_PATCH
        else f"an isotropic ConvNeXt's {minimum}x{minimum} patches leave none below that"
    )
    return (
        f"ConvNeXt needs images of at least {minimum}x{minimum} pixels ({why}); got "
        f"{height}x{width}. Resize the images first (convnext predict / eval do), e.g. with "
        "preprocess.eval_transform."
    )


@keras.saving.register_keras_serializable(package=PACKAGE)
class MinimumInputSize(keras.layers.Layer):
    """Passes NHWC images through unchanged, refusing a height or width below ``min_size``.

    ConvNeXt's last stage has ``size // 32`` pixels: a smaller image would reach it with none
    and global pooling would average nothing - NaN logits on some backends, a shape error deep
    inside on others.  A static size is checked in Python (``ValueError`` at build or call
    time); a size only known when a TensorFlow graph runs (``model.predict`` after several
    sizes, a SavedModel with a dynamic size) by an assertion in the graph
    (``InvalidArgumentError`` carrying the same message).
    """

    def __init__(self, min_size: int, **kwargs):
        super().__init__(autocast=False, **kwargs)
        self.min_size = int(min_size)

    def _check_static(self, height, width) -> None:
        for side in (height, width):
            if isinstance(side, int) and side < self.min_size:
                error = ValueError(too_small_message(height, width, self.min_size))
                # The message says it all: keep Keras from wrapping it in its dump of the call's
                # arguments (it leaves errors carrying this mark as they are).
                error._keras_call_info_injected = True
                raise error

    def call(self, inputs):
        height, width = inputs.shape[1], inputs.shape[2]
        self._check_static(height, width)
        dynamic = not (isinstance(height, int) and isinstance(width, int))
        if not dynamic or keras.backend.backend() != "tensorflow":
            return inputs  # JAX and PyTorch always see static sizes (JAX's symbolic ones pass)
        import tensorflow as tf

        shape = tf.shape(inputs)
        fits = tf.logical_and(shape[1] >= self.min_size, shape[2] >= self.min_size)
        message = too_small_message("H", "W", self.min_size) + " H, W ="
        with tf.control_dependencies([tf.debugging.Assert(fits, [message, shape[1], shape[2]])]):
            return tf.identity(inputs)

    def compute_output_shape(self, input_shape):
        self._check_static(input_shape[1], input_shape[2])
        return input_shape

    def get_config(self):
        return {**super().get_config(), "min_size": self.min_size}


_SQRT_HALF = 0.7071067811865476


@keras.saving.register_keras_serializable(package=PACKAGE)
def gelu(x):
    """Exact (erf) GELU, ``x / 2 * (1 + erf(x / sqrt(2)))``: what ``torch.nn.GELU()`` computes.

    On TensorFlow and PyTorch this is ``keras.ops.gelu(x, approximate=False)`` (TensorFlow's
    ``tf.nn.gelu``, which the TFLite and ONNX converters recognise; PyTorch's fused kernel).  On
    JAX, ``jax.nn.gelu`` writes the same function with ``erfc``, which XLA expands into two
    branches with an exponential and divisions: in bfloat16 on an H200 its GELU fusions took 3x
    the time of PyTorch's (kernel profiles in BENCHMARKS.md).  Here JAX gets the erf form
    instead, evaluated in float32 for 16-bit inputs and rounded once, as PyTorch's kernels do;
    XLA fuses it with the bias add into one memory-bound loop.
    """
    if keras.backend.backend() != "jax":
        return ops.gelu(x, approximate=False)
    dtype = keras.backend.standardize_dtype(x.dtype)
    y = ops.cast(x, "float32") if dtype in ("bfloat16", "float16") else x
    y = 0.5 * y * (1.0 + ops.erf(y * _SQRT_HALF))
    return ops.cast(y, dtype)


def _jax_on_cpu() -> bool:
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


def _jax_on_one_cuda_gpu() -> bool:
    """JAX computing on an NVIDIA GPU, with no multi-device ``keras.distribution`` set.

    XLA cannot partition a Pallas kernel across devices (it would gather the whole batch onto
    each one), so a data-parallel program keeps cuDNN's convolution; ROCm GPUs are not
    measured, so they keep it too."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    if jax.default_backend() != "gpu":
        return False
    try:
        version = str(jax.devices()[0].client.platform_version).lower()
    except Exception:  # noqa: BLE001  (an unknown runtime: not known to be CUDA)
        return False
    if "rocm" in version or "hip" in version:
        return False
    distribution = keras.distribution.distribution()
    if distribution is not None and distribution.device_mesh.devices.size > 1:
        return False
    return True


@keras.saving.register_keras_serializable(package=PACKAGE)
class DepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """``keras.layers.DepthwiseConv2D`` with the fastest depthwise kernel each JAX device has.

    XLA lowers a feature-grouped convolution poorly on CPUs (one depthwise 7x7 took 26x longer
    than the same function written as below, and the whole network ran 2.7x slower; see
    BENCHMARKS.md).  For stride 1, ``"same"`` padding and depth multiplier 1 (ConvNeXt's case)
    JAX on a CPU therefore computes ``sum_ij pad(x)[i:i+H, j:j+W] * kernel[i, j] + bias`` in
    float32, which XLA fuses into one loop.  JAX on one NVIDIA GPU runs the Pallas/Triton
    kernel of :mod:`convnext_keras.kernels.depthwise`: on an H200 (BENCHMARKS.md) cuDNN's
    kernel, as XLA's autotuner picks it, ran the bf16 training step at 2.6k img/s in one
    process and 3.7k in another, and ConvNeXt-B inference at 5.2k or 7.1k; with the Pallas
    kernel 3.8-3.9k and 7.1k.  TensorFlow and PyTorch have good depthwise kernels of their
    own: there the Keras layer runs unchanged.  Weights, their shapes and names are those of
    the Keras layer.

    ``implementation``: ``"auto"`` (``$CONVNEXT_DEPTHWISE`` when set - one of the values
    below, for a whole process, e.g. ``CONVNEXT_DEPTHWISE=native convnext bench --backend
    jax`` -, else shifted sums on JAX's CPU backend, the Pallas kernel on JAX with one NVIDIA
    GPU for inputs it suits (``kernels.depthwise.suits_width``: up to 256 pixels wide; not under a
    multi-device ``keras.distribution``: XLA cannot split a Pallas kernel across devices) and
    Keras' convolution elsewhere), ``"shifted"``, ``"native"`` (always the
    Keras convolution: cuDNN on GPUs), ``"pallas"`` (JAX only: the Pallas kernel; off a GPU it
    runs in Pallas' interpreter, exact but slow) or ``"xla"`` (JAX only: XLA's convolution
    with its input gradient written as the forward convolution with flipped taps,
    ``kernels.depthwise.xla_depthwise_conv2d``).  On TensorFlow and PyTorch ``"pallas"`` and
    ``"xla"`` mean Keras' convolution.  Shapes other than stride 1 / ``"same"`` / depth
    multiplier 1 / odd kernel always use Keras' convolution.
    """

    IMPLEMENTATIONS = ("auto", "native", "shifted", "pallas", "xla")

    def __init__(self, *args, implementation: str = "auto", **kwargs):
        # ConvNeXt is NHWC by contract, whatever keras.config.image_data_format() says.
        kwargs.setdefault("data_format", "channels_last")
        super().__init__(*args, **kwargs)
        if implementation not in self.IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {self.IMPLEMENTATIONS}, got {implementation!r}."
            )
        self.implementation = implementation

    def _same_stride_one(self) -> bool:
        return (
            tuple(self.strides) == (1, 1)
            and tuple(self.dilation_rate) == (1, 1)
            and self.depth_multiplier == 1
            and self.padding == "same"
            and self.data_format == "channels_last"
            and all(k % 2 == 1 for k in self.kernel_size)
        )

    def _choice(self, width: int | None = None) -> str:
        """The implementation in effect: ``"auto"`` resolved (read at call time) for an input
        ``width`` pixels wide (None: any)."""
        if self.implementation != "auto":
            return self.implementation
        env = os.environ.get("CONVNEXT_DEPTHWISE", "").strip().lower() or "auto"
        if env not in self.IMPLEMENTATIONS:
            raise ValueError(
                f"CONVNEXT_DEPTHWISE={env!r} is not a depthwise implementation; use one of "
                f"{self.IMPLEMENTATIONS} or unset it."
            )
        if env != "auto":
            return env
        if _jax_on_cpu():
            return "shifted"
        if not _jax_on_one_cuda_gpu():
            return "native"
        from convnext_keras.kernels import depthwise as pallas_depthwise

        return "pallas" if width is None or pallas_depthwise.suits_width(width) else "native"

    def _shifted_applies(self) -> bool:
        return self._choice() == "shifted" and self._same_stride_one()

    def _jax_kernel(self, width: int | None = None) -> str | None:
        """``"pallas"`` / ``"xla"`` where that JAX function computes this layer (for an input
        ``width`` pixels wide), else None."""
        choice = self._choice(width)
        if (
            choice in ("pallas", "xla")
            and keras.backend.backend() == "jax"
            and self._same_stride_one()
        ):
            return choice
        return None

    def _pallas_applies(self) -> bool:
        return self._jax_kernel() == "pallas"

    def call(self, inputs):
        engine = self._jax_kernel(inputs.shape[2])
        if engine:
            from convnext_keras.kernels import depthwise as pallas_depthwise

            conv = (
                pallas_depthwise.depthwise_conv2d
                if engine == "pallas"
                else pallas_depthwise.xla_depthwise_conv2d
            )
            kh, kw = self.kernel_size
            kernel = ops.reshape(self.kernel, (kh, kw, -1))
            bias = ops.convert_to_tensor(self.bias) if self.use_bias else None
            out = conv(inputs, kernel, bias)
            return self.activation(out) if self.activation is not None else out
        if not self._shifted_applies():
            return super().call(inputs)
        kh, kw = self.kernel_size
        shape = ops.shape(inputs)
        height, width = shape[1], shape[2]
        padded = ops.pad(inputs, [[0, 0], [kh // 2, kh // 2], [kw // 2, kw // 2], [0, 0]])
        padded = ops.cast(padded, "float32")
        kernel = ops.cast(self.kernel, "float32")
        out = None
        for i in range(kh):
            for j in range(kw):
                term = padded[:, i : i + height, j : j + width, :] * kernel[i, j, :, 0]
                out = term if out is None else out + term
        if self.use_bias:
            out = out + ops.cast(self.bias, "float32")
        if self.activation is not None:
            out = self.activation(out)
        return ops.cast(out, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "implementation": self.implementation}
