"""convnext_keras: the ConvNeXt family for Keras 3 (TensorFlow, JAX and PyTorch backends).

import convnext_keras as ck
ck.list_models()
model = ck.load_model("convnext_tiny_1k_224")       # ConvNeXt (MIT weights)
model = ck.load_model("convnextv2_tiny_1k_224")     # ConvNeXt V2 (CC BY-NC 4.0 weights)
"""

from . import finetune, registry
from .api import OFFICIAL, convert_checkpoint, count_params, list_models, load_model
from .checkpoints import CheckpointError, UnsafeCheckpointError, convert_state_dict, read_state_dict
from .export import ExportError, VerificationError, export
from .hub import DownloadError

# Importing the layers registers them with Keras, so keras.saving.load_model("m.keras") needs no
# custom_objects once this package is imported.
from .layers import GlobalResponseNormalization, LayerScale, StochasticDepth
from .model import build_model
from .predict import decode_predictions, predict_files
from .preprocess import ImageError, eval_transform, load_image
from .registry import UnknownModelError

__version__ = "0.1.0"

__all__ = [
    "OFFICIAL",
    "CheckpointError",
    "DownloadError",
    "ExportError",
    "GlobalResponseNormalization",
    "ImageError",
    "LayerScale",
    "StochasticDepth",
    "UnknownModelError",
    "UnsafeCheckpointError",
    "VerificationError",
    "build_model",
    "convert_checkpoint",
    "convert_state_dict",
    "count_params",
    "decode_predictions",
    "eval_transform",
    "export",
    "finetune",
    "list_models",
    "load_image",
    "load_model",
    "predict_files",
    "read_state_dict",
    "registry",
]
