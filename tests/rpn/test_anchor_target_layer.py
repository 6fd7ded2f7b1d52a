"""AnchorTargetLayer: hand-worked cases, then the original's forward (tests/original_code.py) on
random images, sampling off (deterministic) and on (the same RandomState draws the same)."""

import numpy as np
import pytest
import torch

from readonly_ohem.errors import ConfigError, SpecError
from readonly_ohem.rpn.sampling import layer_rng

from original_code import anchor_target_layer_forward
from rpn_testing import config, make_layer, n, random_gt, t

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops

# scale 1: 3 anchors per cell, 23x12 [-3.5, 2, 18.5, 13], 16x16 [0, 0, 15, 15], 11x22
# [2.5, -3.5, 12.5, 18.5]; on a 2 x 2 map over a 32 x 32 image only the four 16x16 ones are inside
SMALL = "'feat_stride': 16 \\n'scales': [1]"


def forward(layer, gt, im_info=(32, 32, 1), shape=(1, 6, 2, 2)):
    score = torch.zeros(shape)
    return [n(x) for x in layer([score, torch.tensor(gt, dtype=torch.float32),
                                 torch.tensor([im_info], dtype=torch.float32), torch.zeros(1)], [])]


def test_hand_worked_tiling():
    labels, targets, inside_w, outside_w = forward(make_layer("AnchorTargetLayer", SMALL),
                                                   [[0, 0, 15, 15, 1]])
    assert labels.shape == (1, 1, 6, 2) and targets.shape == inside_w.shape == (1, 12, 2, 2)
    # anchor a of cell (h, w) is labels[0, 0, a * H + h, w]; only a = 1 (rows 2, 3) is inside
    want = np.full((6, 2), -1.0)
    want[2:4] = [[1, 0], [0, 0]]  # IoU 1 with the gt at (0, 0); 0 elsewhere: negative
    np.testing.assert_array_equal(labels[0, 0], want)
    # targets of every inside anchor toward the gt (negatives too): dx = (8 - 24) / 16 = -1
    want_t = np.zeros((12, 2, 2), np.float32)
    want_t[4, :, 1] = -1  # dx of the cells at w = 1
    want_t[5, 1, :] = -1  # dy of the cells at h = 1
    np.testing.assert_array_equal(targets[0], want_t)
    want_in = np.zeros((12, 2, 2), np.float32)
    want_in[4:8, 0, 0] = 1
    np.testing.assert_array_equal(inside_w[0], want_in)
    want_out = np.zeros((12, 2, 2), np.float32)
    want_out[4:8] = 0.25  # 1 / (4 labelled anchors)
    np.testing.assert_array_equal(outside_w[0], want_out)


def test_zero_overlap_gt_quirk_and_its_guard():
    """A gt box touching no inside anchor makes all of them 'best' for it: 4 positives. Our
    guard (off by default) leaves it out: the one true positive."""
    gt = [[0, 0, 15, 15, 1], [100, 100, 110, 110, 2]]
    labels = forward(make_layer("AnchorTargetLayer", SMALL), gt)[0]
    assert (labels == 1).sum() == 4 and (labels == 0).sum() == 0
    guarded = make_layer("AnchorTargetLayer", SMALL, config(TRAIN__RPN_GUARD_ZERO_OVERLAP_GT=True))
    labels = forward(guarded, gt)[0]
    assert labels[0, 0, 2, 0] == 1 and (labels == 1).sum() == 1 and (labels == 0).sum() == 3


