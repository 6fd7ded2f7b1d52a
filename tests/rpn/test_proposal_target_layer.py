"""ProposalTargetLayer: a hand-worked image, then the original's forward (tests/original_code.py)
with the same RandomState, sampling on and off, BATCH_SIZE -1, normalized targets."""

import math

import numpy as np
import pytest
import torch

from readonly_ohem.errors import ConfigError, DataError, SpecError

from original_code import proposal_target_layer_forward
from rpn_testing import config, make_layer, n, random_gt, t

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops


def sorted_rows(*arrays):
    """The rows of the tops side by side, sorted (the original permutes each group)."""
    rows = np.concatenate([a.reshape(len(a), -1) for a in arrays], 1)
    return rows[np.lexsort(rows.T[::-1])]


def test_hand_worked():
    """gt [0, 0, 9, 9] class 2; proposals: the gt itself (IoU 1), [0, 0, 9, 4] (50 / 100 = 0.5:
    fg), [20, 20, 29, 29] (IoU 0: bg only when BG_THRESH_LO is 0)."""
    rois = torch.tensor([[0, 0, 0, 9, 9], [0, 0, 0, 9, 4], [0, 20, 20, 29, 29]],
                        dtype=torch.float32)
    gt = torch.tensor([[0, 0, 9, 9, 2]], dtype=torch.float32)
    layer = make_layer("ProposalTargetLayer", "'num_classes': 3")
    out_rois, labels, targets, inside, outside = (n(x) for x in layer([rois, gt], []))
    assert out_rois.shape == (3, 5) and labels.shape == (3,) and targets.shape == (3, 12)
    assert labels.tolist() == [2, 2, 2]  # two proposals and the appended gt box: all fg
    by_box = {tuple(r[1:]): i for i, r in enumerate(out_rois)}
    half = by_box[(0, 0, 9, 4)]
    # [0, 0, 9, 4] -> [0, 0, 9, 9]: dy = (5 - 2.5) / 5, dh = log(10 / 5), class 2's columns
    np.testing.assert_allclose(targets[half], [0] * 8 + [0, 0.5, 0, math.log(2)], rtol=1e-6)
    assert not targets[by_box[(0, 0, 9, 9)]].any()
    assert (inside[:, 8:] == 1).all() and not inside[:, :8].any()
    np.testing.assert_array_equal(outside, inside)

    cfg = config(TRAIN__BG_THRESH_LO=0.0, TRAIN__BBOX_NORMALIZE_TARGETS_PRECOMPUTED=True,
                 TRAIN__BBOX_INSIDE_WEIGHTS=(1.0, 1.0, 0.5, 0.5))
    layer = make_layer("ProposalTargetLayer", "'num_classes': 3", cfg)
    out_rois, labels, targets, inside, outside = (n(x) for x in layer([rois, gt], []))
    assert out_rois[3].tolist() == [0, 20, 20, 29, 29] and labels.tolist() == [2, 2, 2, 0]
    half = [tuple(r[1:]) for r in out_rois].index((0, 0, 9, 4))
    # normalized by the default stds (0.1, 0.1, 0.2, 0.2)
    np.testing.assert_allclose(targets[half, 8:], [0, 5, 0, math.log(2) / 0.2], rtol=1e-6)
    assert inside[0, 8:].tolist() == [1, 1, 0.5, 0.5] and outside[0, 8:].tolist() == [1] * 4
    assert not targets[3].any() and not inside[3].any()


def test_fg_fraction_caps_foreground():
    rois = torch.tensor([[0, 0, 0, 9, 9]] * 6 + [[0, 20, 20, 29, 29]] * 6, dtype=torch.float32)
    gt = torch.tensor([[0, 0, 9, 9, 1], [20, 20, 29, 29, 1]], dtype=torch.float32)
    cfg = config(TRAIN__BATCH_SIZE=8, TRAIN__FG_FRACTION=0.25)
    (labels,) = make_layer("ProposalTargetLayer", "'num_classes': 2", cfg)([rois, gt], [])[1:2]
    assert labels.tolist() == [1, 1]  # round(0.25 * 8) fg of 14 candidates; no bg candidate


