"""``readonly-ohem run`` on nets of Input blobs feeding the RPN layers writes their tops, equal to
the original layers' (tests/original_code.py) with sampling off, in TRAIN and TEST."""

import numpy as np
import pytest

from readonly_ohem.cli import main
from readonly_ohem.config import default_config
from readonly_ohem.rpn.sampling import layer_rng

from original_code import (anchor_target_layer_forward, argsort_desc_stable,
                           proposal_layer_forward, proposal_target_layer_forward)

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops

H, W = 16, 22
NET = f"""
name: "rpn_layers"
input: "rpn_cls_score" input_shape {{ dim: 1 dim: 18 dim: {H} dim: {W} }}
input: "rpn_cls_prob_reshape" input_shape {{ dim: 1 dim: 18 dim: {H} dim: {W} }}
input: "rpn_bbox_pred" input_shape {{ dim: 1 dim: 36 dim: {H} dim: {W} }}
input: "gt_boxes" input_shape {{ dim: 1 dim: 5 }}
input: "im_info" input_shape {{ dim: 1 dim: 3 }}
layer {{ name: 'rpn-data' type: 'Python'
  bottom: 'rpn_cls_score' bottom: 'gt_boxes' bottom: 'im_info'
  top: 'rpn_labels' top: 'rpn_bbox_targets' top: 'rpn_bbox_inside_weights'
  top: 'rpn_bbox_outside_weights'
  python_param {{ module: 'rpn.anchor_target_layer' layer: 'AnchorTargetLayer'
                  param_str: "'feat_stride': 16" }} include {{ phase: TRAIN }} }}
layer {{ name: 'proposal' type: 'Python'
  bottom: 'rpn_cls_prob_reshape' bottom: 'rpn_bbox_pred' bottom: 'im_info'
  top: 'rpn_rois' top: 'rpn_scores'
  python_param {{ module: 'rpn.proposal_layer' layer: 'ProposalLayer'
                  param_str: "'feat_stride': 16" }} }}
layer {{ name: 'roi-data' type: 'Python' bottom: 'rpn_rois' bottom: 'gt_boxes'
  top: 'rois' top: 'labels' top: 'bbox_targets' top: 'bbox_inside_weights'
  top: 'bbox_outside_weights'
  python_param {{ module: 'rpn.proposal_target_layer' layer: 'ProposalTargetLayer'
                  param_str: "'num_classes': 21" }} include {{ phase: TRAIN }} }}
"""
SETS = ["--set", "TRAIN.RPN_BATCHSIZE", "100000", "--set", "TRAIN.BATCH_SIZE", "100000",
        "--set", "TRAIN.FG_FRACTION", "1.0", "--set", "TRAIN.RPN_POST_NMS_TOP_N", "150",
        "--set", "TEST.RPN_POST_NMS_TOP_N", "40"]


def feed(seed=0):
    rng = np.random.default_rng(seed)
    gt = np.array([[20, 30, 120, 110, 7], [60, 10, 200, 140, 12], [100, 60, 150, 100, 3]],
                  np.float32)
    return {
        "rpn_cls_score": rng.normal(size=(1, 18, H, W)).astype(np.float32),
        "rpn_cls_prob_reshape": rng.uniform(size=(1, 18, H, W)).astype(np.float32),
        "rpn_bbox_pred": (rng.normal(size=(1, 36, H, W)) * 0.2).astype(np.float32),
        "gt_boxes": gt,
        "im_info": np.array([[H * 16 - 4, W * 16 - 2, 1.25]], np.float32),
    }


def run(tmp_path, phase, inputs):
    (tmp_path / "net.prototxt").write_text(NET)
    np.savez(tmp_path / "in.npz", **inputs)
    out = tmp_path / f"out_{phase}.npz"
    assert main(["run", str(tmp_path / "net.prototxt"), "--inputs", str(tmp_path / "in.npz"),
                 "--out", str(out), "--phase", phase] + SETS) == 0
    return dict(np.load(out))


def config():
    cfg = default_config()
    cfg.set_list([v for i, v in enumerate(SETS) if i % 3])  # KEY VALUE pairs
    return cfg


def test_run_writes_the_tops_of_the_rpn_layers_in_train(tmp_path):
    x = feed()
    got = run(tmp_path, "TRAIN", x)
    cfg = config()
    labels, targets, inside, outside = anchor_target_layer_forward(
        x["rpn_cls_score"], x["gt_boxes"], x["im_info"], cfg, np.random.RandomState(0))
    np.testing.assert_array_equal(got["rpn_labels"], labels)
    assert (labels == 1).any() and (labels == 0).any()
    np.testing.assert_allclose(got["rpn_bbox_targets"], targets, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["rpn_bbox_inside_weights"], inside)
    np.testing.assert_array_equal(got["rpn_bbox_outside_weights"], outside)

    rois, scores = proposal_layer_forward(x["rpn_cls_prob_reshape"], x["rpn_bbox_pred"],
                                          x["im_info"], cfg, "TRAIN",
                                          argsort_desc=argsort_desc_stable)
    assert got["rpn_rois"].shape == rois.shape == (150, 5)
    np.testing.assert_allclose(got["rpn_rois"], rois, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(got["rpn_scores"], scores)

    # sampling off: every candidate, each group permuted by the layer's generator (RNG_SEED and
    # the layer's name); the same draws from the original's npr.choice
    ref = proposal_target_layer_forward(got["rpn_rois"], x["gt_boxes"], 21, cfg,
                                        layer_rng(cfg.RNG_SEED, "roi-data"))
    for name, want in zip(("rois", "labels", "bbox_targets", "bbox_inside_weights",
                           "bbox_outside_weights"), ref):
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6, err_msg=name)
    assert (ref[1] > 0).sum() >= 3 and (ref[1] == 0).sum() > 10


def test_run_proposals_in_test_phase_use_the_test_keys(tmp_path):
    x = feed(1)
    del x["rpn_cls_score"], x["gt_boxes"]  # the TRAIN-only layers are left out in TEST
    got = run(tmp_path, "TEST", x)
    assert "rpn_labels" not in got and "rois" not in got
    rois, scores = proposal_layer_forward(x["rpn_cls_prob_reshape"], x["rpn_bbox_pred"],
                                          x["im_info"], config(), "TEST",
                                          argsort_desc=argsort_desc_stable)
    assert got["rpn_rois"].shape == rois.shape == (40, 5)
    np.testing.assert_allclose(got["rpn_rois"], rois, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(got["rpn_scores"], scores)
