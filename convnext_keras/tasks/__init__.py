"""What a user runs on a model: predict (and Grad-CAM), evaluate, segment (and mIoU), embed,
bench.
"""
