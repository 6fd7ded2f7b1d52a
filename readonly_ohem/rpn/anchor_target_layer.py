"""AnchorTargetLayer: RPN labels and box targets (the original ``rpn/anchor_target_layer.py``).

Prototxt: ``type: "Python"``, ``python_param { module: "rpn.anchor_target_layer"
layer: "AnchorTargetLayer" param_str: "'feat_stride': 16" }``; optional ``param_str`` keys
``scales`` (anchor scales, default [8, 16, 32]) and ``allowed_border`` (pixels an anchor may
stick out of the image, default 0), as the original.

Bottoms: rpn_cls_score (1, 2A, H, W) (only H and W are read), gt_boxes (G, 5) ``[x1, y1, x2, y2,
class]``, im_info (1, 3) ``[height, width, scale]`` of the scaled image, and (unread) data.
Tops, float32 on the bottoms' device, anchor a of cell (h, w) at channel a (labels: row a*H + h):
rpn_labels (1, 1, A*H, W) in {1, 0, -1 (ignored)}, rpn_bbox_targets, rpn_bbox_inside_weights,
rpn_bbox_outside_weights (1, 4A, H, W). No gradient goes back (the original's backward is empty).

The rules (config ``TRAIN.RPN_*``), as the original:

- only anchors inside the image count (x1 >= -border, y1 >= -border, x2 < width + border,
  y2 < height + border); every other anchor gets label -1 and zero targets and weights;
- IoU (+1 widths, float64) of each inside anchor with each gt box; an anchor is negative (0)
  below ``RPN_NEGATIVE_OVERLAP``, positive (1) at or above ``RPN_POSITIVE_OVERLAP``, and positive
  when its IoU with some gt box equals that box's best IoU over the inside anchors (every tie);
  positives win over negatives unless ``RPN_CLOBBER_POSITIVES``;
- the quirk, kept: a gt box whose best IoU is 0 makes every inside anchor "best" for it, hence
  positive. ``TRAIN.RPN_GUARD_ZERO_OVERLAP_GT: True`` (ours, off by default) leaves such a box out
  of the best-anchor rule;
- at most ``int(RPN_FG_FRACTION * RPN_BATCHSIZE)`` positives, then at most ``RPN_BATCHSIZE`` minus
  the positives kept negatives: the surplus, drawn at random (``sampling.choice``, the original's
  ``npr.choice``), becomes -1 (``TRAIN.RPN_MINING``, ours: the hardest anchors by the RPN's own
  classification loss instead, ``ohem.anchor_mining``);
- targets: ``bbox_transform`` (float64, cast to float32) from every inside anchor to its best
  gt box (negatives included; their weights are 0); inside weights ``RPN_BBOX_INSIDE_WEIGHTS`` on
  positives; outside weights 1 / (labels >= 0) on positives and negatives when
  ``RPN_POSITIVE_WEIGHT < 0``, else p / #positives and (1 - p) / #negatives.

Where the original crashes we do not: no gt box (every inside anchor negative, targets 0), no
inside anchor (every label -1).
"""

from __future__ import annotations

import numpy as np
import torch

from readonly_ohem.caffe.layers.base import Layer, register_python
from readonly_ohem.caffe.layers.python import parse_param_str
from readonly_ohem.config import default_config
from readonly_ohem.errors import ConfigError
from readonly_ohem.ohem.anchor_mining import anchor_sampler
from readonly_ohem.ops.boxes import bbox_overlaps, bbox_transform
from readonly_ohem.rpn.anchors import layer_anchors, shifted_anchors
from readonly_ohem.rpn.checks import check_gt_boxes, check_im_info, check_unknown_keys
from readonly_ohem.rpn.sampling import choice, layer_rng, rng_state, set_rng_state


