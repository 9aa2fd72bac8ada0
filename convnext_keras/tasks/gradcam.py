"""Grad-CAM (Selvaraju et al., 2017) for ConvNeXt classifiers, on every Keras backend.

The class activation map of class ``c`` is ``ReLU(sum_k alpha_k A^k)``, where ``A`` is the last
stage's output (stride 32) and ``alpha_k`` the spatial mean of ``d logit_c / d A^k``.  The
gradient is taken through the model's own head layers (``head_pool``, ``head_norm``,
``head_fc``) with the running backend's autodiff: ``tf.GradientTape`` on TensorFlow,
``jax.grad`` on JAX and ``torch.autograd`` on PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from PIL import Image

from convnext_keras import preprocess
from convnext_keras.weights import cache

_HEAD_LAYERS = ("head_pool", "head_norm", "head_fc")


class GradCAM:
    """Grad-CAM of a ConvNeXt classifier built by this library (any backend).

    ``cams, classes = GradCAM(model)(images)`` with normalised NHWC ``images``; each map is
    ``(H/32, W/32)`` float32 scaled to [0, 1] (all zero where the class has no positive
    evidence).  ``class_index`` picks the class per image; by default the top-1 class.
    """

    def __init__(self, model: keras.Model):
        names = {layer.name for layer in model.layers}
        missing = [n for n in _HEAD_LAYERS if n not in names]
        if missing:
            raise ValueError(
                f"Grad-CAM needs a ConvNeXt classifier built by convnext_keras (layers "
                f"{', '.join(_HEAD_LAYERS)}); model {model.name!r} lacks {', '.join(missing)}. "
                "Load it with convnext_keras.load_model(name) (features=None or 'all')."
            )
        self.features = keras.Model(
            model.input, model.get_layer("head_pool").input, name=f"{model.name}_stage4"
        )
        self._head = [model.get_layer(n) for n in _HEAD_LAYERS]
        self.backend = keras.backend.backend()
        if self.backend not in _GRADIENTS:
            raise ValueError(
                f"Grad-CAM supports the tensorflow, jax and torch backends, not {self.backend!r}."
            )

    def head(self, features):
        """Logits from last-stage features, through the model's own head layers."""
        for layer in self._head:
            features = layer(features)
        return features

    def __call__(self, images, class_index=None) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim == 3:
            images = images[None]
        features = np.asarray(self.features.predict_on_batch(images), dtype=np.float32)
        if class_index is None:
            logits = keras.ops.convert_to_numpy(self.head(features))
            classes = np.argmax(logits, axis=-1)
        else:
            classes = np.array(np.broadcast_to(class_index, (len(images),)), dtype=np.int64)
        grads = np.asarray(_GRADIENTS[self.backend](self.head, features, classes), np.float32)
        alpha = grads.mean(axis=(1, 2), keepdims=True)  # (n, 1, 1, channels)
        cams = np.maximum((alpha * features).sum(axis=-1), 0.0)
        peak = cams.max(axis=(1, 2), keepdims=True)
        cams = np.where(peak > 0, cams / np.where(peak > 0, peak, 1.0), 0.0)
        return cams.astype(np.float32), classes.astype(np.int64)


def _grad_tensorflow(head, features, classes):
    import tensorflow as tf

    x = tf.convert_to_tensor(features)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = head(x)
        target = tf.reduce_sum(tf.gather(logits, classes, axis=1, batch_dims=1))
    return tape.gradient(target, x).numpy()


def _grad_jax(head, features, classes):
    import jax
    import jax.numpy as jnp

    index = jnp.asarray(classes)[:, None]

    def target(x):
        return jnp.sum(jnp.take_along_axis(head(x), index, axis=1))

    return np.asarray(jax.grad(target)(jnp.asarray(features)))


def _grad_torch(head, features, classes):
    import torch
    from keras.src.backend.torch.core import get_device

    x = torch.tensor(features, device=get_device(), requires_grad=True)
    logits = head(x)
    index = torch.as_tensor(classes, device=logits.device)[:, None]
    (grad,) = torch.autograd.grad(logits.gather(1, index).sum(), x)
    return grad.detach().cpu().numpy()


# Sum of each image's target logit: images are independent through the head (per-image
# pooling and LayerNorm), so its gradient holds every image's own gradient.
_GRADIENTS = {"tensorflow": _grad_tensorflow, "jax": _grad_jax, "torch": _grad_torch}


def colorize(cam: np.ndarray, size: tuple[int, int], colormap: str = "jet") -> Image.Image:
    """A heat map resized (bicubic) to ``size = (width, height)`` as an RGB image.

    Uses matplotlib's colormaps (``pip install matplotlib``)."""
    from convnext_keras.errors import require

    matplotlib = require("matplotlib", extra="viz", purpose="Grad-CAM pictures (the colour map)")
    big = Image.fromarray(np.asarray(cam, np.float32), "F").resize(size, Image.Resampling.BICUBIC)
    values = np.clip(np.asarray(big), 0.0, 1.0)
    rgba = matplotlib.colormaps[colormap](values)
    return Image.fromarray((rgba[..., :3] * 255).round().astype(np.uint8), "RGB")


def overlay(
    photo: Image.Image, cam: np.ndarray, config, *, alpha: float = 0.5, colormap: str = "jet"
) -> Image.Image:
    """The part of ``photo`` the model saw (:func:`preprocess.crop_box`), at the photo's own
    resolution, blended with the heat map (``alpha`` = heat-map weight)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    box = preprocess.crop_box(photo.size, config)
    view = photo.convert("RGB").crop(tuple(int(round(v)) for v in box))
    heat = colorize(cam, view.size, colormap)
    return Image.blend(view, heat, alpha)


def save_png(image: Image.Image, path) -> Path:
    """Write a PNG atomically (temporary file beside it, renamed when complete)."""
    with cache.atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
