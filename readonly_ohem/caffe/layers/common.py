"""Caffe's common layers (plumbing, InnerProduct, Softmax, Eltwise, Scale/Bias, BatchNorm)
with Caffe's exact semantics.

Each class reads its Caffe parameter message (``inner_product_param``, ``eltwise_param``, ...) and
computes what Caffe's CPU/GPU code computes, quirks included (see ``../shared/SPEC.md`` §3):
Eltwise MAX gives a 0-vs-1 tie to bottom 1, BatchNorm keeps Caffe's three blobs (mean·s, var·s,
s) that no solver may update. The element-wise neurons live in ``neuron``.

Gradients come from autograd; where Caffe's backward is not the exact derivative of its
forward (none here) a custom ``Function`` would be used instead.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from readonly_ohem.caffe.layers.base import Layer, ParamBlob, register
from readonly_ohem.caffe.layers.util import broadcast, canonical_axis, constant_filler
from readonly_ohem.caffe.proto import caffe_pb2


def _count(shape: Sequence[int], start: int = 0, end: int | None = None) -> int:
    return int(np.prod(shape[start:end], dtype=np.int64))


def _filler_or_none(msg, field: str):
    return getattr(msg, field) if msg.HasField(field) else None


# -- inputs and plumbing ----------------------------------------------------------------------


@register("Input")
class Input(Layer):
    """Declares net inputs: ``input_param.shape`` once, once per top, or not at all.

    The net feeds the tops; running the layer itself means an input was not fed.
    """

    max_bottoms = 0
    min_tops = 1

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        n_shape, n_top = len(param.input_param.shape), len(param.top)
        if n_shape not in (0, 1, n_top):
            raise self.error(f"must specify 'shape' once, once per top blob, or not at all: "
                             f"{n_top} top(s), {n_shape} shape(s)")
        self.shapes = [tuple(int(d) for d in s.dim) for s in param.input_param.shape]

    def top_shapes(self, bottom_shapes):
        if not self.shapes:
            raise self.error(f"declares no shape for {list(self.param.top)}; feed the blob(s) "
                             f"or give their shapes")
        return [self.shapes[0 if len(self.shapes) == 1 else i] for i in range(len(self.param.top))]

    def forward(self, bottoms, params):
        raise self.error(f"input blob(s) {list(self.param.top)} were not fed")


@register("Silence")
class Silence(Layer):
    """Consumes bottoms, produces nothing (Caffe's backward writes zero diffs)."""

    min_bottoms = 1
    max_tops = 0

    def forward(self, bottoms, params):
        return []

    def top_shapes(self, bottom_shapes):
        return []


@register("Split")
class Split(Layer):
    """Copies its bottom to every top; autograd sums the tops' gradients as Caffe does."""

    min_bottoms = max_bottoms = 1
    min_tops = 1

    def forward(self, bottoms, params):
        return [bottoms[0].view_as(bottoms[0]) for _ in self.param.top]

    def top_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0]) for _ in self.param.top]


@register("Concat")
class Concat(Layer):
    """Concatenates along ``axis`` (or the legacy non-negative ``concat_dim``)."""

    min_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        p = param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise self.error("either axis or concat_dim should be specified; not both")

    def _axis(self, ndim: int) -> int:
        p = self.param.concat_param
        if p.HasField("concat_dim"):
            if p.concat_dim >= ndim:
                raise self.error(f"concat_dim {p.concat_dim} out of range ({ndim} axes)")
            return int(p.concat_dim)
        return canonical_axis(self, p.axis, ndim)

    def _check(self, shapes) -> int:
        axis = self._axis(len(shapes[0]))
        for i, s in enumerate(shapes[1:], 1):
            if len(s) != len(shapes[0]) or any(a != b for j, (a, b) in
                                               enumerate(zip(s, shapes[0])) if j != axis):
                raise self.error(f"bottom {self.param.bottom[i]!r} shape {tuple(s)} does not "
                                 f"match {tuple(shapes[0])} outside axis {axis}")
        return axis

    def forward(self, bottoms, params):
        axis = self._check([b.shape for b in bottoms])
        if len(bottoms) == 1:
            return [bottoms[0].view_as(bottoms[0])]
        return [torch.cat(bottoms, axis)]

    def top_shapes(self, bottom_shapes):
        axis = self._check(bottom_shapes)
        shape = list(bottom_shapes[0])
        shape[axis] = sum(s[axis] for s in bottom_shapes)
        return [tuple(shape)]