def test_clobber_positives_and_positive_weight():
    gt = [[0, 0, 3, 3, 1]]  # best anchor [0, 0, 15, 15] has IoU 16 / 256 < 0.3
    labels, _, _, outside_w = forward(make_layer("AnchorTargetLayer", SMALL), gt)
    assert labels[0, 0, 2, 0] == 1 and (labels == 0).sum() == 3
    layer = make_layer("AnchorTargetLayer", SMALL, config(TRAIN__RPN_CLOBBER_POSITIVES=True))
    labels = forward(layer, gt)[0]
    assert (labels == 0).sum() == 4 and (labels == 1).sum() == 0
    layer = make_layer("AnchorTargetLayer", SMALL, config(TRAIN__RPN_POSITIVE_WEIGHT=0.4))
    outside_w = forward(layer, gt)[3]
    assert outside_w[0, 4:8, 0, 0].tolist() == [np.float32(0.4)] * 4  # 0.4 / 1 positive
    assert outside_w[0, 4:8, 1, 1].tolist() == [np.float32(0.6 / 3)] * 4  # 0.6 / 3 negatives
    for bad in (0.0, 1.0):
        layer = make_layer("AnchorTargetLayer", SMALL, config(TRAIN__RPN_POSITIVE_WEIGHT=bad))
        with pytest.raises(ConfigError, match="TRAIN.RPN_POSITIVE_WEIGHT"):
            forward(layer, gt)


def test_allowed_border_and_inside_weights_key():
    layer = make_layer("AnchorTargetLayer", SMALL + " \\n'allowed_border': 4",
                       config(TRAIN__RPN_BBOX_INSIDE_WEIGHTS=(0.5, 0.5, 1.0, 1.0)))
    labels, _, inside_w, _ = forward(layer, [[0, 0, 15, 15, 1]])
    # every anchor sticks out by at most 3.5 pixels: all 12 are inside; the 23x12 and 11x22 ones
    # at (0, 0) overlap the gt by 192 / 340 and 176 / 322 (between 0.3 and 0.7): ignored
    np.testing.assert_array_equal(labels[0, 0], [[-1, 0], [0, 0], [1, 0], [0, 0], [-1, 0], [0, 0]])
    assert inside_w[0, 4:8, 0, 0].tolist() == [0.5, 0.5, 1.0, 1.0]


def test_no_gt_and_no_inside_anchor_do_not_crash():
    labels, targets, _, outside_w = forward(make_layer("AnchorTargetLayer", SMALL),
                                            np.zeros((0, 5)))
    assert (labels == 0).sum() == 4 and (labels == 1).sum() == 0 and not targets.any()
    labels = forward(make_layer("AnchorTargetLayer", SMALL), [[0, 0, 15, 15, 1]],
                     im_info=(10, 10, 1))[0]
    assert (labels == -1).all()


