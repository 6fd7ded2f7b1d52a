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

_FIRST_CHUNK = 256  # boxes per chunk of an unbounded NMS (later chunks double, up to _MAX_CHUNK)
_MIN_CHUNK = 64  # smallest chunk when stopping early
_MAX_CHUNK = 2048  # largest chunk when stopping early
_MAX_FULL_CHUNK = 512  # largest chunk of an unbounded NMS (its cost is mostly the kept x chunk IoU)


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
    n = int(order.numel())
    if n == 0 or (max_keep is not None and max_keep <= 0):
        return order.new_zeros(0), 0
    if max_keep is None and groups is not None:
        # Visit group by group (each group in its own order: same result), so that only boxes
        # kept earlier in the same group are compared with a chunk; then restore the order.
        visit = order[torch.sort(groups[order], stable=True).indices]
        keep, _ = _visit(boxes, visit, thresh, groups, suppress_equal, None, None, grouped=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n, device=order.device)
        return keep[torch.argsort(rank[keep])], n
    return _visit(boxes, order, thresh, groups, suppress_equal, max_keep, tie_scores, grouped=False)


def _visit(boxes, order, thresh, groups, suppress_equal, max_keep, tie_scores, grouped):
    """The chunked greedy pass (see the module docstring)."""
    n = int(order.numel())
    device = boxes.device
    thr = torch.tensor(thresh, dtype=boxes.dtype, device=device)
    kept = []  # index tensors, in visiting order
    n_kept = 0
    kept_boxes = boxes.new_zeros((0, 4))
    kept_groups = None if groups is None else groups.new_zeros((0,))
    chunk = _FIRST_CHUNK if max_keep is None else max(_MIN_CHUNK, 2 * max_keep)
    start = 0
    while start < n:
        cand = order[start:start + chunk]
        k = int(cand.numel())
        cboxes = boxes[cand]
        cgroups = None if groups is None else groups[cand]
        prev_boxes, prev_groups = kept_boxes, kept_groups
        if grouped and n_kept:
            # visiting group-major: only the kept boxes of the chunk's first group can matter
            first = int(torch.searchsorted(kept_groups, cgroups[:1]))
            prev_boxes, prev_groups = kept_boxes[first:], kept_groups[first:]
        p = int(prev_boxes.shape[0])
        q = torch.cat((prev_boxes, cboxes))
        # column-major copies make bbox_overlaps' column broadcasts contiguous (much faster)
        iou = bbox_overlaps(q.t().contiguous().t(), cboxes.t().contiguous().t())  # (p + k, k)
        over = iou >= thr if suppress_equal else iou > thr
        if groups is not None:
            over &= torch.cat((prev_groups, cgroups))[:, None] == cgroups[None, :]
        alive = ~over[:p].any(0)  # not suppressed by a box kept before this chunk
        within = over[p:].triu_(1).float()  # within[a, b]: a is visited before b and overlaps it
        keep = _greedy_within(alive, within)
        new_idx = cand[keep]
        kept.append(new_idx)
        n_kept += int(new_idx.numel())
        kept_boxes = torch.cat((kept_boxes, cboxes[keep]))
        if groups is not None:
            kept_groups = torch.cat((kept_groups, cgroups[keep]))
        start += k
        if max_keep is None:
            chunk = min(2 * chunk, _MAX_FULL_CHUNK)
            continue
        if n_kept >= max_keep:
            if tie_scores is None or start >= n:
                break
            last = torch.cat(kept)[max_keep - 1]
            if bool(tie_scores[order[start]] < tie_scores[last]):
                break
        # size the next chunk from the survival rate so far (at least _MIN_CHUNK)
        need = max(max_keep - n_kept, 1)
        rate = max(n_kept / start, 1.0 / 16)
        chunk = min(max(_MIN_CHUNK, int(1.25 * need / rate) + 1), _MAX_CHUNK)
    keep = torch.cat(kept) if kept else order.new_zeros(0)
    return keep, min(start, n)


def _greedy_within(alive: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
    """Greedy NMS inside one chunk: (k,) bool candidates, (k, k) float 0/1 strict-upper
    "would suppress" matrix -> (k,) bool kept.

    Decisions only ever become final: an undecided box is kept once no undecided or kept box
    before it overlaps it, and suppressed once a kept one does. Every step decides at least the
    first undecided box; on real data a few steps decide all.
    """
    kept = torch.zeros_like(alive)
    undecided = alive.clone()
    while bool(undecided.any()):
        blockers = torch.mv(within.t(), (kept | undecided).float())  # overlapping, not suppressed
        killers = torch.mv(within.t(), kept.float())
        newly_kept = undecided & (blockers == 0)
        kept |= newly_kept
        undecided &= ~(newly_kept | (killers > 0))
    return kept


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