def anchor_labels(max_overlaps: torch.Tensor, is_best: torch.Tensor, train_cfg) -> torch.Tensor:
    """(N,) float32 labels 1 / 0 / -1 of inside anchors from their best IoU (N,) and the
    best-anchor rule (N,) bool, before subsampling."""
    labels = torch.full(max_overlaps.shape, -1.0, dtype=torch.float32, device=max_overlaps.device)
    negative = max_overlaps < train_cfg.RPN_NEGATIVE_OVERLAP
    if not train_cfg.RPN_CLOBBER_POSITIVES:
        labels[negative] = 0  # negatives first, so that positives can clobber them
    labels[is_best] = 1
    labels[max_overlaps >= train_cfg.RPN_POSITIVE_OVERLAP] = 1
    if train_cfg.RPN_CLOBBER_POSITIVES:
        labels[negative] = 0
    return labels


def subsample_labels(labels: torch.Tensor, train_cfg, rng: np.random.RandomState) -> torch.Tensor:
    """Disable (-1) random surplus positives, then surplus negatives, in place; returns labels."""
    num_fg = int(train_cfg.RPN_FG_FRACTION * train_cfg.RPN_BATCHSIZE)
    fg = torch.nonzero(labels == 1).squeeze(1)
    if fg.numel() > num_fg:
        labels[choice(fg, fg.numel() - num_fg, rng)] = -1
    num_bg = train_cfg.RPN_BATCHSIZE - int((labels == 1).sum())
    bg = torch.nonzero(labels == 0).squeeze(1)
    if bg.numel() > num_bg:
        labels[choice(bg, bg.numel() - num_bg, rng)] = -1
    return labels


def outside_weights(labels: torch.Tensor, train_cfg) -> torch.Tensor:
    """(N, 4) float32: the per-example weights of positives and negatives (float64 math, as
    the original's ``np.ones((1, 4)) * 1.0 / n``, stored in float32)."""
    out = torch.zeros((labels.shape[0], 4), dtype=torch.float32, device=labels.device)
    pos, neg = labels == 1, labels == 0
    p = train_cfg.RPN_POSITIVE_WEIGHT
    if p < 0:
        n = int((labels >= 0).sum())
        w_pos = w_neg = 1.0 / n if n else 0.0
    else:
        if not 0 < p < 1:
            raise ConfigError(f"TRAIN.RPN_POSITIVE_WEIGHT must be < 0 (uniform weighting) or in "
                              f"(0, 1), got {p!r}")
        n_pos, n_neg = int(pos.sum()), int(neg.sum())
        w_pos = p / n_pos if n_pos else 0.0
        w_neg = (1.0 - p) / n_neg if n_neg else 0.0
    out[pos] = w_pos
    out[neg] = w_neg
    return out


