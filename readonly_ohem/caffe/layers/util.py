"""Helpers shared by several layer families: Caffe's axis rules, default fillers, broadcasting."""

from __future__ import annotations

import torch

from readonly_ohem.caffe.layers.base import Layer
from readonly_ohem.caffe.proto import caffe_pb2


def canonical_axis(layer: Layer, axis: int, num_axes: int, what: str = "axis") -> int:
    """Caffe's ``Blob::CanonicalAxisIndex``: -num_axes <= axis < num_axes, negatives wrap."""
    if not -num_axes <= axis < num_axes:
        raise layer.error(f"{what} {axis} out of range for a blob with {num_axes} axes")
    return axis + num_axes if axis < 0 else axis


def constant_filler(value: float):
    """A ``constant`` FillerParameter: the default filler some layers declare (PReLU, Scale)."""
    return caffe_pb2.FillerParameter(type="constant", value=value)


def broadcast(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """View ``t`` (shape = x.shape[axis:axis + t.dim()]) so it broadcasts against an ndim blob."""
    return t.reshape((1,) * axis + tuple(t.shape) + (1,) * (ndim - axis - t.dim()))
