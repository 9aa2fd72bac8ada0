"""Object detection and instance segmentation on the ConvNeXt pyramid: Mask R-CNN and Cascade
Mask R-CNN as mmdetection 2.x runs them at test time, in Keras 3 (``keras.ops`` only, one graph
for TensorFlow, JAX and PyTorch).

    boxes       anchors, the delta box coder, clipping, IoU
    nms         non-maximum suppression in a padded, fixed-size form (batched, per group)
    roi_align   mmcv's RoIAlign (aligned, adaptive sampling) on the FPN levels
    layers      the Keras layers: FPN upsampling, RPN proposals, RoI features, the cascade's
                refinement, the final detections and mask probabilities
    model       ``build_detector``: backbone + FPN + RPN + R-CNN heads as one Keras model
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__, ["boxes", "layers", "model", "nms", "roi_align"]
)
