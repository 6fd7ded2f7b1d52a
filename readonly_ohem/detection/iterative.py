"""+B: iterative bounding-box regression and weighted box voting (the OHEM paper's §6, after MR-CNN).

The paper (Shrivastava et al. 2016, "Adding bells and whistles"), following Gidaris & Komodakis
(MR-CNN, ICCV 2015): the network scores and relocalizes every proposal (R1: the usual per-class
boxes and scores of ``im_detect``); the high-scoring R1 boxes are scored and relocalized again
(R2); R1 ∪ R2 goes through per-class NMS at 0.3 (``TEST.NMS``), and each kept box is replaced by
the score-weighted average of the R1 ∪ R2 boxes with IoU >= 0.5 to it. Never released with the
OHEM code; these are our choices where the papers leave room (see docs/REPRODUCE.md, "+M and +B"):

- R2 pairs, as R1 and MR-CNN's code, the *score of the box fed in* with *the box regressed from
  it*: an R1 box b1 of class j (score s0 > ``TEST.ITER_BBOX_REG_THRESH``) is fed as a RoI, giving
  score s1 = cls_prob(b1)[j] and box b2 = bbox_pred(b1)[j]; R2 holds (b2, s1). One forward for
  all classes (``im_detect`` on the stacked boxes: same scales, levels, dedup and clipping).
- Voters: the candidates NMS saw (R1 ∪ R2 of the class with score > the test threshold), weight
  max(score, 0) (MR-CNN's weight for SVM scores; for softmax scores it is the score). Coordinates
  change, scores do not. IoU with +1 widths (``ops.boxes.bbox_overlaps``), ``>=`` as the paper.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from readonly_ohem.errors import ConfigError
from readonly_ohem.ops.boxes import bbox_overlaps


class SecondPass(NamedTuple):
    """R2 detections, one row per re-scored (R1 box, class): cls (M,) int64 >= 1, scores (M,)
    float32 (its class's score of the R1 box fed in), boxes (M, 4) float32 (regressed again)."""

    cls: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray


def check_config(cfg) -> None:
    """One-line errors for +B settings that cannot work."""
    t = cfg.TEST
    if t.ITER_BBOX_REG and not t.BBOX_REG:
        raise ConfigError("TEST.ITER_BBOX_REG needs TEST.BBOX_REG (the R2 pass regresses the boxes)")
    if t.BBOX_VOTE and not 0.0 < t.BBOX_VOTE_THRESH <= 1.0:
        raise ConfigError(f"TEST.BBOX_VOTE_THRESH must be in (0, 1], got {t.BBOX_VOTE_THRESH}")


def second_pass_rois(scores: np.ndarray, pred_boxes: np.ndarray, thresh: float):
    """The R1 boxes to re-score: every (proposal r, class j >= 1) with scores[r, j] > thresh.

    scores (R, C), pred_boxes (R, 4C) from ``im_detect``. Returns (cls (M,) int64, boxes (M, 4)
    float64), proposal-major (r, then j), boxes = pred_boxes[r, 4j:4j+4].
    """
    r, c = scores.shape
    rows, cls = np.nonzero(scores[:, 1:] > thresh)
    cls = cls.astype(np.int64) + 1
    boxes = pred_boxes.reshape(r, c, 4)[rows, cls].astype(np.float64)
    return cls, boxes


def iterative_bbox_reg(detect: Callable, scores: np.ndarray, pred_boxes: np.ndarray,
                       thresh: float) -> SecondPass:
    """The R2 pass: re-score and re-regress the R1 boxes scoring > ``thresh`` for their class.

    detect: boxes (M, 4) float64 -> (scores (M, C), pred_boxes (M, 4C)), i.e. ``im_detect`` on
    the same image (a Faster R-CNN detector that scores given boxes plugs in the same way).
    """
    cls, rois = second_pass_rois(scores, pred_boxes, thresh)
    m = cls.size
    if m == 0:
        return SecondPass(cls, np.zeros(0, np.float32), np.zeros((0, 4), np.float32))
    s2, b2 = detect(rois)
    rows = np.arange(m)
    return SecondPass(cls, np.asarray(s2[rows, cls], np.float32),
                      np.asarray(b2.reshape(m, -1, 4)[rows, cls], np.float32))


def box_voting(kept: np.ndarray, pool: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Weighted voting: kept (K, 5), pool (N, 5) float32 ``[x1, y1, x2, y2, score]`` of one class.

    Each kept box's coordinates become sum(w_n b_n) / sum(w_n) over the pool boxes with
    IoU >= ``iou_thresh`` to it, w_n = max(score_n, 0) (float64 arithmetic); its score stays. A
    kept box whose voters all weigh 0 keeps its coordinates. Returns (K, 5) float32.
    """
    kept = np.asarray(kept, np.float32)
    if kept.shape[0] == 0 or pool.shape[0] == 0:
        return kept.copy()
    b = pool[:, :4].astype(np.float64)
    iou = bbox_overlaps(kept[:, :4].astype(np.float64), b)  # (K, N)
    w = (iou >= iou_thresh) * np.maximum(pool[:, 4].astype(np.float64), 0.0)[None, :]
    total = w.sum(axis=1)
    voted = kept[:, :4].astype(np.float64)
    ok = total > 0
    voted[ok] = (w[ok] @ b) / total[ok, None]
    return np.hstack((voted, kept[:, 4:5].astype(np.float64))).astype(np.float32)
