"""Caffe's ``Python`` layer type, resolved through our own registry (``PYTHON_LAYERS``).

A spec names ``python_param { module layer param_str }``. We look ``(module, layer)`` up in
``PYTHON_LAYERS``, which the application fills when its modules are imported (``register_python``;
e.g. ``("roi_data_layer.layer", "OHEMDataLayer")``): the engine itself names no application
module. An unregistered pair gets an error naming the installed package that provides it, read
from the ``readonly_ohem.caffe.python_layers`` entry-point group of the installed distributions'
metadata (nothing is imported for that). A spec never makes us import code it names, unless the
user opts in (``allow_python_import=True`` / ``--allow-python-import``): then the module is
imported and its Caffe-style class (``setup``/``reshape``/``forward``/``backward`` on numpy
blobs) is wrapped as a layer.

``param_str`` is read as the original layers read it, as YAML, so ``"'num_classes': 21"`` gives
``{"num_classes": 21}``; safely (no object is built from a tag), except that the one tag Faster
R-CNN specs use, ``!!python/tuple [4, 8, 16, 32]`` (``"'feat_stride': 16 \\n'scales': !!python/tuple
[...]"``), gives a tuple, as ``yaml.load`` did.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
from typing import Any

import numpy as np
import torch
import yaml

from readonly_ohem.errors import SpecError
from readonly_ohem.caffe.layers.base import PYTHON_LAYERS, Layer, LayerContext, register

# Entry-point group in which installed packages declare the Python layers they provide, as
# ``"<module>.<layer>" = "<provider module>:<class>"``; read only to name the provider in an error.
PROVIDER_GROUP = "readonly_ohem.caffe.python_layers"


class _ParamStrLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` plus ``!!python/tuple`` (a plain tuple: data, no code)."""


_ParamStrLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple",
    lambda loader, node: tuple(loader.construct_sequence(node, deep=True)))


def parse_param_str(param) -> dict:
    """``python_param.param_str`` as a dict (safe YAML plus ``!!python/tuple``); empty -> ``{}``."""
    text = param.python_param.param_str
    if not text.strip():
        return {}
    try:
        value = yaml.load(text, Loader=_ParamStrLoader)
    except yaml.YAMLError as e:
        raise SpecError(f"layer {param.name!r}: python_param.param_str {text!r} is not valid "
                        f"YAML: {str(e).splitlines()[0]}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"layer {param.name!r}: python_param.param_str {text!r} must be a "
                        "mapping such as \"'num_classes': 21\"")
    return value


def provider_of(module: str, layer: str) -> str | None:
    """``"<provider module> (<distribution>)"`` for an installed package that declares this Python
    layer in the ``readonly_ohem.caffe.python_layers`` entry-point group; None when none does."""
    try:
        for ep in importlib.metadata.entry_points(group=PROVIDER_GROUP):
            if ep.name == f"{module}.{layer}":
                dist = getattr(ep.dist, "name", None)
                return ep.module + (f" (package {dist})" if dist else "")
    except Exception:  # broken metadata must not hide the real error
        return None
    return None


def resolve(param, allow_import: bool = False):
    """The class for a Python layer spec: ours from the registry, or (opt-in) the user's."""
    pp = param.python_param
    key = (pp.module, pp.layer)
    if not pp.module or not pp.layer:
        raise SpecError(f"layer {param.name!r}: a Python layer needs python_param.module and "
                        "python_param.layer")
    if key in PYTHON_LAYERS:
        return PYTHON_LAYERS[key]
    if allow_import:
        return _import_user_class(pp.module, pp.layer, param.name)
    known = ", ".join(f"{m}.{n}" for m, n in sorted(PYTHON_LAYERS)) or "none"
    provider = provider_of(pp.module, pp.layer)
    hint = (f"; it is provided by {provider}: import that module before building the net (the "
            "readonly-ohem commands do)" if provider else "")
    raise SpecError(
        f"layer {param.name!r}: Python layer {pp.module}.{pp.layer} is not registered; "
        f"registered: {known}{hint} (pass allow_python_import=True / --allow-python-import to "
        "import it)")


def build_python_layer(param, ctx: LayerContext) -> Layer:
    """An instance for a ``type: "Python"`` spec (``ctx.extras["allow_python_import"]``)."""
    cls = resolve(param, bool(ctx.extras.get("allow_python_import", False)))
    if isinstance(cls, type) and issubclass(cls, Layer):
        return cls(param, ctx)
    return CaffePythonLayer(param, ctx, cls)


@register("Python")
class PythonLayer(Layer):
    """Registry entry for ``type: "Python"``: constructing it gives the resolved layer."""

    def __new__(cls, param, ctx):
        return build_python_layer(param, ctx)


# -- opt-in: Caffe-style classes from user modules ------------------------------------------------

def _caffe_shim() -> types.ModuleType:
    """A minimal ``caffe`` module (``caffe.Layer``, ``TRAIN``/``TEST``) for user layers that
    ``import caffe``, used only when no real pycaffe is importable."""
    shim = types.ModuleType("caffe")

    class CaffeLayer:  # what pycaffe's caffe.Layer offers a python layer
        def __init__(self, *args, **kwargs):
            pass

    shim.Layer = CaffeLayer
    shim.TRAIN, shim.TEST = 0, 1
    return shim


