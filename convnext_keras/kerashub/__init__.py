"""This library's models in keras-hub's API (the optional extra: ``pip install
'convnext-keras[keras-hub]'``).

    import convnext_keras, keras_hub      # importing keras-hub registers what is below
    clf = keras_hub.models.ImageClassifier.from_preset("convnextv2_tiny_1k_224")
    bb = keras_hub.models.Backbone.from_preset("convnext_base_21k_1k_384")
    seg = keras_hub.models.ImageSegmenter.from_preset("upernet_convnext_tiny_ade20k_512")

Modules: :mod:`.backbone` (``ConvNeXtBackbone``: this library's network as a keras-hub
``FeaturePyramidBackbone``), :mod:`.converter` (image converters running each checkpoint's
own evaluation transform, bit-equal to :mod:`convnext_keras.preprocess`), :mod:`.classifier`
and :mod:`.segmenter` (the ``ImageClassifier`` and ``ImageSegmenter`` tasks and their
preprocessors), :mod:`.presets` (preset folders written, verified, cached; registry names as
keras-hub presets; uploads that keep the model card).

Nothing else in the library imports this package: ``convnext_keras._registration`` imports it
when ``keras_hub`` is imported (after ``import convnext_keras``, in either order), which
registers the classes with Keras (``convnext_keras>ConvNeXtBackbone`` ...) and the registry's
names with keras-hub.  Keras' safe deserialisation never imports the module a saved config
names, so ``import convnext_keras`` is what makes a preset of these classes loadable.
"""

try:
    import keras_hub  # noqa: F401
except ImportError as e:  # pragma: no cover - the extra is installed where this is tested
    raise ImportError(
        "convnext_keras.kerashub needs keras-hub (and keras >= 3.15, tensorflow-text): "
        "pip install 'convnext-keras[keras-hub]'"
    ) from e

from convnext_keras.kerashub.backbone import ConvNeXtBackbone
from convnext_keras.kerashub.classifier import (
    ConvNeXtImageClassifier,
    ConvNeXtImageClassifierPreprocessor,
)
from convnext_keras.kerashub.converter import ConvNeXtImageConverter, ConvNeXtUperNetImageConverter
from convnext_keras.kerashub.presets import (
    build,
    export_preset,
    preset_path,
    register_presets,
    save_preset,
    upload_preset,
)
from convnext_keras.kerashub.segmenter import (
    ConvNeXtUperNetImageSegmenter,
    ConvNeXtUperNetImageSegmenterPreprocessor,
)

__all__ = [
    "ConvNeXtBackbone",
    "ConvNeXtImageClassifier",
    "ConvNeXtImageClassifierPreprocessor",
    "ConvNeXtImageConverter",
    "ConvNeXtUperNetImageConverter",
    "ConvNeXtUperNetImageSegmenter",
    "ConvNeXtUperNetImageSegmenterPreprocessor",
    "build",
    "export_preset",
    "preset_path",
    "register_presets",
    "save_preset",
    "upload_preset",
]

#: The registry's checkpoint names, as keras-hub built-in presets.
PRESETS = register_presets()
