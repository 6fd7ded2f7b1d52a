"""Box arithmetic with the original's +1 pixel convention: the one IoU, bbox transform and clip.

Boxes are ``[x1, y1, x2, y2]`` with inclusive pixel corners, so a box's width is ``x2 - x1 + 1``
(the convention of Fast R-CNN's ``bbox_overlaps``, ``bbox_transform`` and the VOC devkit).
Every function takes torch tensors or numpy arrays and returns the same kind, computing in the
input's dtype (the roidb is float64, network blobs float32), so everyone can use this one copy.
"""

from __future__ import annotations

import numpy as np
import torch


def _to_torch(x):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)), True
    return x, False


def _back(t: torch.Tensor, was_numpy: bool):
    return t.numpy() if was_numpy else t


def box_areas(boxes):
    """(N, 4) -> (N,) areas ``(x2 - x1 + 1) * (y2 - y1 + 1)``."""
    b, np_in = _to_torch(boxes)
    areas = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return _back(areas, np_in)


def bbox_overlaps(boxes, query_boxes):
    """IoU of every box with every query box, +1 convention: (N, 4), (K, 4) -> (N, K).

    As the original Cython ``bbox_overlaps``: a pair whose intersection is empty (iw or ih <= 0)
    has IoU 0.
    """
    b, np_in = _to_torch(boxes)
    q, _ = _to_torch(query_boxes)
    q = q.to(b.dtype)
    bx1, by1, bx2, by2 = b.t().contiguous()
    qx1, qy1, qx2, qy2 = q.t().contiguous()
    # in-place chains: this sits in the OHEM NMS hot path, where allocations dominate
    iw = torch.minimum(bx2[:, None], qx2[None, :]).sub_(torch.maximum(bx1[:, None], qx1[None, :]))
    ih = torch.minimum(by2[:, None], qy2[None, :]).sub_(torch.maximum(by1[:, None], qy1[None, :]))
    inter = iw.add_(1).clamp_(min=0).mul_(ih.add_(1).clamp_(min=0))
    area_b = (bx2 - bx1 + 1) * (by2 - by1 + 1)
    area_q = (qx2 - qx1 + 1) * (qy2 - qy1 + 1)
    union = (area_b[:, None] + area_q[None, :]).sub_(inter)
    iou = torch.where(inter > 0, inter / union, torch.zeros((), dtype=inter.dtype))
    return _back(iou, np_in)


def crowd_overlaps(boxes, crowd_boxes):
    """COCO's overlap of a box with a crowd region, +1 convention: (N, 4), (K, 4) -> (N, K).

    Intersection over the box's own area (not the union): pycocotools' ``iou`` with
    ``iscrowd`` set, on boxes ``[x1, y1, x2 - x1 + 1, y2 - y1 + 1]`` as the original's COCO imdb
    hands them over; 0 where the boxes do not intersect.
    """
    b, np_in = _to_torch(boxes)
    q, _ = _to_torch(crowd_boxes)
    q = q.to(b.dtype)
    iw = torch.minimum(b[:, None, 2], q[None, :, 2]) - torch.maximum(b[:, None, 0], q[None, :, 0]) + 1
    ih = torch.minimum(b[:, None, 3], q[None, :, 3]) - torch.maximum(b[:, None, 1], q[None, :, 1]) + 1
    inter = iw.clamp(min=0) * ih.clamp(min=0)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    out = torch.where(inter > 0, inter / area_b[:, None], torch.zeros((), dtype=inter.dtype))
    return _back(out, np_in)


def to_host(x):
    """(numpy array, the torch tensor it came from or None): the paired functions compute on the
    host, where a few thousand pairs cost less than the torch launches for them."""
    if type(x) is np.ndarray:
        return x, None
    if isinstance(x, torch.Tensor):
        return x.numpy(force=True), x  # detached, copied to the host if it is not there
    return np.asarray(x), None


def like_source(a: np.ndarray, src):
    """``a`` as the kind (and device) of ``src``: a torch tensor when src is one, else as is."""
    return a if src is None else torch.from_numpy(a).to(src.device)


def paired_intersections(boxes, first, second):
    """Intersection (P,) and summed areas (P,) of the pairs ``boxes[first[i]]``,
    ``boxes[second[i]]``: boxes (K, 4), first/second (P,) int; numpy arrays or torch tensors,
    returned as the boxes' kind and device. ``bbox_overlaps``' arithmetic, pair by pair:
    iw = (min(x2) - max(x1)) + 1, clamped at 0, in the boxes' dtype.

    Computed on the host in numpy, a dozen ops over all pairs at once: for OHEM's few hundred
    candidates that is about half the time of the same ops as torch launches (and one copy of
    the candidates instead of ~15 launches on a GPU)."""
    b, src = to_host(boxes)
    i, _ = to_host(first)
    j, _ = to_host(second)
    cols = np.empty((5, b.shape[0]), dtype=b.dtype)  # x1, y1, x2, y2, area (as box_areas)
    cols[:4] = b.T
    cols[4] = (cols[2] - cols[0] + 1) * (cols[3] - cols[1] + 1)
    p, q = cols.take(i, axis=1), cols.take(j, axis=1)  # (5, P) each
    wh = np.minimum(p[2:4], q[2:4]) - np.maximum(p[:2], q[:2]) + 1
    np.maximum(wh, 0, out=wh)
    return like_source(wh[0] * wh[1], src), like_source(p[4] + q[4], src)