def _case(seed, size=(150, 230), n_gt=3):
    rng = np.random.default_rng(seed)
    h, w = size
    gt = random_gt(rng, n_gt, h, w)
    if seed % 2:
        gt = np.vstack([gt, gt[:1]])  # a duplicate gt box: two columns with one best anchor
    fh, fw = -(-h // 16), -(-w // 16)
    score = rng.standard_normal((1, 18, fh, fw)).astype(np.float32)
    im_info = np.array([[h, w, 1.5]], np.float32)
    return score, gt, im_info


@pytest.mark.parametrize("seed,keys,param_str", [
    (0, {}, "'feat_stride': 16"),
    (1, {"TRAIN.RPN_CLOBBER_POSITIVES": True, "TRAIN.RPN_NEGATIVE_OVERLAP": 0.2},
     "'feat_stride': 16"),
    (2, {"TRAIN.RPN_POSITIVE_WEIGHT": 0.3, "TRAIN.RPN_POSITIVE_OVERLAP": 0.5},
     "'feat_stride': 16 \\n'allowed_border': 20"),
    (3, {"TRAIN.RPN_POSITIVE_OVERLAP": 0.6}, "'feat_stride': 16 \\n'scales': [2, 4, 8]"),
])
def test_equals_the_original_with_sampling_off(seed, keys, param_str):
    cfg = config(TRAIN__RPN_BATCHSIZE=100000, TRAIN__RPN_FG_FRACTION=0.5)
    cfg.set_list(list(keys.items()))
    layer = make_layer("AnchorTargetLayer", param_str, cfg)
    score, gt, im_info = _case(seed)
    ours = [n(x) for x in layer([t(score), t(gt), t(im_info), torch.zeros(1)], [])]
    params = dict(feat_stride=16)
    if "allowed_border" in param_str:
        params["allowed_border"] = 20
    if "scales" in param_str:
        params["scales"] = (2, 4, 8)
    ref = anchor_target_layer_forward(score, gt, im_info, cfg, np.random.RandomState(0), **params)
    np.testing.assert_array_equal(ours[0], ref[0])
    assert (ref[0] == 1).sum() > 0 and (ref[0] == 0).sum() > 0
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(ours[2], ref[2])
    np.testing.assert_array_equal(ours[3], ref[3])


@pytest.mark.parametrize("seed", [4, 5])
def test_sampling_draws_what_the_original_draws(seed):
    cfg = config(TRAIN__RPN_BATCHSIZE=32, TRAIN__RPN_POSITIVE_OVERLAP=0.5)
    layer = make_layer("AnchorTargetLayer", "'feat_stride': 16", cfg)
    score, gt, im_info = _case(seed, size=(300, 400), n_gt=6)
    layer.rng = np.random.RandomState(seed)
    ours = [n(x) for x in layer([t(score), t(gt), t(im_info)], [])]
    ref = anchor_target_layer_forward(score, gt, im_info, cfg, np.random.RandomState(seed))
    assert (ref[0] == 1).sum() == 16 and (ref[0] == 0).sum() == 16  # both groups were cut
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[3], ref[3])
    # the next image continues the same stream
    ours = n(layer([t(score), t(gt), t(im_info)], [])[0])
    rng = _advanced(seed, score, gt, im_info, cfg)
    ref2 = anchor_target_layer_forward(score, gt, im_info, cfg, rng)[0]
    np.testing.assert_array_equal(ours, ref2)


def _advanced(seed, score, gt, im_info, cfg):
    rng = np.random.RandomState(seed)
    anchor_target_layer_forward(score, gt, im_info, cfg, rng)
    return rng


def test_seeded_generator_and_its_state():
    cfg = config(TRAIN__RPN_BATCHSIZE=16, TRAIN__RPN_POSITIVE_OVERLAP=0.5)
    a = make_layer("AnchorTargetLayer", "'feat_stride': 16", cfg, name="rpn-data")
    b = make_layer("AnchorTargetLayer", "'feat_stride': 16", cfg, name="rpn-data")
    want = layer_rng(cfg.RNG_SEED, "rpn-data").get_state()[1]
    assert a.rng.get_state()[1].tolist() == want.tolist()
    score, gt, im_info = _case(6, size=(300, 400), n_gt=6)
    feed = [t(score), t(gt), t(im_info)]
    first = n(a(feed, [])[0])
    state = a.random_state()
    second = n(a(feed, [])[0])
    assert not np.array_equal(first, second)  # a new draw per image
    np.testing.assert_array_equal(n(b(feed, [])[0]), first)  # same seed and name: same draws
    b.load_random_state(state)
    np.testing.assert_array_equal(n(b(feed, [])[0]), second)


def test_shape_errors_name_the_layer_and_blob():
    layer = make_layer("AnchorTargetLayer", "'feat_stride': 16", name="rpn-data")
    gt, info = torch.zeros((1, 5)), torch.tensor([[100.0, 100, 1]])
    with pytest.raises(SpecError, match="layer 'rpn-data'.*'rpn_cls_score' must be .*one image"):
        layer([torch.zeros(2, 18, 3, 3), gt, info], [])
    with pytest.raises(SpecError, match="'gt_boxes' must be gt boxes"):
        layer([torch.zeros(1, 18, 3, 3), torch.zeros(2, 4), info], [])
    with pytest.raises(SpecError, match="'im_info' must be im_info"):
        layer([torch.zeros(1, 18, 3, 3), gt, torch.zeros(3)], [])
    shapes = layer.top_shapes([(1, 18, 3, 5), (1, 5), (1, 3)])
    assert shapes == [(1, 1, 27, 5)] + [(1, 36, 3, 5)] * 3
