"""ProposalTargetLayer: RoIs and their targets (the original ``rpn/proposal_target_layer.py``).

Prototxt: ``type: "Python"``, ``python_param { module: "rpn.proposal_target_layer"
layer: "ProposalTargetLayer" param_str: "'num_classes': 21" }``.

Bottoms: rpn_rois (R, 5) ``[0, x1, y1, x2, y2]`` (the proposal layer's), gt_boxes (G, 5)
``[x1, y1, x2, y2, class]``. Tops, float32 on the bottoms' device: rois (B, 5), labels (B,),
bbox_targets, bbox_inside_weights, bbox_outside_weights (B, 4 * num_classes), the 4 values of
class c in columns 4c..4c+3. No gradient goes back.

The original's rules (config ``TRAIN.*``):

- the gt boxes are appended to the proposals as RoIs ``[0, x1, y1, x2, y2]`` (one image only:
  a RoI of another batch index is an error);
- IoU (+1 widths, float64) with the gt boxes; each RoI takes its first best gt box;
  foreground: IoU >= ``FG_THRESH``; background: ``BG_THRESH_LO`` <= IoU < ``BG_THRESH_HI``;
- ``BATCH_SIZE`` RoIs per image (``-1``: every candidate, py-R-FCN's convention, which OHEM
  end-to-end uses so the readonly head scores them all), at most ``round(FG_FRACTION *
  BATCH_SIZE)`` foreground, the rest background; each group is drawn without replacement by
  ``sampling.choice`` (the original's ``npr.choice``: the group comes out permuted even when all
  of it is taken), foreground rows first; background labels are 0;
- targets ``bbox_transform`` (float32) from each RoI to its gt box, minus
  ``BBOX_NORMALIZE_MEANS`` and over ``BBOX_NORMALIZE_STDS`` (float64) when
  ``BBOX_NORMALIZE_TARGETS_PRECOMPUTED``; written in the columns of the RoI's class for
  foreground RoIs only, with inside weights ``BBOX_INSIDE_WEIGHTS``; outside weights are
  ``inside > 0``.

Where the original crashes we do not: no gt box (every RoI is a background candidate, IoU 0).
"""

from __future__ import annotations

import numpy as np
import torch

from readonly_ohem.caffe.layers.base import Layer, register_python
from readonly_ohem.caffe.layers.python import parse_param_str
from readonly_ohem.config import default_config
from readonly_ohem.errors import ConfigError, DataError
from readonly_ohem.ops.boxes import bbox_overlaps, bbox_transform
from readonly_ohem.rpn.checks import check_gt_boxes, check_unknown_keys
from readonly_ohem.rpn.sampling import choice, layer_rng, rng_state, set_rng_state


def rois_per_image(train_cfg) -> tuple[float, float]:
    """(rois_per_image, fg_rois_per_image) for one image: (BATCH_SIZE, round(FG_FRACTION * it)),
    both infinite for ``BATCH_SIZE: -1``."""
    batch = train_cfg.BATCH_SIZE
    if batch == -1:
        return float("inf"), float("inf")
    if batch < 1:
        raise ConfigError(f"TRAIN.BATCH_SIZE must be positive, or -1 for every RoI, got {batch!r}")
    if not 0 <= train_cfg.FG_FRACTION <= 1:
        raise ConfigError(f"TRAIN.FG_FRACTION must be in [0, 1], got {train_cfg.FG_FRACTION!r}")
    return float(batch), float(np.round(train_cfg.FG_FRACTION * batch))


