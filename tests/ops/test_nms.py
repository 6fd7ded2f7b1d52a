"""ops.nms against a plain loop (py-faster-rcnn's pure-numpy NMS with a stable argsort)."""

import numpy as np
import pytest
import torch

import readonly_ohem.ops.nms as nms_mod
from readonly_ohem.ops.boxes import bbox_overlaps, bbox_overlaps_paired
from readonly_ohem.ops.nms import batched_nms, descending_order, greedy_nms, nms, top_descending


def loop_nms(dets, thresh, suppress_equal=False):
    """py_cpu_nms: +1 areas, in the dets' dtype; visit by argsort(kind="stable")[::-1]."""
    x1, y1, x2, y2, scores = (dets[:, i] for i in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores, kind="stable")[::-1]
    thr = dets.dtype.type(thresh)
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = (w * h).astype(dets.dtype)
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        inds = np.where(ovr < thr if suppress_equal else ovr <= thr)[0]
        order = order[inds + 1]
    return keep


def clustered_boxes(rng, n, n_clusters=6, scale=1.0, dtype=np.float32):
    ctr = rng.uniform(50, 500, size=(n_clusters, 2))
    size = rng.uniform(20, 200, size=(n_clusters, 2))
    src = rng.integers(0, n_clusters, size=n)
    c = ctr[src] + rng.normal(0, 0.15, size=(n, 2)) * size[src]
    s = size[src] * np.exp(rng.normal(0, 0.15, size=(n, 2)))
    boxes = np.concatenate((c - s / 2, c + s / 2), axis=1) * scale
    return boxes.astype(dtype)


@pytest.mark.parametrize("n,thresh,seed", [(1, 0.7, 0), (7, 0.5, 1), (300, 0.7, 2),
                                           (1200, 0.3, 3), (2500, 0.7, 4)])
def test_nms_matches_loop(n, thresh, seed):
    rng = np.random.default_rng(seed)
    boxes = clustered_boxes(rng, n, scale=0.937)
    scores = rng.random(n).astype(np.float32)
    want = loop_nms(np.concatenate((boxes, scores[:, None]), 1), thresh)
    got = nms(torch.from_numpy(boxes), torch.from_numpy(scores), thresh)
    assert got.tolist() == want
    assert len(want) < n or n < 10  # NMS really suppressed something


def test_nms_float64_and_suppress_equal():
    # two 10x10 boxes overlapping by 5 columns: IoU = 50 / 150 = 1/3 exactly representable? no:
    # use IoU = 0.5 exactly: boxes [0,0,9,9] and [0,0,9,4] (area 100 and 50, inter 50)
    boxes = torch.tensor([[0, 0, 9, 9], [0, 0, 9, 4], [20, 20, 29, 29]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    assert nms(boxes, scores, 0.5).tolist() == [0, 1, 2]  # IoU 0.5 is not > 0.5
    assert nms(boxes, scores, 0.5, suppress_equal=True).tolist() == [0, 2]
    assert nms(boxes, scores, 0.49).tolist() == [0, 2]
    dets = np.concatenate((boxes.numpy(), scores.numpy()[:, None]), 1)
    assert loop_nms(dets, 0.5, suppress_equal=True) == [0, 2]


def test_nms_ties_visit_higher_index_first():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]],
                         dtype=torch.float32)
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5])
    # order by argsort(stable)[::-1]: 3, 2, 1, 0 -> 2 suppresses 1 and 0
    assert nms(boxes, scores, 0.7).tolist() == [3, 2]
    dets = np.concatenate((boxes.numpy(), scores.numpy()[:, None]), 1)
    assert loop_nms(dets, 0.7) == [3, 2]


def test_nms_empty_and_degenerate():
    assert nms(torch.zeros((0, 4)), torch.zeros(0), 0.7).tolist() == []
    # zero-area boxes (x2 = x1 - 1): IoU 0/0 counts as 0, as the GPU kernel (NaN > t is false)
    boxes = torch.tensor([[5, 5, 4, 4], [5, 5, 4, 4]], dtype=torch.float32)
    assert nms(boxes, torch.tensor([0.2, 0.1]), 0.7).tolist() == [0, 1]


def test_batched_nms_matches_per_group_loop():
    rng = np.random.default_rng(5)
    n = 900
    boxes = clustered_boxes(rng, n)
    scores = rng.random(n).astype(np.float32)
    groups = rng.integers(0, 5, size=n)
    want = []
    for g in np.unique(groups):
        sel = np.nonzero(groups == g)[0]
        want += sel[loop_nms(np.concatenate((boxes[sel], scores[sel, None]), 1), 0.6)].tolist()
    got = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                      torch.from_numpy(groups), 0.6)
    assert sorted(got.tolist()) == sorted(want)
    assert (np.diff(scores[got.numpy()]) <= 0).all()  # by descending score


