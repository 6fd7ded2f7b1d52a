"""Building a net's graph from its parsed spec, as Caffe's ``Net::Init`` does (``SPEC.md`` §3).

``NetBuilder.build`` walks the layers in file order (after ``spec``'s upgrade and phase
filtering) and gives back a ``BuiltNet``: one ``LayerRecord`` per layer, the layer modules, the
unique learnable tensors and the blob shapes. What it copies from Caffe:

- blobs: a bottom must be a top of an earlier layer (or a net input); a top is new, or in place
  (top j named as bottom j), which rebinds the name to the layer's output;
- sources: Input layers declare their tops' shapes (once, or once per top); a data layer (no
  bottoms) is built and asked for its top shapes, unless its tops are all given shapes
  (``input_shapes``) or ``build_data_layers`` is off; a given shape replaces a declared one.
  A data layer not built is still checked as far as can be without running it: its type must
  be registered, a Python layer, or one of Caffe's data layers (``CAFFE_DATA_TYPES``, which we
  never run), and a registered type's parameters are checked by building it;
- top shapes: the layer's own ``top_shapes``, else a forward on meta tensors;
- loss weights: ``loss_weight`` per top, else 1 on top 0 of classes with ``loss_by_default``;
- ``param { name }`` sharing: the first layer naming a param owns the tensor; a later sharer's
  ``lr_mult``/``decay_mult`` are adopted when the owner set none, a conflict or a shape clash
  (Caffe's STRICT ``share_mode``; PERMISSIVE only needs equal counts) is a ``SpecError`` naming
  the param and both layers; a new param is filled from its filler (``weights.fill_``), from one
  generator seeded with the net's ``seed``, or made on the meta device (``materialize=False``),
  every blob's filler is checked (``weights.check_filler``), a sharer's and an unfilled one's
  too, as Caffe makes every layer's filler;
- numbers: a NaN or infinite float anywhere in a layer's parameters is a ``SpecError`` naming
  the field (Caffe would run with it and fill the net with NaN; a deliberate difference).

So every check of a build runs whether or not the net is run: ``readonly-ohem net`` (data
layers not built, params not materialized) refuses what ``run`` refuses.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

# the package, not ``layers.base``: importing it registers every layer family in LAYERS
from readonly_ohem.caffe.layers import LAYERS, Layer, LayerContext, ParamBlob
from readonly_ohem.caffe.layers.python import build_python_layer
from readonly_ohem.caffe.spec import non_finite_fields
from readonly_ohem.caffe.weights import check_filler, fill_
from readonly_ohem.errors import OhemError, SpecError


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
class ParamInfo:
    """What the build knows of one unique param: its owner, shape, the mults as set (and by
    which layer, for the conflict messages) and every (layer, blob index) using it."""

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


@dataclass
class BuiltNet:
    """What ``NetBuilder.build`` gives the ``Net``: records in file order, the layer modules in
    build order, the unique params (index = ``LayerRecord.param_ids``) and each blob's final
    shape (in place: after the chain)."""

    layers: list[LayerRecord]
    modules: list[Layer]
    params: list[nn.Parameter]
    param_info: list[ParamInfo]
    blob_shapes: dict[str, tuple]


# Caffe's own data layers: their tops can be fed (``input_shapes``), they are never built here.
CAFFE_DATA_TYPES = ("Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData")


def layer_where(source: str, lp) -> str:
    """The prefix of every message about layer ``lp``: ``file: layer 'name' (Type)``."""
    return f"{source}: layer {lp.name!r} ({lp.type})"


def layer_class(lp, source: str):
    """The registered class for ``lp.type``; an unknown type suggests the closest names."""
    cls = LAYERS.get(lp.type)
    if cls is None:
        close = difflib.get_close_matches(lp.type, sorted(LAYERS) + ["Input"], n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise SpecError(f"{source}: layer {lp.name!r}: unknown layer type {lp.type!r}{hint}")
    return cls


def declared_input_shapes(lp, source: str) -> list[tuple]:
    """An Input layer's shape per top: ``input_param.shape`` given once, or once per top."""
    shapes = [tuple(int(d) for d in s.dim) for s in lp.input_param.shape]
    n = len(lp.top)
    if len(shapes) == 1:
        return shapes * n
    if len(shapes) == n:
        return shapes
    raise SpecError(f"{source}: layer {lp.name!r} (Input): {n} top(s) but "
                    f"{len(shapes)} input_param shape(s); give one shape, or one per top")


def infer_top_shapes(module: Layer, bottom_shapes: list[tuple], where: str) -> list[tuple]:
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


def loss_weights_of(lp, module) -> list[float]:
    """Per top: the spec's ``loss_weight``, else 1 on top 0 of a ``loss_by_default`` class."""
    if len(lp.loss_weight):
        return [float(w) for w in lp.loss_weight]
    weights = [0.0] * len(lp.top)
    if module is not None and getattr(module, "loss_by_default", False) and weights:
        weights[0] = 1.0
    return weights


