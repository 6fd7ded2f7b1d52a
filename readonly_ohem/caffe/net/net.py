"""``Net``: a Caffe network as a PyTorch module, with Caffe's graph semantics (``SPEC.md`` §3).

A ``Net`` is made in three stages: ``spec`` parses the file (V1 upgrade, NetState filtering),
``build`` makes the layers, blobs and params (``NetBuilder``), ``backward`` runs Caffe's
need-backward analysis (``BackwardPlan``). Running it copies Caffe's ``Net::Forward`` /
``Net::Backward``:

- layers run in file order; Input layers and data layers (layers without bottoms) are the
  sources; a fed blob replaces what its source would produce, with the fed shape (Caffe
  reshapes);
- in-place tops (top j named as bottom j) rebind the blob name to the new tensor: no tensor is
  ever modified in place, so autograd sums the gradients of a blob consumed several times, which
  is what Caffe's inserted Split layers do;
- a layer whose tops reach no loss through edges that carry gradient runs under
  ``torch.no_grad()``; a bottom that gets no gradient is detached; a param with ``lr_mult: 0``
  gets no gradient (unless ``force_backward``);
- the loss is Σ loss_weight · top.sum() over the loss tops;
- all in float32, as Caffe; ``set_compute_dtype`` lets chosen layers run under ``torch.autocast``
  (e.g. bfloat16) for speed, their tops cast back to float32, so every blob stays float32.

Blob diffs in Caffe's sense (``blob_diffs``): an in-place chain shares one diff buffer, so the
diff left after backward is the gradient w.r.t. the input of the first in-place layer that
writes its bottom diff (usually the first version of the blob).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from readonly_ohem.caffe import weights
from readonly_ohem.caffe.layers.base import Layer, LayerContext
from readonly_ohem.caffe.net.backward import BackwardPlan
from readonly_ohem.caffe.net.build import (
    LayerRecord,
    LearnableParam,
    NetBuilder,
    ParamInfo,
    declared_input_shapes,
    layer_where,
)
from readonly_ohem.caffe.spec import load_net_spec, phase_value
from readonly_ohem.errors import SpecError


class Net(nn.Module):
    """A Caffe net; the module docstring gives the semantics.

    ``cfg``: the application's config, handed to the layers (``LayerContext.cfg``) as is; the
    engine never reads it. ``input_shapes``: blob -> shape for net inputs and data-layer tops;
    ``extras``: handed to the layers; ``seed``: of the param fillers; ``build_data_layers``:
    False leaves data layers unbuilt (their tops then need ``input_shapes``); ``materialize``:
    False makes the params on the meta device, unfilled.
    """

    def __init__(self, net_param, phase: str = "TRAIN", cfg=None, source: str | None = None,
                 input_shapes: Mapping[str, Iterable[int]] | None = None,
                 extras: dict | None = None, allow_python_import: bool = False,
                 level: int = 0, stages: Iterable[str] = (), seed: int = 0,
                 build_data_layers: bool = True, materialize: bool = True):
        super().__init__()
        self.source = str(source) if source is not None else "<net>"
        self.phase = "TRAIN" if phase_value(phase) == 0 else "TEST"
        spec = load_net_spec(net_param, self.phase, level, stages, source=self.source)
        self.spec = spec
        self.net_name = spec.name
        self.cfg = cfg
        extras = dict(extras or {})
        extras.setdefault("allow_python_import", allow_python_import)
        self.ctx = LayerContext(phase=self.phase, cfg=cfg, net_name=spec.name, extras=extras)
        self.force_backward = bool(spec.force_backward)
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)
        built = NetBuilder(self.source, self.ctx, input_shapes=input_shapes, seed=seed,
                           build_data_layers=build_data_layers,
                           materialize=materialize).build(spec)
        self._modules_list = nn.ModuleList(built.modules)
        self._params = nn.ParameterList(built.params)
        self._param_info: list[ParamInfo] = built.param_info
        self.layers: list[LayerRecord] = built.layers
        self.blob_shapes: dict[str, tuple] = built.blob_shapes  # final (in place: after the chain)
        self._by_name = {r.name: r for r in self.layers}
        self.loss_weights: dict[str, float] = {}
        for rec in self.layers:
            for t, w in zip(rec.tops, rec.loss_weights):
                if w != 0:
                    self.loss_weights[t] = w
        self._diff_tensors: dict[str, torch.Tensor] = {}
        self._seeds: dict[str, torch.Tensor] = {}
        self._compute_dtype: dict[str, torch.dtype] = {}  # layer -> autocast dtype
        self._plan_backward()

    @classmethod
    def from_file(cls, path, phase: str = "TRAIN", cfg=None, input_shapes=None, extras=None,
                  allow_python_import: bool = False, **kw) -> "Net":
        """Parse ``path`` (text or binary, V1 upgraded, phase-filtered) and build the net."""
        return cls(str(path), phase=phase, cfg=cfg, source=str(path), input_shapes=input_shapes,
                   extras=extras, allow_python_import=allow_python_import, **kw)

    def _where(self, lp) -> str:
        return layer_where(self.source, lp)

    def _plan_backward(self) -> None:
        """Caffe's Net::Init analysis (``BackwardPlan``); a param no layer takes a gradient
        for gets ``requires_grad`` False."""
        plan = BackwardPlan(self.layers, self.force_backward)
        self._plan = plan
        self._leaf_grad = plan.leaf_grad
        self._diff_version = plan.diff_version
        used = [False] * len(self._params)
        for rec in self.layers:
            for pid, g in zip(rec.param_ids, rec.param_grad):
                used[pid] = used[pid] or g
        for p, u in zip(self._params, used):
            p.requires_grad_(u)

    def set_compute_dtype(self, layers: Iterable[str], dtype: torch.dtype | None) -> None:
        """Run ``layers`` (names) under ``torch.autocast(dtype)`` (bfloat16 or float16), or back in
        float32 (``dtype`` None or float32). Their tops are cast back to float32: blobs stay
        float32 between layers, as Caffe's."""
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute dtype must be bfloat16, float16 or float32, got {dtype}")
        for name in layers:
            if name not in self._by_name:
                raise SpecError(f"{self.source}: no layer named {name!r}")
            if dtype in (None, torch.float32):
                self._compute_dtype.pop(name, None)
            else:
                self._compute_dtype[name] = dtype

    # -- running ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def _as_tensor(self, name: str, value) -> torch.Tensor:
        if isinstance(value, np.ndarray) or not isinstance(value, torch.Tensor):
            value = torch.as_tensor(np.asarray(value))
        return value.to(self.device)

    def forward(self, feed: Mapping[str, Any] | None = None,
                retain_diffs: bool = False) -> dict[str, torch.Tensor]:
        """Run the net. ``feed``: blob name -> array for net inputs or data-layer tops (a data
        layer whose tops are all fed is skipped). Returns every blob's final value.
        ``retain_diffs``: keep what ``blob_diffs`` needs after a backward."""
        feed = dict(feed or {})
        sources = {t for r in self.layers if r.is_source for t in r.tops}
        unknown = [k for k in feed if k not in sources]
        if unknown:
            known = sorted(sources)
            raise SpecError(f"{self.source}: cannot feed blob(s) {unknown}: only net inputs and "
                            f"data-layer tops can be fed ({', '.join(known) or 'none'})")
        blobs: dict[str, torch.Tensor] = {}
        versions: dict[str, int] = {}
        self._diff_tensors = {}
        self._seeds = {}
        grad_on = torch.is_grad_enabled()

        def bind(name, tensor, inplace):
            v = versions[name] + 1 if inplace else 0
            versions[name] = v
            from_source = self._leaf_grad.get((name, v))
            if (from_source or (from_source is not None and retain_diffs)) and grad_on \
                    and not tensor.requires_grad and tensor.is_floating_point():
                # Caffe computes this blob's diff though no graph leads here: a leaf for it
                tensor = tensor.detach().requires_grad_(True)
            if retain_diffs and self._diff_version.get(name) == v:
                if tensor.requires_grad and not tensor.is_leaf:
                    tensor.retain_grad()
                self._diff_tensors[name] = tensor
            blobs[name] = tensor

        for rec in self.layers:
            if rec.is_source:
                fed = [t in feed for t in rec.tops]
                if all(fed) or rec.module is None:
                    for j, t in enumerate(rec.tops):
                        if t in feed:
                            tensor = self._as_tensor(t, feed[t])
                        elif rec.type == "Input":
                            decl = declared_input_shapes(rec.param, self.source)[j]
                            tensor = torch.zeros(decl, device=self.device)
                        else:
                            raise SpecError(f"{self._where(rec.param)}: this data layer was not "
                                            f"built (its tops were given shapes): feed its top {t!r}")
                        bind(t, tensor, False)
                    continue
                with torch.no_grad():
                    tops = rec.module([], [])
                self._check_tops(rec, tops)
                for j, (t, x) in enumerate(zip(rec.tops, tops)):
                    x = self._as_tensor(t, feed[t]) if fed[j] else x.to(self.device)
                    bind(t, x, False)
                continue
            bottoms = []
            for i, b in enumerate(rec.bottoms):
                x = blobs[b]
                bottoms.append(x if rec.bottom_grad[i] else x.detach())
            params = [self._param_as(pid, shape, g)
                      for pid, shape, g in zip(rec.param_ids, rec.param_shapes, rec.param_grad)]
            dtype = self._compute_dtype.get(rec.name)
            cast = nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)
            with torch.set_grad_enabled(grad_on and rec.need_backward), cast:
                tops = rec.module(bottoms, params)
            self._check_tops(rec, tops)
            if dtype is not None:
                tops = [x.float() if x.dtype in (torch.bfloat16, torch.float16) else x for x in tops]
            for j, (t, x) in enumerate(zip(rec.tops, tops)):
                if any(x is y for y in blobs.values()) or any(x is y for y in params):
                    x = x.view_as(x)  # a distinct autograd node, so each blob keeps its own diff
                bind(t, x, rec.inplace[j])
        return blobs

    def _check_tops(self, rec, tops) -> None:
        if not isinstance(tops, (list, tuple)) or len(tops) != len(rec.tops):
            n = len(tops) if isinstance(tops, (list, tuple)) else type(tops).__name__
            raise SpecError(f"{self._where(rec.param)}: the layer returned {n} top(s), the spec "
                            f"names {len(rec.tops)}")

    def total_loss(self, blobs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Σ weight · blob.sum() over the loss tops: Caffe's net loss, a scalar with grad."""
        total = None
        for name, w in self.loss_weights.items():
            term = blobs[name].sum() * w
            total = term if total is None else total + term
        if total is None:
            return torch.zeros((), device=self.device)
        return total

    def backward(self, blobs: Mapping[str, torch.Tensor],
                 top_diffs: Mapping[str, Any] | None = None) -> None:
        """One Net::Backward: from the weighted losses, plus ``top_diffs`` written into the named
        blobs' diffs (a seed on a loss blob replaces its loss weight)."""
        top_diffs = dict(top_diffs or {})
        tensors, grads = [], []
        self._seeds = {}
        for name, w in self.loss_weights.items():
            if name in top_diffs:
                continue
            t = blobs[name]
            if t.requires_grad:
                tensors.append(t)
                grads.append(torch.full_like(t, w))
        for name, d in top_diffs.items():
            if name not in blobs:
                raise SpecError(f"{self.source}: top diff for unknown blob {name!r}")
            t = blobs[name]
            d = self._as_tensor(name, d).to(t.dtype)
            if d.numel() != t.numel():
                raise SpecError(f"{self.source}: top diff for blob {name!r} has shape "
                                f"{list(d.shape)}, the blob is {list(t.shape)}")
            d = d.reshape(t.shape)
            self._seeds[name] = d
            if t.requires_grad:
                tensors.append(t)
                grads.append(d)
        if tensors:
            torch.autograd.backward(tensors, grads)

    def blob_diffs(self) -> dict[str, torch.Tensor]:
        """Each blob's diff in Caffe's sense after ``forward(retain_diffs=True)`` and a backward
        (for an in-place chain: w.r.t. the input of its first in-place layer); zeros where no
        gradient arrived, the loss weight on a loss top that had no graph."""
        out = {}
        for name, t in self._diff_tensors.items():
            g = t.grad if t.requires_grad else None
            if g is None:
                if name in self._seeds:
                    g = self._seeds[name]
                elif name in self.loss_weights and not t.requires_grad:
                    g = torch.full_like(t, self.loss_weights[name])
                else:
                    g = torch.zeros_like(t)
            out[name] = g.detach()
        return out

    def param_diffs(self) -> dict[str, list[torch.Tensor]]:
        """Per layer with params, its blobs' accumulated ``.grad`` (zeros when none); shared
        params appear under every layer using them."""
        out = {}
        for rec in self.layers:
            if rec.param_ids:
                out[rec.name] = [(self._params[pid].grad.detach() if self._params[pid].grad
                                  is not None else torch.zeros_like(self._params[pid]))
                                 .reshape(shape)
                                 for pid, shape in zip(rec.param_ids, rec.param_shapes)]
        return out

    # -- params ---------------------------------------------------------------------------------
    def layer(self, name: str) -> Layer | None:
        try:
            return self._by_name[name].module
        except KeyError:
            raise SpecError(f"{self.source}: no layer named {name!r}") from None

    def record(self, name: str) -> LayerRecord:
        try:
            return self._by_name[name]
        except KeyError:
            raise SpecError(f"{self.source}: no layer named {name!r}") from None

    def layer_params(self, name: str) -> list[nn.Parameter]:
        """The layer's blobs, in its own shapes: the shared ``nn.Parameter`` objects, or a view of
        one where a ``share_mode: PERMISSIVE`` sharer declares another shape of the same count."""
        rec = self.record(name)
        return [self._param_as(pid, shape) for pid, shape in zip(rec.param_ids, rec.param_shapes)]

    def _param_as(self, pid: int, shape: tuple, grad: bool = True) -> torch.Tensor:
        p = self._params[pid] if grad else self._params[pid].detach()
        return p if tuple(p.shape) == tuple(shape) else p.view(shape)

    def param_info(self, pid: int) -> ParamInfo:
        return self._param_info[pid]

    def learnable_params(self) -> list[LearnableParam]:
        out = []
        for p, info in zip(self._params, self._param_info):
            out.append(LearnableParam(
                key=info.key, tensor=p,
                lr_mult=1.0 if info.lr_mult is None else info.lr_mult,
                decay_mult=1.0 if info.decay_mult is None else info.decay_mult,
                owner=info.owner, index=info.index))
        return out

    def load_caffemodel(self, path):
        """Copy a .caffemodel's blobs into the params by layer name (``weights.load_into``)."""
        targets = {r.name: self.layer_params(r.name) for r in self.layers if r.param_ids}
        return weights.load_into(targets, path)

    def save_caffemodel(self, path) -> None:
        layers = [(r.name, r.type, [p.detach().cpu().numpy() for p in self.layer_params(r.name)])
                  for r in self.layers]
        weights.write_caffemodel(path, self.net_name, layers)
