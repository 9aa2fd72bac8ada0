"""The ``convnext`` command line: argument parsing only; every command calls the library.

Each sub-module registers its commands on :data:`main`.
"""

from __future__ import annotations

import os

# Quiet TensorFlow's C++ start-up chatter before any backend is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from . import bench as _bench  # noqa: E402,F401  (registers bench)
from . import core  # noqa: E402,F401  (registers list / convert)
from . import export as _export  # noqa: E402,F401  (registers export / collection)
from . import finetune as _finetune  # noqa: E402,F401  (registers finetune)
from . import predict as _predict  # noqa: E402,F401  (registers predict / eval)
from ._app import main  # noqa: E402

__all__ = ["main"]
