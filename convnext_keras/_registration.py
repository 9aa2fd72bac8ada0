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

keras-hub (the optional extra) gets a hook of its own: when ``keras_hub`` is imported,
:func:`register_keras_hub` imports :data:`KERAS_HUB_PACKAGE`, whose classes (the backbone,
tasks, preprocessors and image converters) subclass keras-hub's and register the same way, and
which makes the registry's names keras-hub presets.  Without keras-hub nothing of it is
imported.  A failure there is a warning, never an error in the user's ``import keras_hub``.
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
#: The package of the keras-hub classes, imported when keras-hub is (relative to the package).
KERAS_HUB_PACKAGE = "kerashub"


def register(keras_module=None) -> None:
    """Import every module in :data:`MODULES`, registering their classes with Keras."""
    for name in MODULES:
        importlib.import_module(f"{__package__}.{name}")


def register_keras_hub(keras_hub_module=None) -> None:
    """Import :data:`KERAS_HUB_PACKAGE` (registering its classes and presets); a failure (an
    incompatible keras-hub, say) is reported as a warning naming the fix."""
    try:
        importlib.import_module(f"{__package__}.{KERAS_HUB_PACKAGE}")
    except Exception as e:  # the user's own `import keras_hub` must not fail because of this
        import warnings

        warnings.warn(
            f"convnext_keras could not register its keras-hub classes ({type(e).__name__}: "
            f"{e}); keras-hub presets of convnext_keras will not load. Install a compatible "
            "keras-hub: pip install 'convnext-keras[keras-hub]'",
            RuntimeWarning,
            stacklevel=2,
        )


def install() -> None:
    """Run :func:`register` when Keras is imported and :func:`register_keras_hub` when
    keras-hub is (each at once if it already is)."""
    import wrapt

    wrapt.register_post_import_hook(register, "keras")
    wrapt.register_post_import_hook(register_keras_hub, "keras_hub")
