"""Convolution, Pooling and LRN with Caffe's exact shapes and arithmetic (SPEC §3).

All take (N, C, H, W) bottoms. The quirks copied from Caffe:

- Convolution: output ``floor((H + 2p - (d(k-1)+1)) / s) + 1`` (what ``F.conv2d`` does);
  weight (num_output, C/group, kh, kw), bias (num_output,).
- Pooling: output ``ceil((H + 2p - k) / s) + 1`` (or floor with ``round_mode: FLOOR``), minus one
  when some pad is set and the last window would start at or beyond ``H + p``. MAX windows are
  clipped to the map (padding never wins) and the first maximum in row-major order takes the
  gradient; AVE divides by the window clipped to ``[-p, H + p)``. PyTorch's own pooling computes
  the same where it accepts the arguments and gives the same size; otherwise we unfold.
- LRN: ACROSS_CHANNELS ``x / (k + alpha/n * sum of x^2 over n channels)^beta`` (zero padded);
  WITHIN_CHANNEL ``x / (1 + alpha * mean of x^2 over an n x n window)^beta``, the mean dividing by
  n^2 including padded zeros (Caffe builds it from AVE pooling with pad (n-1)/2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from readonly_ohem.caffe.layers.base import Layer, ParamBlob, register

FLT_MAX = 3.4028234663852886e38  # Caffe's initial value of a max: padding never wins


def _check_4d(layer: Layer, x: torch.Tensor, i: int = 0) -> None:
    if x.dim() != 4:
        raise layer.error(f"bottom {layer.param.bottom[i]!r} must have 4 axes (N, C, H, W), "
                          f"got shape {tuple(x.shape)}")


def _filler(msg, field: str):
    return getattr(msg, field) if msg.HasField(field) else None


# ---------------------------------------------------------------------------------------------
@register("Convolution")
class Convolution(Layer):
    """2-D convolution; several bottoms share the weights (one top per bottom), as in Caffe."""

    min_bottoms = min_tops = 1

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        cp = param.convolution_param
        if len(param.top) != len(param.bottom):
            raise self.error(f"needs one top per bottom, got {len(param.bottom)} bottom(s) and "
                             f"{len(param.top)} top(s)")
        if cp.axis != 1:
            raise self.error(f"convolution_param axis {cp.axis} is not supported "
                             "(only 1: N, C, H, W)")
        if cp.num_output <= 0:
            raise self.error("convolution_param num_output must be > 0")
        self.num_output, self.group, self.bias_term = cp.num_output, cp.group, cp.bias_term
        if self.group <= 0 or self.num_output % self.group:
            raise self.error(f"num_output {self.num_output} is not divisible by group {self.group}")
        self.kernel = self._pair(cp, "kernel_size", "kernel_h", "kernel_w", None)
        self.stride = self._pair(cp, "stride", "stride_h", "stride_w", 1)
        self.pad = self._pair(cp, "pad", "pad_h", "pad_w", 0)
        if len(cp.dilation) > 2:
            raise self.error(f"dilation has {len(cp.dilation)} values; "
                             "2-D convolution takes 1 or 2")
        self.dilation = (tuple(cp.dilation) * 2)[:2] if cp.dilation else (1, 1)
        if min(self.kernel) <= 0 or min(self.stride) <= 0 or min(self.dilation) <= 0:
            raise self.error("kernel, stride and dilation must be > 0")

    def _pair(self, cp, name, name_h, name_w, default):
        """Caffe's rule: a repeated field with 1 or 2 values, OR both *_h and *_w, not both."""
        values = list(getattr(cp, name))
        has_h, has_w = cp.HasField(name_h), cp.HasField(name_w)
        if has_h or has_w:
            if values:
                raise self.error(f"either {name} or {name_h}/{name_w} should be specified; "
                                 "not both")
            if not (has_h and has_w):
                raise self.error(f"{name_h} and {name_w} must be specified together")
            return getattr(cp, name_h), getattr(cp, name_w)
        if not values:
            if default is None:
                raise self.error(f"{name} (or {name_h} and {name_w}) is required")
            return default, default
        if len(values) > 2:
            raise self.error(f"{name} has {len(values)} values; 2-D convolution takes 1 or 2")
        return (values * 2)[:2] if len(values) == 1 else tuple(values)

    def param_blobs(self, bottom_shapes):
        channels = bottom_shapes[0][1]
        if channels % self.group:
            raise self.error(f"input channels {channels} are not divisible by group {self.group}")
        cp = self.param.convolution_param
        blobs = [ParamBlob((self.num_output, channels // self.group, *self.kernel),
                           _filler(cp, "weight_filler"))]
        if self.bias_term:
            blobs.append(ParamBlob((self.num_output,), _filler(cp, "bias_filler")))
        return blobs

    def forward(self, bottoms, params):
        weight = params[0]
        bias = params[1] if self.bias_term else None
        tops = []
        for i, x in enumerate(bottoms):
            _check_4d(self, x, i)
            if x.shape[1] != weight.shape[1] * self.group:
                raise self.error(f"bottom {self.param.bottom[i]!r} has {x.shape[1]} channels, the "
                                 f"weight expects {weight.shape[1] * self.group}")
            for ax, size in enumerate(x.shape[2:]):
                extent = self.dilation[ax] * (self.kernel[ax] - 1) + 1
                if size + 2 * self.pad[ax] < extent:
                    raise self.error(f"bottom {self.param.bottom[i]!r} of shape {tuple(x.shape)} "
                                     f"is smaller than the kernel extent {extent} (pad "
                                     f"{self.pad[ax]})")
            tops.append(F.conv2d(x, weight, bias, self.stride, self.pad, self.dilation, self.group))
        return tops


# ---------------------------------------------------------------------------------------------
def caffe_pooled_size(size: int, kernel: int, pad: int, stride: int, ceil_mode: bool,
                      any_pad: bool) -> int:
    """Caffe's pooled size on one axis (``any_pad``: some pad is set on either axis)."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if any_pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def caffe_pool2d(x: torch.Tensor, method: str, kernel, stride, pad, ceil_mode: bool = True,
                 return_mask: bool = False):
    """Caffe's MAX/AVE pooling of x (N, C, H, W) -> (N, C, OH, OW) [, mask as float h*W+w or -1].

    kernel/stride/pad: (h, w) pairs. Uses PyTorch's pooling where it computes the same (pad at
    most half the kernel and the same output size), else an unfold over an explicitly padded map.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    h, w = x.shape[2:]
    any_pad = bool(ph or pw)
    oh = caffe_pooled_size(h, kh, ph, sh, ceil_mode, any_pad)
    ow = caffe_pooled_size(w, kw, pw, sw, ceil_mode, any_pad)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"pooled output would be {oh} x {ow} for input {h} x {w}")
    if 2 * ph <= kh and 2 * pw <= kw:
        try:
            if method == "MAX":
                out = _max_pool2d(x, kernel, stride, pad, ceil_mode, return_mask)
                top = out[0] if return_mask else out
            else:
                top = F.avg_pool2d(x, kernel, stride, pad, ceil_mode=ceil_mode,
                                   count_include_pad=True)
        except RuntimeError:  # PyTorch refuses a size Caffe accepts: the general path below
            top = None
        if top is not None and top.shape[2:] == (oh, ow):
            if return_mask:
                return top, out[1].to(x.dtype)
            return top
    return _unfold_pool(x, method, kernel, stride, pad, (oh, ow), return_mask)


