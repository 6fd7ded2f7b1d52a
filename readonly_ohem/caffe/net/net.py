"""``Net``: a Caffe network as a PyTorch module, with Caffe's graph semantics.

What this module copies from Caffe's ``Net::Init`` (see ``SPEC.md`` §3):

- layers run in file order (after ``readonly_ohem.caffe.spec``'s upgrade and phase filtering);
  Input layers and data layers (layers without bottoms) are the sources; a fed blob replaces
  what its source would produce, with the fed shape (Caffe reshapes);
- in-place tops (top j named as bottom j) rebind the blob name to the new tensor: no tensor is
  ever modified in place, so autograd sums the gradients of a blob consumed several times, which
  is what Caffe's inserted Split layers do;
- ``param { name }`` sharing: the first layer naming a param owns the tensor; a later sharer's
  ``lr_mult``/``decay_mult`` are adopted when the owner set none, a conflict or a shape clash is
  a ``SpecError`` naming the param and both layers;
- loss weights: ``loss_weight`` per top, else 1 on top 0 of classes with ``loss_by_default``;
- backward pruning, computed exactly as ``Net::Init`` does on the net with its Split layers
  (``_BackwardPlan``): a layer whose tops reach no loss through edges that carry gradient runs
  under ``torch.no_grad()``; a bottom that gets no gradient is detached; a param with
  ``lr_mult: 0`` gets no gradient (unless ``force_backward``). This is what makes OHEM's readonly
  head keep no graph, without special-casing any name.

Blob diffs in Caffe's sense (``blob_diffs``): an in-place chain shares one diff buffer, so the
diff left after backward is the gradient w.r.t. the input of the first in-place layer that
writes its bottom diff (usually the first version of the blob).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from readonly_ohem.errors import OhemError, SpecError
from readonly_ohem.caffe.layers.base import LAYERS, Layer, LayerContext, ParamBlob

# Caffe computes in true float32. TF32, PyTorch's default for cuDNN convolutions on Ampere and
# newer GPUs, is ~1e-3 off, and every net built here is meant to match Caffe to ~1e-4.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@dataclass
class LayerRecord:
    """One layer of the net as built: spec names plus what the graph analysis decided."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    module: Layer | None  # None: Input layers, and data layers whose tops are all fed
    param: Any  # the LayerParameter
    index: int
    is_source: bool  # no bottoms: an Input or a data layer
    inplace: list[bool] = field(default_factory=list)  # per top
    top_shapes: list[tuple] = field(default_factory=list)  # at build time (declared/given inputs)
    param_ids: list[int] = field(default_factory=list)  # into Net._params
    param_shapes: list[tuple] = field(default_factory=list)  # this layer's own blob shapes
    loss_weights: list[float] = field(default_factory=list)  # per top
    # filled by the backward analysis
    need_backward: bool = False
    bottom_grad: list[bool] = field(default_factory=list)  # edge carries gradient
    param_grad: list[bool] = field(default_factory=list)


@dataclass
class LearnableParam:
    """One unique learnable tensor (shared params appear once). ``key``: the param's name when
    named, else ``"<layer>/<index>"``; ``owner``/``index``: the first layer using it."""

    key: str
    tensor: nn.Parameter
    lr_mult: float
    decay_mult: float
    owner: str
    index: int


@dataclass
class _ParamInfo:
    key: str
    name: str  # the spec's param name ("" = unnamed, never shared)
    owner: str
    index: int
    shape: tuple
    lr_mult: float | None = None  # None: nobody set it (Caffe default 1)
    decay_mult: float | None = None
    lr_setter: str = ""
    decay_setter: str = ""
    users: list[tuple[str, int]] = field(default_factory=list)


