"""The training roidb as the original builds it (``imdb.append_flipped_images``,
``roi_data_layer.roidb``, ``fast_rcnn.train.filter_roidb``) from an imdb's roidb (``datasets/imdb.py``).

Order of ``training_roidb`` (= ``train_net.py``): per imdb part, gt + proposals, flipped copies
appended, ``prepare_roidb`` (max_overlaps / max_classes); parts concatenated; ``filter_roidb``;
``add_bbox_regression_targets`` (targets normalized, means/stds returned flattened (84,)).

Entry fields: ``boxes`` (N, 4) float64 0-based, ``gt_classes`` (N,) int32, ``gt_overlaps`` (N, K)
csr float32 (one non-zero per row at most), ``flipped``, ``image``, ``image_id``, ``width``,
``height``, then ``max_overlaps`` (N,) float32, ``max_classes`` (N,) int64, ``bbox_targets``
(N, 5) float32 ``[class, tx, ty, tw, th]``.
"""

from __future__ import annotations

import warnings

import numpy as np

from readonly_ohem.datasets.imdb import build_imdb_roidb
from readonly_ohem.errors import ConfigError, DataError
from readonly_ohem.ops.boxes import bbox_overlaps, bbox_transform


def flipped_entry(entry: dict) -> dict:
    """A horizontally flipped copy: x1' = W - x2 - 1, x2' = W - x1 - 1 (overlaps shared)."""
    boxes = entry["boxes"].copy()
    w = entry["width"]
    boxes[:, 0] = w - entry["boxes"][:, 2] - 1
    boxes[:, 2] = w - entry["boxes"][:, 0] - 1
    if not (boxes[:, 2] >= boxes[:, 0]).all():
        raise DataError(f"{entry['image']}: a box has x2 < x1 (cannot flip)")
    out = dict(entry)
    out.update(boxes=boxes, flipped=True)
    return out


def prepare_roidb(roidb: list[dict]) -> list[dict]:
    """Add ``max_overlaps`` (N,) float32 and ``max_classes`` (N,) int64 (row max/argmax), in place."""
    for e in roidb:
        dense = e["gt_overlaps"].toarray()
        e["max_overlaps"] = dense.max(axis=1) if dense.shape[0] else np.zeros(0, np.float32)
        e["max_classes"] = dense.argmax(axis=1) if dense.shape[0] else np.zeros(0, np.int64)
    return roidb


def get_training_roidb(imdb, cfg) -> list[dict]:
    """Per part: roidb, flipped copies appended (``TRAIN.USE_FLIPPED``), prepared; parts concatenated.

    ``TRAIN.PROPOSAL_METHOD: gt`` (the original's ``imdb.set_proposal_method('gt')``, Faster R-CNN
    end-to-end): each part's gt rows only (``build_imdb_roidb(part, proposals=False)``).
    """
    out = []
    for p in imdb.parts:
        r = build_imdb_roidb(p, proposals=False) if cfg.TRAIN.PROPOSAL_METHOD == "gt" else list(p.roidb)
        if cfg.TRAIN.USE_FLIPPED:
            r = r + [flipped_entry(e) for e in r]
        out.extend(prepare_roidb([dict(e) for e in r]))
    return out


def is_valid(entry: dict, cfg) -> bool:
    """An image is usable if it has a fg RoI or a bg RoI in [BG_THRESH_LO, BG_THRESH_HI)."""
    ov = entry["max_overlaps"]
    fg = ov >= cfg.TRAIN.FG_THRESH
    bg = (ov < cfg.TRAIN.BG_THRESH_HI) & (ov >= cfg.TRAIN.BG_THRESH_LO)
    return bool(fg.any() or bg.any())


def filter_roidb(roidb: list[dict], cfg, verbose: bool = True) -> list[dict]:
    """Drop images with neither fg nor bg RoIs (``fast_rcnn.train.filter_roidb``)."""
    out = [e for e in roidb if is_valid(e, cfg)]
    if verbose:
        print(f"Filtered {len(roidb) - len(out)} roidb entries: {len(roidb)} -> {len(out)}")
    return out


def compute_targets(rois: np.ndarray, overlaps: np.ndarray, labels: np.ndarray, bbox_thresh: float):
    """(N, 5) float32 ``[class, tx, ty, tw, th]`` for rows with overlap >= bbox_thresh, to the
    highest-IoU gt row (gt rows = overlap == 1; first on ties); zeros without gt."""
    targets = np.zeros((rois.shape[0], 5), dtype=np.float32)
    gt_inds = np.where(overlaps == 1)[0]
    if len(gt_inds) == 0:
        return targets
    ex_inds = np.where(overlaps >= bbox_thresh)[0]
    ex_gt = bbox_overlaps(rois[ex_inds].astype(np.float64), rois[gt_inds].astype(np.float64))
    gt_rois = rois[gt_inds[ex_gt.argmax(axis=1)]]
    targets[ex_inds, 0] = labels[ex_inds]
    targets[ex_inds, 1:] = bbox_transform(rois[ex_inds].astype(np.float64), gt_rois.astype(np.float64))
    return targets


