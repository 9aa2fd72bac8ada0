"""Images in, model inputs out: the official ConvNeXt evaluation transform, exactly.

The original evaluates with torchvision on PIL images (``main.py`` / ``datasets.py``,
``build_transform``)::

    res < 384:  Resize(int(res / crop_pct), BICUBIC)   # shorter side; aspect ratio kept
                CenterCrop(res)
    res >= 384: Resize((res, res), BICUBIC)            # squash, no crop
    ToTensor()                                         # uint8 -> [0, 1]
    Normalize(IMAGENET_MEAN, IMAGENET_STD)

:func:`eval_transform` does exactly that with PIL (the same resampling code torchvision calls),
so this library's inputs equal the original's to the last bit.  The settings come from the
registry (:func:`config_for`), where a checkpoint's ``crop_mode`` can fix the choice between
crop and squash whatever the resolution (timm's centre crop at 384, DINOv3's squash at 224).

Also here:

* :func:`load_image` - any file PIL reads becomes RGB (grayscale, palette, alpha, CMYK,
  16-bit), optionally upright by its EXIF orientation; unreadable files raise
  :class:`ImageError` naming the file.
* :func:`normalize` / :func:`denormalize` and :class:`EvalPreprocessing`, a Keras layer that
  does resize + crop + normalise inside a model (close to, not bit-equal with, PIL).
* Batched input pipelines that decode and resize in parallel and prefetch:
  :class:`ImageBatches` (a thread pool yielding numpy batches; needs no TensorFlow) and
  :func:`image_dataset` (a ``tf.data.Dataset``; TensorFlow is imported only there).

Modules: :mod:`.transforms` (PIL and numpy: the transform, image loading, normalisation),
:mod:`.batches` (the pipelines) and :mod:`.layers` (the Keras layers; imported on first use, so
that ``from convnext_keras import preprocess`` imports no Keras).
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
