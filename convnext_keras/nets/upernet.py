"""UperNet on the ConvNeXt pyramid: the semantic-segmentation network of the official
ADE20K checkpoints, as one Keras 3 functional model.

The backbone is :func:`convnext_keras.nets.convnext.build_model`'s pyramid with the segmentation
backbone's LayerNorm on each stage output (``stage_norms=True``; facebookresearch/ConvNeXt
``semantic_segmentation/backbone/convnext.py``, ``norm0`` ... ``norm3``).  The decoder is
mmsegmentation's ``UPerHead`` (``mmseg/models/decode_heads/uper_head.py`` and ``psp_head.py``;
Xiao et al., "Unified Perceptual Parsing for Scene Understanding", arXiv:1807.10221) with the
settings of a registry row (:class:`convnext_keras.registry.UperNetHead`):

* pyramid pooling on the last stage: adaptive average pooling to ``s x s`` for each pool scale
  ``s`` (PyTorch's bins: ``floor(i H / s)`` to ``ceil((i + 1) H / s)``), a 1x1 conv + BatchNorm
  + ReLU each, resized back and concatenated with the stage, then a 3x3 ``bottleneck``;
* 1x1 lateral convs on stages 1-3, the top-down path (each level plus the level above resized
  to it), a 3x3 FPN conv per lateral, all four levels resized to stride 4, concatenated and
  fused by a 3x3 ``fpn_bottleneck``; a 1x1 classifier (``conv_seg``);
* the logits resized to the input's height and width (mmseg ``EncoderDecoder.encode_decode``).

Every resize is bilinear with ``align_corners=False`` (PyTorch's ``F.interpolate``; half-pixel
centres, no antialiasing).  BatchNorm runs in inference mode on the checkpoint's running
statistics.  The decode head's dropout (before ``conv_seg``) is an identity at inference and is
left out; the auxiliary FCN head is training-only and is not built.

Layer names (the checkpoint conversion addresses them): ``decode_ppm{i}_conv`` / ``_bn``,
``decode_bottleneck_*``, ``decode_lateral{i}_*``, ``decode_fpn{i}_*``, ``decode_fpn_bottleneck_*``
and ``decode_conv_seg``; the backbone keeps :func:`convnext_keras.nets.convnext.layer_names`'
names plus ``stage{i}_output_norm``.

This module imports no other module of the package that imports Keras at import time (the
backbone builder is imported when a model is built), so ``_registration`` can register its
layers from Keras' import hook.
"""

from __future__ import annotations

import keras
from keras import ops

from convnext_keras import registry
from convnext_keras._registration import PACKAGE


