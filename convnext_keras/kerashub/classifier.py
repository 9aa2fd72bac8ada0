"""``ConvNeXtImageClassifier`` (+ its preprocessor): keras-hub's image-classification task on a
:class:`~convnext_keras.kerashub.backbone.ConvNeXtBackbone`.

The head is ConvNeXt's, not keras-hub's default one: global average pooling of the last stage,
the head LayerNorm (the backbone's, with its pretrained weights; a backbone without one gets a
fresh LayerNorm here), dropout, then the ``predictions`` Dense layer (float32, as this
library's ``head_fc``; keras-hub's name).  So ``from_preset(name)`` gives exactly the logits
of ``ck.load_model(name)``, and keras-hub's task API comes with it: raw images in through the
preprocessor, ``predict``, ``fit`` with keras-hub's defaults (Adam 5e-5, sparse categorical
cross-entropy on logits, sparse categorical accuracy), ``save_to_preset``.
"""

from __future__ import annotations

import keras
from keras_hub.models import ImageClassifier, ImageClassifierPreprocessor, Task

from convnext_keras import registry
from convnext_keras._registration import PACKAGE
from convnext_keras.kerashub.backbone import ConvNeXtBackbone
from convnext_keras.kerashub.converter import ConvNeXtImageConverter


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtImageClassifierPreprocessor(ImageClassifierPreprocessor):
    """Raw images (and labels) in, the checkpoint's evaluation transform applied
    (:class:`~convnext_keras.kerashub.converter.ConvNeXtImageConverter`); labels pass through."""

    backbone_cls = ConvNeXtBackbone
    image_converter_cls = ConvNeXtImageConverter


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXtImageClassifier(ImageClassifier):
    """ConvNeXt's classifier as a keras-hub ``ImageClassifier``.

    Args:
        backbone: a :class:`ConvNeXtBackbone`.
        num_classes: classes of the head (a checkpoint's own, or a new head's).
        preprocessor: a :class:`ConvNeXtImageClassifierPreprocessor` (None: the model takes
            normalised images).
        pooling: ``"avg"`` (ConvNeXt's) or ``"max"``.
        activation: on the logits; None (default) gives logits, as this library's models.
        dropout: before the head (training).
        head_dtype: dtype of the head (default float32 under any backbone policy, as this
            library pins its head).

    ``output`` / ``predict``: ``(batch, num_classes)``.
    """

    backbone_cls = ConvNeXtBackbone
    preprocessor_cls = ConvNeXtImageClassifierPreprocessor

    def __init__(
        self,
        backbone,
        num_classes=None,
        preprocessor=None,
        pooling="avg",
        activation=None,
        dropout=0.0,
        head_dtype=None,
        **kwargs,
    ):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(
                "num_classes must be a positive integer (a model without classification head "
                "- a self-supervised encoder such as DINOv3's or FCMAE's - takes a new one: "
                f"from_preset(..., num_classes=N)), got {num_classes!r}."
            )
        if pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}.")
        head_dtype = head_dtype or "float32"

        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        pool = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}
        self.pooler = pool[pooling](data_format="channels_last", dtype=head_dtype, name="pooler")
        self.head_norm = getattr(backbone, "head_norm", None) or keras.layers.LayerNormalization(
            epsilon=registry.LAYER_NORM_EPSILON, dtype="float32", name="head_norm"
        )
        self.output_dropout = keras.layers.Dropout(dropout, dtype=head_dtype, name="output_dropout")
        self.output_dense = keras.layers.Dense(
            num_classes, activation=activation, dtype=head_dtype, name="predictions"
        )

        # === Functional model ===
        inputs = backbone.input
        x = self.pooler(backbone(inputs))
        x = self.head_norm(x)
        outputs = self.output_dense(self.output_dropout(x))
        Task.__init__(self, inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.num_classes = num_classes
        self.pooling = pooling
        self.activation = activation
        self.dropout = dropout
        self.head_dtype = head_dtype

    def get_config(self):
        config = Task.get_config(self)
        config.update(
            {
                "num_classes": self.num_classes,
                "pooling": self.pooling,
                "activation": self.activation,
                "dropout": self.dropout,
                "head_dtype": self.head_dtype,
            }
        )
        return config
