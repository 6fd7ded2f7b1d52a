"""Caffe's neuron layers: element-wise, one bottom, one top of the same shape.

Each computes what Caffe's CPU/GPU code computes, quirks included (see ``../shared/SPEC.md``
§3): ReLU/PReLU pass the negative slope at exactly 0, Dropout follows the Fast R-CNN fork's
``scale_train`` and the net's phase. Gradients come from autograd.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from readonly_ohem.caffe.layers.base import Layer, ParamBlob, register
from readonly_ohem.caffe.layers.util import broadcast, constant_filler


class _Neuron(Layer):
    """One bottom, one top of the same shape."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def top_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]


@register("ReLU")
class ReLU(_Neuron):
    """max(x, 0) + negative_slope·min(x, 0); the gradient at exactly 0 is the negative slope."""

    def forward(self, bottoms, params):
        x, slope = bottoms[0], float(self.param.relu_param.negative_slope)
        return [torch.relu(x) if slope == 0 else torch.where(x > 0, x, x * slope)]


@register("PReLU")
class PReLU(_Neuron):
    """ReLU with a learned slope per channel (axis 1), or one shared: blob (C,) or () (Caffe)."""

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        self.shared = bool(param.prelu_param.channel_shared)

    def param_blobs(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) < 2:
            raise self.error("number of axes of bottom blob must be >= 2")
        p = self.param.prelu_param
        filler = p.filler if p.HasField("filler") else constant_filler(0.25)
        return [ParamBlob(() if self.shared else (shape[1],), filler)]

    def forward(self, bottoms, params):
        x, slope = bottoms[0], params[0]
        if x.dim() < 2:
            raise self.error("number of axes of bottom blob must be >= 2")
        want = 1 if self.shared else x.shape[1]
        if slope.numel() != want:
            raise self.error(f"negative slope has {slope.numel()} values, expected {want}")
        slope = slope.reshape(()) if self.shared else broadcast(slope.reshape(-1), 1, x.dim())
        return [torch.where(x > 0, x, x * slope)]


@register("Sigmoid")
class Sigmoid(_Neuron):
    def forward(self, bottoms, params):
        return [torch.sigmoid(bottoms[0])]


@register("TanH")
class TanH(_Neuron):
    def forward(self, bottoms, params):
        return [torch.tanh(bottoms[0])]


@register("Power")
class Power(_Neuron):
    """(shift + scale·x)^power; a constant (zero gradient) when scale or power is 0."""

    def forward(self, bottoms, params):
        p, x = self.param.power_param, bottoms[0]
        power, scale, shift = float(p.power), float(p.scale), float(p.shift)
        if scale == 0 or power == 0:
            value = 1.0 if power == 0 else math.pow(shift, power)
            return [torch.full_like(x, value)]
        y = x
        if scale != 1:
            y = y * scale
        if shift != 0:
            y = y + shift
        if power != 1:
            y = y.pow(power)
        return [y if y is not x else x.view_as(x)]


@register("Dropout")
class Dropout(_Neuron):
    """TRAIN: x·mask/(1−p), mask ~ Bernoulli(1−p); TEST: identity.

    The Fast R-CNN fork's ``scale_train: false``: TRAIN x·mask, TEST x·(1−p). Caffe's phase is
    the net's (``ctx.phase``), not ``self.training``. The factors are Caffe's float32 values.
    """

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        p = param.dropout_param
        self.ratio = float(np.float32(p.dropout_ratio))
        if not 0.0 <= self.ratio < 1.0:
            raise self.error(f"dropout_ratio {p.dropout_ratio} must be in [0, 1)")
        self.scale = float(np.float32(1.0 / (1.0 - self.ratio)))  # Caffe's Dtype scale_
        self.test_factor = float(np.float32(1.0 / self.scale))  # caffe_scal(1. / scale_)
        self.scale_train = bool(p.scale_train)

    def forward(self, bottoms, params):
        x = bottoms[0]
        if self.ctx.phase == "TRAIN":
            mask = torch.empty_like(x).bernoulli_(1.0 - self.ratio)
            return [x * mask * self.scale if self.scale_train else x * mask]
        return [x.view_as(x) if self.scale_train else x * self.test_factor]