def resize_bilinear(x, size):
    """``x`` (NHWC) resized to ``size`` = (height, width), bilinear, ``align_corners=False``,
    no antialiasing: PyTorch's ``F.interpolate(mode="bilinear")``.  ``size`` may hold tensors
    (a dynamic height/width under TensorFlow)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # TF2's resize uses half-pixel centres, as align_corners=False.
        resized = tf.image.resize(x, tf.stack(size), method="bilinear", antialias=False)
        return ops.cast(resized, x.dtype)
    return ops.image.resize(
        x,
        (int(size[0]), int(size[1])),
        interpolation="bilinear",
        antialias=False,
        data_format="channels_last",
    )


@keras.saving.register_keras_serializable(package=PACKAGE)
class BilinearResize(keras.layers.Layer):
    """``layer(x, like)``: ``x`` (NHWC) resized to the height and width of ``like`` (see
    :func:`resize_bilinear`).  Dynamic sizes work on every backend."""

    def call(self, x, like):
        shape = ops.shape(like)
        return resize_bilinear(x, (shape[1], shape[2]))

    def compute_output_shape(self, x_shape, like_shape):
        return (x_shape[0], like_shape[1], like_shape[2], x_shape[3])


def _pooling_matrix(size, bins: int, dtype):
    """``(bins, size)``: row ``i`` averages positions ``floor(i size / bins)`` to
    ``ceil((i + 1) size / bins) - 1`` (PyTorch's adaptive average pooling)."""
    index = ops.arange(bins, dtype="int32")
    start = (index * size) // bins
    end = ((index + 1) * size + bins - 1) // bins
    position = ops.arange(size, dtype="int32")
    inside = ops.logical_and(position[None, :] >= start[:, None], position[None, :] < end[:, None])
    return ops.cast(inside, dtype) / ops.cast(end - start, dtype)[:, None]


@keras.saving.register_keras_serializable(package=PACKAGE)
class AdaptiveAveragePooling2D(keras.layers.Layer):
    """``torch.nn.AdaptiveAvgPool2d(output_size)`` on NHWC inputs: ``(batch, H, W, C)`` ->
    ``(batch, output_size, output_size, C)``, each output the mean of its bin (bins overlap
    when ``H`` is not a multiple of ``output_size``).  Any input size, dynamic included: the
    bins are two averaging matrices applied along height and width."""

    def __init__(self, output_size: int, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(output_size, int) or output_size < 1:
            raise ValueError(f"output_size must be a positive integer, got {output_size!r}.")
        self.output_size = output_size

    def call(self, x):
        shape = ops.shape(x)
        rows = _pooling_matrix(shape[1], self.output_size, x.dtype)
        cols = _pooling_matrix(shape[2], self.output_size, x.dtype)
        x = ops.einsum("ih,nhwc->niwc", rows, x)
        return ops.einsum("jw,niwc->nijc", cols, x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_size, self.output_size, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "output_size": self.output_size}


def _conv_bn_relu(x, channels: int, kernel: int, name: str):
    """mmcv's ``ConvModule`` with BatchNorm: conv (no bias) -> BatchNorm -> ReLU."""
    from convnext_keras.nets.convnext import _kernel_init

    x = keras.layers.Conv2D(
        channels,
        kernel,
        padding="same",
        use_bias=False,
        kernel_initializer=_kernel_init(),
        data_format="channels_last",
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(epsilon=registry.BATCH_NORM_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def build_upernet(
    variant: str | registry.Variant = "tiny",
    *,
    num_classes: int = registry.NUM_CLASSES_ADE20K,
    head: registry.UperNetHead | None = None,
    input_shape: tuple = (None, None, 3),
    name: str | None = None,
) -> keras.Model:
    """Build a randomly initialised UperNet-ConvNeXt.

    Args:
        variant: the backbone (a ``registry.VARIANTS`` key or architecture name).
        num_classes: segmentation classes (150 for ADE20K).
        head: the decoder's settings (default :class:`registry.UperNetHead`: 512 channels,
            pool scales 1, 2, 3, 6, as every official checkpoint).
        input_shape: NHWC without the batch axis; any height/width from 32 up by default.
        name: model name (default ``upernet_<architecture>``).

    Returns a model ``images (batch, H, W, 3)`` (normalised with the ImageNet mean/std, as the
    classifiers) -> ``logits (batch, H, W, num_classes)``, float32 under every dtype policy.
    """
    from convnext_keras.nets.convnext import PYRAMID_OUTPUTS, build_model

    spec = registry.variant(variant)
    head = head or registry.UperNetHead()
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    backbone = build_model(spec, head="pyramid", input_shape=input_shape, stage_norms=True)
    images = backbone.inputs[0]
    features = [backbone.output[key] for key in PYRAMID_OUTPUTS]
    logits = upernet_decoder(images, features, num_classes, head)
    return keras.Model(images, logits, name=name or f"upernet_{spec.arch_name}")


def upernet_decoder(images, features, num_classes: int, head: registry.UperNetHead | None = None):
    """UperNet's decoder on symbolic tensors: ``features`` (the 4 normalised stage outputs,
    strides 4-32) -> logits ``(batch, H, W, num_classes)`` at the height and width of
    ``images`` (float32).  What :func:`build_upernet` puts on its backbone; keras-hub's
    segmenter (:mod:`convnext_keras.kerashub.segmenter`) puts it on a ``ConvNeXtBackbone``.
    Layer names as the module docstring says."""
    from convnext_keras.nets.convnext import _kernel_init

    head = head or registry.UperNetHead()
    if len(features) != 4:
        raise ValueError(f"UperNet takes the 4 stage outputs of a pyramid, got {len(features)}.")
    channels = head.channels

    top = features[-1]
    pooled = [top]
    for i, scale in enumerate(head.pool_scales):
        y = AdaptiveAveragePooling2D(scale, name=f"decode_ppm{i}_pool")(top)
        y = _conv_bn_relu(y, channels, 1, f"decode_ppm{i}")
        pooled.append(BilinearResize(name=f"decode_ppm{i}_resize")(y, top))
    y = keras.layers.Concatenate(name="decode_ppm_concat")(pooled)
    laterals = [
        _conv_bn_relu(f, channels, 1, f"decode_lateral{i}") for i, f in enumerate(features[:-1])
    ]
    laterals.append(_conv_bn_relu(y, channels, 3, "decode_bottleneck"))
    for i in range(len(laterals) - 1, 0, -1):  # top-down: each level plus the one above
        above = BilinearResize(name=f"decode_top_down{i}_resize")(laterals[i], laterals[i - 1])
        laterals[i - 1] = keras.layers.Add(name=f"decode_top_down{i}_add")([laterals[i - 1], above])
    outputs = [_conv_bn_relu(x, channels, 3, f"decode_fpn{i}") for i, x in enumerate(laterals[:-1])]
    outputs.append(laterals[-1])
    outputs[1:] = [
        BilinearResize(name=f"decode_fpn{i}_resize")(x, outputs[0])
        for i, x in enumerate(outputs[1:], 1)
    ]
    y = keras.layers.Concatenate(name="decode_fpn_concat")(outputs)
    y = _conv_bn_relu(y, channels, 3, "decode_fpn_bottleneck")
    y = keras.layers.Conv2D(
        num_classes,
        1,
        kernel_initializer=_kernel_init(),
        data_format="channels_last",
        dtype="float32",
        name="decode_conv_seg",
    )(y)
    return BilinearResize(dtype="float32", name="decode_resize")(y, images)