def _import_user_class(module: str, layer: str, layer_name: str):
    if not hasattr(sys.modules.get("caffe"), "Layer"):
        try:
            found = importlib.import_module("caffe")
        except ImportError:
            found = None
        if not hasattr(found, "Layer"):  # none, or a namespace folder named caffe: not pycaffe
            sys.modules["caffe"] = _caffe_shim()
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise SpecError(f"layer {layer_name!r}: cannot import Python layer module {module!r}: "
                        f"{e}") from None
    except Exception as e:  # the user's module failed while importing
        raise SpecError(f"layer {layer_name!r}: importing Python layer module {module!r} "
                        f"failed: {type(e).__name__}: {e}") from None
    cls = getattr(mod, layer, None)
    if cls is None:
        raise SpecError(f"layer {layer_name!r}: module {module!r} has no class {layer!r}")
    return cls


class Blob:
    """The numpy blob a Caffe-style python layer sees: ``.data``, ``.diff``, ``.reshape``."""

    def __init__(self, data: np.ndarray | None = None):
        self.data = np.zeros(0, np.float32) if data is None else data
        self.diff = np.zeros_like(self.data)

    def reshape(self, *shape) -> None:
        shape = tuple(int(d) for d in shape)
        if self.data.shape != shape:
            self.data = np.zeros(shape, np.float32)
            self.diff = np.zeros(shape, np.float32)

    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def count(self) -> int:
        return int(self.data.size)

    def _axis(self, i: int) -> int:
        return int(self.data.shape[i]) if self.data.ndim > i else 1

    num = property(lambda self: self._axis(0))
    channels = property(lambda self: self._axis(1))
    height = property(lambda self: self._axis(2))
    width = property(lambda self: self._axis(3))


class _PythonFunction(torch.autograd.Function):
    @staticmethod
    def forward(fctx, layer: "CaffePythonLayer", *bottoms):
        fctx.layer = layer
        fctx.devices = [b.device for b in bottoms]
        return tuple(layer._run_forward(bottoms))

    @staticmethod
    def backward(fctx, *top_diffs):
        grads = fctx.layer._run_backward(top_diffs, fctx.needs_input_grad[1:])
        return (None,) + tuple(g.to(d) if g is not None else None
                               for g, d in zip(grads, fctx.devices))


class CaffePythonLayer(Layer):
    """Wraps a user's Caffe-style python layer class (opt-in only). The instance gets
    ``param_str`` (and ``param_str_``, the older name), ``params`` (parsed param_str, or None
    when it is not a YAML mapping) and ``phase`` (0 TRAIN, 1 TEST); ``setup`` runs once."""

    def __init__(self, param, ctx: LayerContext, impl_cls: Any):
        super().__init__(param, ctx)
        try:
            impl = impl_cls(param)
        except TypeError:
            impl = impl_cls()
        impl.param_str = impl.param_str_ = param.python_param.param_str
        try:
            impl.params = parse_param_str(param)
        except SpecError:
            impl.params = None
        impl.phase = 0 if ctx.phase == "TRAIN" else 1
        self.impl = impl
        self._set_up = False
        self._bottom_blobs: list[Blob] = []
        self._top_blobs = [Blob() for _ in param.top]

    def _call(self, method: str, *args) -> None:
        try:
            getattr(self.impl, method)(*args)
        except SpecError:
            raise
        except Exception as e:
            raise SpecError(f"layer {self.name!r}: Python layer {type(self.impl).__name__}."
                            f"{method} failed: {type(e).__name__}: {e}") from e

    def _run_forward(self, bottoms) -> list[torch.Tensor]:
        self._bottom_blobs = [Blob(b.detach().cpu().numpy().astype(np.float32, copy=True))
                              for b in bottoms]
        if not self._set_up:
            self._call("setup", self._bottom_blobs, self._top_blobs)
            self._set_up = True
        self._call("reshape", self._bottom_blobs, self._top_blobs)
        self._call("forward", self._bottom_blobs, self._top_blobs)
        device = bottoms[0].device if bottoms else torch.device("cpu")
        return [torch.from_numpy(np.array(t.data, dtype=np.float32)).to(device)
                for t in self._top_blobs]

    def _run_backward(self, top_diffs, needs) -> list[torch.Tensor | None]:
        for blob, d in zip(self._top_blobs, top_diffs):
            blob.diff = (np.zeros_like(blob.data) if d is None
                         else d.detach().cpu().numpy().reshape(blob.data.shape).copy())
        for blob in self._bottom_blobs:
            blob.diff = np.zeros_like(blob.data)
        if hasattr(self.impl, "backward"):
            self._call("backward", self._top_blobs, list(needs), self._bottom_blobs)
        return [torch.from_numpy(np.array(b.diff, dtype=np.float32)) if n else None
                for b, n in zip(self._bottom_blobs, needs)]

    def forward(self, bottoms, params):
        if torch.is_grad_enabled() and any(b.requires_grad for b in bottoms):
            return list(_PythonFunction.apply(self, *bottoms))
        return self._run_forward(bottoms)
