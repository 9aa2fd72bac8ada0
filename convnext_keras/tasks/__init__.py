"""What a user runs on a model: predict (and Grad-CAM), evaluate, segment (and mIoU), embed,
bench.
"""

import lazy_loader as _lazy

#: Modules reachable as attributes (``ck.tasks.bench``), imported on first use.
__getattr__, __dir__, __all__ = _lazy.attach(
    __name__, ["bench", "embed", "evaluate", "gradcam", "predict", "segment", "segment_eval"]
)
