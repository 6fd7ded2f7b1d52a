"""RoI max pooling exactly as the Fast R-CNN Caffe fork computes it, forward and backward.

``roi_pool(features, rois, spatial_scale, pooled_h, pooled_w)``
    features: (N, C, H, W); rois: (R, 5) [batch_idx, x1, y1, x2, y2] in image coordinates
    -> (R, C, pooled_h, pooled_w), differentiable in ``features`` only.

Caffe's rules (SPEC §3), all in the features' dtype like Caffe's ``Dtype``:

- corners ``round(coord * spatial_scale)`` with C ``round`` (half away from zero; not
  ``torch.round``, which rounds half to even); batch index truncated like ``static_cast<int>``;
- ``roi_w = max(x2 - x1 + 1, 1)`` (so a malformed RoI with x2 < x1 pools one cell);
  ``bin = roi_w / pooled_w`` as a float; bin ``p`` spans ``[floor(p*bin), ceil((p+1)*bin))``
  offset by the start and clipped to ``[0, W]``; an empty bin outputs 0 (argmax -1);
- max with the FIRST maximum in row-major order (Caffe compares with a strict ``>``);
- backward (the fork's GPU kernel): a cell receives a bin's diff when it is that bin's argmax AND
  lies inside ``[start, end]`` of the RoI AND the bin is in the cell's inverse range
  ``[floor((h-start)/bin), ceil((h-start+1)/bin))``. So a malformed RoI gives no gradient.

The forward is vectorized with a 2-D sparse table of (max, first index) over power-of-two
rectangles: any bin is the union of four overlapping such rectangles, and "larger value, then
smaller row-major index" picks the first maximum of the union (for float32 both live in one
int64 key, so combining is ``torch.maximum``). The tables are built in place in a reused
per-thread CPU buffer (a fresh one costs more in page faults than the work), and a second call
on a bit-identical map (OHEM's two heads) reuses them. On CUDA, ``torchvision.ops.roi_pool``'s
forward (a port of the same kernel) is used instead when its compiled ops load, the scale is a
power of two (it scales corners in double, Caffe in float) and it agrees with ours on a
self-check; the backward is always ours (torchvision's skips Caffe's in-RoI test).
"""

from __future__ import annotations

import math
import threading

import torch
from torch.autograd.function import once_differentiable

from readonly_ohem.errors import DataError

# Elements (RoIs x bins x channels) handled per chunk: bounds the temporaries, not a per-RoI loop.
_CHUNK_ELEMENTS = 1 << 22


