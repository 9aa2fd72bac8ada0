"""Keras learns this package's serializable classes as soon as Keras itself is imported.

``import convnext_keras`` imports no Keras (the ``convnext`` CLI starts in a fraction of a
second, and ``convnext list`` never loads a backend).  Yet ``keras.saving.load_model("m.keras")``
after ``import convnext_keras`` must find ``convnext_keras>LayerScale`` & co. with no
``custom_objects``: Keras resolves such names only through its registry (it imports modules
named in a ``.keras`` file only for its own packages).  So the package asks wrapt for a
post-import hook on ``keras`` (:func:`install`), which imports the modules below; each registers
its classes with ``@keras.saving.register_keras_serializable(package=PACKAGE)``.

The modules' import chains are kept free of other modules of this package that import Keras,
so the hook also works when the first Keras import comes from inside one of them (a module
still being imported is returned as it is and registers its classes when it completes).
"""

from __future__ import annotations

import importlib

#: The Keras registration package of every serializable class here (``convnext_keras>Name``).
PACKAGE = "convnext_keras"

#: The modules that define Keras serializables (relative to the package).
MODULES = (
    "nets.layers",
    "preprocess.layers",
    "finetune.optim",
    "nets.upernet",
    "nets.detection.layers",
)


def register(keras_module=None) -> None:
    """Import every module in :data:`MODULES`, registering their classes with Keras."""
    for name in MODULES:
        importlib.import_module(f"{__package__}.{name}")


def install() -> None:
    """Run :func:`register` when Keras is imported (at once if it already is)."""
    import wrapt

    wrapt.register_post_import_hook(register, "keras")