def _case(seed, n_props=300, n_gt=4, size=(300, 400)):
    rng = np.random.default_rng(seed)
    h, w = size
    gt = random_gt(rng, n_gt, h, w)
    near = gt[rng.integers(0, n_gt, n_props // 2), :4] + rng.normal(0, 12, (n_props // 2, 4))
    xy = rng.uniform(0, [w - 20, h - 20], (n_props - n_props // 2, 2))
    far = np.concatenate((xy, xy + rng.uniform(10, 150, xy.shape)), 1)
    boxes = np.concatenate((near, far)).clip(0, [w - 1, h - 1] * 2)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
    rois = np.concatenate((np.zeros((n_props, 1)), boxes), 1).astype(np.float32)
    return rois, gt


@pytest.mark.parametrize("seed,keys", [
    (0, {}),  # 128 RoIs: both groups sampled
    (1, {"TRAIN.BATCH_SIZE": 100000, "TRAIN.FG_FRACTION": 1.0}),  # sampling off
    (2, {"TRAIN.BATCH_SIZE": -1, "TRAIN.BG_THRESH_LO": 0.0}),  # every RoI (py-R-FCN)
    (3, {"TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED": True, "TRAIN.FG_THRESH": 0.6,
         "TRAIN.BG_THRESH_HI": 0.4, "TRAIN.BATCH_SIZE": 64}),
])
def test_equals_the_original_with_the_same_generator(seed, keys):
    cfg = config()
    cfg.set_list(list(keys.items()))
    layer = make_layer("ProposalTargetLayer", "'num_classes': 21", cfg)
    layer.rng = np.random.RandomState(seed)
    rois, gt = _case(seed)
    ours = [n(x) for x in layer([t(rois), t(gt)], [])]
    ref = proposal_target_layer_forward(rois, gt, 21, cfg, np.random.RandomState(seed))
    assert (ref[1] > 0).sum() > 5 and (ref[1] == 0).sum() > 5
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])
    np.testing.assert_allclose(ours[2], ref[2], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ours[3], ref[3])
    np.testing.assert_array_equal(ours[4], ref[4])
    if cfg.TRAIN.BATCH_SIZE == -1:  # every fg and bg candidate, in some order
        assert len(ours[0]) == (ref[1] > 0).sum() + (ref[1] == 0).sum() > 300 * 0.9
    # with sampling off, any generator gives the same rows, permuted
    if keys.get("TRAIN.BATCH_SIZE", 0) > 1000:
        other = [n(x) for x in layer([t(rois), t(gt)], [])]
        np.testing.assert_array_equal(sorted_rows(*other), sorted_rows(*ours))


def test_no_gt_boxes_every_roi_is_background():
    rois, _ = _case(4, n_props=20)
    cfg = config(TRAIN__BG_THRESH_LO=0.0)
    out = [n(x) for x in make_layer("ProposalTargetLayer", "'num_classes': 21", cfg)(
        [t(rois), torch.zeros((0, 5))], [])]
    assert len(out[0]) == 20 and not out[1].any() and not out[2].any()


def test_errors_name_the_layer_blob_and_key():
    layer = make_layer("ProposalTargetLayer", "'num_classes': 3", name="roi-data")
    gt = torch.tensor([[0, 0, 9, 9, 1]], dtype=torch.float32)
    with pytest.raises(DataError, match="layer 'roi-data'.*'rpn_rois'.*batch index other than 0"):
        layer([torch.tensor([[1.0, 0, 0, 5, 5]]), gt], [])
    with pytest.raises(DataError, match="'gt_boxes' has class label 3; num_classes 3"):
        layer([torch.zeros((1, 5)), torch.tensor([[0, 0, 9, 9, 3.0]])], [])
    with pytest.raises(SpecError, match=r"'rpn_rois' must be RoIs \(R, 5\)"):
        layer([torch.zeros((1, 4)), gt], [])
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['num_class'\]"):
        make_layer("ProposalTargetLayer", "'num_class': 3")
    with pytest.raises(SpecError, match="must give num_classes"):
        make_layer("ProposalTargetLayer", "'num_classes': 2.5")
    bad = make_layer("ProposalTargetLayer", "'num_classes': 3", config(TRAIN__BATCH_SIZE=0))
    with pytest.raises(ConfigError, match="TRAIN.BATCH_SIZE"):
        bad([torch.zeros((1, 5)), gt], [])
    assert layer.top_shapes([(5, 5), (1, 5)]) == [(1, 5), (1, 1)] + [(1, 12)] * 3
