"""ProposalLayer: a hand-worked map, then the original's forward (tests/original_code.py, its NMS
as py_cpu_nms) on random maps in TRAIN and TEST, ties included."""

import numpy as np
import pytest
import torch

from readonly_ohem.errors import SpecError

from original_code import argsort_desc_stable, proposal_layer_forward
from rpn_testing import config, make_layer, n, t

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops

# scale 1: per cell a 23x12, a 16x16 and an 11x22 anchor; with zero deltas each box is its anchor
# with x2 and y2 one pixel further (bbox_transform_inv has no -1): the 16x16 anchor of cell
# (0, w) gives [16w, 0, 16w + 16, 16]
SMALL = "'feat_stride': 16 \\n'scales': [1]"


def small_inputs(fg_scores, dx=None):
    """A 1 x 3 map: fg_scores (3 anchors, 3 cells); dx: (anchor, cell) -> delta x."""
    prob = torch.zeros(1, 6, 1, 3)
    prob[0, 3:, 0, :] = torch.tensor(fg_scores)
    deltas = torch.zeros(1, 12, 1, 3)
    for (a, w), v in (dx or {}).items():
        deltas[0, 4 * a, 0, w] = v
    return prob, deltas


def test_hand_worked_min_size_nms_and_order():
    cfg = config(TRAIN__RPN_PRE_NMS_TOP_N=100, TRAIN__RPN_POST_NMS_TOP_N=100)
    layer = make_layer("ProposalLayer", SMALL, cfg, tops=["rois", "scores"])
    im_info = torch.tensor([[20.0, 48.0, 1.0]])
    # the 23x12 (13 high after clipping) and 11x22 (12 wide) boxes are under 16 pixels: dropped,
    # however high their scores; dx = -1 moves the 16x16 box of cell 1 onto that of cell 0
    # (IoU 1): the better one (cell 1, 0.95) suppresses the other
    fg = [[0.99, 0.99, 0.99], [0.9, 0.95, 0.7], [0.98, 0.98, 0.98]]
    rois, scores = layer(list(small_inputs(fg, {(1, 1): -1.0})) + [im_info], [])
    assert rois.tolist() == [[0, 0, 0, 16, 16], [0, 32, 0, 47, 16]]  # x2 48 clipped to 47
    assert scores.shape == (2, 1) and scores[:, 0].tolist() == pytest.approx([0.95, 0.7])
    # at image scale 0.5 the minimum is 8 pixels: the 23x12 boxes (0.99, x1 = -3.5 + 16w clipped
    # at 0) come first, then the 11x22 ones (0.98, x1 = 2.5 + 16w). Equal scores are sorted twice
    # (here, then in NMS), each time ties by higher index first: they end in ascending order
    half_scale = torch.tensor([[20.0, 48.0, 0.5]])
    rois, _ = layer(list(small_inputs(fg, {(1, 1): -1.0})) + [half_scale], [])
    assert rois[:6, 1].tolist() == [0, 12.5, 28.5, 2.5, 18.5, 34.5]
    # RPN_POST_NMS_TOP_N / RPN_PRE_NMS_TOP_N
    cfg.set_key("TRAIN.RPN_POST_NMS_TOP_N", 1)
    rois, _ = layer(list(small_inputs(fg, {(1, 1): -1.0})) + [im_info], [])
    assert rois.tolist() == [[0, 0, 0, 16, 16]]
    cfg.set_list(["TRAIN.RPN_POST_NMS_TOP_N", 0, "TRAIN.RPN_PRE_NMS_TOP_N", 1])
    rois, _ = layer(list(small_inputs(fg, {(1, 1): -1.0})) + [im_info], [])
    assert rois.tolist() == [[0, 0, 0, 16, 16]]


def test_phase_picks_the_keys():
    cfg = config(TRAIN__RPN_POST_NMS_TOP_N=2, TEST__RPN_POST_NMS_TOP_N=1)
    fg = [[0.1, 0.1, 0.1], [0.9, 0.8, 0.7], [0.1, 0.1, 0.1]]
    im_info = torch.tensor([[20.0, 48.0, 1.0]])
    for phase, want in (("TRAIN", 2), ("TEST", 1)):
        layer = make_layer("ProposalLayer", SMALL, cfg, phase=phase)
        (rois,) = layer(list(small_inputs(fg)) + [im_info], [])
        assert rois.shape == (want, 5)


def _case(seed, h=20, w=28, ties=False):
    rng = np.random.default_rng(seed)
    prob = rng.uniform(0, 1, (1, 18, h, w)).astype(np.float32)
    if ties:
        prob = (np.round(prob * 4) / 4).astype(np.float32)  # five distinct scores
    deltas = (rng.standard_normal((1, 36, h, w)) * 0.3).astype(np.float32)
    im_info = np.array([[h * 16 - 5, w * 16 - 3, 1.6]], np.float32)
    return prob, deltas, im_info


