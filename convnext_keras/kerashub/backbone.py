"""``ConvNeXtBackbone``: this library's ConvNeXt network as a keras-hub ``Backbone``.

The backbone *is* the network of :func:`convnext_keras.nets.convnext.build_model` (the same
layers, names and arithmetic: V1 layer scale, V2 GRN, isotropic), seen through keras-hub's
``FeaturePyramidBackbone`` interface:

* ``backbone(images)``: the last stage's feature map ``(batch, H/32, W/32, C)`` (isotropic:
  ``H/16``), as keras-hub's ResNet or EfficientNet backbones give theirs;
* ``backbone.pyramid_outputs``: ``{"P2": stride 4, "P3": 8, "P4": 16, "P5": 32}`` (isotropic:
  ``{"P4": ...}``), the stage outputs keras-hub's detection and segmentation tasks read;
* ``backbone.head_norm``: ConvNeXt's head LayerNorm, applied to the globally averaged last stage
  (the pooled features of the ``_fe`` models, DINOv3's pooled embedding).  It is part of the
  backbone's weights (``model.weights.h5``), so a new classification head on a pretrained
  backbone keeps the pretrained norm, as the original fine-tuning does
  (facebookresearch/ConvNeXt ``main.py``: only ``head.weight`` / ``head.bias`` are dropped);
  ``backbone.pooled_output`` is its symbolic output, for ``keras.Model(backbone.inputs,
  backbone.pooled_output)``.

The segmentation checkpoints' backbone (UperNet) has a LayerNorm on every stage output instead
(``stage_norms=True``; facebookresearch/ConvNeXt ``semantic_segmentation/backbone/convnext.py``,
``norm0`` ... ``norm3``) and no head norm.

Inputs: NHWC float32 RGB normalised with the ImageNet mean/std (the image converter's output);
any height and width from 32 (isotropic: 16) up.
"""

from __future__ import annotations

import contextlib

import keras
from keras_hub.models import FeaturePyramidBackbone

from convnext_keras import registry
from convnext_keras._registration import PACKAGE
from convnext_keras.nets.convnext import PYRAMID_OUTPUTS, build_model, kernels_drawn_in_numpy

#: keras-hub's pyramid keys by stage stride (``Pn``: 2**n times smaller than the input).
_PYRAMID_KEYS = {4: "P2", 8: "P3", 16: "P4", 32: "P5"}


def find_variant(depths, dims, block: str, patch_size: int, stem_norm: bool) -> registry.Variant:
    """The registry variant with this architecture, else a new ``Variant`` named ``custom``
    (``ValueError`` from :class:`registry.Variant` for an impossible one)."""
    shape = (tuple(int(d) for d in depths), tuple(int(d) for d in dims))
    for spec in registry.VARIANTS.values():
        if (spec.depths, spec.dims, spec.block) == shape + (block,) and (
            spec.patch_size,
            spec.stem_norm,
        ) == (patch_size, stem_norm):
            return spec
    return registry.Variant(
        "custom", *shape, block=block, patch_size=patch_size, stem_norm=stem_norm
    )


