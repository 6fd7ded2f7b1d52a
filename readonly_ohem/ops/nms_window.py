"""The windowed greedy NMS pass for many boxes on the CPU (``ops.nms.greedy_nms`` uses it).

Same result as the plain greedy pass (visit in order, keep a box unless a kept one overlaps it
by IoU > t, or >= t), far fewer comparisons when the boxes spread over an image, as RPN
proposals do. numpy throughout: the pass is many operations on small arrays, where a numpy call
costs a fraction of a torch call.

The bound. With +1 widths w and centers c = x1 + w / 2, IoU(a, b) > t means I (1 + t) >
t (Aa + Ab) for the intersection I = iw ih. As ih <= min(ha, hb), Aa + Ab >= min(ha, hb) (wa +
wb): so iw > t / (1 + t) (wa + wb), hence min(wa, wb) > t max(wa, wb) and, as iw <= (wa + wb) / 2
- |ca - cb|, |ca - cb| < (1 - t) / (2 (1 + t)) (wa + wb); heights alike.

The index (``_Index``): the undecided boxes sorted by cell: size class (log w and log h in bins of
log(1/t)), x cell (as wide as the largest center distance of a pair with a box of the class),
y cell (half that), with a CSR row of cell starts. A box's candidates (``_Index.ranges``): in the
3 x 3 size classes around its own that hold boxes, the x cells its window covers (at most 3),
each one range of slots over the y cells. The bounds use a threshold 1e-4 below t, so float
rounding of the IoU cannot push a pair out of them; every candidate gets the exact IoU test in
``bbox_overlaps``' arithmetic, in pieces of ``PIECE`` consecutive slots (``_Index.suppressed``).

The pass (``window_nms``): rounds over the undecided boxes in visiting order, in chunks growing
from ``FIRST`` by ``GROWTH`` up to ``CHUNK``. A chunk finds its pairs in the index at once, among
its own boxes and with the later ones; the pairs inside it decide it (``_fixed_point``), then its
kept boxes remove the later boxes they overlap. Small early chunks keep the first kept boxes of
a dense cluster from testing boxes an earlier one has already removed. Decided boxes leave the
index once they are a fifth of it (no new sort). With ``max_keep`` the pass runs on a prefix of
the order first (greedy NMS decides the boxes of a prefix as the whole does) and goes on past it
only if it keeps too few.

On the 12,000 proposals of ``scripts/bench_rpn.py`` (1,291 kept) a kept box meets ~150 candidates;
a comparison costs tens of nanoseconds in numpy, so this pass takes ~10 ms there (one core).
"""

from __future__ import annotations

import math

import numpy as np

CHUNK = 4096  # the largest chunk of boxes decided together (tests lower it)
FIRST = 8  # the first chunk ...
GROWTH = 1.7  # ... and each next one this much larger
PIECE = 4  # candidates are tested in pieces of this many consecutive slots of the index
PREFIX = 4  # with max_keep: the first pass covers PREFIX * max_keep boxes (at least MIN_PREFIX)
MIN_PREFIX = 1024
_SLACK = 1e-4  # the bounds hold for IoU > t (1 - _SLACK): float rounding stays inside them
_COMPACT = 0.8  # drop decided boxes from the index when fewer than this share are undecided
_MAX_CLASSES = 64  # size bins per axis, at most (wider bins for extreme size ranges)
_NEAR = np.array([-1, 0, 1])  # a size class and its neighbours
_LANES = np.arange(PIECE)[:, None]


class _Boxes:
    """The boxes (N, 4) of one pass, in visiting order: ``data`` (5, N) x1, y1, x2, y2 and the
    area (x2 - x1 + 1) * (y2 - y1 + 1) in their dtype; float64 sizes, centers, size classes."""

    def __init__(self, boxes: np.ndarray, thresh: float):
        self.data = np.empty((5, boxes.shape[0]), boxes.dtype)
        self.data[:4] = boxes.T
        x1, y1, x2, y2 = self.data[:4]
        np.multiply(x2 - x1 + 1, y2 - y1 + 1, out=self.data[4])
        b = self.data[:4].astype(np.float64)
        w, h = b[2] - b[0] + 1, b[3] - b[1] + 1
        self.cx, self.cy = b[0] + 0.5 * w, b[1] + 0.5 * h
        t = thresh * (1 - _SLACK)
        lw, lh = np.log(w), np.log(h)
        span = max(float(lw.max() - lw.min()), float(lh.max() - lh.min()))
        self.bin = max(-math.log(t) * (1 + 1e-6), span / (_MAX_CLASSES - 1))
        self.cw = np.floor(lw / self.bin).astype(np.int64)
        self.ch = np.floor(lh / self.bin).astype(np.int64)
        self.t = t
        self.reach = (1 - t) / (2 * (1 + t))  # centers closer than reach * (wa + wb)
        self.w, self.h = w, h

    def class_top(self, c: np.ndarray) -> np.ndarray:
        """Upper bounds of the sizes in size classes ``c``, with a margin."""
        return np.exp((c + 1) * self.bin) * (1 + 1e-6)

    def class_cell(self, c: np.ndarray) -> np.ndarray:
        """A cell of size class ``c``: the largest reach of a pair with a box of the class (the
        other box is at most top / t): a window spans at most 3 cells."""
        return self.reach * self.class_top(c) * (1 + 1 / self.t) + 1e-6