@pytest.mark.parametrize("seed,phase,keys,ties", [
    (0, "TRAIN", {}, False),
    (1, "TEST", {}, False),
    (2, "TRAIN", {"TRAIN.RPN_PRE_NMS_TOP_N": 3000, "TRAIN.RPN_POST_NMS_TOP_N": 400,
                  "TRAIN.RPN_NMS_THRESH": 0.5, "TRAIN.RPN_MIN_SIZE": 5}, False),
    (3, "TEST", {"TEST.RPN_PRE_NMS_TOP_N": -1, "TEST.RPN_POST_NMS_TOP_N": -1}, False),
    (4, "TEST", {"TEST.RPN_PRE_NMS_TOP_N": 2000}, True),
])
def test_equals_the_original(seed, phase, keys, ties):
    cfg = config()
    cfg.set_list(list(keys.items()))
    layer = make_layer("ProposalLayer", "'feat_stride': 16", cfg, phase=phase,
                       tops=["rois", "scores"])
    prob, deltas, im_info = _case(seed, ties=ties)
    rois, scores = (n(x) for x in layer([t(prob), t(deltas), t(im_info)], []))
    ref_rois, ref_scores = proposal_layer_forward(prob, deltas, im_info, cfg, phase,
                                                  argsort_desc=argsort_desc_stable)
    assert rois.dtype == np.float32 and rois.shape == ref_rois.shape and len(rois) > 100
    # numpy's and torch's float32 exp may differ in the last bit: coordinates to 1e-6
    np.testing.assert_allclose(rois, ref_rois, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(scores, ref_scores)


def test_equals_the_original_on_the_cuda_device_too():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    layer = make_layer("ProposalLayer", "'feat_stride': 16", config(), phase="TEST")
    prob, deltas, im_info = _case(5, ties=True)
    (rois,) = layer([t(prob).cuda(), t(deltas).cuda(), t(im_info).cuda()], [])
    assert rois.is_cuda
    ref, _ = proposal_layer_forward(prob, deltas, im_info, config(), "TEST",
                                    argsort_desc=argsort_desc_stable)
    np.testing.assert_allclose(n(rois), ref, rtol=1e-6, atol=1e-4)


def test_shape_errors_name_the_layer_and_blob():
    layer = make_layer("ProposalLayer", "'feat_stride': 16", name="proposal")
    info = torch.tensor([[100.0, 100, 1]])
    with pytest.raises(SpecError,
                       match=r"layer 'proposal'.*'rpn_cls_prob_reshape' must be \(1, 18"):
        layer([torch.zeros(1, 2, 3, 3), torch.zeros(1, 36, 3, 3), info], [])
    with pytest.raises(SpecError, match=r"'rpn_bbox_pred' must be \(1, 36, 3, 3\)"):
        layer([torch.zeros(1, 18, 3, 3), torch.zeros(1, 36, 3, 4), info], [])
    assert layer.top_shapes([(1, 18, 3, 3), (1, 36, 3, 3), (1, 3)]) == [(1, 5)]


@pytest.mark.parametrize("seed,phase,keys", [
    (6, "TRAIN", {}),
    (7, "TEST", {"TEST.RPN_POST_NMS_TOP_N": 150}),
    # most boxes under the minimum size: decoding in score order has to go on past its
    # first guess to find RPN_PRE_NMS_TOP_N boxes that pass
    (8, "TEST", {"TEST.RPN_PRE_NMS_TOP_N": 2500, "TEST.RPN_MIN_SIZE": 140}),
    (9, "TRAIN", {"TRAIN.RPN_PRE_NMS_TOP_N": 3000, "TRAIN.RPN_MIN_SIZE": 110}),
])
def test_cpu_tops_are_the_originals_bit_for_bit(seed, phase, keys):
    """On the CPU every step is numpy's, as the original's: the same floats, not just close."""
    cfg = config()
    cfg.set_list(list(keys.items()))
    layer = make_layer("ProposalLayer", "'feat_stride': 16", cfg, phase=phase,
                       tops=["rois", "scores"])
    prob, deltas, im_info = _case(seed, h=30, w=40)
    rois, scores = (n(x) for x in layer([t(prob), t(deltas), t(im_info)], []))
    ref_rois, ref_scores = proposal_layer_forward(prob, deltas, im_info, cfg, phase,
                                                  argsort_desc=argsort_desc_stable)
    assert len(rois) > 100
    np.testing.assert_array_equal(rois, ref_rois)
    np.testing.assert_array_equal(scores, ref_scores)
    if "RPN_MIN_SIZE" in str(keys):  # the case is as described: most boxes are too small
        c = cfg[phase]
        everything = config(**{f"{phase}__RPN_PRE_NMS_TOP_N": -1, f"{phase}__RPN_NMS_THRESH": 1.0,
                               f"{phase}__RPN_POST_NMS_TOP_N": -1,
                               f"{phase}__RPN_MIN_SIZE": c.RPN_MIN_SIZE})
        passing, _ = proposal_layer_forward(prob, deltas, im_info, everything, phase)
        assert len(passing) < 0.4 * prob[0, 9:].size and len(passing) > c.RPN_PRE_NMS_TOP_N