class NetBuilder:
    """Builds the layers of one parsed ``NetParameter`` (see the module docstring).

    ``ctx``: the ``LayerContext`` every layer gets; ``input_shapes``: blob name -> shape for net
    inputs and data-layer tops; ``seed``: of the filler generator; ``build_data_layers``: False
    leaves every data layer unbuilt (its tops then need ``input_shapes``); ``materialize``: False
    makes the params on the meta device, unfilled.
    """

    def __init__(self, source: str, ctx: LayerContext,
                 input_shapes: Mapping[str, Any] | None = None, seed: int = 0,
                 build_data_layers: bool = True, materialize: bool = True):
        self.source = source
        self.ctx = ctx
        self.input_shapes = dict(input_shapes or {})
        self.build_data_layers = build_data_layers
        self.materialize = materialize
        self.generator = torch.Generator().manual_seed(seed)
        self.layers: list[LayerRecord] = []
        self.modules: list[Layer] = []
        self.params: list[nn.Parameter] = []
        self.param_info: list[ParamInfo] = []
        self.shapes: dict[str, tuple] = {}  # blob -> its current shape
        self.names_seen: set[str] = set()
        self.owners: dict[str, int] = {}  # param name -> index in param_info

    def build(self, spec) -> BuiltNet:
        """Every layer of ``spec`` in file order; a message lacking the file name gets it."""
        for index, lp in enumerate(spec.layer):
            try:
                self._build_layer(index, lp)
            except OhemError as e:
                msg = str(e)
                if not msg.startswith(self.source):
                    raise type(e)(f"{self.source}: {msg}") from None
                raise
        return BuiltNet(layers=self.layers, modules=self.modules, params=self.params,
                        param_info=self.param_info, blob_shapes=self.shapes)

    def _build_layer(self, index: int, lp) -> None:
        where = layer_where(self.source, lp)
        bad = non_finite_fields(lp)
        if bad:
            raise SpecError(f"{where}: {bad[0][0]} is {bad[0][1]}; layer parameters must be "
                            "finite numbers")
        inplace = self._check_blobs(lp, where)
        bottoms, tops = list(lp.bottom), list(lp.top)
        rec = LayerRecord(name=lp.name, type=lp.type, bottoms=bottoms, tops=tops, module=None,
                          param=lp, index=index, is_source=not bottoms, inplace=inplace)
        if lp.type == "Input":
            top_shapes, blob_specs = self._input_shapes(lp, where), []
        else:
            top_shapes, blob_specs = self._layer_shapes(rec, lp, where)
        rec.loss_weights = loss_weights_of(lp, rec.module)
        self._add_params(rec, lp, blob_specs, where)
        rec.top_shapes = [tuple(int(d) for d in s) for s in top_shapes]
        for t, s in zip(tops, rec.top_shapes):
            self.shapes[t] = s
        self.layers.append(rec)

    def _check_blobs(self, lp, where: str) -> list[bool]:
        """Caffe's checks on names, bottoms and tops; returns per top whether it is in place."""
        if lp.name in self.names_seen:
            raise SpecError(f"{where}: duplicate layer name {lp.name!r}")
        self.names_seen.add(lp.name)
        bottoms, tops = list(lp.bottom), list(lp.top)
        for j, b in enumerate(bottoms):
            if b not in self.shapes:
                raise SpecError(f"{where}: bottom blob {b!r} (bottom {j}) is not produced by "
                                "any earlier layer (or net input)")
        inplace = []
        for j, t in enumerate(tops):
            if t in tops[:j]:
                raise SpecError(f"{where}: top blob {t!r} is listed twice")
            is_inplace = j < len(bottoms) and bottoms[j] == t
            if not is_inplace and t in self.shapes:
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
        return inplace

    def _input_shapes(self, lp, where: str) -> list[tuple]:
        """An Input layer's top shapes: the given shape, else the declared one."""
        if len(lp.bottom):
            raise SpecError(f"{where}: an Input layer takes no bottoms")
        declared = declared_input_shapes(lp, self.source)
        return [tuple(self.input_shapes.get(t, declared[j])) for j, t in enumerate(lp.top)]

    def _layer_shapes(self, rec: LayerRecord, lp, where: str) -> tuple[list, list[ParamBlob]]:
        """(top shapes, learnable blob specs) of a layer other than Input, building its module
        unless it is a data layer that is not run here (its tops then need given shapes)."""
        tops, given = rec.tops, self.input_shapes
        all_fed = rec.is_source and tops and all(t in given for t in tops)
        if rec.is_source and (all_fed or not self.build_data_layers):
            missing = [t for t in tops if t not in given]
            if missing:
                raise SpecError(
                    f"{where}: data layer is not run here, so its tops need shapes; "
                    "pass " + " ".join(f"--shape {t}=d0,d1,..." for t in missing))
            self._check_unbuilt(lp)
            return [tuple(given[t]) for t in tops], []
        module = self._make_module(lp)
        rec.module = module
        self.modules.append(module)
        bottom_shapes = [self.shapes[b] for b in rec.bottoms]
        blob_specs = list(module.param_blobs(bottom_shapes))
        if rec.is_source:
            top_shapes = self._data_layer_shapes(module, tops, where)
        else:
            top_shapes = infer_top_shapes(module, bottom_shapes, where)
        if len(top_shapes) != len(tops):
            raise SpecError(f"{where}: the layer makes {len(top_shapes)} top(s), the "
                            f"spec names {len(tops)}")
        return top_shapes, blob_specs

    def _data_layer_shapes(self, module: Layer, tops: list[str], where: str) -> list:
        """A built data layer's top shapes: the given ones, the rest from the layer itself."""
        top_shapes = [tuple(self.input_shapes[t]) if t in self.input_shapes else None
                      for t in tops]
        if any(s is None for s in top_shapes):
            try:
                inferred = infer_top_shapes(module, [], where)
            except SpecError as e:
                missing = [t for t, s in zip(tops, top_shapes) if s is None]
                raise SpecError(f"{e}; give the shapes of its tops (input_shapes "
                                f"or --shape): {', '.join(missing)}") from None
            top_shapes = [s if s is not None else inferred[j]
                          for j, s in enumerate(top_shapes)]
        return top_shapes

    def _check_unbuilt(self, lp) -> None:
        """A data layer that is not built: its type must be known (registered, Python, or one
        of Caffe's own data layers); a registered type is built once to check its parameters
        (and dropped). A Python layer's module is not resolved: it is not run."""
        if lp.type != "Python" and lp.type not in CAFFE_DATA_TYPES:
            self._make_module(lp)  # an unknown type: layer_class's error

    def _make_module(self, lp) -> Layer:
        """The layer's module: a registered Python layer, or the class of its Caffe type."""
        if lp.type == "Python":
            make = lambda: build_python_layer(lp, self.ctx)  # noqa: E731
        else:
            cls = layer_class(lp, self.source)
            make = lambda: cls(lp, self.ctx)  # noqa: E731
        try:
            return make()
        except OhemError as e:
            msg = str(e)
            if not msg.startswith(self.source):
                msg = f"{self.source}: {msg}"
            raise type(e)(msg) from None

    # -- params ---------------------------------------------------------------------------------
    def _add_params(self, rec: LayerRecord, lp, blob_specs: list[ParamBlob], where: str) -> None:
        """One param per learnable blob: the owner's when its name is already taken (shared),
        else a new one; ``rec`` gets its ids and its own shapes (a PERMISSIVE sharer may view
        the owner's data in another shape of the same count)."""
        if len(lp.param) > len(blob_specs):
            raise SpecError(f"{where}: {len(lp.param)} param {{ }} block(s) given but the layer "
                            f"has {len(blob_specs)} learnable blob(s)")
        for j, pb in enumerate(blob_specs):
            ps = lp.param[j] if j < len(lp.param) else None
            name = ps.name if ps is not None else ""
            shape = tuple(int(d) for d in pb.shape)
            # Caffe makes every layer's filler (GetFiller), a sharer's and an unfilled one's too
            check_filler(pb.filler, shape, where=f"{where}: param {j}")
            if name and name in self.owners:
                pid = self.owners[name]
                self._share(self.param_info[pid], rec, ps, shape, where)
            else:
                pid = self._new_param(rec, j, ps, pb, shape, where)
            self.param_info[pid].users.append((rec.name, j))
            rec.param_ids.append(pid)
            rec.param_shapes.append(shape)  # PERMISSIVE sharing: a view of the owner's data

    def _share(self, info: ParamInfo, rec: LayerRecord, ps, shape: tuple, where: str) -> None:
        """A later user of a named param: check the shape (STRICT) or count (PERMISSIVE), adopt
        the mults it sets where the owner set none, and reject a conflicting one."""
        name = ps.name
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
        for attr, setter in (("lr_mult", "lr_setter"), ("decay_mult", "decay_setter")):
            if not ps.HasField(attr):
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

    def _new_param(self, rec: LayerRecord, j: int, ps, pb: ParamBlob, shape: tuple,
                   where: str) -> int:
        """Create blob ``j`` of ``rec`` (filled, or on the meta device); returns its index. A
        ``frozen_params`` layer (BatchNorm) gets lr_mult 0, as Caffe forces."""
        name = ps.name if ps is not None else ""
        has_lr = ps is not None and ps.HasField("lr_mult")
        has_decay = ps is not None and ps.HasField("decay_mult")
        frozen = getattr(rec.module, "frozen_params", False)
        pid = len(self.param_info)
        info = ParamInfo(key=name or f"{rec.name}/{j}", name=name, owner=rec.name, index=j,
                         shape=shape)
        if has_lr or frozen:
            info.lr_mult, info.lr_setter = (0.0 if frozen else float(ps.lr_mult)), rec.name
        if has_decay:
            info.decay_mult, info.decay_setter = float(ps.decay_mult), rec.name
        if self.materialize:
            tensor = torch.empty(shape, dtype=torch.float32)
            fill_(tensor, pb.filler, self.generator, where=f"{where}: param {j}")
        else:
            tensor = torch.empty(shape, dtype=torch.float32, device="meta")
        self.params.append(nn.Parameter(tensor))
        self.param_info.append(info)
        if name:
            self.owners[name] = pid
        return pid
