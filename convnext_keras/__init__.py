"""convnext_keras: the ConvNeXt family for Keras 3 (TensorFlow, JAX and PyTorch backends).

import convnext_keras as ck
ck.list_models()
model = ck.load_model("convnext_tiny_1k_224")       # ConvNeXt (MIT weights)
model = ck.load_model("convnextv2_tiny_1k_224")     # ConvNeXt V2 (CC BY-NC 4.0 weights)

Importing the package imports no Keras and no backend: each public name below is imported
from its module on first use (lazy_loader), and Keras learns the package's layers when Keras
itself is imported (``_registration``), so ``keras.saving.load_model("m.keras")`` needs no
``custom_objects`` after ``import convnext_keras``.
"""

import lazy_loader as _lazy

from convnext_keras import _registration

__version__ = "0.2.0"

#: Module -> the public names it defines, imported on first access.
_PUBLIC = {
    "api": [
        *("OFFICIAL", "convert_checkpoint", "count_params", "list_models", "load_model"),
        "load_detection_model",
    ],
    "weights.read": ["CheckpointError", "UnsafeCheckpointError", "read_state_dict"],
    "weights.convert": ["convert_state_dict"],
    "tasks.embed": ["EmbedError", "embed", "load_features"],
    "export.exporter": ["export"],
    "export.planning": ["ExportError", "VerificationError"],
    "weights.download": ["DownloadError"],
    "nets.layers": ["GlobalResponseNormalization", "LayerScale", "StochasticDepth"],
    "nets.convnext": ["build_model"],
    "tasks.predict": ["decode_predictions", "predict_files"],
    "preprocess": ["ImageError", "eval_transform", "load_image"],
    "registry": ["UnknownModelError"],
    "tasks.segment": ["segment_files"],
    "tasks.detect": ["detect_files"],
}

#: Packages reachable as attributes (``ck.weights``, ``ck.tasks``), imported on first use.
_SUBMODULES = [
    *("api", "data", "engines", "errors", "finetune", "interface", "kernels", "nets"),
    *("preprocess", "registry", "tasks", "weights"),
]  # (``export`` is a function; import the package by its name)

__getattr__, __dir__, _ = _lazy.attach(__name__, _SUBMODULES, _PUBLIC)
__all__ = sorted(["finetune", "registry", *(n for names in _PUBLIC.values() for n in names)])
_registration.install()
