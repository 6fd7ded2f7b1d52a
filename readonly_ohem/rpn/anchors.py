"""Anchors: the original ``generate_anchors`` (its rounding) and their shifts over a feature map.

``generate_anchors()`` gives the 9 reference windows of py-faster-rcnn (base 16, ratios 0.5/1/2,
scales 8/16/32), row ``r * len(scales) + s`` for ratio r and scale s, as float64 ``[x1, y1, x2,
y2]`` with the +1 pixel widths::

    [[ -84.  -40.   99.   55.]      ratio 0.5: 23 x 12 base window, scaled by 8, 16, 32
     [-176.  -88.  191.  103.]
     [-360. -184.  375.  199.]
     [ -56.  -56.   71.   71.]      ratio 1: 16 x 16
     [-120. -120.  135.  135.]
     [-248. -248.  263.  263.]
     [ -36.  -80.   51.   95.]      ratio 2: 11 x 22
     [ -80. -168.   95.  183.]
     [-168. -344.  183.  359.]]

(The comment in the original file quotes Shaoqing's MATLAB anchors, one pixel off; the Python
code, which the released models were trained with, gives these.) The ratio step rounds half to
even (``np.round``; ``torch.round`` does the same).

``shifted_anchors`` lays them over an H x W map with stride ``feat_stride``: (H*W*A, 4), rows
ordered (h, w, a) slowest to fastest, the order of the RPN layers' blobs.

``layer_anchors`` reads the anchor keys of an RPN layer's ``param_str`` (``feat_stride``,
``scales``), as both original layers do.
"""

from __future__ import annotations

from typing import Sequence

import torch

RATIOS = (0.5, 1.0, 2.0)
SCALES = (8, 16, 32)


def _whctrs(anchors: torch.Tensor):
    """Width, height, x center, y center of (N, 4) windows (the original ``_whctrs``)."""
    w = anchors[:, 2] - anchors[:, 0] + 1
    h = anchors[:, 3] - anchors[:, 1] + 1
    return w, h, anchors[:, 0] + 0.5 * (w - 1), anchors[:, 1] + 0.5 * (h - 1)


def _mkanchors(ws: torch.Tensor, hs: torch.Tensor, x_ctr: torch.Tensor, y_ctr: torch.Tensor):
    """Windows of widths ``ws`` and heights ``hs`` around the centers: (..., 4)."""
    return torch.stack((x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1),
                        x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)), dim=-1)


def generate_anchors(base_size: float = 16, ratios: Sequence[float] = RATIOS,
                     scales: Sequence[float] = SCALES) -> torch.Tensor:
    """The reference windows: (len(ratios) * len(scales), 4) float64, ratio-major.

    Step for step the original: each ratio keeps the area of the (0, 0, base-1, base-1) window
    with ``ws = round(sqrt(area / ratio))``, ``hs = round(ws * ratio)``; each of those windows is
    then scaled about its center.
    """
    f64 = torch.float64
    base = torch.tensor([[0.0, 0.0, base_size - 1.0, base_size - 1.0]], dtype=f64)
    w, h, x_ctr, y_ctr = _whctrs(base)
    r = torch.as_tensor(ratios, dtype=f64)
    ws = torch.round(torch.sqrt(w * h / r))
    hs = torch.round(ws * r)
    ratio_anchors = _mkanchors(ws, hs, x_ctr, y_ctr)  # (R, 4)
    w, h, x_ctr, y_ctr = _whctrs(ratio_anchors)
    s = torch.as_tensor(scales, dtype=f64)
    return _mkanchors(w[:, None] * s, h[:, None] * s, x_ctr[:, None], y_ctr[:, None]).reshape(-1, 4)


def shifted_anchors(anchors: torch.Tensor, height: int, width: int,
                    feat_stride: float) -> torch.Tensor:
    """``anchors`` (A, 4) shifted to every cell of an H x W map: (H*W*A, 4) in ``anchors``' dtype
    and device, row ``(h * W + w) * A + a`` = anchor a + stride * (w, h, w, h)."""
    dev, dt = anchors.device, anchors.dtype
    sx = torch.arange(width, device=dev, dtype=dt) * feat_stride
    sy = torch.arange(height, device=dev, dtype=dt) * feat_stride
    sy, sx = torch.meshgrid(sy, sx, indexing="ij")  # (H, W): the original's meshgrid(sx, sy)
    shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)  # (K, 1, 4)
    return (anchors[None] + shifts).reshape(-1, 4)


def layer_anchors(layer, params: dict) -> tuple[float, torch.Tensor]:
    """``(feat_stride, anchors (A, 4) float64)`` from an RPN layer's parsed ``param_str``:
    ``feat_stride`` (required), ``scales`` (default 8, 16, 32). Errors name the layer."""
    if "feat_stride" not in params:
        raise layer.error(f"param_str must give feat_stride (e.g. \"'feat_stride': 16\"), got "
                          f"{layer.param.python_param.param_str!r}")
    stride = params["feat_stride"]
    scales = params.get("scales", SCALES)
    if isinstance(scales, (int, float)):
        scales = (scales,)
    if not _positive_number(stride) or not isinstance(scales, (list, tuple)) or not scales \
            or not all(_positive_number(s) for s in scales):
        raise layer.error(f"param_str feat_stride must be a positive number and scales a list of "
                          f"them, got feat_stride {stride!r}, scales {scales!r}")
    return stride, generate_anchors(scales=scales)


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
