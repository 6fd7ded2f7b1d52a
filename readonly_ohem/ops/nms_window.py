"""The windowed greedy NMS pass for many boxes on the CPU (``ops.nms.greedy_nms`` uses it).

Same result as the plain greedy pass (visit in order, keep a box unless a kept one overlaps it
by IoU > t, or >= t), far fewer comparisons when the boxes spread over an image, as RPN
proposals do. The chunk's kept boxes suppress the later boxes at once (as ``py_cpu_nms`` does box
by box), but each kept box is compared only with the boxes it could suppress. With +1 widths,
IoU(a, b) > t implies (iw <= min(wa, wb), IoU <= iw / max(wa, wb), iw <= w_first - |x1a - x1b|):

- min(wa, wb) > t max(wa, wb), and the heights alike: log w and log h of b within log(1/t) of a's;
- |x1a - x1b| < (1 - t) max(wa, wb) < (1 - t) / t wa, and |y1a - y1b| < (1 - t) / t ha.

So the boxes are sorted once by (size class: log w and log h in bins of log(1/t); x cell, as
wide as the class's reach; y1), and a kept box looks up, in the 3 x 3 classes around its own,
the x cells its window covers, each a range of y1 (``WindowIndex.candidates``). Bins and
windows carry a 0.1% margin, so float32 rounding of the IoU cannot push a pair out of them;
every candidate pair then gets the exact IoU test, in ``bbox_overlaps``' arithmetic
(``WindowIndex.suppress``). Decided boxes leave the index when it is rebuilt (once half of it
is decided).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from readonly_ohem.ops.boxes import bbox_overlaps

CHUNK = 256  # boxes resolved together (their IoU matrix), then applied to the rest at once
_MARGIN = 1e-3  # relative slack of the bins and windows
_NEAR = torch.tensor([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)])  # neighbouring classes


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ranges [starts[i], starts[i] + counts[i]): (owner i, value) of every element."""
    total = int(counts.sum())
    owner = torch.repeat_interleave(torch.arange(counts.numel()), counts, output_size=total)
    shift = starts - (torch.cumsum(counts, 0) - counts)
    return owner, torch.arange(total).add_(shift.index_select(0, owner))


