"""Kernels used by everyone: boxes (IoU, bbox transform, clip), NMS, RoI pooling."""