@register("Slice")
class Slice(Layer):
    """Splits along ``axis``/``slice_dim`` at ``slice_point``s, or into equal parts."""

    min_bottoms = max_bottoms = 1
    min_tops = 1

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        p = param.slice_param
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise self.error("either axis or slice_dim should be specified; not both")
        self.points = [int(x) for x in p.slice_point]
        n_top = len(param.top)
        if self.points and len(self.points) != n_top - 1:
            raise self.error(f"{len(self.points)} slice_point(s) for {n_top} tops; "
                             f"need exactly {n_top - 1}")
        if any(b <= a for a, b in zip([0] + self.points, self.points)):
            raise self.error(f"slice_point {self.points} must be positive and increasing")

    def _sizes(self, shape) -> tuple[int, list[int]]:
        p = self.param.slice_param
        if p.HasField("slice_dim"):
            if p.slice_dim >= len(shape):
                raise self.error(f"slice_dim {p.slice_dim} out of range ({len(shape)} axes)")
            axis = int(p.slice_dim)
        else:
            axis = canonical_axis(self, p.axis, len(shape))
        n, n_top = shape[axis], len(self.param.top)
        if self.points:
            if n_top > n or self.points[-1] > n:
                raise self.error(f"slice_point {self.points} does not fit axis {axis} of size {n}")
            edges = [0] + self.points + [n]
            return axis, [b - a for a, b in zip(edges, edges[1:])]
        if n % n_top:
            raise self.error(f"number of top blobs ({n_top}) should evenly divide input slice "
                             f"axis ({n})")
        return axis, [n // n_top] * n_top

    def forward(self, bottoms, params):
        axis, sizes = self._sizes(bottoms[0].shape)
        return list(torch.split(bottoms[0], sizes, dim=axis))

    def top_shapes(self, bottom_shapes):
        axis, sizes = self._sizes(bottom_shapes[0])
        shape = list(bottom_shapes[0])
        return [tuple(shape[:axis] + [n] + shape[axis + 1:]) for n in sizes]


@register("Flatten")
class Flatten(Layer):
    """Merges axes ``axis``..``end_axis`` (inclusive) into one; never in place (Caffe)."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        if param.top[0] == param.bottom[0]:
            raise self.error("Flatten layer does not allow in-place computation")

    def _shape(self, shape) -> tuple:
        p, n = self.param.flatten_param, len(shape)
        start = canonical_axis(self, p.axis, n, "axis")
        end = canonical_axis(self, p.end_axis, n, "end_axis")
        return tuple(shape[:start]) + (_count(shape, start, end + 1),) + tuple(shape[end + 1:])

    def forward(self, bottoms, params):
        return [bottoms[0].reshape(self._shape(tuple(bottoms[0].shape)))]

    def top_shapes(self, bottom_shapes):
        return [self._shape(tuple(bottom_shapes[0]))]


@register("Reshape")
class Reshape(Layer):
    """``reshape_param.shape`` over axes [axis, axis + num_axes): 0 copies a dim, -1 infers one."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        if param.top[0] == param.bottom[0]:
            raise self.error("Reshape layer does not allow in-place computation")
        p = param.reshape_param
        self.dims = [int(d) for d in p.shape.dim]
        if self.dims.count(-1) > 1:
            raise self.error("new shape contains multiple -1 dims; at most one may be given")
        if any(d < -1 for d in self.dims):
            raise self.error(f"shape {self.dims}: dims must be >= -1")
        if p.num_axes < -1:
            raise self.error("num_axes must be >= 0, or -1 for all")

    def _shape(self, shape) -> tuple:
        p, n = self.param.reshape_param, len(shape)
        start = p.axis if p.axis >= 0 else n + p.axis + 1
        if not 0 <= start <= n:
            raise self.error(f"axis {p.axis} out of range for a blob with {n} axes")
        end = n if p.num_axes == -1 else start + p.num_axes
        if end > n:
            raise self.error(f"axis {p.axis} + num_axes {p.num_axes} exceeds {n} axes")
        new = list(shape[:start]) + list(self.dims) + list(shape[end:])
        for i, d in enumerate(self.dims):
            if d == 0:
                if start + i >= n:
                    raise self.error("new shape contains a 0, but there was no corresponding "
                                     "bottom axis to copy")
                new[start + i] = shape[start + i]
        total = _count(shape)
        if -1 in self.dims:
            i = start + self.dims.index(-1)
            known = _count([d for j, d in enumerate(new) if j != i])
            if known == 0 or total % known:
                raise self.error(f"bottom count ({total}) must be divisible by the product of "
                                 f"the specified dimensions ({known})")
            new[i] = total // known
        if _count(new) != total:
            raise self.error(f"output count {_count(new)} {tuple(new)} must match input count "
                             f"{total} {tuple(shape)}")
        return tuple(new)

    def forward(self, bottoms, params):
        return [bottoms[0].reshape(self._shape(tuple(bottoms[0].shape)))]

    def top_shapes(self, bottom_shapes):
        return [self._shape(tuple(bottom_shapes[0]))]


# -- learned / structured ---------------------------------------------------------------------


@register("InnerProduct")
class InnerProduct(Layer):
    """y = x·Wᵀ + b on x flattened from ``axis``: (M, K) → (M, N); W (N, K), or (K, N) with
    ``transpose``; bias (N,). Top shape = bottom.shape[:axis] + (N,)."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        p = param.inner_product_param
        if not p.HasField("num_output") or p.num_output == 0:
            raise self.error("inner_product_param.num_output is required")
        self.num_output = int(p.num_output)
        self.bias_term, self.transpose = p.bias_term, p.transpose

    def _axis_k(self, shape) -> tuple[int, int]:
        axis = canonical_axis(self, self.param.inner_product_param.axis, len(shape))
        return axis, _count(shape, axis)

    def param_blobs(self, bottom_shapes):
        p = self.param.inner_product_param
        _, k = self._axis_k(tuple(bottom_shapes[0]))
        n = self.num_output
        shape = (k, n) if self.transpose else (n, k)
        blobs = [ParamBlob(shape, _filler_or_none(p, "weight_filler"))]
        if self.bias_term:
            blobs.append(ParamBlob((n,), _filler_or_none(p, "bias_filler")))
        return blobs

    def forward(self, bottoms, params):
        x = bottoms[0]
        axis, k = self._axis_k(tuple(x.shape))
        w = params[0]
        w_k = w.shape[0] if self.transpose else w.shape[1]
        if w.dim() != 2 or w_k != k:
            raise self.error(f"input size incompatible with inner product parameters: bottom "
                             f"{tuple(x.shape)} gives K = {k}, weight is {tuple(w.shape)}")
        x2 = x.reshape(_count(x.shape, 0, axis), k)
        y = x2 @ w if self.transpose else F.linear(x2, w)
        if self.bias_term:
            y = y + params[1].reshape(-1)
        return [y.reshape(tuple(x.shape[:axis]) + (self.num_output,))]

    def top_shapes(self, bottom_shapes):
        axis, _ = self._axis_k(tuple(bottom_shapes[0]))
        return [tuple(bottom_shapes[0][:axis]) + (self.num_output,)]


@register("Softmax")
class Softmax(Layer):
    """Softmax over ``softmax_param.axis``."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def forward(self, bottoms, params):
        x = bottoms[0]
        return [torch.softmax(x, canonical_axis(self, self.param.softmax_param.axis, x.dim()))]

    def top_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]