def caffe_round(x: torch.Tensor) -> torch.Tensor:
    """C ``round``: half away from zero (2.5 -> 3, -0.5 -> -1), exact for every float."""
    t = torch.trunc(x)
    frac = x - t  # exact: the fractional part of a float is representable
    return t + torch.where(frac.abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


class RoIGeometry:
    """Caffe's per-RoI integers and float bin sizes.

    batch: (R,) long; start_h/start_w/end_h/end_w: (R,) long (scaled, rounded corners);
    bin_h/bin_w: (R,) in ``dtype``; hstart/hend: (R, PH) and wstart/wend: (R, PW) long, the bins'
    half-open rows/columns on the map, offset and clipped to [0, H] / [0, W].
    """

    def __init__(self, rois: torch.Tensor, spatial_scale: float, pooled_h: int, pooled_w: int,
                 height: int, width: int, dtype: torch.dtype):
        r = rois.to(dtype)
        scale = torch.tensor(spatial_scale, dtype=dtype, device=r.device)
        self.batch = r[:, 0].long()  # static_cast<int>: truncation toward zero
        corners = caffe_round(r[:, 1:5] * scale).long()
        self.start_w, self.start_h, self.end_w, self.end_h = corners.unbind(1)
        roi_h = (self.end_h - self.start_h + 1).clamp(min=1)
        roi_w = (self.end_w - self.start_w + 1).clamp(min=1)
        self.bin_h = roi_h.to(dtype) / pooled_h
        self.bin_w = roi_w.to(dtype) / pooled_w
        self.dtype = dtype
        self.hstart, self.hend = self._edges(self.bin_h, self.start_h, pooled_h, height)
        self.wstart, self.wend = self._edges(self.bin_w, self.start_w, pooled_w, width)

    @staticmethod
    def _edges(bin_size, start, pooled, size):
        p = torch.arange(pooled, device=bin_size.device, dtype=bin_size.dtype)
        lo = torch.floor(p[None, :] * bin_size[:, None]).long() + start[:, None]
        hi = torch.ceil((p[None, :] + 1) * bin_size[:, None]).long() + start[:, None]
        return lo.clamp(0, size), hi.clamp(0, size)


def check_rois(features: torch.Tensor, rois: torch.Tensor, what: str = "roi_pool") -> torch.Tensor:
    """rois (R, 5) or (R, 5, 1, 1) -> (R, 5); DataError on a bad shape or batch index."""
    if features.dim() != 4:
        raise DataError(f"{what}: features must be (N, C, H, W), got shape {tuple(features.shape)}")
    if rois.dim() == 0 or rois.numel() != rois.shape[0] * 5:
        raise DataError(f"{what}: rois must be (R, 5) [batch_idx, x1, y1, x2, y2], "
                        f"got shape {tuple(rois.shape)}")
    rois = rois.reshape(-1, 5).to(features.device)
    if rois.shape[0]:
        b = rois[:, 0].long()
        lo, hi = int(b.min()), int(b.max())
        if lo < 0 or hi >= features.shape[0]:
            bad = lo if lo < 0 else hi
            raise DataError(f"{what}: a RoI has batch index {bad}, "
                            f"outside [0, {features.shape[0]})")
    return rois


def _first_max(va, ia, vb, ib):
    """Combine two (value, row-major index) candidates: larger value, then smaller index."""
    take_b = (vb > va) | ((vb == va) & (ib < ia))
    return torch.where(take_b, vb, va), torch.where(take_b, ib, ia)


class _PackedKeys:
    """float32: (value, index) packed in one int64 ordered as "larger value, then smaller index",
    so combining candidates is one ``torch.maximum``: the high half holds the float's bits made
    order-preserving, the low half ~index. (-0.0 is read as +0.0: Caffe ties them too.)
    The key 0 decodes to (0.0, -1), an empty bin's output."""

    @staticmethod
    def encode(values, index):
        bits = (values + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order of the floats
        return [(ordered.long() << 32) | (~index.long() & 0xFFFFFFFF)]

    @staticmethod
    def combine(a, b):
        return [torch.maximum(a[0], b[0])]

    @staticmethod
    def combine_into(a, b, out):
        torch.maximum(a[0], b[0], out=out[0])

    @staticmethod
    def decode(state):
        key = state[0]
        hi = (key >> 32).int()
        values = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).view(torch.float32)
        return values, ~key.int()  # the low 32 bits hold ~index


class _Pairs:
    """Any other dtype (float64 in gradchecks): the value and the index side by side."""

    @staticmethod
    def encode(values, index):
        return [values, index.to(torch.int32).expand_as(values)]

    @staticmethod
    def combine(a, b):
        return list(_first_max(a[0], a[1], b[0], b[1]))

    @staticmethod
    def combine_into(a, b, out):
        for o, m in zip(out, _first_max(a[0], a[1], b[0], b[1])):
            o.copy_(m)

    @staticmethod
    def decode(state):
        return state[0], state[1]


def _sparse_table(features: torch.Tensor, levels_h: int, levels_w: int, scheme):
    """(max, first index) over [h, h+2^kh) x [w, w+2^kw) for kh <= levels_h, kw <= levels_w.

    -> the scheme's state tensors, each (L + 1, C) with rows flattened over (kh, kw, n, h, w);
    the last row is the empty bin's (0.0, -1). Rows whose rectangle leaves the map are never
    written (a level's valid rows read only valid rows of the level below) and never queried.
    The tables live in this thread's CPU workspace (``_workspace``): valid until the next call.
    """
    n, c, h, w = features.shape
    index = torch.arange(h * w, device=features.device, dtype=torch.int32).view(1, h, w, 1)
    base = scheme.encode(features.detach().permute(0, 2, 3, 1), index)
    count = (levels_h + 1) * (levels_w + 1) * n * h * w
    flat_tables = [_workspace(i, (count + 1, c), t) for i, t in enumerate(base)]
    tables = [t[:count].view(levels_h + 1, levels_w + 1, n, h, w, c) for t in flat_tables]
    empty_row = scheme.encode(features.new_zeros((1, c)),
                              torch.full((1, 1), -1, device=features.device))
    for t, b in zip(tables, base):
        t[0, 0] = b
    for t, e in zip(flat_tables, empty_row):
        t[count:] = e
    for kh in range(levels_h + 1):
        if kh:
            s = 1 << (kh - 1)
            prev = [t[kh - 1, 0] for t in tables]
            scheme.combine_into([p[:, : h - s] for p in prev], [p[:, s:] for p in prev],
                                [t[kh, 0, :, : h - s] for t in tables])
        for kw in range(1, levels_w + 1):
            s = 1 << (kw - 1)
            prev = [t[kh, kw - 1] for t in tables]
            scheme.combine_into([p[:, :, : w - s] for p in prev], [p[:, :, s:] for p in prev],
                                [t[kh, kw, :, :, : w - s] for t in tables])
    return flat_tables


_WORKSPACE = threading.local()


def _tables_for(features: torch.Tensor, levels_h: int, levels_w: int, scheme):
    """The sparse tables of ``features`` with at least these levels -> (tables, levels_h,
    levels_w) of the tables returned. On the CPU the last map's tables are reused when the map
    is bit for bit the same (and they have enough levels): OHEM pools one feature map twice (the
    readonly head over every RoI, then the trainable head over the kept ones). The memo keeps a
    copy of the map's bits, so a change by any route (in place, through ``.data`` or numpy)
    rebuilds; the check is one compare of the map, the build ~25 passes over it."""
    if features.device.type != "cpu":
        return _sparse_table(features, levels_h, levels_w, scheme), levels_h, levels_w
    bits = _bits(features)
    memo = getattr(_WORKSPACE, "memo", None)
    if (memo is not None and memo[2] >= levels_h and memo[3] >= levels_w
            and memo[4] == features.dtype and memo[0].shape == bits.shape
            and torch.equal(memo[0], bits)):
        return memo[1], memo[2], memo[3]
    _WORKSPACE.memo = None  # the workspace is about to be overwritten
    tables = _sparse_table(features, levels_h, levels_w, scheme)
    _WORKSPACE.memo = (bits.clone(), tables, levels_h, levels_w, features.dtype)
    return tables, levels_h, levels_w


def _bits(features: torch.Tensor) -> torch.Tensor:
    """The map's bits as integers of its width (so -0.0 differs from 0.0, and NaN equals
    itself)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[features.element_size()]
    return features.detach().contiguous().view(ints)


def _workspace(slot: int, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """An uninitialized (shape) tensor like ``like``, reused across calls on the CPU.

    The tables of a larger map are tens of MB: a fresh allocation of that size is a fresh
    ``mmap`` whose page faults cost more than filling the tables (5x at 68 x 60 x 64, levels
    4 x 4). One buffer per thread and slot, grown as needed; CUDA's caching allocator already
    reuses memory, so there it is a plain ``new_empty``."""
    if like.device.type != "cpu":
        return like.new_empty(shape)
    buffers = _WORKSPACE.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buf = buffers.get((slot, like.dtype))
    if buf is None or buf.numel() < numel:
        buf = buffers[(slot, like.dtype)] = like.new_empty(numel)
    return buf[:numel].view(shape)


def _floor_log2(x: torch.Tensor, limit: int) -> torch.Tensor:
    table = torch.tensor([0] + [int(math.log2(k)) for k in range(1, limit + 1)], device=x.device)
    return table[x.clamp(1, limit)]


def _forward_ours(features, geo: RoIGeometry, pooled_h, pooled_w):
    n, c, h, w = features.shape
    r = geo.batch.shape[0]
    scheme = _PackedKeys if features.dtype == torch.float32 else _Pairs
    bin_rows = geo.hend - geo.hstart  # (R, PH)
    bin_cols = geo.wend - geo.wstart  # (R, PW)
    empty = (bin_rows <= 0)[:, :, None] | (bin_cols <= 0)[:, None, :]  # (R, PH, PW)
    kh = _floor_log2(bin_rows, h)
    kw = _floor_log2(bin_cols, w)
    levels_h, levels_w = (int(kh.max()), int(kw.max())) if r else (0, 0)
    tables, levels_h, levels_w = _tables_for(features, levels_h, levels_w, scheme)
    empty_row = tables[0].shape[0] - 1
    level = kh[:, :, None] * (levels_w + 1) + kw[:, None, :]
    base = ((level * n + geo.batch[:, None, None]) * h)  # (R, PH, PW)
    rows = (geo.hstart, geo.hend - (1 << kh))  # first and last power-of-two block per bin
    cols = (geo.wstart, geo.wend - (1 << kw))
    out = features.new_empty((r, c, pooled_h, pooled_w))
    argmax = torch.empty((r, c, pooled_h, pooled_w), dtype=torch.int32, device=features.device)
    out_rows, argmax_rows = out.permute(0, 2, 3, 1), argmax.permute(0, 2, 3, 1)  # (R, PH, PW, C)
    step = max(1, _CHUNK_ELEMENTS // max(1, pooled_h * pooled_w * c))
    for lo in range(0, r, step):
        sl = slice(lo, lo + step)
        best = None
        for hh in rows:
            for ww in cols:
                flat = (base[sl] + hh[sl, :, None]) * w + ww[sl, None, :]
                flat = flat.masked_fill(empty[sl], empty_row).view(-1)
                cand = [t.index_select(0, flat) for t in tables]
                best = cand if best is None else scheme.combine(best, cand)
        values, index = scheme.decode(best)
        out_rows[sl] = values.view(-1, pooled_h, pooled_w, c)
        argmax_rows[sl] = index.view(-1, pooled_h, pooled_w, c)
    return out, argmax


# -- torchvision: its forward is a port of the same kernel (its backward is not: see above) ----
_TV_CHECKED: dict = {}
_TV_DEVICES = ("cuda",)  # on CPU torchvision's kernel is a plain loop, slower than ours


def _torchvision_op():
    try:
        import torchvision  # noqa: F401

        return torch.ops.torchvision.roi_pool
    except Exception:  # not installed, or its compiled ops do not load
        return None


def _torchvision_usable(features: torch.Tensor, spatial_scale: float) -> bool:
    """True where torchvision's forward equals ours: it scales corners in double, Caffe in Dtype,
    which agree exactly when the scale is a power of two; plus a one-time self-check per
    device/dtype on a case with half-way corners, borders, empty bins and a malformed RoI."""
    if features.device.type not in _TV_DEVICES or spatial_scale <= 0:
        return False
    if features.dtype not in (torch.float32, torch.float64):
        return False
    if math.frexp(spatial_scale)[0] != 0.5:
        return False
    key = (features.device.type, features.dtype)
    if key not in _TV_CHECKED:
        _TV_CHECKED[key] = _torchvision_self_check(features.device, features.dtype)
    return _TV_CHECKED[key]


def _torchvision_self_check(device, dtype) -> bool:
    op = _torchvision_op()
    if op is None:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        feats = torch.randint(-3, 4, (2, 3, 9, 11), generator=g).to(dtype)  # many ties
        rois = torch.tensor([[0, 0, 0, 175, 143], [1, 40, 8, 72, 72], [0, 150, 120, 300, 250],
                             [1, -40, -24, 24, 40], [0, 40, 24, 40, 24], [1, 40, 8, 200, 72],
                             [0, 80, 64, 16, 32], [1, 8, 8, 8.5, 120]], dtype=dtype)
        feats, rois = feats.to(device), rois.to(device)
        geo = RoIGeometry(rois, 1 / 16, 5, 4, 9, 11, dtype)
        want_out, want_arg = _forward_ours(feats, geo, 5, 4)
        got_out, got_arg = op(feats, rois, 1 / 16, 5, 4)
        return bool(torch.equal(got_out, want_out) and torch.equal(got_arg.int(), want_arg))
    except Exception:
        return False


def roi_pool_forward(features: torch.Tensor, rois: torch.Tensor, spatial_scale: float,
                     pooled_h: int, pooled_w: int, use_torchvision: bool = True):
    """No-grad forward -> (out (R, C, PH, PW), argmax (R, C, PH, PW) int32 plane index h*W+w,
    -1 for an empty bin)."""
    rois = check_rois(features, rois)
    return _forward(features, rois, spatial_scale, pooled_h, pooled_w, use_torchvision)


def _forward(features, rois, spatial_scale, pooled_h, pooled_w, use_torchvision=True):
    n, c, h, w = features.shape
    with torch.no_grad():
        if use_torchvision and rois.shape[0] and _torchvision_usable(features, spatial_scale):
            out, argmax = _torchvision_op()(features.detach(), rois.to(features.dtype),
                                            float(spatial_scale), pooled_h, pooled_w)
            return out, argmax.int()
        geo = RoIGeometry(rois, spatial_scale, pooled_h, pooled_w, h, w, features.dtype)
        return _forward_ours(features, geo, pooled_h, pooled_w)


def roi_pool_backward(grad_out: torch.Tensor, argmax: torch.Tensor, rois: torch.Tensor,
                      features_shape, spatial_scale: float) -> torch.Tensor:
    """The fork's GPU backward: grad_out (R, C, PH, PW) -> grad of features (N, C, H, W).

    Each bin's diff goes to its argmax cell only where Caffe's per-cell test accepts it (cell in
    [start, end] of the RoI and bin in the cell's inverse bin range), summed over RoIs and bins.
    """
    n, c, h, w = features_shape
    r, _, pooled_h, pooled_w = grad_out.shape
    sink = n * c * h * w  # one extra slot takes the diffs Caffe drops
    grad = grad_out.new_zeros(sink + 1)
    if r == 0:
        return grad[:sink].view(n, c, h, w)
    geo = RoIGeometry(rois.reshape(-1, 5), spatial_scale, pooled_h, pooled_w, h, w, grad_out.dtype)
    # accept_h[r, ph, y]: row y may receive bin row ph's diff (Caffe's test), likewise columns.
    accept_h = _accept(geo.start_h, geo.end_h, geo.bin_h, pooled_h, h)
    accept_w = _accept(geo.start_w, geo.end_w, geo.bin_w, pooled_w, w)
    # Bins whose every cell passes need no per-cell test (all bins of well-formed RoIs, but for
    # a rare float edge): only the others look at their argmax's row and column.
    rows_ok = _all_accepted(accept_h, geo.hstart, geo.hend)  # (R, PH)
    cols_ok = _all_accepted(accept_w, geo.wstart, geo.wend)  # (R, PW)
    bins_ok = rows_ok[:, :, None] & cols_ok[:, None, :]
    empty = ((geo.hend <= geo.hstart)[:, :, None] | (geo.wend <= geo.wstart)[:, None, :])
    any_bad, any_empty = not bool(bins_ok.all()), bool(empty.any())
    ph = torch.arange(pooled_h, device=grad.device).view(1, 1, -1, 1)
    pw = torch.arange(pooled_w, device=grad.device).view(1, 1, 1, -1)
    ch = torch.arange(c, device=grad.device).view(1, -1, 1, 1)
    step = max(1, _CHUNK_ELEMENTS // max(1, c * pooled_h * pooled_w))
    for lo in range(0, r, step):
        sl = slice(lo, lo + step)
        rr = torch.arange(lo, min(lo + step, r), device=grad.device).view(-1, 1, 1, 1)
        a = argmax[sl]
        flat = (geo.batch[rr] * c + ch) * (h * w) + a  # (r, C, PH, PW) int64
        if any_bad or any_empty:
            drop = a < 0
            if any_bad:
                y, x = a.clamp(min=0).long().div(w, rounding_mode="floor"), a.clamp(min=0) % w
                cell_ok = accept_h[rr, ph, y] & accept_w[rr, pw, x.long()]
                drop |= ~(bins_ok[sl].unsqueeze(1) | cell_ok)
            flat.masked_fill_(drop, sink)
        grad.index_add_(0, flat.view(-1), grad_out[sl].reshape(-1))
    return grad[:sink].view(n, c, h, w)


def _all_accepted(accept, lo, hi):
    """(R, P) bool: every cell y in [lo, hi) of bin p passes Caffe's test (empty bins: True)."""
    y = torch.arange(accept.shape[2], device=accept.device)
    in_bin = (y >= lo[:, :, None]) & (y < hi[:, :, None])
    return ~(in_bin & ~accept).any(dim=2)


def _accept(start, end, bin_size, pooled, size):
    """(R, pooled, size) bool: cell coordinate y of the RoI may take bin p's diff (Caffe's test)."""
    y = torch.arange(size, device=start.device)
    rel = (y[None, :] - start[:, None]).to(bin_size.dtype)  # (R, size)
    pstart = torch.floor(rel / bin_size[:, None]).long()
    pend = torch.ceil((rel + 1) / bin_size[:, None]).long()
    inside = (y[None, :] >= start[:, None]) & (y[None, :] <= end[:, None])
    p = torch.arange(pooled, device=start.device).view(1, -1, 1)
    return inside[:, None, :] & (p >= pstart[:, None, :]) & (p < pend[:, None, :])


class _ROIPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, spatial_scale, pooled_h, pooled_w):
        out, argmax = _forward(features, rois, spatial_scale, pooled_h, pooled_w)
        ctx.save_for_backward(rois.detach(), argmax)
        ctx.features_shape = tuple(features.shape)
        ctx.spatial_scale = spatial_scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        rois, argmax = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = roi_pool_backward(grad_out.contiguous(), argmax, rois, ctx.features_shape,
                                     ctx.spatial_scale)
        return grad, None, None, None, None


def roi_pool(features: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_h: int,
             pooled_w: int) -> torch.Tensor:
    """features (N, C, H, W), rois (R, 5) [batch_idx, x1, y1, x2, y2] -> (R, C, PH, PW).

    Differentiable in ``features`` (Caffe's backward); ``rois`` get no gradient.
    """
    rois = check_rois(features, rois)
    return _ROIPool.apply(features, rois, float(spatial_scale), int(pooled_h), int(pooled_w))
