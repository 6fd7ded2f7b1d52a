"""Minibatches from the roidb: plain Fast R-CNN sampling, OHEM's "all RoIs", and Faster R-CNN's
image + gt boxes (``roi_data_layer/minibatch.py``).

A minibatch is made in two steps so that background workers cannot change the random stream:
``plan_minibatch`` (main process) draws everything random, with the original's calls in the
original's order on one ``np.random.RandomState`` (``randint`` for the scales, then per image
``choice`` of fg and of bg without replacement); ``build_minibatch`` (anywhere) reads the images
and assembles the blobs from the plan, deterministically.

Blobs (torch, float32): ``data`` (N, 3, H, W); ``rois`` (R, 5) ``[batch_idx, x1 s, y1 s, x2 s, y2 s]``
unrounded; ``labels`` (R,); with ``TRAIN.BBOX_REG``: ``bbox_targets``, ``bbox_inside_weights``,
``bbox_outside_weights`` (R, 4K), the 4 values of class c in columns 4c..4c+3.

With ``TRAIN.HAS_RPN`` (Faster R-CNN end-to-end: the RoIs come from the net's own RPN) the plan
draws only the scale, and the blobs are ``data`` (1, 3, H, W), ``im_info`` (1, 3) ``[H, W,
scale]`` of the blob and ``gt_boxes`` (G, 5) ``[x1 s, y1 s, x2 s, y2 s, class]``, the image's gt
rows (``gt_classes != 0``) scaled, float32; one image per minibatch, as the original.
"""

from __future__ import annotations

import numpy as np
import torch

from readonly_ohem.roi_data.blob import get_image_blob
from readonly_ohem.errors import ConfigError


def fg_bg_candidates(entry: dict, cfg) -> tuple[np.ndarray, np.ndarray]:
    """Indices with max_overlap >= FG_THRESH, and with BG_THRESH_LO <= max_overlap < BG_THRESH_HI."""
    ov = entry["max_overlaps"]
    fg = np.where(ov >= cfg.TRAIN.FG_THRESH)[0]
    bg = np.where((ov < cfg.TRAIN.BG_THRESH_HI) & (ov >= cfg.TRAIN.BG_THRESH_LO))[0]
    return fg, bg


def sample_rois(entry: dict, fg_rois_per_image: int, rois_per_image: int, cfg,
                rng: np.random.RandomState) -> tuple[np.ndarray, int]:
    """Plain FRCN: up to ``fg_rois_per_image`` fg and the rest bg, each drawn without replacement.

    Returns (keep_inds (R,) int64 fg first, num_fg). Random calls as the original ``_sample_rois``.
    """
    fg, bg = fg_bg_candidates(entry, cfg)
    n_fg = int(min(fg_rois_per_image, fg.size))
    if fg.size > 0:
        fg = rng.choice(fg, size=n_fg, replace=False)
    n_bg = int(min(rois_per_image - n_fg, bg.size))
    if bg.size > 0:
        bg = rng.choice(bg, size=n_bg, replace=False)
    return np.append(fg, bg).astype(np.int64), n_fg


def all_rois(entry: dict, cfg) -> tuple[np.ndarray, int]:
    """OHEM: every fg RoI then every bg RoI, each group in roidb order: (keep_inds, num_fg)."""
    fg, bg = fg_bg_candidates(entry, cfg)
    return np.append(fg, bg).astype(np.int64), int(fg.size)


def rois_per_image(cfg, num_images: int) -> tuple[int, int]:
    """(rois_per_image, fg_rois_per_image) = (BATCH_SIZE / N, round(FG_FRACTION * that))."""
    if cfg.TRAIN.BATCH_SIZE % num_images:
        raise ConfigError(f"TRAIN.BATCH_SIZE ({cfg.TRAIN.BATCH_SIZE}) must be a multiple of the "
                          f"images per batch ({num_images})")
    per = cfg.TRAIN.BATCH_SIZE // num_images
    return per, int(np.round(cfg.TRAIN.FG_FRACTION * per))


def check_rpn_batch(cfg, num_images: int) -> None:
    """``TRAIN.HAS_RPN`` takes one image per minibatch (the original asserts "Single batch only")."""
    if num_images != 1:
        raise ConfigError(f"TRAIN.HAS_RPN: the RPN layers take one image per minibatch "
                          f"(TRAIN.IMS_PER_BATCH 1), got {num_images}")