@pytest.mark.parametrize("max_keep", [1, 10, 64, 200, 5000])
def test_early_stop_gives_the_first_survivors(max_keep):
    rng = np.random.default_rng(6)
    n = 1500
    boxes = torch.from_numpy(clustered_boxes(rng, n))
    scores = torch.from_numpy(rng.random(n).astype(np.float32))
    groups = torch.from_numpy(rng.integers(0, 3, size=n))
    full, visited_all = greedy_nms(boxes, 0.7, scores=scores, groups=groups)
    assert visited_all.numel() == n
    part, visited = greedy_nms(boxes, 0.7, scores=scores, groups=groups, max_keep=max_keep)
    in_order = full[torch.argsort(torch.argsort(descending_order(scores))[full])]
    assert part[:max_keep].tolist() == in_order[:max_keep].tolist()
    assert visited.tolist() == descending_order(scores)[:visited.numel()].tolist()


def test_early_stop_goes_on_through_tie_scores(monkeypatch):
    # chunks of 2 boxes; four far-apart boxes, boxes 1 and 2 with equal tie scores
    monkeypatch.setattr(nms_mod, "_MIN_CHUNK", 1)
    monkeypatch.setattr(nms_mod, "_FIRST_FACTOR", 1)
    boxes = torch.tensor([[0, 0, 5, 5], [10, 10, 15, 15], [20, 20, 25, 25], [30, 30, 35, 35]],
                         dtype=torch.float32)
    order = torch.tensor([0, 1, 2, 3])
    keep, visited = greedy_nms(boxes, 0.7, order=order, max_keep=2)
    assert keep.tolist() == [0, 1] and visited.tolist() == [0, 1]
    tie = torch.tensor([3.0, 2.0, 2.0, 1.0])
    keep, visited = greedy_nms(boxes, 0.7, order=order, max_keep=2, tie_scores=tie)
    assert keep.tolist()[:3] == [0, 1, 2] and visited.numel() >= 3


def test_vectorized_steps_path_equals_bit_path(monkeypatch):
    rng = np.random.default_rng(7)
    n = 800
    boxes = torch.from_numpy(clustered_boxes(rng, n, n_clusters=3))
    scores = torch.from_numpy(rng.random(n).astype(np.float32))
    groups = torch.from_numpy(rng.integers(0, 2, size=n))
    want = batched_nms(boxes, scores, groups, 0.5)
    monkeypatch.setattr(nms_mod, "_FORCE_STEPS", True)
    assert batched_nms(boxes, scores, groups, 0.5).tolist() == want.tolist()
    assert nms(boxes, scores, 0.5).tolist() == loop_nms(
        np.concatenate((boxes.numpy(), scores.numpy()[:, None]), 1), 0.5)


def test_long_suppression_chain():
    # boxes shifted by 1 px: each overlaps its neighbours > 0.7, a chain through the whole set
    n = 300
    x = torch.arange(n, dtype=torch.float32)
    boxes = torch.stack((x, torch.zeros(n), x + 9, torch.full((n,), 9.0)), 1)
    scores = torch.linspace(1, 0, n)
    want = loop_nms(np.concatenate((boxes.numpy(), scores.numpy()[:, None]), 1), 0.7)
    assert nms(boxes, scores, 0.7).tolist() == want


def test_descending_order_and_top_descending():
    x = torch.tensor([1.0, 3.0, 2.0, 3.0, 1.0, 3.0])
    assert descending_order(x).tolist() == np.argsort(x.numpy(), kind="stable")[::-1].tolist()
    assert descending_order(x).tolist() == [5, 3, 1, 2, 4, 0]
    rng = np.random.default_rng(8)
    y = torch.from_numpy(rng.integers(0, 50, size=2000).astype(np.float64))  # many ties
    for k in (0, 1, 7, 100, 499, 2000):
        assert top_descending(y, k).tolist() == descending_order(y)[:k].tolist()


# -- prefix_nms: greedy NMS of boxes given in visiting order (OHEM's candidates) ----------------
def per_group_loop(boxes, groups, thresh, suppress_equal=False):
    """Plain greedy loop in index order (box 0 first), a box only suppressing its own group."""
    n = boxes.shape[0]
    scores = np.linspace(1.0, 0.0, n, dtype=np.float64)  # visiting order = index order
    kept = np.zeros(n, dtype=bool)
    for g in np.unique(groups):
        sel = np.nonzero(groups == g)[0]
        dets = np.concatenate((boxes[sel], scores[sel, None].astype(boxes.dtype)), 1)
        kept[sel[loop_nms(dets, thresh, suppress_equal)]] = True
    return kept


@pytest.mark.parametrize("n,n_groups,thresh,seed", [(1, 1, 0.7, 0), (40, 1, 0.5, 1),
                                                    (256, 4, 0.7, 2), (300, 9, 0.3, 3)])