def add_bbox_regression_targets(roidb: list[dict], cfg, num_classes: int | None = None,
                                verbose: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Add normalized ``bbox_targets`` to every entry (in place) and return (means, stds), each
    flattened to (num_classes * 4,) float64 — the layout that un-normalizes bbox_pred.

    Means/stds: per class over every target row of the whole (flipped) roidb, counts + EPS
    (background and unseen classes: 0 and 0); or the precomputed ones
    (``TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED``). Where the original would divide by a zero
    std (a class whose targets are all equal) we divide by 1 instead, with a warning.
    """
    if not roidb:
        raise DataError("the training roidb is empty (no usable images)")
    t = cfg.TRAIN
    if num_classes is None:
        num_classes = roidb[0]["gt_overlaps"].shape[1]
    for e in roidb:
        e["bbox_targets"] = compute_targets(e["boxes"], e["max_overlaps"], e["max_classes"], t.BBOX_THRESH)

    if t.BBOX_NORMALIZE_TARGETS_PRECOMPUTED:
        means = np.tile(np.array(t.BBOX_NORMALIZE_MEANS, dtype=np.float64), (num_classes, 1))
        stds = np.tile(np.array(t.BBOX_NORMALIZE_STDS, dtype=np.float64), (num_classes, 1))
    else:
        counts = np.zeros((num_classes, 1)) + cfg.EPS
        sums = np.zeros((num_classes, 4))
        sq = np.zeros((num_classes, 4))
        for e in roidb:
            tg = e["bbox_targets"]
            for c in np.unique(tg[:, 0]).astype(np.int64):
                if c < 1:
                    continue
                rows = tg[tg[:, 0] == c, 1:]  # float32 sums, as the original
                counts[c] += rows.shape[0]
                sums[c] += rows.sum(axis=0)
                sq[c] += (rows ** 2).sum(axis=0)
        means = sums / counts
        with np.errstate(invalid="ignore"):
            stds = np.sqrt(sq / counts - means ** 2)
    if verbose:
        print("bbox target means:\n", means[1:].mean(axis=0), "\nbbox target stdevs:\n", stds[1:].mean(axis=0))

    if t.BBOX_NORMALIZE_TARGETS:
        div = stds.copy()
        bad = np.zeros(num_classes, bool)
        if not t.BBOX_NORMALIZE_TARGETS_PRECOMPUTED:
            bad = (counts[:, 0] >= 1) & ~(np.isfinite(div) & (div > 0)).all(axis=1)
            bad[0] = False
        if bad.any():
            warnings.warn(f"bbox targets of class(es) {np.nonzero(bad)[0].tolist()} have zero spread; "
                          f"not dividing them by their std", stacklevel=2)
            div[bad] = 1.0
        for e in roidb:
            tg = e["bbox_targets"]
            c = tg[:, 0].astype(np.int64)
            rows = c > 0
            # two float32 roundings, as the original's in-place ``-=`` then ``/=`` on float32
            centred = (tg[rows, 1:] - means[c[rows]]).astype(np.float32)
            tg[rows, 1:] = (centred / div[c[rows]]).astype(np.float32)
    return means.ravel(), stds.ravel()


def check_rpn_normalization(cfg) -> None:
    """``TRAIN.HAS_RPN`` regresses targets normalized by the precomputed means/stds (the
    ProposalTargetLayer's), so normalizing needs ``BBOX_NORMALIZE_TARGETS_PRECOMPUTED``, as the
    original asserts (there are no dataset statistics of RoIs made while training)."""
    t = cfg.TRAIN
    if t.HAS_RPN and t.BBOX_REG and t.BBOX_NORMALIZE_TARGETS and not t.BBOX_NORMALIZE_TARGETS_PRECOMPUTED:
        raise ConfigError("TRAIN.HAS_RPN with TRAIN.BBOX_NORMALIZE_TARGETS needs "
                          "TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED True (the RoIs are made while "
                          "training; prototxt/cfgs/faster_rcnn_end2end.yml sets it)")


def training_roidb(imdb, cfg, verbose: bool = True) -> tuple[list[dict], np.ndarray | None, np.ndarray | None]:
    """The whole ``train_net.py`` data preparation: (roidb, bbox_means (84,), bbox_stds (84,)).

    means/stds are None when ``TRAIN.BBOX_REG`` is off (no targets, as the original).
    """
    check_rpn_normalization(cfg)
    roidb = filter_roidb(get_training_roidb(imdb, cfg), cfg, verbose=verbose)
    if not roidb:
        raise DataError(f"{imdb.name}: no image has a foreground or background RoI")
    if cfg.TRAIN.BBOX_REG:
        means, stds = add_bbox_regression_targets(roidb, cfg, imdb.num_classes, verbose=verbose)
        return roidb, means, stds
    return roidb, None, None
