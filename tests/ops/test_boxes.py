"""The one IoU / bbox transform / clip, against plain loops and hand-worked numbers."""

import numpy as np
import torch

from readonly_ohem.ops.boxes import (bbox_overlaps, bbox_transform, bbox_transform_inv,
                                     box_areas, clip_boxes)

from original_code import np_bbox_transform_inv, np_clip_boxes


def _iou_loop(a, b):
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = min(p[2], q[2]) - max(p[0], q[0]) + 1
            ih = min(p[3], q[3]) - max(p[1], q[1]) + 1
            if iw > 0 and ih > 0:
                ua = (p[2] - p[0] + 1) * (p[3] - p[1] + 1) + (q[2] - q[0] + 1) * (q[3] - q[1] + 1) - iw * ih
                out[i, j] = iw * ih / ua
    return out


def _random_boxes(rng, n):
    xy = rng.uniform(0, 100, size=(n, 2))
    wh = rng.uniform(0, 60, size=(n, 2))
    return np.hstack([xy, xy + wh])


def test_iou_hand_worked():
    a = np.array([[0, 0, 9, 9]], dtype=np.float64)  # 10x10 with the +1 convention
    b = np.array([[5, 0, 14, 9], [10, 10, 20, 20], [0, 0, 9, 9]], dtype=np.float64)
    np.testing.assert_allclose(bbox_overlaps(a, b), [[50 / 150, 0.0, 1.0]])
    assert box_areas(a)[0] == 100


def test_iou_matches_loop_numpy_and_torch():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 30), _random_boxes(rng, 17)
    ref = _iou_loop(a, b)
    np.testing.assert_allclose(bbox_overlaps(a, b), ref, rtol=1e-12)
    got = bbox_overlaps(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_transform_round_trip_and_formula():
    ex = np.array([[10.0, 20.0, 29.0, 59.0]])
    gt = np.array([[12.0, 18.0, 35.0, 61.0]])
    t = bbox_transform(ex, gt)
    # w = 20, h = 40, cx = 20, cy = 40; gw = 24, gh = 44, gcx = 24, gcy = 40
    np.testing.assert_allclose(t, [[4 / 20, 0.0, np.log(24 / 20), np.log(44 / 40)]])
    pred = bbox_transform_inv(ex, t)
    # the test-time inverse has no -1 on x2: x2' = ctr + 0.5 w' = gt x2 + 1 - 0.5 ... exactly:
    np.testing.assert_allclose(pred, [[12.0, 18.0, 36.0, 62.0]])


def test_transform_inv_per_class_columns():
    boxes = np.array([[0.0, 0.0, 9.0, 9.0]])
    deltas = np.array([[0, 0, 0, 0, 0.1, -0.1, np.log(2), 0]])
    out = bbox_transform_inv(boxes, deltas)
    np.testing.assert_allclose(out[0, :4], [0, 0, 10, 10])
    np.testing.assert_allclose(out[0, 4:], [6 - 10, 4 - 5, 6 + 10, 4 + 5])
    assert bbox_transform_inv(np.zeros((0, 4)), np.zeros((0, 8))).shape == (0, 8)


def test_clip():
    b = torch.tensor([[-5.0, -1.0, 120.0, 50.0, 3.0, 4.0, 99.5, 200.0]])
    out = clip_boxes(b, (60, 100))
    assert out.tolist() == [[0.0, 0.0, 99.0, 50.0, 3.0, 4.0, 99.0, 59.0]]


def test_numpy_transform_inv_and_clip_are_the_originals_bit_for_bit():
    """numpy in: numpy's arithmetic (its float32 exp), the original's ``bbox_transform_inv`` and
    ``clip_boxes`` to the bit; torch in: the same to float32 rounding of exp."""
    rng = np.random.default_rng(1)
    boxes = _random_boxes(rng, 500) - 20  # float64, as the anchors
    for dtype in (np.float32, np.float64):
        deltas = (rng.standard_normal((500, 8)) * 0.5).astype(dtype)
        got = bbox_transform_inv(boxes, deltas)
        want = np_bbox_transform_inv(boxes, deltas)
        assert got.dtype == dtype and np.array_equal(got, want)
        im_shape = np.array([70.0, 90.0], dtype)  # the original clips with im_info's floats
        clipped = clip_boxes(got, im_shape)
        assert np.array_equal(clipped, np_clip_boxes(want.copy(), im_shape))
        assert not np.array_equal(clipped, got)  # it clipped something
        t = bbox_transform_inv(torch.from_numpy(boxes), torch.from_numpy(deltas))
        np.testing.assert_allclose(t.numpy(), want, rtol=1e-6, atol=1e-4)
        np.testing.assert_array_equal(clip_boxes(t, im_shape).numpy() <= [89, 69] * 4, True)
