"""The networks: the ConvNeXt network (V1, V2 and isotropic as block options), its layers, and
the decoders and heads built on its feature pyramid (UperNet).
"""

import lazy_loader as _lazy

#: Modules reachable as attributes (``ck.nets.convnext``), imported on first use.
__getattr__, __dir__, __all__ = _lazy.attach(__name__, ["convnext", "layers", "upernet"])
