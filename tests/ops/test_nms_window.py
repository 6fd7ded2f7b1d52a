"""ops.nms_window (greedy_nms's windowed CPU pass) against the plain loop NMS: RPN-like proposals,
nested boxes (where its bound is tight), thresholds, >=, early stops, the fallbacks."""

import numpy as np
import pytest
import torch

import readonly_ohem.ops.nms as nms_mod
import readonly_ohem.ops.nms_window as window_mod
from readonly_ohem.ops.nms import descending_order, greedy_nms, nms

from test_nms import clustered_boxes, loop_nms


pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops


@pytest.fixture
def windowed(monkeypatch):
    """Counts the windowed passes; from 64 boxes on, with 32-box chunks (many chunks, rebuilds)."""
    calls = []
    real = nms_mod.window_nms

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(nms_mod, "window_nms", counting)
    monkeypatch.setattr(nms_mod, "_WINDOW_MIN_BOXES", 64)
    monkeypatch.setattr(window_mod, "CHUNK", 32)
    return calls


def rpn_like(rng, n_cells=(12, 18), stride=16, spread=0.15):
    """Decoded anchors of 9 shapes over a map, clipped to the image, as the proposal layer's."""
    h, w = n_cells
    ws = np.array([184, 368, 736, 128, 256, 512, 88, 176, 352], float) / 4
    hs = np.array([96, 192, 384, 128, 256, 512, 176, 352, 704], float) / 4
    cy, cx = np.meshgrid(np.arange(h) * stride + 8, np.arange(w) * stride + 8, indexing="ij")
    cx = (cx.reshape(-1, 1) + rng.normal(0, spread, (h * w, 9)) * ws).reshape(-1)
    cy = (cy.reshape(-1, 1) + rng.normal(0, spread, (h * w, 9)) * hs).reshape(-1)
    bw = np.tile(ws, h * w) * np.exp(rng.normal(0, spread, h * w * 9))
    bh = np.tile(hs, h * w) * np.exp(rng.normal(0, spread, h * w * 9))
    boxes = np.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), 1)
    boxes = np.clip(boxes, 0, [w * stride - 1, h * stride - 1] * 2).astype(np.float32)
    keep = (boxes[:, 2] - boxes[:, 0] + 1 >= 4) & (boxes[:, 3] - boxes[:, 1] + 1 >= 4)
    return boxes[keep]


def check(boxes, scores, thresh, suppress_equal=False):
    dets = np.concatenate((boxes, scores[:, None]), 1)
    want = loop_nms(dets, thresh, suppress_equal)
    got = nms(torch.from_numpy(boxes), torch.from_numpy(scores), thresh, suppress_equal)
    assert got.tolist() == want
    assert len(want) < len(boxes)  # NMS really suppressed
    return want


@pytest.mark.parametrize("thresh", [0.5, 0.7, 0.85])
@pytest.mark.parametrize("seed", [0, 1])
def test_rpn_like_proposals_equal_the_loop(windowed, thresh, seed):
    rng = np.random.default_rng(seed)
    boxes = rpn_like(rng)
    scores = rng.random(len(boxes)).astype(np.float32)
    check(boxes, scores, thresh)
    assert windowed


def test_clustered_float64_and_suppress_equal(windowed):
    rng = np.random.default_rng(2)
    boxes = clustered_boxes(rng, 700, n_clusters=5, scale=0.937, dtype=np.float64) - 300
    scores = rng.random(len(boxes))
    check(boxes, scores, 0.6)
    # pairs [x, y, x + 9, y + 9], [x, y, x + 9, y + 4]: IoU 50 / 100 = 0.5 exactly; >= suppresses
    # the second of each pair, > does not
    xy = rng.integers(0, 400, (300, 2)).astype(np.float32)
    boxes = np.concatenate((np.concatenate((xy, xy + 9), 1), np.concatenate((xy, xy + [9, 4]), 1)))
    scores = rng.random(len(boxes)).astype(np.float32)
    strict = check(boxes, scores, 0.5)
    assert len(check(boxes, scores, 0.5, suppress_equal=True)) < len(strict)
    assert len(windowed) == 3


