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