def _max_pool2d(x, kernel, stride, pad, ceil_mode, return_indices):
    """``F.max_pool2d``; on the CPU the argmax comes from a channels-last copy (PyTorch's
    channels-last CPU kernel is 3-4x faster on one thread than its NCHW one, same first-maximum
    indices) and the values are gathered from x by it, so the gradient is a scatter-add in
    output order, as the NCHW kernel's backward adds it. Same values, indices and gradient."""
    if x.device.type != "cpu" or x.dim() != 4:
        return F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil_mode,
                            return_indices=return_indices)
    with torch.no_grad():
        _, index = F.max_pool2d(x.detach().contiguous(memory_format=torch.channels_last), kernel,
                                stride, pad, ceil_mode=ceil_mode, return_indices=True)
    index = index.contiguous()
    n, c = x.shape[:2]
    top = x.reshape(n, c, -1).gather(2, index.view(n, c, -1)).view(index.shape)
    return (top, index) if return_indices else top


def _unfold_pool(x, method, kernel, stride, pad, out_size, return_mask):
    """The general case: pad to cover every window, unfold, reduce; shapes (N, C, OH, OW)."""
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = kernel, stride, pad, out_size
    n, c, h, w = x.shape
    bottom = (oh - 1) * sh + kh - h - ph  # negative: crop what no window reaches
    right = (ow - 1) * sw + kw - w - pw
    fill = -FLT_MAX if method == "MAX" else 0.0
    padded = F.pad(x, (pw, right, ph, bottom), value=fill)
    cols = F.unfold(padded, (kh, kw), stride=(sh, sw)).view(n, c, kh * kw, oh, ow)
    if method == "MAX":
        top, k = cols.max(dim=2)  # first maximum in row-major window order
        if not return_mask:
            return top
        rows = torch.arange(oh, device=x.device).view(-1, 1) * sh - ph + k // kw
        colm = torch.arange(ow, device=x.device).view(1, -1) * sw - pw + k % kw
        inside = (rows >= 0) & (rows < h) & (colm >= 0) & (colm < w)
        mask = torch.where(inside, rows * w + colm, torch.full_like(k, -1))
        return top, mask.to(x.dtype)
    hs = torch.arange(oh, device=x.device) * sh - ph
    ws = torch.arange(ow, device=x.device) * sw - pw
    size_h = torch.clamp(hs + kh, max=h + ph) - hs
    size_w = torch.clamp(ws + kw, max=w + pw) - ws
    divisor = (size_h.view(-1, 1) * size_w.view(1, -1)).to(x.dtype)
    return cols.sum(dim=2) / divisor