@register("Eltwise")
class Eltwise(Layer):
    """SUM (Σ coeff_i·x_i), PROD, MAX. MAX routes the gradient as Caffe's mask does: bottom 0
    wins over bottom 1 only when strictly greater (a tie goes to 1); a later bottom wins only
    when strictly greater than the running max (a tie stays with the earlier)."""

    min_bottoms = 2
    min_tops = max_tops = 1

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        p = param.eltwise_param
        if len(p.coeff) not in (0, len(param.bottom)):
            raise self.error("Eltwise layer takes one coefficient per bottom blob")
        if p.coeff and p.operation != caffe_pb2.EltwiseParameter.SUM:
            raise self.error("Eltwise layer only takes coefficients for summation")
        self.op = p.operation
        self.coeffs = [float(c) for c in p.coeff] or [1.0] * len(param.bottom)

    def _check(self, shapes):
        for name, s in zip(self.param.bottom[1:], shapes[1:]):
            if tuple(s) != tuple(shapes[0]):
                raise self.error(f"bottom {name!r} shape {tuple(s)} differs from "
                                 f"{tuple(shapes[0])}")

    def forward(self, bottoms, params):
        self._check([b.shape for b in bottoms])
        E = caffe_pb2.EltwiseParameter
        if self.op == E.PROD:
            y = bottoms[0] * bottoms[1]
            for b in bottoms[2:]:
                y = y * b
        elif self.op == E.SUM:
            y = None
            for c, b in zip(self.coeffs, bottoms):
                t = b if c == 1.0 else b * c
                y = t if y is None else y + t
        else:  # MAX
            a, b = bottoms[0], bottoms[1]
            y = torch.where(a > b, a, b)
            for b in bottoms[2:]:
                y = torch.where(b > y, b, y)
        return [y]

    def top_shapes(self, bottom_shapes):
        self._check(bottom_shapes)
        return [tuple(bottom_shapes[0])]