def paired_iou(inter: np.ndarray, area_sum: np.ndarray) -> np.ndarray:
    """IoU from ``paired_intersections``' numpy results: inter / (area_sum - inter), NaN for 0/0
    (quietly: a pair of empty boxes)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area_sum - inter)


def bbox_overlaps_paired(boxes, first, second):
    """IoU of ``boxes[first[i]]`` with ``boxes[second[i]]``: boxes (K, 4), first/second (P,) int
    -> (P,), the same arithmetic as ``bbox_overlaps`` (+1 widths, 0 where the boxes do
    not intersect) without its all-pairs matrix; numpy or torch in, the boxes' kind out."""
    b, src = to_host(boxes)
    inter, area_sum = paired_intersections(b, to_host(first)[0], to_host(second)[0])
    iou = np.where(inter > 0, paired_iou(inter, area_sum), inter.dtype.type(0))
    return like_source(iou, src)


def bbox_transform(ex_rois, gt_rois):
    """Regression targets (tx, ty, tw, th) taking ``ex_rois`` onto ``gt_rois``: (N, 4) -> (N, 4).

    w = x2 - x1 + 1, cx = x1 + 0.5 w; tx = (gcx - cx) / w, tw = log(gw / w) (and y alike).
    """
    e, np_in = _to_torch(ex_rois)
    g, _ = _to_torch(gt_rois)
    g = g.to(e.dtype)
    ew = e[:, 2] - e[:, 0] + 1.0
    eh = e[:, 3] - e[:, 1] + 1.0
    ex = e[:, 0] + 0.5 * ew
    ey = e[:, 1] + 0.5 * eh
    gw = g[:, 2] - g[:, 0] + 1.0
    gh = g[:, 3] - g[:, 1] + 1.0
    gx = g[:, 0] + 0.5 * gw
    gy = g[:, 1] + 0.5 * gh
    t = torch.stack(((gx - ex) / ew, (gy - ey) / eh, torch.log(gw / ew), torch.log(gh / eh)), dim=1)
    return _back(t, np_in)


def bbox_transform_inv(boxes, deltas):
    """Apply per-class deltas to boxes: (N, 4), (N, 4K) -> (N, 4K) predicted boxes.

    ctr' = d * w + ctr, w' = exp(dw) * w; x1 = ctr' - 0.5 w', x2 = ctr' + 0.5 w' (the original's
    test-time transform; note it has no -1 on x2, as the original). numpy arrays are computed by
    numpy (its exp, as the original's), torch tensors by torch; the boxes are cast to the deltas'
    dtype first, as the original's ``astype(deltas.dtype)``.
    """
    if isinstance(boxes, np.ndarray):
        d = np.asarray(deltas)
        if boxes.shape[0] == 0:
            return np.zeros((0, d.shape[1]), dtype=d.dtype)
        b, exp, out = boxes.astype(d.dtype, copy=False), np.exp, np.empty_like(d)
    else:
        d = deltas if isinstance(deltas, torch.Tensor) else torch.from_numpy(np.asarray(deltas))
        if boxes.shape[0] == 0:
            return torch.zeros((0, d.shape[1]), dtype=d.dtype)
        b, exp, out = boxes.to(d.dtype), torch.exp, torch.empty_like(d)
    w = b[:, 2] - b[:, 0] + 1.0
    h = b[:, 3] - b[:, 1] + 1.0
    cx = b[:, 0] + 0.5 * w
    cy = b[:, 1] + 0.5 * h
    dx, dy, dw, dh = d[:, 0::4], d[:, 1::4], d[:, 2::4], d[:, 3::4]
    pcx = dx * w[:, None] + cx[:, None]
    pcy = dy * h[:, None] + cy[:, None]
    pw = exp(dw) * w[:, None]
    ph = exp(dh) * h[:, None]
    out[:, 0::4] = pcx - 0.5 * pw
    out[:, 1::4] = pcy - 0.5 * ph
    out[:, 2::4] = pcx + 0.5 * pw
    out[:, 3::4] = pcy + 0.5 * ph
    return out


def clip_boxes(boxes, im_shape):
    """Clip (N, 4K) boxes to the image: x in [0, W - 1], y in [0, H - 1]; ``im_shape`` = (H, W).
    Returns a new array / tensor of the same kind and dtype."""
    h, w = float(im_shape[0]), float(im_shape[1])
    if isinstance(boxes, np.ndarray):
        n, k = boxes.shape[0], boxes.shape[1] // 4
        hi = np.array([w - 1, h - 1, w - 1, h - 1], dtype=boxes.dtype)
        out = np.minimum(boxes.reshape(n, k, 4), hi)  # the original's maximum(minimum(...), 0)
        return np.maximum(out, 0, out=out).reshape(boxes.shape)
    out = boxes.clone()
    out[:, 0::4] = boxes[:, 0::4].clamp(0, w - 1)
    out[:, 1::4] = boxes[:, 1::4].clamp(0, h - 1)
    out[:, 2::4] = boxes[:, 2::4].clamp(0, w - 1)
    out[:, 3::4] = boxes[:, 3::4].clamp(0, h - 1)
    return out
