"""The ``convnext`` command line: argument parsing only; every command calls the library.

Each sub-module registers its commands on :data:`main`.
"""

from __future__ import annotations

from convnext_keras.cli import bench as _bench  # noqa: F401  (registers bench)
from convnext_keras.cli import cache as _cache  # noqa: F401  (registers cache list/verify/remove)
from convnext_keras.cli import core  # noqa: F401  (registers list / convert / fetch)
from convnext_keras.cli import detect as _detect  # noqa: F401  (registers detect)
from convnext_keras.cli import embed as _embed  # noqa: F401  (registers embed)
from convnext_keras.cli import export as _export  # noqa: F401  (registers export / collection)
from convnext_keras.cli import finetune as _finetune  # noqa: F401  (registers finetune)
from convnext_keras.cli import predict as _predict  # noqa: F401  (registers predict / eval)
from convnext_keras.cli import segment as _segment  # noqa: F401  (registers segment / eval-seg)
from convnext_keras.cli._app import main

__all__ = ["main"]
