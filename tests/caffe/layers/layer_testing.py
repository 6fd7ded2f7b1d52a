"""Helpers the Caffe layer-family tests share: build a layer from text, seeded float64 data,
gradcheck on fresh leaves."""

import torch
from google.protobuf import text_format

from readonly_ohem.caffe.layers import LAYERS, LayerContext
from readonly_ohem.caffe.proto import caffe_pb2


def make(text: str, phase: str = "TRAIN"):
    """The layer a ``LayerParameter`` text describes, in ``phase``."""
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    return LAYERS[lp.type](lp, LayerContext(phase=phase))


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gradcheck(fn, *inputs):
    inputs = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    return torch.autograd.gradcheck(fn, inputs)