def _affine_axis(layer: Layer, axis: int, x_shape, p_shape) -> int:
    """Axis of a Scale/Bias operand against x: 0 for a scalar (Caffe), else canonical; checks
    that x.shape[axis:axis + len(p_shape)] == p_shape."""
    a = 0 if len(p_shape) == 0 else canonical_axis(layer, axis, len(x_shape))
    if tuple(x_shape[a:a + len(p_shape)]) != tuple(p_shape):
        raise layer.error(f"operand shape {tuple(p_shape)} does not match bottom "
                          f"{tuple(x_shape)} from axis {a}")
    return a


def _param_shape(layer: Layer, shape, axis: int, num_axes: int) -> tuple:
    """Shape of a learned Scale/Bias blob: bottom.shape[axis:axis + num_axes] (-1: to the end)."""
    a = canonical_axis(layer, axis, len(shape))
    if num_axes < -1:
        raise layer.error("num_axes must be non-negative, or -1 to extend to the end of bottom[0]")
    if num_axes >= 0 and len(shape) < a + num_axes:
        raise layer.error(f"scale/bias blob needs axes [{a}, {a + num_axes}) of bottom "
                          f"{tuple(shape)}")
    return tuple(shape[a:] if num_axes == -1 else shape[a:a + num_axes])


@register("Scale")
class Scale(Layer):
    """y = x ⊙ s (+ b), s from bottom 1 or a learned blob (filler default constant 1),
    broadcast over axes [axis, axis + s.dim()); optional learned bias (``bias_term``)."""

    min_bottoms, max_bottoms = 1, 2
    min_tops = max_tops = 1

    def param_blobs(self, bottom_shapes):
        p, x = self.param.scale_param, tuple(bottom_shapes[0])
        blobs = []
        if len(bottom_shapes) == 1:
            filler = p.filler if p.HasField("filler") else constant_filler(1.0)
            blobs.append(ParamBlob(_param_shape(self, x, p.axis, p.num_axes), filler))
        if p.bias_term:
            num_axes = len(bottom_shapes[1]) if len(bottom_shapes) == 2 else p.num_axes
            blobs.append(ParamBlob(_param_shape(self, x, p.axis, num_axes), p.bias_filler))
        return blobs

    def forward(self, bottoms, params):
        p, x = self.param.scale_param, bottoms[0]
        s = bottoms[1] if len(bottoms) == 2 else params[0]
        y = x * broadcast(s, _affine_axis(self, p.axis, x.shape, s.shape), x.dim())
        if p.bias_term:
            b = params[-1]
            y = y + broadcast(b, _affine_axis(self, p.axis, x.shape, b.shape), x.dim())
        return [y]

    def top_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]


