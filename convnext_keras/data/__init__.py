"""Label files and dataset tables that ship with the package: ImageNet names, ADE20K names and
palette, COCO's classes and category ids.
"""

import lazy_loader as _lazy

#: Modules reachable as attributes (``ck.data.ade20k``), imported on first use.
__getattr__, __dir__, __all__ = _lazy.attach(__name__, ["ade20k", "coco", "labels"])