@register("Pooling")
class Pooling(Layer):
    """MAX (optional second top: the argmax mask, as Caffe) or AVE pooling."""

    min_bottoms = max_bottoms = 1
    min_tops, max_tops = 1, 2

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        pp = param.pooling_param
        self.method = {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}[pp.pool]
        if self.method == "STOCHASTIC":
            raise self.error("pool: STOCHASTIC is not supported (only MAX and AVE)")
        if len(param.top) == 2 and self.method != "MAX":
            raise self.error("only MAX pooling has a second (mask) top")
        self.global_pooling = pp.global_pooling
        has_k = pp.HasField("kernel_size")
        has_kh, has_kw = pp.HasField("kernel_h"), pp.HasField("kernel_w")
        if self.global_pooling:
            if has_k or has_kh or has_kw:
                raise self.error("with global_pooling: true the filter size cannot be specified")
            self.kernel = None
        else:
            if has_k and has_kh and has_kw:
                raise self.error("the filter size is kernel_size OR kernel_h and kernel_w; "
                                 "not both")
            if not has_k and not (has_kh and has_kw):
                raise self.error("kernel_size (or both kernel_h and kernel_w) is required")
            self.kernel = (pp.kernel_size,) * 2 if has_k else (pp.kernel_h, pp.kernel_w)
            if min(self.kernel) <= 0:
                raise self.error(f"kernel size must be > 0, got {self.kernel}")
        self.pad = self._pair(pp, "pad")
        self.stride = self._pair(pp, "stride")
        if min(self.stride) <= 0:
            raise self.error(f"stride must be > 0, got {self.stride}")
        if self.global_pooling and (self.pad != (0, 0) or self.stride != (1, 1)):
            raise self.error("with global_pooling: true only pad = 0 and stride = 1")
        if self.kernel and (self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]):
            raise self.error(f"pad {self.pad} must be smaller than the kernel {self.kernel}")
        self.ceil_mode = pp.round_mode == pp.CEIL

    def _pair(self, pp, name):
        has_h, has_w = pp.HasField(name + "_h"), pp.HasField(name + "_w")
        if has_h or has_w:
            if pp.HasField(name) or not (has_h and has_w):
                raise self.error(f"{name} is {name} OR {name}_h and {name}_w are required")
            return getattr(pp, name + "_h"), getattr(pp, name + "_w")
        return (getattr(pp, name),) * 2

    def forward(self, bottoms, params):
        x = bottoms[0]
        _check_4d(self, x)
        kernel = tuple(x.shape[2:]) if self.global_pooling else self.kernel
        try:
            out = caffe_pool2d(x, self.method, kernel, self.stride, self.pad, self.ceil_mode,
                               return_mask=len(self.param.top) == 2)
        except ValueError as err:
            raise self.error(f"bottom {self.param.bottom[0]!r} {tuple(x.shape)}: {err}") from None
        return list(out) if isinstance(out, tuple) else [out]


# ---------------------------------------------------------------------------------------------
@register("LRN")
class LRN(Layer):
    min_bottoms = max_bottoms = min_tops = max_tops = 1

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        lp = param.lrn_param
        self.size, self.alpha, self.beta, self.k = lp.local_size, lp.alpha, lp.beta, lp.k
        if self.size % 2 != 1:
            raise self.error(f"LRN only supports odd values for local_size, got {self.size}")
        self.across = lp.norm_region == lp.ACROSS_CHANNELS

    def forward(self, bottoms, params):
        x = bottoms[0]
        _check_4d(self, x)
        pre_pad = (self.size - 1) // 2
        sq = x * x
        if self.across:
            padded = F.pad(sq, (0, 0, 0, 0, pre_pad, self.size - pre_pad - 1))
            window = padded.unfold(1, self.size, 1).sum(dim=-1)  # (N, C, H, W)
            scale = self.k + (self.alpha / self.size) * window
        else:
            mean = F.avg_pool2d(sq, self.size, 1, pre_pad, count_include_pad=True)
            scale = 1.0 + self.alpha * mean
        return [x * scale.pow(-self.beta)]
