"""The contract every layer honours, and the two registries the net builds layers from.

A layer is a small ``torch.nn.Module`` built from its ``LayerParameter``. It does not own its
learnable blobs: the net creates them (so that layers naming the same ``param { name }`` share
one tensor) from the shapes the layer declares in ``param_blobs`` and hands them to ``forward``.

``LAYERS`` maps Caffe's type name (``"Convolution"``) to the class; ``PYTHON_LAYERS`` maps a
Python layer's ``(module, layer)`` (``("roi_data_layer.layer", "OHEMDataLayer")``) to our class,
so that a spec never makes us import code it names.

Contract of a layer class:

- ``__init__(self, param, ctx)``: ``param`` is the layer's ``LayerParameter`` (V1 already
  upgraded), ``ctx`` a ``LayerContext`` (phase, config). Check the parameters here and raise
  ``SpecError`` naming the layer on nonsense.
- ``param_blobs(bottom_shapes) -> list[ParamBlob]``: the learnable blobs, Caffe's order
  (weight, then bias), with Caffe's shapes, so ``.caffemodel`` blobs load one to one.
- ``forward(bottoms, params) -> list[Tensor]``: the tops, in the order of the spec's ``top``s.
  Bottoms arrive already detached where ``propagate_down: false``. Use ``ctx.phase`` (not
  ``self.training``) for phase-dependent behaviour (Dropout), as Caffe's phase is the net's.
- ``top_shapes(bottom_shapes) -> list[tuple]`` (optional): for ``readonly-ohem net``; the base
  version runs ``forward`` on zero tensors of those shapes.
- Class attributes: ``loss_by_default`` (Caffe loss layers: top 0 gets loss_weight 1 when the
  spec sets none), ``backprop_to_bottoms`` (False where Caffe's backward is a no-op or not
  implemented: data layers, OHEMDataLayer, Accuracy — the net then cuts the gradient there),
  ``min_bottoms``/``max_bottoms``/``min_tops``/``max_tops`` for friendly arity errors
  (``None`` = unbounded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from readonly_ohem.errors import SpecError


@dataclass
class LayerContext:
    """What a layer may know beyond its own parameters."""

    phase: str = "TRAIN"  # "TRAIN" or "TEST": Caffe's phase of the whole net
    cfg: Any = None  # the application's config, for its Python layers; the engine never reads it
    net_name: str = ""
    extras: dict = field(default_factory=dict)  # e.g. a selection recorder for OHEMDataLayer


@dataclass
class ParamBlob:
    """A learnable blob a layer declares: its Caffe shape and the filler that initializes it."""

    shape: tuple
    filler: Any = None  # a FillerParameter message (or None: constant 0)


class Layer(nn.Module):
    loss_by_default: bool = False
    backprop_to_bottoms: bool = True
    min_bottoms: int | None = 0
    max_bottoms: int | None = None
    min_tops: int | None = 0
    max_tops: int | None = None

    def __init__(self, param, ctx: LayerContext):
        super().__init__()
        self.param = param
        self.ctx = ctx
        self.name = param.name
        self._check_arity()

    # -- contract ---------------------------------------------------------------------------
    def param_blobs(self, bottom_shapes: Sequence[tuple]) -> list[ParamBlob]:
        return []

    def forward(self, bottoms: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def top_shapes(self, bottom_shapes: Sequence[tuple]) -> list[tuple]:
        bottoms = [torch.zeros(s) for s in bottom_shapes]
        params = [torch.zeros(b.shape) for b in self.param_blobs(bottom_shapes)]
        with torch.no_grad():
            return [tuple(t.shape) for t in self.forward(bottoms, params)]

    # -- helpers ----------------------------------------------------------------------------
    def error(self, message: str) -> SpecError:
        """A SpecError naming this layer: ``raise self.error("kernel_size is required")``."""
        return SpecError(f"layer {self.name!r} ({self.param.type}): {message}")

    def _check_arity(self) -> None:
        nb, nt = len(self.param.bottom), len(self.param.top)
        for what, n, lo, hi in (("bottom", nb, self.min_bottoms, self.max_bottoms),
                                ("top", nt, self.min_tops, self.max_tops)):
            if lo is not None and n < lo or hi is not None and n > hi:
                want = f"exactly {lo}" if lo == hi else f"{lo}..{'∞' if hi is None else hi}"
                raise self.error(f"takes {want} {what} blob(s), got {n}")


LAYERS: dict[str, type[Layer]] = {}
PYTHON_LAYERS: dict[tuple[str, str], type[Layer]] = {}


def register(*type_names: str) -> Callable[[type[Layer]], type[Layer]]:
    """Class decorator: ``@register("Convolution")`` adds the class to ``LAYERS``."""

    def deco(cls: type[Layer]) -> type[Layer]:
        for t in type_names:
            LAYERS[t] = cls
        return cls

    return deco


def register_python(module: str, layer: str) -> Callable[[type[Layer]], type[Layer]]:
    """Class decorator: ``@register_python("roi_data_layer.layer", "OHEMDataLayer")``."""

    def deco(cls: type[Layer]) -> type[Layer]:
        PYTHON_LAYERS[(module, layer)] = cls
        return cls

    return deco
