"""Checkpoint files to Keras weights: safe reading, the foreign layouts, conversion, the cache,
downloads and the Hugging Face Hub.
"""

import lazy_loader as _lazy

#: Modules reachable as attributes (``ck.weights.cache``), imported on first use.
__getattr__, __dir__, __all__ = _lazy.attach(
    __name__, ["cache", "convert", "download", "hfhub", "layouts", "read", "store"]
)