@register("Bias")
class Bias(Layer):
    """y = x + b, b from bottom 1 or a learned blob (filler default constant 0)."""

    min_bottoms, max_bottoms = 1, 2
    min_tops = max_tops = 1

    def param_blobs(self, bottom_shapes):
        if len(bottom_shapes) == 2:
            return []
        p = self.param.bias_param
        return [ParamBlob(_param_shape(self, tuple(bottom_shapes[0]), p.axis, p.num_axes),
                          _filler_or_none(p, "filler"))]

    def forward(self, bottoms, params):
        x = bottoms[0]
        b = bottoms[1] if len(bottoms) == 2 else params[0]
        return [x + broadcast(b, _affine_axis(self, self.param.bias_param.axis, x.shape,
                                               b.shape), x.dim())]

    def top_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]


@register("BatchNorm")
class BatchNorm(Layer):
    """Caffe's BatchNorm: (x − mean) / sqrt(var + eps) per channel (axis 1), no affine part.

    Blobs (Caffe's order): mean·s (C,), var·s (C,), s (1,). With global stats (default in TEST)
    it uses mean = blob0·f, var = blob1·f, f = 0 if s == 0 else 1/s, and gradients treat them as
    constants. Otherwise it uses the batch's mean and biased variance and updates the blobs as
    Caffe does: s ← maf·s + 1, blob0 ← mean + maf·blob0, blob1 ← m/(m−1)·var + maf·blob1
    (m = count / C). The blobs are never learned: ``frozen_params`` tells the net to give them
    lr_mult 0 (Caffe forces it), and they never receive a gradient.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1
    frozen_params = True  # the net/solver: lr_mult 0 for every blob of this layer

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        p = param.batch_norm_param
        self.use_global_stats = (p.use_global_stats if p.HasField("use_global_stats")
                                 else ctx.phase == "TEST")
        self.maf = float(p.moving_average_fraction)
        self.eps = float(p.eps)
        for i, spec in enumerate(param.param):
            if spec.lr_mult != 0:
                raise self.error(f"param {i} has lr_mult {spec.lr_mult}: batch normalization "
                                 f"statistics cannot be learned (lr_mult must be 0)")

    @staticmethod
    def _channels(shape) -> int:
        return 1 if len(shape) == 1 else int(shape[1])

    def param_blobs(self, bottom_shapes):
        c = self._channels(tuple(bottom_shapes[0]))
        return [ParamBlob((c,)), ParamBlob((c,)), ParamBlob((1,))]

    def forward(self, bottoms, params):
        x = bottoms[0]
        c = self._channels(x.shape)
        xv = x.reshape(x.shape[0], c, -1)  # (N, C, spatial)
        if any(p.numel() != n for p, n in zip(params, (c, c, 1))):
            raise self.error(f"blobs {[tuple(p.shape) for p in params]} do not fit {c} channels")
        mean_b, var_b, s_b = (p.detach().reshape(-1) for p in params)
        if self.use_global_stats:
            s = s_b[0]
            factor = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
            mean, var = mean_b * factor, var_b * factor
        else:
            mean = xv.mean(dim=(0, 2))
            var = (xv - mean[None, :, None]).pow(2).mean(dim=(0, 2))
            m = x.numel() // c
            correction = float(np.float32(m) / np.float32(m - 1)) if m > 1 else 1.0
            with torch.no_grad():
                params[2].mul_(self.maf).add_(1.0)
                params[0].mul_(self.maf).add_(mean.detach().reshape(params[0].shape))
                params[1].mul_(self.maf).add_(correction * var.detach().reshape(params[1].shape))
        y = (xv - mean[None, :, None]) / torch.sqrt(var + self.eps)[None, :, None]
        return [y.reshape(x.shape)]

    def top_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]