def plan_minibatch(entries: list[dict], cfg, rng: np.random.RandomState, ohem: bool | None = None) -> dict:
    """All random choices of one minibatch: ``scale_inds`` (N,), ``keep`` [(R_i,)], ``num_fg`` [int]
    (with ``TRAIN.HAS_RPN`` the scales only: ``keep`` and ``num_fg`` are None)."""
    ohem = cfg.TRAIN.USE_OHEM if ohem is None else ohem
    n = len(entries)
    scale_inds = rng.randint(0, high=len(cfg.TRAIN.SCALES), size=n)
    if cfg.TRAIN.HAS_RPN:
        check_rpn_batch(cfg, n)
        return dict(scale_inds=scale_inds, keep=None, num_fg=None)
    per, fg_per = rois_per_image(cfg, n)
    keep, num_fg = [], []
    for e in entries:
        k, f = all_rois(e, cfg) if ohem else sample_rois(e, fg_per, per, cfg, rng)
        keep.append(k)
        num_fg.append(f)
    return dict(scale_inds=scale_inds, keep=keep, num_fg=num_fg)


def bbox_regression_labels(bbox_target_data: np.ndarray, num_classes: int, inside_weights) -> tuple[np.ndarray, np.ndarray]:
    """(R, 5) compact ``[c, tx, ty, tw, th]`` -> (R, 4K) targets and inside weights (class c > 0 only)."""
    r = bbox_target_data.shape[0]
    targets = np.zeros((r, 4 * num_classes), dtype=np.float32)
    inside = np.zeros_like(targets)
    cls = bbox_target_data[:, 0].astype(np.int64)
    rows = np.nonzero(cls > 0)[0]
    cols = 4 * cls[rows, None] + np.arange(4)[None, :]
    targets[rows[:, None], cols] = bbox_target_data[rows, 1:]
    inside[rows[:, None], cols] = np.asarray(inside_weights, dtype=np.float32)
    return targets, inside


def rpn_blobs(entry: dict, data: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """``im_info`` (1, 3) and ``gt_boxes`` (G, 5) of one image blob (the ``HAS_RPN`` branch of the
    original ``get_minibatch``): gt rows are those with ``gt_classes != 0``, boxes times the scale
    in float64, stored float32."""
    gt = np.nonzero(entry["gt_classes"] != 0)[0]
    gt_boxes = np.empty((gt.size, 5), dtype=np.float32)
    gt_boxes[:, :4] = entry["boxes"][gt] * scale
    gt_boxes[:, 4] = entry["gt_classes"][gt]
    im_info = np.array([[data.shape[2], data.shape[3], scale]], dtype=np.float32)
    return dict(im_info=torch.from_numpy(im_info), gt_boxes=torch.from_numpy(gt_boxes))


def build_minibatch(entries: list[dict], plan: dict, num_classes: int, cfg) -> dict[str, torch.Tensor]:
    """The blobs of a planned minibatch (see the module docstring)."""
    data, scales = get_image_blob(entries, plan["scale_inds"], cfg)
    if cfg.TRAIN.HAS_RPN:
        check_rpn_batch(cfg, len(entries))
        return dict(data=data, **rpn_blobs(entries[0], data, scales[0]))
    rois, labels, targets, inside = [], [], [], []
    for i, (e, k, nf) in enumerate(zip(entries, plan["keep"], plan["num_fg"])):
        boxes = e["boxes"][k] * scales[i]
        rois.append(np.hstack([np.full((k.size, 1), i, dtype=np.float64), boxes]))
        lab = e["max_classes"][k].astype(np.float32)
        lab[nf:] = 0
        labels.append(lab)
        if cfg.TRAIN.BBOX_REG:
            t, w = bbox_regression_labels(e["bbox_targets"][k], num_classes, cfg.TRAIN.BBOX_INSIDE_WEIGHTS)
            targets.append(t)
            inside.append(w)
    blobs = dict(data=data,
                 rois=torch.from_numpy(np.concatenate(rois).astype(np.float32).reshape(-1, 5)),
                 labels=torch.from_numpy(np.concatenate(labels).astype(np.float32)))
    if cfg.TRAIN.BBOX_REG:
        inside_w = np.concatenate(inside).reshape(-1, 4 * num_classes)
        blobs["bbox_targets"] = torch.from_numpy(np.concatenate(targets).reshape(-1, 4 * num_classes))
        blobs["bbox_inside_weights"] = torch.from_numpy(inside_w)
        blobs["bbox_outside_weights"] = torch.from_numpy((inside_w > 0).astype(np.float32))
    return blobs


def get_minibatch(entries: list[dict], num_classes: int, cfg, rng: np.random.RandomState) -> dict:
    """Plain Fast R-CNN minibatch (the original ``get_minibatch``)."""
    return build_minibatch(entries, plan_minibatch(entries, cfg, rng, ohem=False), num_classes, cfg)


def get_allrois_minibatch(entries: list[dict], num_classes: int, cfg,
                          rng: np.random.RandomState | None = None) -> dict:
    """OHEM all-RoIs minibatch (the original ``get_allrois_minibatch``); rng only draws the scale."""
    rng = rng if rng is not None else np.random.RandomState(cfg.RNG_SEED)
    return build_minibatch(entries, plan_minibatch(entries, cfg, rng, ohem=True), num_classes, cfg)