@contextlib.contextmanager
def _global_policy(dtype):
    """Build layers under ``dtype`` (a policy name or ``DTypePolicy``; None: as it is)."""
    if dtype is None:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(keras.dtype_policies.get(dtype))
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtBackbone(FeaturePyramidBackbone):
    """A ConvNeXt (V1, V2, isotropic, DINOv3's, UperNet's) as a keras-hub backbone.

    Args:
        depths: blocks per stage (4 stages; 1 for an isotropic ConvNeXt).
        dims: channels per stage.
        block: ``"layer_scale"`` (ConvNeXt), ``"grn"`` (ConvNeXt V2) or ``"plain"`` (the
            isotropic small/base, trained without layer scale).
        patch_size: stem patch (4; isotropic 16).
        stem_norm: LayerNorm after the stem (not in the isotropic ConvNeXt).
        stage_norms: a LayerNorm on each stage output (UperNet's backbone); such a backbone has
            no head norm.
        drop_path_rate: stochastic depth of the last block (training; rates rise linearly).
        image_shape: ``(height, width, 3)``; None sizes take any image.
        dtype: a Keras dtype policy (``"float32"``, ``"mixed_bfloat16"``...); the head norm
            stays float32.

    Use :meth:`from_architecture` for a registry architecture (``"convnextv2_atto"``), or
    ``keras_hub.models.Backbone.from_preset(name)`` for a checkpoint of this library
    (``import convnext_keras`` first).
    """

    def __init__(
        self,
        depths,
        dims,
        block: str = "layer_scale",
        patch_size: int = registry.STEM_PATCH,
        stem_norm: bool = True,
        stage_norms: bool = False,
        drop_path_rate: float = 0.0,
        image_shape=(None, None, 3),
        dtype=None,
        **kwargs,
    ):
        spec = find_variant(depths, dims, block, patch_size, stem_norm)
        image_shape = tuple(image_shape)
        # "all" holds the stage outputs and the pooled features in one graph (its one-class
        # head_fc is left out of the backbone); UperNet's backbone is the normed pyramid.  The
        # kernels are drawn in numpy: keras-hub builds a backbone before loading its weights,
        # and Keras' own draws cost JAX a compilation per kernel shape.
        with _global_policy(dtype), kernels_drawn_in_numpy() as draw:
            network = build_model(
                spec,
                head="pyramid" if stage_norms else "all",
                num_classes=1,
                input_shape=image_shape,
                drop_path_rate=drop_path_rate,
                stage_norms=stage_norms,
            )
        draw(network.layers)
        stages = [network.output[k] for k in PYRAMID_OUTPUTS if k in network.output]
        kwargs.setdefault("name", "convnext_backbone")
        super().__init__(inputs=network.inputs[0], outputs=stages[-1], dtype=dtype, **kwargs)
        self.pyramid_outputs = {
            _PYRAMID_KEYS[stride]: stage for stride, stage in zip(spec.strides, stages)
        }
        #: ConvNeXt's head LayerNorm (None for UperNet's backbone): see the module docstring.
        self.head_norm = None if stage_norms else network.get_layer("head_norm")
        #: UperNet's LayerNorms of the stage outputs (``pyramid_outputs``; empty without
        #: ``stage_norms``).  Held here so that they are the backbone's weights although only
        #: the last one lies on the path to its output.
        self.stage_output_norms = [
            network.get_layer(f"stage{i}_output_norm") for i in range(len(stages) * stage_norms)
        ]
        #: ``head_norm(mean over positions of the last stage)``, symbolic (None: no head norm).
        self.pooled_output = None if stage_norms else network.output["pooled"]
        self.variant = spec
        self.depths = list(spec.depths)
        self.dims = list(spec.dims)
        self.block = block
        self.patch_size = int(patch_size)
        self.stem_norm = bool(stem_norm)
        self.stage_norms = bool(stage_norms)
        self.drop_path_rate = float(drop_path_rate)
        self.image_shape = image_shape

    @classmethod
    def from_architecture(cls, architecture: str | registry.Variant, **kwargs):
        """A randomly initialised backbone of a registry architecture (``"convnext_tiny"``,
        ``"convnextv2_atto"``, ``"convnext_iso_small"`` or a registry key such as ``"tiny"``);
        ``kwargs`` as the constructor's."""
        spec = registry.variant(architecture)
        return cls(
            spec.depths,
            spec.dims,
            block=spec.block,
            patch_size=spec.patch_size,
            stem_norm=spec.stem_norm,
            **kwargs,
        )

    @property
    def num_features(self) -> int:
        """Channels of the last stage (and of the pooled features)."""
        return self.dims[-1]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "depths": self.depths,
                "dims": self.dims,
                "block": self.block,
                "patch_size": self.patch_size,
                "stem_norm": self.stem_norm,
                "stage_norms": self.stage_norms,
                "drop_path_rate": self.drop_path_rate,
                "image_shape": list(self.image_shape),
            }
        )
        return config
