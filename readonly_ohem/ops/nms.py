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

Many boxes on the CPU in one group, at a threshold of at least 0.5 (the RPN's proposals):
``ops.nms_window``, the same greedy pass comparing each kept box only with the boxes near it, in
numpy.

``prefix_nms`` is the same greedy NMS for a few hundred boxes given in visiting order (OHEM's
highest-loss candidates): IoU only over same-group pairs (``bbox_overlaps_paired``, the arithmetic of
``bbox_overlaps`` pair by pair), then the fixed point of "kept = no kept suppressor" in a few
vectorized rounds; no host loop over boxes. It runs in numpy on the host (cheaper than torch
launches at that size, on any device).

torchvision's ``nms`` on boxes shifted by +1 is not used: ``(x2 + 1) - x1`` rounds differently
from ``(x2 - x1) + 1`` on scaled float32 RoIs, and its order on equal scores is unspecified.
"""

from __future__ import annotations

import numpy as np
import torch

from readonly_ohem.ops.boxes import (bbox_overlaps, bbox_overlaps_paired, like_source,
                                     paired_intersections, paired_iou, to_host)
from readonly_ohem.ops.nms_window import window_nms

_FIRST_CHUNK = 256  # boxes per chunk of an unbounded NMS (later chunks double, up to _MAX_CHUNK)
_MIN_CHUNK = 64  # smallest chunk when stopping early
_FIRST_FACTOR = 2  # first chunk when stopping early: this many times max_keep
_MAX_CHUNK = 2048  # largest chunk when stopping early
_MAX_FULL_CHUNK = 512  # largest chunk of an unbounded NMS (its cost is mostly the kept x chunk IoU)

_FORCE_STEPS = False  # tests set True to check the any-device path on CPU
_WINDOW_MIN_BOXES = 2048  # ops.nms_window from this many boxes (tests lower it) ...
_WINDOW_MIN_THRESH = 0.5  # ... and thresholds (its windows grow as (1 - t) / t) ...
_WINDOW_MIN_KEEP = 128  # ... unless max_keep is below this (the chunked pass stops soon enough)


def descending_order(scores):
    """Indices of ``scores`` (N,) by descending value, ties by descending index.

    Equal to ``np.argsort(scores, kind="stable")[::-1]``: the original's ``argsort()[::-1]``
    with a deterministic order for ties (NaN first, as numpy sorts it last). A tensor gives a
    tensor; a numpy array an int64 array, float32/float64 sorted by 16-bit radix passes (numpy's
    stable sort of 16-bit keys; several times faster than its sort of floats).
    """
    if not isinstance(scores, np.ndarray):
        return torch.sort(scores, stable=True).indices.flip(0)
    if scores.dtype not in (np.float32, np.float64) or scores.size < 2:
        return np.ascontiguousarray(np.argsort(scores, kind="stable")[::-1])
    key = _sortable_bits(scores)
    order = np.argsort((key & 0xFFFF).astype(np.uint16), kind="stable")
    for shift in range(16, 8 * key.itemsize, 16):
        digit = ((key[order] >> shift) & 0xFFFF).astype(np.uint16)
        order = order[np.argsort(digit, kind="stable")]
    return np.ascontiguousarray(order[::-1])


def _sortable_bits(x: np.ndarray) -> np.ndarray:
    """Unsigned ints (N,) of float ``x`` in numpy's sort order: -0.0 equal to 0.0, every NaN
    equal and last."""
    x = x + x.dtype.type(0)  # -0.0 -> 0.0
    nan = np.isnan(x)
    if nan.any():
        x[nan] = np.nan
    u = x.view(np.uint32 if x.itemsize == 4 else np.uint64)
    top = u.dtype.type(1) << u.dtype.type(8 * x.itemsize - 1)
    return u ^ np.where(u >= top, ~u.dtype.type(0), top)  # negative: flip all; else the sign


def top_descending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``descending_order(scores)[:k]`` without sorting everything when k is small."""
    n = int(scores.numel())
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    if 4 * k >= n:
        return descending_order(scores)[:k]
    kth = torch.topk(scores, k).values[-1]
    cand = torch.nonzero(scores >= kth).squeeze(1)  # ascending index; every tie at the cut
    if cand.numel() < k:  # NaN scores: fall back to the full sort
        return descending_order(scores)[:k]
    return cand[descending_order(scores[cand])][:k]


class _VisitOrder:
    """The visiting order, given outright or as scores ranked lazily (early stops rank few)."""

    def __init__(self, order=None, scores=None):
        self.order, self.scores = order, scores
        self.n = int((order if order is not None else scores).numel())
        self._top = None  # the longest prefix ranked so far

    def prefix(self, m: int) -> torch.Tensor:
        if self.order is None and 4 * m >= self.n:
            self.order = descending_order(self.scores)
        if self.order is not None:
            return self.order[:m]
        if self._top is None or self._top.numel() < min(m, self.n):
            self._top = top_descending(self.scores, m + 64)  # a little ahead: the next peek
        return self._top[:m]


def greedy_nms(boxes: torch.Tensor, thresh: float, *, order: torch.Tensor | None = None,
               scores: torch.Tensor | None = None, groups: torch.Tensor | None = None,
               suppress_equal: bool = False, max_keep: int | None = None,
               tie_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS over ``boxes`` (N, 4) ``[x1, y1, x2, y2]``, visiting them in ``order`` (M,)
    or, given ``scores`` (N,) instead, in ``descending_order(scores)``.

    ``groups`` (N,) int: boxes only suppress boxes of their own group (per class, per image).
    ``max_keep``: stop once that many boxes are kept; with ``tie_scores`` (N,) the visit goes on
    while the next box's tie score equals that of the ``max_keep``-th kept box, so a caller that
    re-ranks the survivors with finer scores sees every candidate it could need.

    Returns ``(keep, visited)``: kept box indices in visiting order, and the indices visited
    (a prefix of the order: every box whose fate was decided; all of them when not stopped).
    """
    if (order is None) == (scores is None):
        raise ValueError("greedy_nms needs exactly one of order= and scores=")
    visit = _VisitOrder(order, scores)
    empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
    if visit.n == 0 or (max_keep is not None and max_keep <= 0):
        return empty, empty
    if groups is None and tie_scores is None and _windowed(boxes, visit.n, thresh, max_keep):
        full = visit.prefix(visit.n)
        keep, visited = window_nms(boxes.detach().index_select(0, full).numpy(), thresh,
                                   suppress_equal, max_keep)
        return full[torch.from_numpy(keep)], full[:visited]
    if max_keep is None and groups is not None:
        # Visit group by group (each group in its own order: same result), so that a chunk is
        # compared only with boxes kept earlier in its own group; then restore the order.
        full = visit.prefix(visit.n)
        by_group = full[torch.sort(groups[full], stable=True).indices]
        keep, _ = _visit(boxes, _VisitOrder(by_group), thresh, groups, suppress_equal, None, None,
                         grouped=True)
        rank = torch.empty_like(full)
        rank[full] = torch.arange(visit.n, device=full.device)
        return keep[torch.argsort(rank[keep])], full
    return _visit(boxes, visit, thresh, groups, suppress_equal, max_keep, tie_scores,
                  grouped=False)


def _visit(boxes, visit, thresh, groups, suppress_equal, max_keep, tie_scores, grouped):
    """The chunked greedy pass (see the module docstring)."""
    n = visit.n
    thr = torch.tensor(thresh, dtype=boxes.dtype, device=boxes.device)
    kept = []  # index tensors, in visiting order
    n_kept = 0
    kept_boxes = boxes.new_zeros((0, 4))
    kept_groups = None if groups is None else groups.new_zeros((0,))
    chunk = _FIRST_CHUNK if max_keep is None else max(_MIN_CHUNK, int(_FIRST_FACTOR * max_keep))
    start = 0
    while start < n:
        cand = visit.prefix(start + chunk)[start:]
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
        over = iou >= thr if suppress_equal else iou > thr  # over[a, b]: a would suppress b
        if groups is not None:
            over &= torch.cat((prev_groups, cgroups))[:, None] == cgroups[None, :]
        keep = _greedy_chunk(over, p)
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
            if bool(tie_scores[visit.prefix(start + 1)[start]] < tie_scores[last]):
                break
        # size the next chunk from the survival rate so far
        need = max(max_keep - n_kept, 1)
        rate = max(n_kept / start, 1.0 / 16)
        chunk = min(max(_MIN_CHUNK, int(1.25 * need / rate) + 1), _MAX_CHUNK)
    keep = torch.cat(kept) if kept else boxes.new_zeros(0, dtype=torch.long)
    return keep, visit.prefix(min(start, n))


def _windowed(boxes: torch.Tensor, n: int, thresh: float, max_keep: int | None) -> bool:
    """Whether the windowed pass applies: CPU, many boxes of which many may be kept, 0.5 <=
    thresh < 1, float32/float64 boxes (its bounds leave room for their rounding) with finite
    coordinates and positive +1 widths and heights (the bound assumes both). A small
    ``max_keep`` stops the chunked pass early enough."""
    if boxes.device.type != "cpu" or n < _WINDOW_MIN_BOXES or not _WINDOW_MIN_THRESH <= thresh < 1:
        return False
    if boxes.dtype not in (torch.float32, torch.float64):
        return False
    if max_keep is not None and max_keep < _WINDOW_MIN_KEEP:
        return False
    b = boxes.detach().numpy()
    if not np.isfinite(b).all():
        return False
    with np.errstate(over="ignore"):  # 3e38 - -3e38 is inf: a positive width still
        return bool((b[:, 2:4] - b[:, 0:2] + 1 > 0).all())


def _greedy_chunk(over: torch.Tensor, p: int) -> torch.Tensor:
    """Greedy NMS of one chunk. over (p + k, k) bool: rows 0..p-1 are boxes kept before the chunk,
    rows p.. the chunk itself in visiting order; over[a, b] = "a would suppress b" (IoU and
    group tests passed). Returns (k,) bool kept."""
    if over.device.type == "cpu" and not _FORCE_STEPS:
        return _greedy_chunk_bits(over, p)
    alive = ~over[:p].any(0)  # not suppressed by a box kept before this chunk
    return _greedy_chunk_steps(alive, over[p:].triu(1).float())


def _greedy_chunk_bits(over: torch.Tensor, p: int) -> torch.Tensor:
    """CPU: the plain greedy loop, but only over boxes that some earlier box of the chunk
    overlaps, with each box's earlier overlapping boxes as one Python-int bitmask."""
    o = over.numpy()
    k = o.shape[1]
    alive = ~o[:p].any(0)
    preds = np.tril(o[p:].T, -1)  # preds[b, a]: a is visited before b and would suppress it
    contested = np.flatnonzero(preds.any(1) & alive)
    free = alive.copy()
    free[contested] = False
    kept = int.from_bytes(np.packbits(free, bitorder="little").tobytes(), "little")
    if contested.size:
        masks = np.packbits(preds[contested], axis=1, bitorder="little")
        for b, mask in zip(contested.tolist(), masks):
            if not int.from_bytes(mask.tobytes(), "little") & kept:
                kept |= 1 << b
    bits = np.frombuffer(kept.to_bytes((k + 7) // 8, "little"), dtype=np.uint8)
    return torch.from_numpy(np.unpackbits(bits, count=k, bitorder="little").astype(bool))


def _greedy_chunk_steps(alive: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
    """Any device: (k,) bool candidates, (k, k) float 0/1 strict-upper "would suppress" matrix
    -> (k,) bool kept, in vectorized steps.

    Decisions only ever become final: an undecided box is kept once no undecided or kept box
    before it overlaps it, and suppressed once a kept one does. Every step decides at least the
    first undecided box; on real data a few steps decide all.
    """
    kept = torch.zeros_like(alive)
    undecided = alive.clone()
    while bool(undecided.any()):
        counts = within.t() @ torch.stack((kept | undecided, kept), 1).to(within.dtype)  # (k, 2)
        newly_kept = undecided & (counts[:, 0] == 0)  # no live box before it overlaps it
        kept |= newly_kept
        undecided &= ~(newly_kept | (counts[:, 1] > 0))  # decided: kept, or a kept box overlaps
    return kept


def prefix_nms(boxes, groups, thresh: float, suppress_equal: bool = False,
               max_pairs: int | None = None):
    """Greedy NMS of ``boxes`` (K, 4) already in visiting order (box 0 first), a box suppressing
    only boxes of its own group (``groups`` (K,) int): (K,) bool kept.

    Exact for any prefix of a longer visiting order: a box's fate depends only on the boxes
    visited before it. Made for a few hundred boxes (OHEM's candidates), in a fixed number of
    vectorized ops plus a few per round:

    - the boxes are sorted by group (stably), and the IoU is computed only for the pairs
      (earlier, later) of one group, as one flat list (``paired_intersections``, the arithmetic
      of ``bbox_overlaps`` pair by pair), not a K x K matrix;
    - over the pairs above the threshold (the edges), the greedy result is the fixed point of
      ``kept[b] = no edge (a, b) with kept[a]``, iterated from ``kept = all``: after round t
      every box whose longest chain of overlapping earlier boxes is shorter than t is right, so
      it stops within (longest chain + 1) rounds (a few on real data).

    numpy arrays or torch tensors (any device) in, the boxes' kind and device out; it runs on
    the host in numpy: ~25 ops on a few thousand elements cost about half there of what they
    cost as torch launches on a CPU, and on a GPU it is one copy of the candidates instead of
    ~40 launches and ~10 synchronizations.

    Returns None, without doing the work, when the pairs number more than ``max_pairs``.
    """
    b, src = to_host(boxes)
    g, _ = to_host(groups)
    k = int(b.shape[0])
    if k == 0:
        return like_source(np.zeros(0, dtype=bool), src)
    perm = g.argsort(kind="stable")
    sorted_groups = g.take(perm)
    first = sorted_groups.searchsorted(sorted_groups)  # first slot of each one's group
    slot = np.arange(k)
    n_before = slot - first  # earlier boxes of its group, per slot
    n_pairs = int(n_before.sum())
    if max_pairs is not None and n_pairs > max_pairs:
        return None
    if n_pairs == 0:
        return like_source(np.ones(k, dtype=bool), src)
    # pair q: later slot ``later[q]``, earlier slot first[later] + (q - first pair of later)
    later = slot.repeat(n_before)
    shift = slot - n_before.cumsum()  # first - (first pair of the slot)
    earlier = np.arange(n_pairs) + shift.take(later)
    edges = _paired_over(b.take(perm, axis=0), earlier, later, thresh, suppress_equal).nonzero()[0]
    # the edges in visiting order (box index): src would suppress dst
    kept = _fixed_point(perm.take(earlier.take(edges)), perm.take(later.take(edges)), k)
    return like_source(kept, src)


def _fixed_point(src: np.ndarray, dst: np.ndarray, k: int) -> np.ndarray:
    """(K,) bool kept: the fixed point of ``kept[b] = no edge (a, b) with kept[a]`` from all
    kept; each round counts every box's kept suppressors with one ``bincount``."""
    kept = np.bincount(dst, minlength=k) == 0  # round 1: no suppressor at all
    while True:
        new = np.bincount(dst, weights=kept.take(src), minlength=k) == 0
        if not (new ^ kept).any():
            return kept
        kept = new


def _paired_over(boxes, first, second, thresh, suppress_equal):
    """``bbox_overlaps_paired(boxes, first, second)`` above ``thresh`` (>= with ``suppress_equal``;
    compared in the boxes' dtype), (P,) bool, numpy or torch as the boxes. With a positive
    threshold (non-negative for >) a pair that does not intersect (IoU 0, or 0/0) is never above
    it: the IoU's ``where`` is left out."""
    b, src = to_host(boxes)
    i, j = to_host(first)[0], to_host(second)[0]
    if thresh < 0 or (suppress_equal and thresh == 0):
        iou = bbox_overlaps_paired(b, i, j)
    else:
        iou = paired_iou(*paired_intersections(b, i, j))
    thr = iou.dtype.type(thresh)  # the kernel's float threshold
    return like_source(iou >= thr if suppress_equal else iou > thr, src)


def nms(boxes: torch.Tensor, scores: torch.Tensor, thresh: float,
        suppress_equal: bool = False) -> torch.Tensor:
    """Greedy NMS: kept indices of ``boxes`` (N, 4) by descending ``scores`` (N,).

    Suppresses IoU > ``thresh`` (+1 pixel areas, the boxes' dtype); ``suppress_equal=True``
    suppresses IoU >= thresh (the original's Cython CPU NMS). Equal scores: higher index first.
    """
    keep, _ = greedy_nms(boxes, thresh, scores=scores, suppress_equal=suppress_equal)
    return keep


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, thresh: float,
                suppress_equal: bool = False) -> torch.Tensor:
    """NMS within each group id (``groups`` (N,) int, e.g. class or image): kept indices of all
    groups together, by descending score (ties: higher index first)."""
    keep, _ = greedy_nms(boxes, thresh, scores=scores, groups=groups,
                         suppress_equal=suppress_equal)
    return keep