def class_targets(targets: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  inside_weights) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 4) targets and (B,) labels -> (B, 4C) targets and inside weights: class c's columns
    4c..4c+3 of the RoIs with label c > 0, zeros elsewhere (``_get_bbox_regression_labels``)."""
    b = targets.shape[0]
    dev = targets.device
    out = torch.zeros((b, 4 * num_classes), dtype=torch.float32, device=dev)
    weights = torch.zeros_like(out)
    rows = torch.nonzero(labels > 0).squeeze(1)
    cols = 4 * labels[rows].long()[:, None] + torch.arange(4, device=dev)
    out[rows[:, None], cols] = targets[rows]
    weights[rows[:, None], cols] = torch.tensor(inside_weights, dtype=torch.float32, device=dev)
    return out, weights


def sample_rois(all_rois: torch.Tensor, gt_boxes: torch.Tensor, num_classes: int, train_cfg,
                rng: np.random.RandomState) -> list[torch.Tensor]:
    """The five tops (rois, labels, bbox_targets, bbox_inside_weights, bbox_outside_weights)
    from proposals (R, 5) and gt boxes (G, 5), float32, on the proposals' device."""
    dev = all_rois.device
    gt = gt_boxes.to(device=dev, dtype=torch.float32)
    rois = torch.cat((all_rois.to(torch.float32),
                      torch.cat((torch.zeros((gt.shape[0], 1), dtype=torch.float32, device=dev),
                                 gt[:, :4]), dim=1)))
    per_image, fg_per_image = rois_per_image(train_cfg)

    if gt.shape[0]:
        overlaps = bbox_overlaps(rois[:, 1:5].double(), gt[:, :4].double())  # (R + G, G)
        gt_assignment = overlaps.argmax(1)  # first best gt, as numpy
        max_overlaps = overlaps.gather(1, gt_assignment[:, None]).squeeze(1)
        labels = gt[gt_assignment, 4]
    else:
        gt_assignment = torch.zeros(rois.shape[0], dtype=torch.long, device=dev)
        max_overlaps = torch.zeros(rois.shape[0], dtype=torch.float64, device=dev)
        labels = torch.zeros(rois.shape[0], dtype=torch.float32, device=dev)

    fg = torch.nonzero(max_overlaps >= train_cfg.FG_THRESH).squeeze(1)
    n_fg = int(min(fg_per_image, fg.numel()))
    if fg.numel():
        fg = choice(fg, n_fg, rng)
    bg = torch.nonzero((max_overlaps < train_cfg.BG_THRESH_HI)
                       & (max_overlaps >= train_cfg.BG_THRESH_LO)).squeeze(1)
    n_bg = int(min(per_image - n_fg, bg.numel()))
    if bg.numel():
        bg = choice(bg, n_bg, rng)

    keep = torch.cat((fg, bg))
    labels = labels[keep].clone()
    labels[n_fg:] = 0
    rois = rois[keep]
    targets = bbox_transform(rois[:, 1:5], gt[gt_assignment[keep], :4]) if gt.shape[0] else \
        torch.zeros((keep.numel(), 4), dtype=torch.float32, device=dev)
    if train_cfg.BBOX_NORMALIZE_TARGETS_PRECOMPUTED:
        means = torch.tensor(train_cfg.BBOX_NORMALIZE_MEANS, dtype=torch.float64, device=dev)
        stds = torch.tensor(train_cfg.BBOX_NORMALIZE_STDS, dtype=torch.float64, device=dev)
        targets = ((targets.double() - means) / stds).to(torch.float32)
    bbox_targets, inside = class_targets(targets, labels, num_classes,
                                         train_cfg.BBOX_INSIDE_WEIGHTS)
    return [rois, labels, bbox_targets, inside, (inside > 0).to(torch.float32)]


@register_python("rpn.proposal_target_layer", "ProposalTargetLayer")
class ProposalTargetLayer(Layer):
    backprop_to_bottoms = False
    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 5

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        self.cfg = ctx.cfg if ctx.cfg is not None else default_config()
        params = parse_param_str(param)
        check_unknown_keys(self, params, ("num_classes",))
        n = params.get("num_classes")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise self.error(f"param_str must give num_classes, a positive integer (e.g. "
                             f"\"'num_classes': 21\"), got {param.python_param.param_str!r}")
        self.num_classes = n
        self.rng = layer_rng(self.cfg.RNG_SEED, self.name)

    def top_shapes(self, bottom_shapes):
        """The original's shapes at setup (the real B is known after a forward)."""
        c4 = 4 * self.num_classes
        return [(1, 5), (1, 1), (1, c4), (1, c4), (1, c4)]

    def forward(self, bottoms, params):
        rois, gt_boxes = (b.detach() for b in bottoms)
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise self.error(f"bottom {self.param.bottom[0]!r} must be RoIs (R, 5) "
                             f"[0, x1, y1, x2, y2], got {tuple(rois.shape)}")
        check_gt_boxes(self, gt_boxes, 1)
        if rois.shape[0] and bool((rois[:, 0] != 0).any()):
            raise DataError(f"layer {self.name!r} (ProposalTargetLayer): bottom "
                            f"{self.param.bottom[0]!r} holds RoIs of a batch index other than 0; "
                            "only single-image batches are supported, as the original")
        cls = gt_boxes[:, 4]
        bad = cls[~((cls >= 0) & (cls < self.num_classes) & (cls == cls.trunc()))]
        if bad.numel():
            raise DataError(f"layer {self.name!r} (ProposalTargetLayer): bottom "
                            f"{self.param.bottom[1]!r} has class label {float(bad[0]):g}; "
                            f"num_classes {self.num_classes} allows the integers "
                            f"0..{self.num_classes - 1}")
        with torch.no_grad():
            return sample_rois(rois, gt_boxes, self.num_classes, self.cfg.TRAIN, self.rng)

    def random_state(self) -> dict:
        """The sampling generator's state (JSON-friendly), for training snapshots."""
        return rng_state(self.rng)

    def load_random_state(self, state: dict) -> None:
        set_rng_state(self.rng, state)
