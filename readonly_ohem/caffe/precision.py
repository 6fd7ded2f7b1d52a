"""Caffe's float32, set by the entry points that run nets (importing the engine sets nothing).

Caffe computes in true float32. TF32, PyTorch's default for cuDNN convolutions on Ampere and
newer GPUs (and optional for matmuls), keeps a 10-bit mantissa: ~1e-3 off, where every net built
here is meant to match Caffe to ~1e-4. The commands, the ``Trainer`` and the demo call
``use_caffe_float32()`` before they run a net; a library user does the same, or not.
"""

from __future__ import annotations

import torch


def use_caffe_float32() -> None:
    """Turn TF32 off for cuDNN convolutions and CUDA matmuls, for the whole process."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