def test_prefix_nms_matches_per_group_loop(n, n_groups, thresh, seed):
    rng = np.random.default_rng(seed)
    boxes = clustered_boxes(rng, n, n_clusters=5, scale=0.96)
    groups = rng.integers(0, n_groups, size=n) * 21 + 3
    for suppress_equal in (False, True):
        want = per_group_loop(boxes, groups, thresh, suppress_equal)
        got = nms_mod.prefix_nms(torch.from_numpy(boxes), torch.from_numpy(groups), thresh,
                                 suppress_equal=suppress_equal)
        assert got.tolist() == want.tolist()
    assert n < 10 or not want.all()
    # a prefix is decided alone exactly as inside the whole
    m = n // 2
    part = nms_mod.prefix_nms(torch.from_numpy(boxes[:m]), torch.from_numpy(groups[:m]), thresh)
    assert part.tolist() == want[:m].tolist()


def test_prefix_nms_long_chain_and_pair_limit():
    n = 200
    x = torch.arange(n, dtype=torch.float32)
    boxes = torch.stack((x, torch.zeros(n), x + 9, torch.full((n,), 9.0)), 1)  # chain of overlaps
    groups = torch.zeros(n, dtype=torch.long)
    want = per_group_loop(boxes.numpy(), groups.numpy(), 0.7)
    assert nms_mod.prefix_nms(boxes, groups, 0.7).tolist() == want.tolist()
    assert nms_mod.prefix_nms(boxes, groups, 0.7, max_pairs=n * (n - 1) // 2 - 1) is None
    assert nms_mod.prefix_nms(boxes[:0], groups[:0], 0.7).tolist() == []


def test_bbox_overlaps_paired_is_bbox_overlaps_bit_for_bit():
    rng = np.random.default_rng(9)
    boxes = clustered_boxes(rng, 400, scale=0.937)
    boxes[:20, 2:] = boxes[:20, :2] - 1  # zero-area boxes (w = 0)
    boxes[20:30, 2] = boxes[20:30, 0] - 3  # negative width
    boxes = torch.from_numpy(boxes)
    first = torch.from_numpy(rng.integers(0, 400, size=3000))
    second = torch.from_numpy(rng.integers(0, 400, size=3000))
    full = bbox_overlaps(boxes, boxes)
    want = full[first, second]
    got = bbox_overlaps_paired(boxes, first, second)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # same bits
    for thresh, eq in ((0.7, False), (0.5, True), (0.0, False)):
        over = nms_mod._paired_over(boxes, first, second, thresh, eq)
        assert torch.equal(over, want >= thresh if eq else want > thresh)


def test_prefix_nms_matrix_rounds_equal_bincount_rounds(monkeypatch):
    rng = np.random.default_rng(10)
    boxes = torch.from_numpy(clustered_boxes(rng, 300, n_clusters=4))
    groups = torch.from_numpy(rng.integers(0, 3, size=300))
    want = nms_mod.prefix_nms(boxes, groups, 0.6)
    monkeypatch.setattr(nms_mod, "_FORCE_STEPS", True)  # the any-device (CUDA) rounds
    assert nms_mod.prefix_nms(boxes, groups, 0.6).tolist() == want.tolist()
    assert want.tolist() == per_group_loop(boxes.numpy(), groups.numpy(), 0.6).tolist()


def test_descending_order_of_numpy_arrays_is_numpys_stable_argsort_reversed():
    """numpy scores: 16-bit radix passes over the floats' bits, in numpy's own order (ties by
    index, -0.0 == 0.0, NaN last whatever its payload and sign), reversed."""
    rng = np.random.default_rng(11)
    for dtype in (np.float32, np.float64):
        x = rng.normal(0, 3, 3000).astype(dtype)
        x[rng.integers(0, 3000, 600)] = np.round(x[:600])  # many ties
        x[:40] = [0.0, -0.0] * 20
        x[40:50] = [np.inf, -np.inf, np.nan, -np.nan, 1e-40, -1e-40, 7.0, np.nan, -0.0, 0.0]
        bits = (np.array([0x7FC00123], np.uint32) if dtype == np.float32
                else np.array([0x7FF8000000000123], np.uint64))
        x[50] = bits.view(dtype)[0]  # a NaN with another payload
        got = descending_order(x)
        assert isinstance(got, np.ndarray)
        assert got.tolist() == np.argsort(x, kind="stable")[::-1].tolist()
        assert descending_order(torch.from_numpy(x)).tolist() == got.tolist()
    ints = rng.integers(0, 9, 100)
    assert descending_order(ints).tolist() == np.argsort(ints, kind="stable")[::-1].tolist()
    assert descending_order(np.zeros(0, np.float32)).tolist() == []
