"""Exports (SavedModel, ONNX, TFLite, ``.keras``), their verification, and the model collection
with its model cards.
"""

import lazy_loader as _lazy

#: Modules reachable as attributes (``ck.export.collection``), imported on first use.
__getattr__, __dir__, __all__ = _lazy.attach(__name__, ["collection", "exporter"])
