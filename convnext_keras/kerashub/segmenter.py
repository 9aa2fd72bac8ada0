"""``ConvNeXtUperNetImageSegmenter`` (+ its preprocessor): the UperNet-ConvNeXt of the ADE20K
checkpoints as keras-hub's ``ImageSegmenter`` task.

The network is :func:`convnext_keras.nets.upernet.upernet_decoder` (mmseg's ``UPerHead``) on
the pyramid of a :class:`~convnext_keras.kerashub.backbone.ConvNeXtBackbone`: the same layers
and arithmetic as ``ck.load_model("upernet_convnext_*")``, images ``(batch, H, W, 3)``
normalised -> logits ``(batch, H, W, num_classes)`` (float32).  A backbone without the
segmentation backbone's stage LayerNorms (a classification checkpoint's, for fine-tuning) gets
fresh ones here, as mmsegmentation's ConvNeXt backbone adds ``norm0`` ... ``norm3`` to an
ImageNet checkpoint.

What keras-hub's task contract covers and what it does not: ``predict`` runs the model once
on the converter's output (mmseg's single-scale test resize, keep-ratio; "whole" inference);
the checkpoints' reported mIoU comes from sliding 512/640 windows over that image and resizing
the logits back to the photo, which ``ck.segment_files`` does (a keras-hub task's ``predict``
maps one preprocessed batch to one output batch).  ``compile``'s defaults take integer class
masks ``(batch, H, W)``: sparse categorical cross-entropy on logits, ignoring label 255
(mmseg's ``ignore_index``), and sparse categorical accuracy.
"""

from __future__ import annotations

import keras
from keras_hub.models import ImageSegmenter, ImageSegmenterPreprocessor, Task

from convnext_keras import registry
from convnext_keras._registration import PACKAGE
from convnext_keras.kerashub.backbone import ConvNeXtBackbone
from convnext_keras.kerashub.converter import ConvNeXtUperNetImageConverter
from convnext_keras.nets.convnext import kernels_drawn_in_numpy
from convnext_keras.nets.upernet import upernet_decoder

#: The label mmsegmentation's ADE20K pipeline ignores (``reduce_zero_label``: "other" -> 255).
IGNORE_LABEL = 255


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtUperNetImageSegmenterPreprocessor(ImageSegmenterPreprocessor):
    """Raw images (and masks, passed through) in, the test transform applied
    (:class:`~convnext_keras.kerashub.converter.ConvNeXtUperNetImageConverter`)."""

    backbone_cls = ConvNeXtBackbone
    image_converter_cls = ConvNeXtUperNetImageConverter


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtUperNetImageSegmenter(ImageSegmenter):
    """UperNet on a ConvNeXt pyramid as a keras-hub ``ImageSegmenter``.

    Args:
        backbone: a hierarchical :class:`ConvNeXtBackbone` (an isotropic one has no pyramid).
        num_classes: segmentation classes (150 for ADE20K).
        preprocessor: a :class:`ConvNeXtUperNetImageSegmenterPreprocessor`, or None.
        channels: the decoder's width (512 in every official checkpoint).
        pool_scales: the pyramid pooling's output sizes ((1, 2, 3, 6)).
    """

    backbone_cls = ConvNeXtBackbone
    preprocessor_cls = ConvNeXtUperNetImageSegmenterPreprocessor

    def __init__(
        self,
        backbone,
        num_classes=None,
        preprocessor=None,
        channels: int = 512,
        pool_scales=(1, 2, 3, 6),
        **kwargs,
    ):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(
                "num_classes must be a positive integer (a classification backbone takes a new "
                f"UperNet: from_preset(..., num_classes=N)), got {num_classes!r}."
            )
        keys = ("P2", "P3", "P4", "P5")
        if sorted(backbone.pyramid_outputs) != list(keys):
            raise ValueError(
                "UperNet needs the 4-stage pyramid of a hierarchical ConvNeXt; this backbone "
                f"has {sorted(backbone.pyramid_outputs) or 'none'} (an isotropic ConvNeXt is "
                "one stage at stride 16)."
            )
        head = registry.UperNetHead(int(channels), tuple(int(s) for s in pool_scales))

        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.pyramid = keras.Model(
            backbone.inputs, [backbone.pyramid_outputs[k] for k in keys], name="pyramid"
        )

        # === Functional model ===
        inputs = backbone.input
        features = self.pyramid(inputs)
        if not getattr(backbone, "stage_norms", False):
            features = [
                keras.layers.LayerNormalization(
                    epsilon=registry.LAYER_NORM_EPSILON, name=f"stage{i}_output_norm"
                )(f)
                for i, f in enumerate(features)
            ]
        with kernels_drawn_in_numpy() as draw:  # see ConvNeXtBackbone
            outputs = upernet_decoder(inputs, features, num_classes, head)
        Task.__init__(self, inputs=inputs, outputs=outputs, **kwargs)
        draw(self.layers)

        # === Config ===
        self.num_classes = num_classes
        self.channels = head.channels
        self.pool_scales = head.pool_scales

    def compile(self, optimizer="auto", loss="auto", *, metrics="auto", **kwargs):
        """keras-hub's ``ImageSegmenter.compile`` with defaults for integer class masks
        ``(batch, H, W)``: Adam 5e-5, ``SparseCategoricalCrossentropy(from_logits=True,
        ignore_class=255)``, ``SparseCategoricalAccuracy``; any other value as keras-hub's."""
        if loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, ignore_class=IGNORE_LABEL
            )
        if metrics == "auto":
            metrics = [keras.metrics.SparseCategoricalAccuracy()]
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def get_config(self):
        config = Task.get_config(self)
        config.update(
            {
                "num_classes": self.num_classes,
                "channels": self.channels,
                "pool_scales": list(self.pool_scales),
            }
        )
        return config
