"""Exports (SavedModel, ONNX, TFLite, ``.keras``), their verification, and the model collection
with its model cards.

    exporter        what a caller uses: formats and paths, staging, export(), export_named()
    planning        the input contract, the errors and result, the plan checked before writing
    writers         writing each format (SavedModel with its TF-Hub object, ONNX, TFLite)
    verify          reloading each export with its runtime and comparing it with Keras
    tf_subprocess   the parent side of a TensorFlow-backend child (export under JAX/PyTorch,
                    the TF-Hub fine-tuning check)
    child           what that child runs (``python -m convnext_keras.export.child``)
    collection      the TF-Hub-style collection: weights, model directories, manifests, index
    cards           the Markdown of the model cards and of the index page

The public names below are imported from their modules on first use (lazy_loader): importing
this package imports no Keras, no TensorFlow and none of its modules (so ``python -m
convnext_keras.export.child`` runs that module once).  ``ck.export``, the top-level
package's attribute, is the function :func:`exporter.export`: import this package by its name.
"""

import lazy_loader as _lazy

#: Module -> the public names it defines, imported on first access.
_PUBLIC = {
    "exporter": [
        "FORMATS",
        "TOLERANCE",
        "canonical_format",
        "default_path",
        "export",
        "export_named",
        "staged",
    ],
    "planning": [
        "INPUT_CONTRACT",
        "INPUT_NAME",
        "OUTPUT_NAMES",
        "RAW_INPUT_CONTRACT",
        "ExportError",
        "ExportResult",
        "VerificationError",
    ],
    "writers": ["METADATA_FILE", "ONNX_OPSET"],
    "tf_subprocess": ["hub_finetune_check"],
    "cards": ["CollectionError", "index_markdown", "model_card"],
    "collection": [
        "CollectionReport",
        "build_collection",
        "read_manifest",
        "select_models",
        "write_index",
    ],
}
_MODULES = [
    "cards",
    "child",
    "collection",
    "exporter",
    "planning",
    "tf_subprocess",
    "verify",
    "writers",
]

__getattr__, __dir__, __all__ = _lazy.attach(__name__, _MODULES, _PUBLIC)