def _layer_class(lp, source: str):
    from readonly_ohem.caffe import layers as _layers  # noqa: F401  (fills LAYERS)

    cls = LAYERS.get(lp.type)
    if cls is None:
        close = difflib.get_close_matches(lp.type, sorted(LAYERS) + ["Input"], n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise SpecError(f"{source}: layer {lp.name!r}: unknown layer type {lp.type!r}{hint}")
    return cls


def _declared_input_shapes(lp, source: str) -> list[tuple]:
    shapes = [tuple(int(d) for d in s.dim) for s in lp.input_param.shape]
    n = len(lp.top)
    if len(shapes) == 1:
        return shapes * n
    if len(shapes) == n:
        return shapes
    raise SpecError(f"{source}: layer {lp.name!r} (Input): {n} top(s) but "
                    f"{len(shapes)} input_param shape(s); give one shape, or one per top")


def _infer_top_shapes(module: Layer, bottom_shapes: list[tuple], where: str) -> list[tuple]:
    """Top shapes of ``module`` for ``bottom_shapes``: the layer's own ``top_shapes`` when it has
    one, else a forward on meta tensors (free), else the base version (zeros on the CPU)."""
    try:
        if type(module).top_shapes is not Layer.top_shapes:
            return [tuple(int(d) for d in s) for s in module.top_shapes(bottom_shapes)]
        try:
            bottoms = [torch.empty(s, device="meta") for s in bottom_shapes]
            params = [torch.empty(b.shape, device="meta") for b in module.param_blobs(bottom_shapes)]
            with torch.no_grad():
                tops = module(bottoms, params)
            return [tuple(int(d) for d in t.shape) for t in tops]
        except OhemError:
            raise
        except Exception:
            return [tuple(int(d) for d in s) for s in Layer.top_shapes(module, bottom_shapes)]
    except OhemError:
        raise
    except Exception as e:
        shapes = ", ".join("x".join(map(str, s)) or "scalar" for s in bottom_shapes)
        raise SpecError(f"{where}: cannot compute the top shapes for bottom shape(s) "
                        f"[{shapes}]: {e}") from None


class Net(nn.Module):
    """A Caffe net. See the module docstring for the semantics; CONTRACTS.md for the API."""

    def __init__(self, net_param, phase: str = "TRAIN", cfg=None, source: str | None = None,
                 input_shapes: Mapping[str, Iterable[int]] | None = None,
                 extras: dict | None = None, allow_python_import: bool = False,
                 level: int = 0, stages: Iterable[str] = (), seed: int = 0,
                 build_data_layers: bool = True, materialize: bool = True):
        super().__init__()
        from readonly_ohem.caffe.spec import load_net_spec, phase_value

        self.source = str(source) if source is not None else "<net>"
        self.phase = "TRAIN" if phase_value(phase) == 0 else "TEST"
        spec = load_net_spec(net_param, self.phase, level, stages, source=self.source)
        self.spec = spec
        self.net_name = spec.name
        if cfg is None:
            from readonly_ohem.config import default_config

            cfg = default_config()
        self.cfg = cfg
        extras = dict(extras or {})
        extras.setdefault("allow_python_import", allow_python_import)
        self.ctx = LayerContext(phase=self.phase, cfg=cfg, net_name=spec.name, extras=extras)
        self.force_backward = bool(spec.force_backward)
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)
        self._modules_list = nn.ModuleList()
        self._params = nn.ParameterList()
        self._param_info: list[_ParamInfo] = []
        self.layers: list[LayerRecord] = []
        self.blob_shapes: dict[str, tuple] = {}  # final shapes (in-place: after the chain)
        self._diff_tensors: dict[str, torch.Tensor] = {}
        self._diff_version: dict[str, int] = {}
        self._seeds: dict[str, torch.Tensor] = {}
        generator = torch.Generator().manual_seed(seed)
        self._build(spec, dict(input_shapes or {}), generator, build_data_layers, materialize)
        self._plan_backward()

    @classmethod
    def from_file(cls, path, phase: str = "TRAIN", cfg=None, input_shapes=None, extras=None,
                  allow_python_import: bool = False, **kw) -> "Net":
        """Parse ``path`` (text or binary, V1 upgraded, phase-filtered) and build the net."""
        return cls(str(path), phase=phase, cfg=cfg, source=str(path), input_shapes=input_shapes,
                   extras=extras, allow_python_import=allow_python_import, **kw)

    # -- construction -------------------------------------------------------------------------
    def _where(self, lp) -> str:
        return f"{self.source}: layer {lp.name!r} ({lp.type})"

    def _build(self, spec, input_shapes, generator, build_data_layers, materialize) -> None:
        shapes: dict[str, tuple] = {}
        names_seen: set[str] = set()
        owners: dict[str, int] = {}  # param name -> index in _param_info
        for index, lp in enumerate(spec.layer):
            try:
                self._build_layer(index, lp, shapes, names_seen, owners, input_shapes, generator,
                                  build_data_layers, materialize)
            except OhemError as e:
                msg = str(e)
                if not msg.startswith(self.source):
                    raise type(e)(f"{self.source}: {msg}") from None
                raise
        self.blob_shapes = shapes
        self._by_name = {r.name: r for r in self.layers}
        self.loss_weights = {}
        for rec in self.layers:
            for t, w in zip(rec.tops, rec.loss_weights):
                if w != 0:
                    self.loss_weights[t] = w

    def _build_layer(self, index, lp, shapes, names_seen, owners, input_shapes, generator,
                     build_data_layers, materialize) -> None:
        where = self._where(lp)
        if lp.name in names_seen:
            raise SpecError(f"{where}: duplicate layer name {lp.name!r}")
        names_seen.add(lp.name)
        bottoms, tops = list(lp.bottom), list(lp.top)
        for j, b in enumerate(bottoms):
            if b not in shapes:
                raise SpecError(f"{where}: bottom blob {b!r} (bottom {j}) is not produced by "
                                "any earlier layer (or net input)")
        inplace = []
        for j, t in enumerate(tops):
            if t in tops[:j]:
                raise SpecError(f"{where}: top blob {t!r} is listed twice")
            is_inplace = j < len(bottoms) and bottoms[j] == t
            if not is_inplace and t in shapes:
                raise SpecError(f"{where}: top blob {t!r} is produced by an earlier layer too "
                                "(only in-place reuse, top j == bottom j, is allowed)")
            if not is_inplace and t in bottoms:
                raise SpecError(f"{where}: top blob {t!r} is also a bottom at another "
                                "position; in-place needs top j == bottom j")
            inplace.append(is_inplace)
        if len(lp.propagate_down) not in (0, len(bottoms)):
            raise SpecError(f"{where}: propagate_down must be given once per bottom "
                            f"({len(bottoms)}) or not at all, got {len(lp.propagate_down)}")
        if len(lp.loss_weight) not in (0, len(tops)):
            raise SpecError(f"{where}: loss_weight must be given once per top ({len(tops)}) "
                            f"or not at all, got {len(lp.loss_weight)}")
        rec = LayerRecord(name=lp.name, type=lp.type, bottoms=bottoms, tops=tops, module=None,
                          param=lp, index=index, is_source=not bottoms, inplace=inplace)
        bottom_shapes = [shapes[b] for b in bottoms]
        if lp.type == "Input":
            if bottoms:
                raise SpecError(f"{where}: an Input layer takes no bottoms")
            declared = _declared_input_shapes(lp, self.source)
            top_shapes = [tuple(input_shapes.get(t, declared[j])) for j, t in enumerate(tops)]
            blob_specs: list[ParamBlob] = []
        else:
            all_fed = rec.is_source and tops and all(t in input_shapes for t in tops)
            if rec.is_source and (all_fed or not build_data_layers):
                missing = [t for t in tops if t not in input_shapes]
                if missing:
                    raise SpecError(
                        f"{where}: data layer is not run here, so its tops need shapes; "
                        "pass " + " ".join(f"--shape {t}=d0,d1,..." for t in missing))
                top_shapes = [tuple(input_shapes[t]) for t in tops]
                blob_specs = []
            else:
                module = self._make_module(lp, where)
                rec.module = module
                self._modules_list.append(module)
                blob_specs = list(module.param_blobs(bottom_shapes))
                if rec.is_source:
                    top_shapes = [tuple(input_shapes[t]) if t in input_shapes else None
                                  for t in tops]
                    if any(s is None for s in top_shapes):
                        try:
                            inferred = _infer_top_shapes(module, [], where)
                        except SpecError as e:
                            missing = [t for t, s in zip(tops, top_shapes) if s is None]
                            raise SpecError(f"{e}; give the shapes of its tops (input_shapes "
                                            f"or --shape): {', '.join(missing)}") from None
                        top_shapes = [s if s is not None else inferred[j]
                                      for j, s in enumerate(top_shapes)]
                else:
                    top_shapes = _infer_top_shapes(module, bottom_shapes, where)
                if len(top_shapes) != len(tops):
                    raise SpecError(f"{where}: the layer makes {len(top_shapes)} top(s), the "
                                    f"spec names {len(tops)}")
        rec.loss_weights = self._loss_weights_of(lp, rec.module)
        self._add_params(rec, lp, blob_specs, owners, generator, materialize, where)
        rec.top_shapes = [tuple(int(d) for d in s) for s in top_shapes]
        for t, s in zip(tops, rec.top_shapes):
            shapes[t] = s
        self.layers.append(rec)

    def _make_module(self, lp, where: str) -> Layer:
        if lp.type == "Python":
            from readonly_ohem.caffe.layers.python import build_python_layer

            make = lambda: build_python_layer(lp, self.ctx)  # noqa: E731
        else:
            cls = _layer_class(lp, self.source)
            make = lambda: cls(lp, self.ctx)  # noqa: E731
        try:
            return make()
        except OhemError as e:
            msg = str(e)
            if not msg.startswith(self.source):
                msg = f"{self.source}: {msg}"
            raise type(e)(msg) from None

    @staticmethod
    def _loss_weights_of(lp, module) -> list[float]:
        if len(lp.loss_weight):
            return [float(w) for w in lp.loss_weight]
        weights = [0.0] * len(lp.top)
        if module is not None and getattr(module, "loss_by_default", False) and weights:
            weights[0] = 1.0
        return weights

    def _add_params(self, rec, lp, blob_specs, owners, generator, materialize, where) -> None:
        if len(lp.param) > len(blob_specs):
            raise SpecError(f"{where}: {len(lp.param)} param {{ }} block(s) given but the layer "
                            f"has {len(blob_specs)} learnable blob(s)")
        for j, pb in enumerate(blob_specs):
            ps = lp.param[j] if j < len(lp.param) else None
            name = ps.name if ps is not None else ""
            shape = tuple(int(d) for d in pb.shape)
            has_lr = ps is not None and ps.HasField("lr_mult")
            has_decay = ps is not None and ps.HasField("decay_mult")
            frozen = getattr(rec.module, "frozen_params", False)  # BatchNorm: lr_mult forced to 0
            if name and name in owners:
                pid = owners[name]
                info = self._param_info[pid]
                permissive = ps.share_mode == ps.PERMISSIVE
                if permissive and math.prod(info.shape) != math.prod(shape):
                    raise SpecError(
                        f"{where}: shared param {name!r} (share_mode PERMISSIVE) has "
                        f"{math.prod(shape)} values {list(shape)} here but "
                        f"{math.prod(info.shape)} {list(info.shape)} in its owner layer "
                        f"{info.owner!r}")
                if not permissive and info.shape != shape:
                    raise SpecError(
                        f"{where}: shared param {name!r} has shape {list(shape)} here but "
                        f"{list(info.shape)} in its owner layer {info.owner!r} (Caffe's STRICT "
                        "share_mode; PERMISSIVE only needs equal counts)")
                for attr, has, setter in (("lr_mult", has_lr, "lr_setter"),
                                          ("decay_mult", has_decay, "decay_setter")):
                    if not has:
                        continue
                    value = float(getattr(ps, attr))
                    current = getattr(info, attr)
                    if current is None:
                        setattr(info, attr, value)
                        setattr(info, setter, rec.name)
                    elif current != value:
                        raise SpecError(
                            f"{where}: shared param {name!r} has mismatched {attr}: {value:g} here, "
                            f"{current:g} in layer {getattr(info, setter)!r}")
            else:
                pid = len(self._param_info)
                key = name or f"{rec.name}/{j}"
                info = _ParamInfo(key=key, name=name, owner=rec.name, index=j, shape=shape)
                if has_lr or frozen:
                    info.lr_mult, info.lr_setter = (0.0 if frozen else float(ps.lr_mult)), rec.name
                if has_decay:
                    info.decay_mult, info.decay_setter = float(ps.decay_mult), rec.name
                if materialize:
                    tensor = torch.empty(shape, dtype=torch.float32)
                    from readonly_ohem.caffe.weights import fill_

                    fill_(tensor, pb.filler, generator, where=f"{where}: param {j}")
                else:
                    tensor = torch.empty(shape, dtype=torch.float32, device="meta")
                self._params.append(nn.Parameter(tensor))
                self._param_info.append(info)
                if name:
                    owners[name] = pid
            info.users.append((rec.name, j))
            rec.param_ids.append(pid)
            rec.param_shapes.append(shape)  # PERMISSIVE sharing: a view of the owner's data

    # -- the backward plan (Caffe's Net::Init with InsertSplits) ---------------------------------
    def _plan_backward(self) -> None:
        plan = _BackwardPlan(self.layers, self.force_backward)
        self._plan = plan
        self._leaf_grad = plan.leaf_grad
        self._diff_version = plan.diff_version
        used = [False] * len(self._params)
        for rec in self.layers:
            for pid, g in zip(rec.param_ids, rec.param_grad):
                used[pid] = used[pid] or g
        for p, u in zip(self._params, used):
            p.requires_grad_(u)

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
                            decl = _declared_input_shapes(rec.param, self.source)[j]
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
            with torch.set_grad_enabled(grad_on and rec.need_backward):
                tops = rec.module(bottoms, params)
            self._check_tops(rec, tops)
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

    def param_info(self, pid: int) -> _ParamInfo:
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
        from readonly_ohem.caffe.weights import load_into

        targets = {r.name: self.layer_params(r.name) for r in self.layers if r.param_ids}
        return load_into(targets, path)

    def save_caffemodel(self, path) -> None:
        from readonly_ohem.caffe.weights import write_caffemodel

        layers = [(r.name, r.type, [p.detach().cpu().numpy() for p in self.layer_params(r.name)])
                  for r in self.layers]
        write_caffemodel(path, self.net_name, layers)