def test_nested_and_identical_boxes(windowed):
    """Boxes inside one another with one side shared reach the bound |x1a - x1b| < (1 - t) wa;
    identical boxes (IoU 1) and 1-pixel boxes too."""
    rng = np.random.default_rng(3)
    n = 300
    outer = rng.uniform(20, 200, n)
    frac = rng.uniform(0.55, 1.0, n)  # inner width / outer width
    x1 = rng.uniform(0, 50, n)
    inner_x1 = x1 + rng.uniform(0, 1, n) * (1 - frac) * outer
    y1 = rng.uniform(0, 50, n)
    h = rng.uniform(10, 100, n)
    a = np.stack((x1, y1, x1 + outer - 1, y1 + h - 1), 1)
    b = np.stack((inner_x1, y1, inner_x1 + frac * outer - 1, y1 + h - 1), 1)
    dup = a[:40]
    tiny = np.stack((x1[:30], y1[:30], x1[:30], y1[:30]), 1)  # 1 x 1 pixel
    boxes = np.concatenate((a, b, dup, tiny)).astype(np.float32)
    scores = rng.random(len(boxes)).astype(np.float32)
    scores[-70:-30] = scores[:40]  # duplicates with equal scores: the higher index is visited first
    for thresh in (0.55, 0.7, 0.9):
        check(boxes, scores, thresh)


@pytest.mark.parametrize("max_keep", [1, 31, 32, 100, 10000])
def test_early_stop_gives_the_first_survivors(windowed, monkeypatch, max_keep):
    monkeypatch.setattr(nms_mod, "_WINDOW_MIN_KEEP", 1)
    rng = np.random.default_rng(4)
    boxes = torch.from_numpy(rpn_like(rng))
    scores = torch.from_numpy(rng.random(len(boxes)).astype(np.float32))
    full, visited_all = greedy_nms(boxes, 0.7, scores=scores)
    assert visited_all.numel() == len(boxes)
    part, visited = greedy_nms(boxes, 0.7, scores=scores, max_keep=max_keep)
    assert part[:max_keep].tolist() == full[:max_keep].tolist()
    order = descending_order(scores)
    assert visited.tolist() == order[:visited.numel()].tolist()
    if max_keep < len(full):
        assert visited.numel() < len(boxes)  # it stopped early
    assert windowed


def test_fallbacks_to_the_dense_pass(windowed):
    rng = np.random.default_rng(5)
    boxes = rpn_like(rng)
    scores = rng.random(len(boxes)).astype(np.float32)
    check(boxes, scores, 0.3)  # a low threshold: dense
    flipped = boxes.copy()
    flipped[0] = [50, 50, 40, 40]  # a box of negative width: dense
    check(flipped, scores, 0.7)
    greedy_nms(torch.from_numpy(boxes), 0.7, scores=torch.from_numpy(scores), max_keep=100)
    assert not windowed  # nor with a small max_keep


