"""The ``convnext`` command line: argument parsing only; every command calls the library.

Each sub-module registers its commands on :data:`main`.
"""

from __future__ import annotations

from . import bench as _bench  # noqa: F401  (registers bench)
from . import core  # noqa: F401  (registers list / convert / fetch)
from . import embed as _embed  # noqa: F401  (registers embed)
from . import export as _export  # noqa: F401  (registers export / collection)
from . import finetune as _finetune  # noqa: F401  (registers finetune)
from . import predict as _predict  # noqa: F401  (registers predict / eval)
from . import segment as _segment  # noqa: F401  (registers segment / eval-seg)
from ._app import main

__all__ = ["main"]