class _Index:
    """The undecided boxes of a ``_Boxes`` in cell order, with a CSR row of cell starts.

    Slot s holds the box at position ``pos[s]``; ``data`` (5, S + PIECE) and ``live`` (S + PIECE)
    are by slot (the padding is never live), so a piece of PIECE consecutive slots is a slice.
    """

    def __init__(self, boxes: _Boxes, positions: np.ndarray, slot_of: np.ndarray):
        self.boxes, self.slot_of = boxes, slot_of
        cw, ch = boxes.cw[positions], boxes.ch[positions]
        self.cw0, self.ch0 = int(cw.min()), int(ch.min())
        self.ncw, self.nch = int(cw.max()) - self.cw0 + 1, int(ch.max()) - self.ch0 + 1
        # per-class tables have a border of 2 rows (edge values: their classes hold no box)
        kw = self.cw0 + np.minimum(np.maximum(np.arange(-2, self.ncw + 2), 0), self.ncw - 1)
        kh = self.ch0 + np.minimum(np.maximum(np.arange(-2, self.nch + 2), 0), self.nch - 1)
        self.wtop, self.htop = boxes.class_top(kw), boxes.class_top(kh)
        cx, cy = boxes.cx[positions], boxes.cy[positions]
        self.x0, self.y0 = float(cx.min()), float(cy.min())
        xspan, yspan = float(cx.max()) - self.x0, float(cy.max()) - self.y0
        self.dx, self.dy = boxes.class_cell(kw), boxes.class_cell(kh) / 2
        limit = 8 * positions.size + 4096  # table size: coarser cells for far-spread small boxes
        while True:  # cells per class on each axis (floats until they are few enough)
            nx, ny = xspan // self.dx + 1, yspan // self.dy + 1
            total = float(nx[2:-2].sum()) * float(ny[2:-2].sum())  # without the border
            if total <= limit:
                break
            scale = math.sqrt(total / limit) * 1.01  # wider cells: a window still spans <= 3
            self.dx, self.dy = self.dx * scale, self.dy * scale
        self.nx, self.ny = nx.astype(np.int64), ny.astype(np.int64)
        nx, ny = self.nx[2:-2], self.ny[2:-2]
        self.base = np.zeros(nx.size * ny.size + 1, np.int64)  # first cell of each class
        np.cumsum((nx[:, None] * ny[None, :]).ravel(), out=self.base[1:])
        self.ncells = int(self.base[-1])
        kw, kh = cw - self.cw0, ch - self.ch0
        xc = ((cx - self.x0) // self.dx[kw + 2]).astype(np.int64)
        yc = ((cy - self.y0) // self.dy[kh + 2]).astype(np.int64)
        cell = self.base[kw * self.nch + kh] + xc * self.ny[kh + 2] + yc
        order = _radix_argsort(cell, self.ncells)
        self._fill(positions[order], cell[order])

    def _fill(self, pos: np.ndarray, cell: np.ndarray) -> None:
        self.pos, self.cell = pos, cell
        s = pos.size
        self.data = np.zeros((5, s + PIECE), self.boxes.data.dtype)
        np.take(self.boxes.data, pos, axis=1, out=self.data[:, :s])
        self.live = np.zeros(s + PIECE, bool)
        self.live[:s] = True
        self.starts = np.zeros(self.ncells + 1, np.int64)
        np.cumsum(np.bincount(cell, minlength=self.ncells), out=self.starts[1:])
        # which size classes hold boxes, with an empty border of 2
        self.occupied = np.zeros((self.ncw + 4, self.nch + 4), bool)
        per_class = np.diff(self.starts[self.base])
        self.occupied[2:-2, 2:-2] = (per_class > 0).reshape(self.ncw, self.nch)
        self.slot_of[pos] = np.arange(s)

    @property
    def size(self) -> int:
        return self.pos.size

    def decide(self, positions: np.ndarray) -> None:
        """Take boxes out of the candidates (kept or suppressed)."""
        self.live[self.slot_of[positions]] = False

    def compact(self) -> None:
        """Drop the decided slots (the cell order stays: no new sort)."""
        live = np.flatnonzero(self.live[:self.size])
        self._fill(self.pos[live], self.cell[live])

    def ranges(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The candidates of boxes at positions ``q`` (K,): (owner row in q, first slot, count)
        of the non-empty slot ranges holding every indexed box each could overlap."""
        b = self.boxes
        # (K, 3) the width classes around each box's own, and its x cells in each; rows of the
        # per-class tables are shifted by the table border of 2 (clipped: far classes are empty)
        kw = np.minimum(np.maximum(b.cw[q] - (self.cw0 - 2), 1), self.ncw + 2)[:, None] + _NEAR
        xlo, n_x = self._cells(b.w[q], b.cx[q] - self.x0, kw, self.wtop, self.dx, self.nx)
        kh = np.minimum(np.maximum(b.ch[q] - (self.ch0 - 2), 1), self.nch + 2)[:, None] + _NEAR
        ylo, n_y = self._cells(b.h[q], b.cy[q] - self.y0, kh, self.htop, self.dy, self.ny)
        ok = self.occupied[kw[:, :, None], kh[:, None, :]]  # (K, 3, 3) classes with boxes ...
        ok &= (n_x > 0)[:, :, None] & (n_y > 0)[:, None, :]  # ... and cells in the window
        who, i, j = np.nonzero(ok)
        kw, kh = kw[who, i], kh[who, j]
        n_x, ny, span = n_x[who, i], self.ny[kh], n_y[who, j]
        first = self.base[(kw - 2) * self.nch + (kh - 2)] + xlo[who, i] * ny + ylo[who, j]
        row = np.repeat(np.arange(who.size), n_x)  # one per (box, class, x cell)
        k = np.arange(row.size) - (np.cumsum(n_x) - n_x)[row]
        cell = first[row] + k * ny[row]  # its first y cell; the range runs over span[row] cells
        lo = self.starts[cell]
        count = self.starts[cell + span[row]] - lo
        some = count > 0
        return who[row[some]], lo[some], count[some]

    def _cells(self, size, center, k, top, cell, n_cells):
        """One axis of the windows: (first cell, number of cells) (K, 3) int64 of boxes of
        ``size`` and ``center`` (K,) in the classes ``k`` (K, 3) (table rows)."""
        size, center = size[:, None], center[:, None]
        b = self.boxes
        reach = b.reach * (size + np.minimum(top[k], size / b.t)) * (1 + 1e-6) + 1e-6
        c = cell[k]
        lo = np.maximum((center - reach) // c, 0)
        hi = np.minimum((center + reach) // c, n_cells[k] - 1)
        return lo.astype(np.int64), (hi - lo + 1).astype(np.int64)

    def suppressed(self, q: np.ndarray, owner: np.ndarray, start: np.ndarray, count: np.ndarray,
                   thr, suppress_equal: bool) -> tuple[np.ndarray, np.ndarray]:
        """The live candidates that boxes ``q`` overlap by IoU > thr (>= with suppress_equal), in
        ``bbox_overlaps``' arithmetic: (row in q, slot) pairs."""
        pieces = (count + (PIECE - 1)) // PIECE
        p = np.repeat(np.arange(pieces.size), pieces)
        off = (np.arange(p.size) - (np.cumsum(pieces) - pieces)[p]) * PIECE
        slot0, left, own = start[p] + off, count[p] - off, owner[p]
        qd = self.boxes.data[:, q[own]]  # (5, pieces): broadcast along the PIECE lanes
        d = self.data
        idx = slot0 + _LANES  # (PIECE, pieces)
        iw = np.minimum(d[2][idx], qd[2])
        iw -= np.maximum(d[0][idx], qd[0])
        iw += 1
        np.maximum(iw, 0, out=iw)
        ih = np.minimum(d[3][idx], qd[3])
        ih -= np.maximum(d[1][idx], qd[1])
        ih += 1
        np.maximum(ih, 0, out=ih)
        iw *= ih  # the intersection
        union = d[4][idx]
        union += qd[4]
        union -= iw
        iw /= union  # the IoU (0 where they do not intersect: areas are positive)
        over = iw >= thr if suppress_equal else iw > thr
        over &= self.live[idx]
        over &= _LANES < left
        lane, j = np.nonzero(over)
        return own[j], slot0[j] + lane


def window_nms(boxes: np.ndarray, thresh: float, suppress_equal: bool = False,
               max_keep: int | None = None) -> tuple[np.ndarray, int]:
    """Greedy NMS of ``boxes`` (N, 4) float32/float64 numpy, already in visiting order (box 0
    first), 0.5 <= thresh < 1, finite boxes of positive +1 widths and heights.

    Returns (kept positions (K,) int64 in visiting order, visited): the first ``visited``
    positions are decided (all N unless it stopped after ``max_keep`` kept boxes).
    """
    n = boxes.shape[0]
    m = n if max_keep is None else max(PREFIX * max_keep, MIN_PREFIX)
    if 2 * m > n:
        return _window_pass(boxes, thresh, suppress_equal, max_keep)
    keep, visited = _window_pass(boxes[:m], thresh, suppress_equal, max_keep)
    while keep.size < max_keep and m < n:  # the prefix kept too few: on with the next block
        end = min(n, PREFIX * m)
        rest = m + np.flatnonzero(~_overlapped(boxes[:end], keep, m, thresh, suppress_equal))
        more, seen = _window_pass(boxes[rest], thresh, suppress_equal, max_keep - keep.size)
        keep = np.concatenate((keep, rest[more]))
        visited = end if seen == rest.size else int(rest[seen - 1]) + 1
        m = end
    return keep, visited


def _overlapped(boxes: np.ndarray, keep: np.ndarray, start: int, thresh: float,
                suppress_equal: bool) -> np.ndarray:
    """(N - start,) bool: which of ``boxes[start:]`` a box at positions ``keep`` overlaps by
    IoU > thresh (>= with suppress_equal)."""
    n = boxes.shape[0]
    b = _Boxes(boxes, thresh)
    hit = np.zeros(n - start, bool)
    if keep.size:
        index = _Index(b, keep, np.empty(n, np.int64))
        q = np.arange(start, n)
        owner, first, count = index.ranges(q)
        row, _ = index.suppressed(q, owner, first, count, b.data.dtype.type(thresh), suppress_equal)
        hit[row] = True
    return hit


def _window_pass(boxes: np.ndarray, thresh: float, suppress_equal: bool,
                 max_keep: int | None) -> tuple[np.ndarray, int]:
    n = boxes.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), 0
    b = _Boxes(boxes, thresh)
    thr = b.data.dtype.type(thresh)  # compared in the boxes' dtype, as the kernel's float
    index = _Index(b, np.arange(n), np.empty(n, np.int64))
    undecided = np.ones(n, bool)
    kept, n_kept, pos, size = [], 0, 0, float(FIRST)
    while True:
        chunk = np.flatnonzero(undecided[pos:])[:int(size)] + pos
        end = int(chunk[-1])
        size = min(size * GROWTH, CHUNK)
        # the chunk's pairs, among themselves and with the later undecided boxes
        owner, start, count = index.ranges(chunk)
        src, slot = index.suppressed(chunk, owner, start, count, thr, suppress_equal)
        dst = index.pos[slot]
        later = dst > chunk[src]
        src, dst = src[later], dst[later]
        inside = dst <= end
        local = np.empty(end + 1 - pos, np.int64)  # position -> row in the chunk
        local[chunk - pos] = np.arange(chunk.size)
        keep = _fixed_point(src[inside], local[dst[inside] - pos], chunk.size)
        kept.append(chunk[keep])
        n_kept += kept[-1].size
        pos = end + 1
        if max_keep is not None and n_kept >= max_keep:
            return np.concatenate(kept), pos
        out = ~inside
        hit = dst[out][keep[src[out]]]  # later boxes a kept one suppresses
        undecided[chunk] = False
        undecided[hit] = False
        index.decide(chunk)
        index.decide(hit)
        live = int(np.count_nonzero(index.live))
        if not live:
            return np.concatenate(kept), n  # every box decided
        if live < _COMPACT * index.size:
            index.compact()


def _fixed_point(src: np.ndarray, dst: np.ndarray, k: int) -> np.ndarray:
    """(K,) bool kept: greedy NMS over edges ``src`` -> ``dst`` (src before dst would suppress
    it), as the fixed point of ``kept[b] = no edge (a, b) with kept[a]``. From "kept = has no
    edge in", round r decides every box whose longest chain of edges in is shorter than r."""
    kept = np.bincount(dst, minlength=k) == 0
    while True:
        new = np.bincount(dst, weights=kept[src], minlength=k) == 0
        if np.array_equal(new, kept):
            return kept
        kept = new


def _radix_argsort(keys: np.ndarray, bound: int) -> np.ndarray:
    """Stable argsort of non-negative int ``keys`` below ``bound``, in 16-bit passes (numpy's
    stable sort of 16-bit keys is a radix sort: far faster than sorting int64)."""
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    shift = 16
    while bound >> shift:
        digit = ((keys[order] >> shift) & 0xFFFF).astype(np.uint16)
        order = order[np.argsort(digit, kind="stable")]
        shift += 16
    return order
