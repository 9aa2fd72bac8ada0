"""Pallas kernels (JAX on a GPU) that the network's layers use where they are faster."""

import lazy_loader as _lazy

#: Modules reachable as attributes (``ck.kernels.depthwise``), imported on first use.
__getattr__, __dir__, __all__ = _lazy.attach(__name__, ["depthwise", "matmul"])