def near_threshold_pairs(rng, n_pairs, thresh):
    """Pairs of boxes far apart from the other pairs, each with an IoU within 0.02 of
    ``thresh``: wide and narrow, shifted along x, y or both, nested with a shared side."""
    pairs = []
    while len(pairs) < n_pairs:
        w, h = rng.uniform(1, 300, 2)
        a = np.array([0.0, 0.0, w - 1, h - 1])
        r = rng.uniform(thresh, 1.0, 2) if rng.random() < 0.5 else np.ones(2)
        wb, hb = w * r[0], h * r[1]
        dx, dy = rng.uniform(-1, 1, 2) * (1 - thresh) * np.array([w, h]) * rng.integers(0, 2, 2)
        b = np.array([dx, dy, dx + wb - 1, dy + hb - 1])
        iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
        ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
        if iw <= 0 or ih <= 0:
            continue
        iou = iw * ih / (w * h + wb * hb - iw * ih)
        if abs(iou - thresh) < 0.02:
            pairs.append((a, b))
    k = np.arange(n_pairs)
    offset = np.stack((k % 40, k // 40, k % 40, k // 40), 1) * 1000.0
    boxes = np.concatenate([np.stack(p) + off for p, off in zip(pairs, offset)])
    return boxes.astype(np.float32)


@pytest.mark.parametrize("thresh,suppress_equal", [(0.5, True), (0.7, False), (0.95, False)])
def test_pairs_at_the_threshold_equal_the_loop(thresh, suppress_equal):
    """The bound's edge: pairs whose IoU is within 0.02 of the threshold (about half of them
    above it) are all found; called directly on numpy boxes in visiting order."""
    rng = np.random.default_rng(int(thresh * 100))
    boxes = near_threshold_pairs(rng, 600, thresh)
    scores = rng.random(len(boxes)).astype(np.float32)
    order = np.argsort(scores, kind="stable")[::-1]
    want = loop_nms(np.concatenate((boxes, scores[:, None]), 1), thresh, suppress_equal)
    keep, visited = window_mod.window_nms(boxes[order], thresh, suppress_equal)
    assert order[keep].tolist() == want and visited == len(boxes)
    assert 0.3 * 600 < len(boxes) - len(want) < 0.7 * 600  # both sides of the threshold


def test_extreme_sizes_and_far_spread_boxes():
    """Sizes from 1 pixel to 1e5 (at t = 0.98: wider size bins than log(1/t)) and small boxes
    spread over 1e7 pixels (coarser cells than their reach): the same result."""
    rng = np.random.default_rng(12)
    size = np.exp(rng.uniform(0, np.log(1e5), (1500, 2)))
    xy = rng.uniform(-1e5, 1e5, (1500, 2))
    big = np.concatenate((xy, xy + size - 1), 1)
    xy = rng.uniform(-5e6, 5e6, (1500, 2))
    small = np.concatenate((xy, xy + rng.uniform(1, 8, (1500, 2))), 1)
    for boxes in (big, small):
        # each with a near twin: 10% of its size off, or 0.3% (IoU > 0.98)
        spread = np.where(np.arange(len(boxes)) % 2, 0.1, 0.003)[:, None]
        size = (boxes[:, 2:] - boxes[:, :2] + 1).repeat(2, 1)
        noise = rng.normal(0, 1, boxes.shape) * spread * size
        boxes = np.concatenate((boxes, boxes + noise))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
        for dtype, thresh in ((np.float64, 0.6), (np.float32, 0.6), (np.float32, 0.98)):
            b = boxes.astype(dtype)
            scores = rng.random(len(b)).astype(dtype)
            order = np.argsort(scores, kind="stable")[::-1]
            want = loop_nms(np.concatenate((b, scores[:, None]), 1), thresh)
            keep, _ = window_mod.window_nms(b[order], thresh)
            assert order[keep].tolist() == want
            assert len(want) < (0.9 if thresh < 0.9 else 0.99) * len(b)


def test_prefix_pass_goes_on_when_it_keeps_too_few(monkeypatch):
    """With max_keep the pass runs on a prefix; when that keeps too few, the boxes after it are
    first tested against the kept ones, then decided in a pass of their own."""
    monkeypatch.setattr(window_mod, "MIN_PREFIX", 8)
    rng = np.random.default_rng(13)
    boxes = clustered_boxes(rng, 3000, n_clusters=4)  # few survivors per box
    scores = rng.random(len(boxes)).astype(np.float32)
    order = np.argsort(scores, kind="stable")[::-1]
    want = loop_nms(np.concatenate((boxes, scores[:, None]), 1), 0.7)
    for max_keep in (3, 20, len(want) - 1, len(want), len(want) + 5):
        keep, visited = window_mod.window_nms(boxes[order], 0.7, max_keep=max_keep)
        assert order[keep[:max_keep]].tolist() == want[:max_keep]
        # the first `visited` boxes are decided: as many kept there as in the full result
        rank = np.empty(len(boxes), int)
        rank[order] = np.arange(len(boxes))
        assert len(keep) == sum(rank[i] < visited for i in want)
        if max_keep < len(want):
            assert visited < len(boxes)  # it stopped early
        if max_keep > len(want):
            assert visited == len(boxes) and len(keep) == len(want)