class _BackwardPlan:
    """Caffe's need-backward analysis (``Net::Init``), run on the net with the Split layers that
    ``InsertSplits`` adds, then mapped back onto the layer records:

    - forward: a layer needs backward if a bottom blob needs it or a param has lr_mult != 0; its
      tops then need it; a bottom's flag is its ``propagate_down`` when given, else the blob's;
    - backward (last layer first): a layer contributes to the loss if a top has a loss weight
      or is under the loss; a layer all of whose tops some consumer does not backprop into is
      skipped with all its bottoms; a layer not contributing to the loss does no backward;
    - ``force_backward``: every layer does backward, bottoms where the layer allows it.

    A bottom the layer class cannot backprop into (``backprop_to_bottoms`` False, or not in its
    ``grad_bottoms``) counts as ``propagate_down: false``: Caffe would run a no-op there.
    """

    def __init__(self, records: list[LayerRecord], force_backward: bool):
        nodes = []  # dicts: name, bottoms (blob names), tops, pd (list or None), params, loss, rec
        last_top: dict[str, tuple[int, int]] = {}
        counts: dict[tuple[int, int], int] = {}
        bottom_src: dict[tuple[int, int], tuple[int, int]] = {}
        for i, rec in enumerate(records):
            for j, b in enumerate(rec.bottoms):
                src = last_top[b]
                bottom_src[(i, j)] = src
                counts[src] = counts.get(src, 0) + 1
            for j, t in enumerate(rec.tops):
                last_top[t] = (i, j)
            for j, t in enumerate(rec.tops):
                if rec.loss_weights[j]:
                    counts[(i, j)] = counts.get((i, j), 0) + 1
        split_used: dict[tuple[int, int], int] = {}
        for i, rec in enumerate(records):
            cls = type(rec.module) if rec.module is not None else None
            cut = self._cut_bottoms(rec, cls)
            pd = [bool(p) for p in rec.param.propagate_down] if len(rec.param.propagate_down) else None
            if any(cut):
                pd = [(pd[k] if pd is not None else None) if not cut[k] else False
                      for k in range(len(rec.bottoms))]
            bnames = []
            for j, b in enumerate(rec.bottoms):
                src = bottom_src[(i, j)]
                if counts.get(src, 0) > 1:
                    k = split_used.get(src, 0)
                    split_used[src] = k + 1
                    bnames.append(f"{b}\x00split{src[0]}_{src[1]}_{k}")
                else:
                    bnames.append(b)
            losses = list(rec.loss_weights)
            split_nodes = []
            for j, t in enumerate(rec.tops):
                n = counts.get((i, j), 0)
                if n > 1:
                    w = losses[j]
                    if w:
                        losses[j] = 0.0
                    split_nodes.append({
                        "split": (i, j), "bottoms": [t], "pd": None,
                        "tops": [f"{t}\x00split{i}_{j}_{k}" for k in range(n)],
                        "params": [], "loss": [w] + [0.0] * (n - 1), "force": [True], "rec": None})
            nodes.append({"split": None, "bottoms": bnames, "tops": list(rec.tops), "pd": pd,
                          "params": [self._lr_nonzero(rec, k) for k in range(len(rec.param_ids))],
                          "loss": losses, "rec": rec,
                          "force": [self._allow_force(rec, cls, k, cut)
                                    for k in range(len(rec.bottoms))]})
            nodes.extend(split_nodes)
        split_index = {n["split"]: idx for idx, n in enumerate(nodes) if n["split"] is not None}
        # -- forward pass of Net::Init
        blob_need: dict[str, bool] = {}
        for n in nodes:
            need = False
            n["bneed"] = []
            for k, b in enumerate(n["bottoms"]):
                bn = blob_need.get(b, False)
                need |= bn
                if n["pd"] is not None and n["pd"][k] is not None:
                    bn = n["pd"][k]
                n["bneed"].append(bn)
            n["pgrad"] = list(n["params"])
            need |= any(n["params"])
            n["need"] = need
            for t in n["tops"]:
                blob_need[t] = blob_need.get(t, False) or need
        # -- backward pass
        under_loss: set[str] = set()
        skip: set[str] = set()
        for n in reversed(nodes):
            contributes = False
            skip_down = True
            for k, t in enumerate(n["tops"]):
                if n["loss"][k] or t in under_loss:
                    contributes = True
                if t not in skip:
                    skip_down = False
                if contributes and not skip_down:
                    break
            if n["need"] and skip_down:
                n["need"] = False
                n["bneed"] = [False] * len(n["bottoms"])
            if not contributes:
                n["need"] = False
            for k, b in enumerate(n["bottoms"]):
                if contributes:
                    under_loss.add(b)
                else:
                    n["bneed"][k] = False
                if not n["bneed"][k]:
                    skip.add(b)
        if force_backward:
            for n in nodes:
                n["need"] = True
                n["bneed"] = [bn or f for bn, f in zip(n["bneed"], n["force"])]
                n["pgrad"] = [True] * len(n["pgrad"])
        # -- map back onto the records
        self.leaf_grad: dict[tuple[str, int], bool] = {}
        for idx, n in enumerate(nodes):
            rec = n["rec"]
            if rec is None:
                continue
            rec.need_backward = n["need"]
            rec.param_grad = [n["need"] and g for g in n["pgrad"]]
            rec.bottom_grad = []
            for k, b in enumerate(n["bottoms"]):
                ok = n["need"] and n["bneed"][k]
                if "\x00" in b:
                    src = self._src_of(records, rec, k)
                    s = nodes[split_index[src]]
                    ok = ok and s["need"] and s["bneed"][0]
                rec.bottom_grad.append(ok)
            # a layer with nothing to send back (e.g. a selector whose bottoms are all cut)
            # computes nothing in backward: no graph for it
            rec.need_backward = n["need"] and (any(rec.bottom_grad) or any(rec.param_grad))
        # (blob, version) whose diff some consumer computes; from a source: (blob, 0, True)
        versions: dict[str, int] = {}
        for rec in records:
            for k, b in enumerate(rec.bottoms):
                if rec.bottom_grad[k]:
                    src = records[self._src_of(records, rec, k)[0]].is_source
                    self.leaf_grad[(b, versions[b])] = src
            for j, t in enumerate(rec.tops):
                versions[t] = versions[t] + 1 if rec.inplace[j] else 0
        self.diff_version = self._diff_versions(records)

    @staticmethod
    def _cut_bottoms(rec, cls) -> list[bool]:
        if cls is None:
            return [False] * len(rec.bottoms)
        if not getattr(cls, "backprop_to_bottoms", True):
            return [True] * len(rec.bottoms)
        allowed = getattr(cls, "grad_bottoms", None)
        if allowed is None:
            return [False] * len(rec.bottoms)
        return [k not in allowed for k in range(len(rec.bottoms))]

    @staticmethod
    def _allow_force(rec, cls, k, cut) -> bool:
        """Caffe's AllowForceBackward: loss layers never force into bottom 1 (the labels)."""
        if cut[k]:
            return False
        if cls is not None and hasattr(cls, "allow_force_backward"):
            return bool(cls.allow_force_backward(k))
        return not (cls is not None and getattr(cls, "loss_by_default", False) and k == 1)

    @staticmethod
    def _lr_nonzero(rec, k) -> bool:
        # From the spec as written, as Caffe's Net::Init: a BatchNorm without `param { lr_mult: 0 }`
        # still "needs backward" there (its forced lr 0 lives in the layer's own copy), which
        # decides which blob diffs Caffe computes; its learning rate is 0 all the same.
        ps = rec.param.param[k] if k < len(rec.param.param) else None
        return ps is None or ps.lr_mult != 0

    @staticmethod
    def _src_of(records, rec, k) -> tuple[int, int]:
        """(producer layer index, top index) of bottom k of ``rec``: the last earlier producer."""
        b = rec.bottoms[k]
        i = records.index(rec)
        for p in range(i - 1, -1, -1):
            if b in records[p].tops:
                return (p, records[p].tops.index(b))
        raise AssertionError(b)

    @staticmethod
    def _diff_versions(records) -> dict[str, int]:
        """Per blob, the version whose gradient Caffe leaves in the shared diff buffer: the input
        of the first in-place layer that writes its bottom diff, else the last version."""
        chains: dict[str, list[tuple[LayerRecord, int]]] = {}
        for rec in records:
            for j, t in enumerate(rec.tops):
                if rec.inplace[j]:
                    chains[t].append((rec, j))
                else:
                    chains[t] = []
        out = {}
        for name, chain in chains.items():
            version = len(chain)
            for v, (rec, j) in enumerate(chain, start=1):
                if rec.need_backward and rec.bottom_grad[j]:
                    version = v - 1
                    break
            out[name] = version
        return out