class WindowIndex:
    """The boxes at ``positions`` (of ``boxes`` (N, 4) float32/64), sorted for window look-ups."""

    def __init__(self, boxes: torch.Tensor, positions: torch.Tensor, thresh: float):
        self.reach = (1.0 - thresh) / thresh * (1 + _MARGIN)
        self.bin = -math.log(thresh) * (1 + _MARGIN)
        b = boxes.index_select(0, positions).double()
        x1, y1 = b[:, 0], b[:, 1]
        w, h = b[:, 2] - x1 + 1, b[:, 3] - y1 + 1
        cw, ch = self._classes(w), self._classes(h)
        self.cw0, self.ch0 = int(cw.min()), int(ch.min())
        self.n_cw, self.n_ch = int(cw.max()) - self.cw0 + 1, int(ch.max()) - self.ch0 + 1
        self.x0, self.y0 = float(x1.min()), float(y1.min())
        cx = torch.floor((x1 - self.x0) / self._cell_width(cw))
        self.n_cx = int(cx.max()) + 1
        self.margin = float(h.max()) * self.reach + 2
        self.stride = float(y1.max()) - self.y0 + 2 * self.margin + 1
        cls = (cw - self.cw0) * self.n_ch + (ch - self.ch0)
        key = self._key(cls, cx, y1)
        self.keys, perm = torch.sort(key)
        self.positions = positions.index_select(0, perm)
        # x1, y1, x2, y2 and the areas, by slot
        self.columns = boxes.index_select(0, self.positions).t().contiguous()
        x1, y1, x2, y2 = self.columns
        self.areas = (x2 - x1 + 1) * (y2 - y1 + 1)
        self.live = torch.ones(perm.numel(), dtype=torch.bool)  # by slot: not yet decided

    def _classes(self, size: torch.Tensor) -> torch.Tensor:
        return torch.floor(torch.log(size) / self.bin).long()

    def _cell_width(self, cw: torch.Tensor) -> torch.Tensor:
        """A class's x cell: the largest window of its boxes (widths below exp(bin (cw + 1)))."""
        return torch.exp((cw + 1).double() * self.bin) * self.reach + 1

    def _key(self, cls, cx, y1) -> torch.Tensor:
        return (cls.double() * self.n_cx + cx).mul_(self.stride).add_(y1 - self.y0 + self.margin)

    def candidates(self, src_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate pairs (row of ``src_boxes`` (K, 4), slot of the index): every indexed box
        that a box of ``src_boxes`` could overlap by IoU > t (and more)."""
        b = src_boxes.double()
        x1, y1 = b[:, 0], b[:, 1]
        w, h = b[:, 2] - x1 + 1, b[:, 3] - y1 + 1
        rx, ry = w * self.reach + 1, h * self.reach + 1
        # the 3 x 3 size classes around each box's own
        cw = (self._classes(w) - self.cw0)[:, None] + _NEAR[:, 0]
        ch = (self._classes(h) - self.ch0)[:, None] + _NEAR[:, 1]
        ok = (cw >= 0) & (cw < self.n_cw) & (ch >= 0) & (ch < self.n_ch)
        who, which = torch.nonzero(ok, as_tuple=True)
        cw, ch = cw[who, which], ch[who, which]
        # the x cells of that class that the window [x1 - rx, x1 + rx] covers
        cell = self._cell_width(cw + self.cw0)
        lo = torch.floor((x1[who] - rx[who] - self.x0) / cell).clamp_(min=0)
        hi = torch.floor((x1[who] + rx[who] - self.x0) / cell).clamp_(max=self.n_cx - 1)
        n_cells = (hi - lo + 1).clamp_(min=0).long()
        row, cx = _ranges(lo.long(), n_cells)
        who = who.index_select(0, row)
        base = self._key(cw.index_select(0, row) * self.n_ch + ch.index_select(0, row), cx,
                         y1.index_select(0, who))
        r = ry.index_select(0, who)
        first = torch.searchsorted(self.keys, base - r, side="left")
        last = torch.searchsorted(self.keys, base + r, side="right")
        owner, slot = _ranges(first, last - first)
        return who.index_select(0, owner), slot

    def suppress(self, src_boxes: torch.Tensor, thr: torch.Tensor, suppress_equal: bool) -> None:
        """Mark undecided (``self.live``) every indexed box that a box of ``src_boxes`` overlaps
        by IoU > thr (>= with ``suppress_equal``), in ``bbox_overlaps``' arithmetic."""
        src, slot = self.candidates(src_boxes)
        a = [c.index_select(0, src) for c in src_boxes.t().contiguous()]
        b = [c.index_select(0, slot) for c in self.columns]
        iw = torch.minimum(a[2], b[2]).sub_(torch.maximum(a[0], b[0])).add_(1).clamp_(min=0)
        ih = torch.minimum(a[3], b[3]).sub_(torch.maximum(a[1], b[1])).add_(1).clamp_(min=0)
        inter = iw.mul_(ih)
        area_a = (a[2] - a[0] + 1).mul_(a[3] - a[1] + 1)
        union = area_a.add_(self.areas.index_select(0, slot)).sub_(inter)
        iou = inter.div_(union)  # 0 where they do not intersect: areas are positive
        self.live[slot[iou >= thr if suppress_equal else iou > thr]] = False


def window_nms(boxes: torch.Tensor, order: torch.Tensor, thresh: float, suppress_equal: bool,
               max_keep: int | None, resolve_chunk: Callable[[torch.Tensor, int], torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS of ``boxes`` (N, 4) in ``order`` (M,), 0 < thresh < 1, finite boxes of
    positive size, CPU. ``resolve_chunk(over, 0)``: the greedy pass over a chunk's (k, k)
    "would suppress" matrix. Returns ``(keep, visited)`` as ``greedy_nms``."""
    b = boxes.index_select(0, order)  # position i: the i-th box visited
    n = b.shape[0]
    thr = torch.tensor(thresh, dtype=b.dtype)
    index = WindowIndex(b, torch.arange(n), thresh)
    slot_of = torch.empty(n, dtype=torch.long)
    slot_of[index.positions] = torch.arange(n)
    pending = torch.arange(n)
    kept, n_kept, visited = [], 0, n
    while pending.numel():
        chunk, pending = pending[:CHUNK], pending[CHUNK:]
        index.live[slot_of.index_select(0, chunk)] = False
        cb = b.index_select(0, chunk)
        cm = cb.t().contiguous().t()  # column-major: bbox_overlaps' broadcasts run contiguous
        iou = bbox_overlaps(cm, cm)
        keep = resolve_chunk(iou >= thr if suppress_equal else iou > thr, 0)
        new = chunk[keep]
        kept.append(new)
        n_kept += int(new.numel())
        if max_keep is not None and n_kept >= max_keep:
            visited = int(chunk[-1]) + 1
            break
        if not pending.numel():
            break
        index.suppress(cb[keep], thr, suppress_equal)
        pending = pending[index.live.index_select(0, slot_of.index_select(0, pending))]
        if 2 * pending.numel() < index.positions.numel():  # rebuild over the undecided boxes
            index = WindowIndex(b, pending, thresh)
            slot_of[index.positions] = torch.arange(pending.numel())
    keep = torch.cat(kept) if kept else order.new_zeros(0)
    return order.index_select(0, keep), order[:visited]
