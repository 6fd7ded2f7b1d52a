"""The one non-maximum suppression of the project: test-time detections and OHEM both use it.

Rules (the original's GPU kernel, used by both training and testing in the released code):

- IoU with +1 pixel widths, computed by ``ops.boxes.bbox_overlaps`` in the boxes' own dtype
  (float32 blobs give the float32 arithmetic of the kernel and of the pure-numpy ``py_cpu_nms``);
  the threshold is cast to that dtype too, as the kernel's ``float`` threshold.
- A box is suppressed by a kept, higher-ranked box when IoU > thresh. The Cython CPU NMS used
  IoU >= thresh: ``suppress_equal=True`` gives that rule.
- Visiting order: descending score; equal scores visit the higher index first. This is what the
  original's ``scores.argsort()[::-1]`` gives with a stable argsort (numpy's default quicksort
  does not promise an order for ties, so "stable, then reversed" is the deterministic reading).
  ``descending_order`` is that order and is used wherever the project ranks by a score.

Implementation: boxes are visited in chunks in their order. Each chunk's IoU against itself and
against the boxes kept so far (same group only) is one vectorized matrix; the greedy pass inside
the chunk is the fixed point of ``keep[b] = alive[b] and no kept a < b suppresses b``, reached in
(longest suppression chain + 1) vectorized steps, exact and free of per-box Python loops. Only
boxes kept so far can suppress later ones, so callers that need just the first ``max_keep``
survivors (OHEM) stop early. Works on any device; nothing is copied to the host but counts.

torchvision's ``nms`` on boxes shifted by +1 is not used: ``(x2 + 1) - x1`` rounds differently
from ``(x2 - x1) + 1`` on scaled float32 RoIs, and its order on equal scores is unspecified.
"""

from __future__ import annotations

import torch

from readonly_ohem.ops.boxes import bbox_overlaps

_FIRST_CHUNK = 512  # boxes per chunk of an unbounded NMS (later chunks double, up to _MAX_CHUNK)
_MAX_CHUNK = 4096


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices of ``scores`` (N,) by descending value, ties by descending index.

    Equal to ``np.argsort(scores, kind="stable")[::-1]``: the original's ``argsort()[::-1]``
    with a deterministic order for ties.
    """
    return torch.sort(scores, stable=True).indices.flip(0)


def greedy_nms(boxes: torch.Tensor, order: torch.Tensor, thresh: float, *, groups=None,
               suppress_equal: bool = False, max_keep: int | None = None,
               tie_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Greedy NMS visiting ``boxes`` (N, 4) ``[x1, y1, x2, y2]`` in the given ``order`` (M,).

    ``groups`` (N,) int: boxes only suppress boxes of their own group (per class, per image).
    ``max_keep``: stop once that many boxes are kept; with ``tie_scores`` (N,) the visit goes on
    while the next box's tie score equals that of the ``max_keep``-th kept box, so a caller that
    re-ranks the survivors with finer scores sees every candidate it could need.

    Returns ``(keep, examined)``: kept box indices (into ``boxes``) in visiting order, and how
    many entries of ``order`` were visited (the rest are undecided; ``M`` when not stopped).
    """
    device = boxes.device
    n = int(order.numel())
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if n == 0 or (max_keep is not None and max_keep <= 0):
        return empty, 0
    thr = torch.tensor(thresh, dtype=boxes.dtype, device=device)
    kept_idx = empty
    kept_boxes = boxes.new_zeros((0, 4))
    kept_groups = None if groups is None else groups.new_zeros((0,))
    chunk = _FIRST_CHUNK if max_keep is None else max(64, 2 * max_keep)
    start = 0
    while start < n:
        cand = order[start:start + chunk]
        k = int(cand.numel())
        cboxes = boxes[cand]
        q = torch.cat((kept_boxes, cboxes))  # (P + k, 4): everything that may suppress the chunk
        iou = bbox_overlaps(q, cboxes)  # (P + k, k)
        over = iou >= thr if suppress_equal else iou > thr
        if groups is not None:
            cgroups = groups[cand]
            over &= torch.cat((kept_groups, cgroups))[:, None] == cgroups[None, :]
        p = int(kept_boxes.shape[0])
        alive = ~over[:p].any(0)  # not suppressed by a box kept in an earlier chunk
        within = over[p:].triu(1)  # within[a, b]: a is visited before b and would suppress it
        keep = alive
        while True:  # fixed point of keep[b] = alive[b] & ~any_a(keep[a] & within[a, b])
            new = alive & ~(within & keep[:, None]).any(0)
            if torch.equal(new, keep):
                break
            keep = new
        new_idx = cand[keep]
        kept_idx = torch.cat((kept_idx, new_idx))
        kept_boxes = torch.cat((kept_boxes, cboxes[keep]))
        if groups is not None:
            kept_groups = torch.cat((kept_groups, cgroups[keep]))
        start += k
        if max_keep is not None and kept_idx.numel() >= max_keep:
            if tie_scores is None or start >= n:
                break
            if bool(tie_scores[order[start]] < tie_scores[kept_idx[max_keep - 1]]):
                break
        chunk = min(2 * chunk, _MAX_CHUNK)
    return kept_idx, min(start, n)


def nms(boxes: torch.Tensor, scores: torch.Tensor, thresh: float,
        suppress_equal: bool = False) -> torch.Tensor:
    """Greedy NMS: kept indices of ``boxes`` (N, 4) by descending ``scores`` (N,).

    Suppresses IoU > ``thresh`` (+1 pixel areas, the boxes' dtype); ``suppress_equal=True``
    suppresses IoU >= thresh (the original's Cython CPU NMS). Equal scores: higher index first.
    """
    keep, _ = greedy_nms(boxes, descending_order(scores), thresh, suppress_equal=suppress_equal)
    return keep


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, thresh: float,
                suppress_equal: bool = False) -> torch.Tensor:
    """NMS within each group id (``groups`` (N,) int, e.g. class or image): kept indices of all
    groups together, by descending score (ties: higher index first)."""
    keep, _ = greedy_nms(boxes, descending_order(scores), thresh, groups=groups,
                         suppress_equal=suppress_equal)
    return keep
