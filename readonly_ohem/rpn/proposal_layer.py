"""ProposalLayer: the RPN's object proposals (the original ``rpn/proposal_layer.py``).

Prototxt: ``type: "Python"``, ``python_param { module: "rpn.proposal_layer" layer: "ProposalLayer"
param_str: "'feat_stride': 16" }``; optional ``scales`` (default [8, 16, 32]).

Bottoms: rpn_cls_prob_reshape (1, 2A, H, W) (channels A.. are the foreground probabilities),
rpn_bbox_pred (1, 4A, H, W), im_info (1, 3) ``[height, width, scale]``.
Tops, float32 on the bottoms' device: rois (R, 5) ``[0, x1, y1, x2, y2]``, best first, and
optionally scores (R, 1). No gradient goes back (the original's backward is empty: approximate
joint training).

The original's order, with the keys of the net's phase (``TRAIN.*`` or ``TEST.*``):
decode the deltas on the shifted anchors (``bbox_transform_inv``, float32) -> clip to the image
-> drop boxes with a side below ``RPN_MIN_SIZE * im_info[2]`` -> sort by score, keep the first
``RPN_PRE_NMS_TOP_N`` (<= 0: all) -> NMS at ``RPN_NMS_THRESH`` (``ops.nms``: IoU > thresh, the
GPU kernel's float32 arithmetic) -> keep the first ``RPN_POST_NMS_TOP_N`` (<= 0: all).
Sorting as the original: once here and once more inside NMS (``argsort()[::-1]`` each time),
deterministic with ``ops.nms.descending_order`` (ties: higher index first in each sort, so
equal scores end up visited in ascending index order). NMS stops as soon as
``RPN_POST_NMS_TOP_N`` boxes are kept: the rest could not be output.

On the CPU every step runs in numpy, as the original's (its float32 exp too); on a GPU in torch.
The CPU steps are many operations on arrays of ~20,000 boxes, where numpy's calls cost a fraction
of torch's (``scripts/bench_rpn.py`` times them against the original).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from readonly_ohem.caffe.layers.base import Layer, register_python
from readonly_ohem.caffe.layers.python import parse_param_str
from readonly_ohem.config import default_config
from readonly_ohem.ops.boxes import bbox_transform_inv, clip_boxes
from readonly_ohem.ops.nms import descending_order, greedy_nms
from readonly_ohem.rpn.anchors import layer_anchors, shifted_anchors
from readonly_ohem.rpn.checks import check_im_info, check_unknown_keys


def filter_small(boxes, min_size: float):
    """Indices of (N, 4) boxes (numpy or torch) whose sides ``x2 - x1 + 1`` are both >=
    ``min_size``, compared in the boxes' dtype (numpy casts the scalar to the float32 array's
    dtype)."""
    ws = boxes[:, 2] - boxes[:, 0] + 1
    hs = boxes[:, 3] - boxes[:, 1] + 1
    if isinstance(boxes, np.ndarray):
        thr = boxes.dtype.type(min_size)
        return np.flatnonzero((ws >= thr) & (hs >= thr))
    thr = torch.tensor(min_size, dtype=boxes.dtype, device=boxes.device)
    return torch.nonzero((ws >= thr) & (hs >= thr)).squeeze(1)


def resorted_order(sorted_scores):
    """``descending_order`` of scores already in descending order, as the NMS's own
    ``argsort()[::-1]`` sees them: each run of equal scores reversed, in O(n) (no second sort).
    numpy or torch (N,) in, the same kind of int64 indices out."""
    if isinstance(sorted_scores, np.ndarray):
        n = sorted_scores.size
        if n == 0 or np.isnan(sorted_scores).any():
            return descending_order(sorted_scores)
        starts = np.ones(n, bool)
        np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=starts[1:])
        first = np.flatnonzero(starts)
        if first.size == n:  # no ties
            return np.arange(n)
        run = np.cumsum(starts) - 1
        last = np.append(first[1:], n) - 1
        return first[run] + last[run] - np.arange(n)
    n = sorted_scores.numel()
    if n == 0 or bool(torch.isnan(sorted_scores).any()):
        return descending_order(sorted_scores)
    pos = torch.arange(n, device=sorted_scores.device)
    starts = torch.ones(n, dtype=torch.bool, device=pos.device)
    starts[1:] = sorted_scores[1:] != sorted_scores[:-1]
    run = torch.cumsum(starts, 0) - 1
    first = pos[starts]
    last = torch.cat((first[1:], pos.new_tensor([n]))) - 1
    return first[run] + last[run] - pos


def proposals(scores: torch.Tensor, bbox_deltas: torch.Tensor, im_info: torch.Tensor,
              anchors: torch.Tensor, feat_stride: float, pre_nms_top_n: int,
              post_nms_top_n: int, nms_thresh: float, min_size: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rois (R, 5), scores (R, 1)) float32 for one image: scores (1, A, H, W) foreground
    probabilities, bbox_deltas (1, 4A, H, W), im_info (>= 1, 3), anchors (A, 4) float64; on
    the device of ``scores`` (numpy steps on the CPU, torch steps on a GPU).

    The boxes are sorted first and decoded in score order only as far as the first
    ``pre_nms_top_n`` that pass the size filter: the filter keeps the order, so this is the
    original's filter-then-sort, without decoding the boxes it would drop after sorting.
    """
    dev = scores.device
    height, width = scores.shape[-2:]
    if dev.type == "cpu":
        s = scores.detach().numpy().transpose(0, 2, 3, 1).reshape(-1)  # rows (h, w, a), as
        d = bbox_deltas.detach().numpy().transpose(0, 2, 3, 1).reshape(-1, 4)  # the anchors
        info = im_info.detach().cpu().numpy()[0].astype(np.float64)
        all_anchors = _cpu_anchors(anchors.cpu().numpy().tobytes(), height, width,
                                   float(feat_stride), d.dtype.str)
    else:
        s = scores.permute(0, 2, 3, 1).reshape(-1)
        d = bbox_deltas.permute(0, 2, 3, 1).reshape(-1, 4)
        info = im_info[0].double().cpu().numpy()
        all_anchors = shifted_anchors(anchors.to(dev), height, width, feat_stride)
    n = s.shape[0]
    order = descending_order(s)  # ties: higher index first
    need = pre_nms_top_n if 0 < pre_nms_top_n < n else n
    m = min(n, need + need // 8 + 256)
    while True:  # decode -> clip -> size filter, in score order, until `need` boxes pass
        first = order[:m]
        boxes = bbox_transform_inv(_rows(all_anchors, first), _rows(d, first))  # anchors cast
        boxes = clip_boxes(boxes, info[:2])  # to the deltas' dtype
        ok = filter_small(boxes, min_size * info[2])  # a float64 product, as the numpy of 2015
        if ok.shape[0] >= need or m == n:
            break
        m = min(n, 2 * m)
    ok = ok[:need]
    boxes, s = _rows(boxes, ok), s[first[ok]]

    visit = resorted_order(s)
    max_keep = post_nms_top_n if post_nms_top_n > 0 else None
    if dev.type == "cpu":
        boxes, s, visit = (torch.from_numpy(x) for x in (boxes, s, visit))
    keep, _ = greedy_nms(boxes, nms_thresh, order=visit, max_keep=max_keep)
    if max_keep is not None:
        keep = keep[:max_keep]
    rois = torch.zeros((keep.shape[0], 5), dtype=torch.float32, device=dev)
    rois[:, 1:] = boxes[keep]
    return rois, s[keep].to(torch.float32)[:, None]


def _rows(x, idx):
    """Rows ``idx`` of a numpy array or a tensor (numpy's take: its fancy indexing of rows is
    several times slower)."""
    return np.take(x, idx, axis=0) if isinstance(x, np.ndarray) else x.index_select(0, idx)


@lru_cache(maxsize=8)
def _cpu_anchors(anchors: bytes, height: int, width: int, feat_stride: float,
                 dtype: str) -> np.ndarray:
    """The shifted anchors of an H x W map as numpy in the deltas' ``dtype`` (cached: maps of a
    size repeat from image to image)."""
    base = torch.from_numpy(np.frombuffer(anchors, np.float64).reshape(-1, 4).copy())
    out = shifted_anchors(base, height, width, feat_stride).numpy().astype(np.dtype(dtype))
    out.flags.writeable = False
    return out


@register_python("rpn.proposal_layer", "ProposalLayer")
class ProposalLayer(Layer):
    backprop_to_bottoms = False
    min_bottoms = max_bottoms = 3
    min_tops, max_tops = 1, 2

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        self.cfg = ctx.cfg if ctx.cfg is not None else default_config()
        params = parse_param_str(param)
        check_unknown_keys(self, params, ("feat_stride", "scales"))
        self.feat_stride, anchors = layer_anchors(self, params)
        self.register_buffer("anchors", anchors, persistent=False)

    @property
    def num_anchors(self) -> int:
        return int(self.anchors.shape[0])

    def top_shapes(self, bottom_shapes):
        """The original's shapes at setup (the real R is known after a forward)."""
        return [(1, 5), (1, 1, 1, 1)][: len(self.param.top)]

    def forward(self, bottoms, params):
        prob, deltas, im_info = (b.detach() for b in bottoms)
        a = self.num_anchors
        if prob.dim() != 4 or prob.shape[0] != 1 or prob.shape[1] != 2 * a:
            raise self.error(f"bottom {self.param.bottom[0]!r} must be (1, {2 * a}, H, W) (bg "
                             f"then fg probabilities of {a} anchors, one image), got "
                             f"{tuple(prob.shape)}")
        want = (1, 4 * a) + tuple(prob.shape[-2:])
        if tuple(deltas.shape) != want:
            raise self.error(f"bottom {self.param.bottom[1]!r} must be {want}, got "
                             f"{tuple(deltas.shape)}")
        check_im_info(self, im_info, 2)
        c = self.cfg[self.ctx.phase]  # TRAIN or TEST keys, by the net's phase
        with torch.no_grad():
            rois, scores = proposals(prob[:, a:], deltas.to(prob.device), im_info, self.anchors,
                                     self.feat_stride, c.RPN_PRE_NMS_TOP_N, c.RPN_POST_NMS_TOP_N,
                                     c.RPN_NMS_THRESH, c.RPN_MIN_SIZE)
        return [rois, scores][: len(self.param.top)]
