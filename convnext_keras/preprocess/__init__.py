"""Images in, model inputs out: the official ConvNeXt evaluation transform, exactly
(torchvision's ``build_transform`` of the originals, with PIL), and what feeds it.

Modules: :mod:`.transforms` (PIL and numpy: :func:`eval_transform`, :func:`load_image`,
:func:`normalize`, the settings of each checkpoint, :func:`config_for`), :mod:`.batches`
(parallel pipelines: :class:`ImageBatches`, :func:`image_dataset`) and :mod:`.layers` (Keras
layers for preprocessing inside a model: :class:`EvalPreprocessing`, :class:`Normalize`;
imported on first use, so that ``from convnext_keras import preprocess`` imports no Keras).
Every public name of the three is importable from here.
"""

import lazy_loader as _lazy

from convnext_keras.preprocess.batches import Batch, ImageBatches, default_workers, image_dataset
from convnext_keras.preprocess.transforms import (
    DEFAULT_CROP_PCT,
    DEFAULT_INTERPOLATION,
    DEFAULT_RESOLUTION,
    INTERPOLATIONS,
    ImageError,
    PreprocessConfig,
    as_config,
    config_for,
    crop_box,
    denormalize,
    eval_transform,
    load_image,
    normalize,
    resize_and_crop,
    transform_file,
)

#: The Keras layers, imported on first use.
__getattr__, __dir__, _ = _lazy.attach(
    __name__,
    ["batches", "layers", "transforms"],
    {"layers": ["EvalPreprocessing", "Normalize", "preprocessing_layer", "with_normalization"]},
)