def anchor_targets(anchors: torch.Tensor, height: int, width: int, feat_stride: float,
                   gt_boxes: torch.Tensor, im_info: torch.Tensor, train_cfg,
                   rng: np.random.RandomState, allowed_border: float = 0,
                   subsample=None) -> list[torch.Tensor]:
    """The four tops for one image (see the module docstring): anchors (A, 4) float64, gt_boxes
    (G, 5), im_info (>= 1, 3); everything on gt_boxes' device. ``train_cfg``: ``cfg.TRAIN``.
    ``subsample(labels (N,), inside (N,) long) -> labels``: in place of the random draw (None)."""
    dev = gt_boxes.device
    A = anchors.shape[0]
    all_anchors = shifted_anchors(anchors.to(dev), height, width, feat_stride)  # (K*A, 4) float64
    total = all_anchors.shape[0]
    im_h, im_w = (float(v) for v in im_info[0, :2].double())
    b = allowed_border
    x1, y1, x2, y2 = all_anchors.unbind(1)
    inside = torch.nonzero((x1 >= -b) & (y1 >= -b) & (x2 < im_w + b) & (y2 < im_h + b)).squeeze(1)
    ex = all_anchors[inside]
    n = ex.shape[0]
    gt = gt_boxes.double()

    if n and gt.shape[0]:
        overlaps = bbox_overlaps(ex, gt[:, :4])  # (N, G) float64, the original's Cython arithmetic
        argmax = overlaps.argmax(1)  # first best gt, as numpy
        max_overlaps = overlaps.gather(1, argmax[:, None]).squeeze(1)
        gt_max = overlaps.max(0).values  # (G,)
        hits = overlaps == gt_max[None, :]
        if train_cfg.RPN_GUARD_ZERO_OVERLAP_GT:
            hits &= (gt_max > 0)[None, :]
        is_best = hits.any(1)
        targets = bbox_transform(ex, gt[argmax, :4]).to(torch.float32)
    else:
        max_overlaps = torch.zeros(n, dtype=torch.float64, device=dev)
        is_best = torch.zeros(n, dtype=torch.bool, device=dev)
        targets = torch.zeros((n, 4), dtype=torch.float32, device=dev)

    labels = anchor_labels(max_overlaps, is_best, train_cfg)
    labels = subsample_labels(labels, train_cfg, rng) if subsample is None else subsample(labels, inside)
    inside_w = torch.zeros((n, 4), dtype=torch.float32, device=dev)
    inside_w[labels == 1] = torch.tensor(train_cfg.RPN_BBOX_INSIDE_WEIGHTS, dtype=torch.float32,
                                         device=dev)
    outside_w = outside_weights(labels, train_cfg)

    def unmap(data: torch.Tensor, fill: float) -> torch.Tensor:
        out = torch.full((total,) + tuple(data.shape[1:]), fill, dtype=torch.float32, device=dev)
        out[inside] = data
        return out

    labels = unmap(labels, -1.0).reshape(1, height, width, A).permute(0, 3, 1, 2)
    tops = [labels.reshape(1, 1, A * height, width).contiguous()]
    for data in (targets, inside_w, outside_w):
        data = unmap(data, 0.0).reshape(1, height, width, 4 * A)
        tops.append(data.permute(0, 3, 1, 2).contiguous())
    return tops


@register_python("rpn.anchor_target_layer", "AnchorTargetLayer")
class AnchorTargetLayer(Layer):
    backprop_to_bottoms = False
    min_bottoms, max_bottoms = 3, 4
    min_tops = max_tops = 4

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        self.cfg = ctx.cfg if ctx.cfg is not None else default_config()
        params = parse_param_str(param)
        check_unknown_keys(self, params, ("feat_stride", "scales", "allowed_border"))
        self.feat_stride, anchors = layer_anchors(self, params)
        self.register_buffer("anchors", anchors, persistent=False)
        border = params.get("allowed_border", 0)
        if not isinstance(border, (int, float)) or isinstance(border, bool):
            raise self.error(f"param_str allowed_border must be a number, got {border!r}")
        self.allowed_border = border
        self.rng = layer_rng(self.cfg.RNG_SEED, self.name)

    @property
    def num_anchors(self) -> int:
        return int(self.anchors.shape[0])

    def top_shapes(self, bottom_shapes):
        h, w = bottom_shapes[0][-2:]
        a = self.num_anchors
        return [(1, 1, a * h, w)] + [(1, 4 * a, h, w)] * 3

    def forward(self, bottoms, params):
        score, gt_boxes, im_info = (b.detach() for b in bottoms[:3])
        if score.dim() != 4 or score.shape[0] != 1:
            raise self.error(f"bottom {self.param.bottom[0]!r} must be (1, 2A, H, W): one image "
                             f"per batch, as the original; got {tuple(score.shape)}")
        check_gt_boxes(self, gt_boxes, 1)
        check_im_info(self, im_info, 2)
        height, width = (int(d) for d in score.shape[-2:])
        with torch.no_grad():
            return anchor_targets(self.anchors, height, width, self.feat_stride,
                                  gt_boxes.to(score.device), im_info, self.cfg.TRAIN, self.rng,
                                  self.allowed_border, anchor_sampler(self.cfg.TRAIN, score))

    def random_state(self) -> dict:
        """The sampling generator's state (JSON-friendly), for training snapshots."""
        return rng_state(self.rng)

    def load_random_state(self, state: dict) -> None:
        set_rng_state(self.rng, state)
