"""Reshape, SoftmaxWithLoss and SmoothL1Loss as the Faster R-CNN end-to-end nets use them around
the RPN: scores (1, 2A, H, W) reshaped to (1, 2, A*H, W) (``dim: 0 dim: 2 dim: -1 dim: 0``) for a
two-way softmax per anchor with ``ignore_label: -1``, reshaped back (``dim: 0 dim: 18 dim: -1
dim: 0``) so channels A.. hold the foreground probabilities; box deltas under ``sigma: 3``.
Checked against plain loops over anchors."""

import math

import numpy as np
from google.protobuf import text_format

from readonly_ohem.caffe.net import Net
from readonly_ohem.caffe.proto import caffe_pb2

A, H, W = 9, 3, 4
NET = f"""
name: "rpn_head" force_backward: true
input: "rpn_cls_score" input_shape {{ dim: 1 dim: {2 * A} dim: {H} dim: {W} }}
input: "rpn_labels" input_shape {{ dim: 1 dim: 1 dim: {A * H} dim: {W} }}
input: "rpn_bbox_pred" input_shape {{ dim: 1 dim: {4 * A} dim: {H} dim: {W} }}
input: "rpn_bbox_targets" input_shape {{ dim: 1 dim: {4 * A} dim: {H} dim: {W} }}
input: "rpn_bbox_inside_weights" input_shape {{ dim: 1 dim: {4 * A} dim: {H} dim: {W} }}
input: "rpn_bbox_outside_weights" input_shape {{ dim: 1 dim: {4 * A} dim: {H} dim: {W} }}
layer {{ bottom: "rpn_cls_score" top: "rpn_cls_score_reshape" name: "rpn_cls_score_reshape"
  type: "Reshape" reshape_param {{ shape {{ dim: 0 dim: 2 dim: -1 dim: 0 }} }} }}
layer {{ name: "rpn_loss_cls" type: "SoftmaxWithLoss" bottom: "rpn_cls_score_reshape"
  bottom: "rpn_labels" propagate_down: 1 propagate_down: 0 top: "rpn_cls_loss" loss_weight: 1
  loss_param {{ ignore_label: -1 normalize: true }} }}
layer {{ name: "rpn_loss_bbox" type: "SmoothL1Loss" bottom: "rpn_bbox_pred"
  bottom: "rpn_bbox_targets" bottom: "rpn_bbox_inside_weights" bottom: "rpn_bbox_outside_weights"
  top: "rpn_loss_bbox" loss_weight: 1 smooth_l1_loss_param {{ sigma: 3.0 }} }}
layer {{ name: "rpn_cls_prob" type: "Softmax" bottom: "rpn_cls_score_reshape" top: "rpn_cls_prob" }}
layer {{ name: "rpn_cls_prob_reshape" type: "Reshape" bottom: "rpn_cls_prob"
  top: "rpn_cls_prob_reshape" reshape_param {{ shape {{ dim: 0 dim: {2 * A} dim: -1 dim: 0 }} }} }}
"""


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice([-1.0, 0.0, 1.0], size=(1, 1, A * H, W), p=[0.6, 0.3, 0.1])
    inside = np.repeat((labels.reshape(A, H, W) == 1)[:, None], 4, 1).reshape(1, 4 * A, H, W)
    return {
        "rpn_cls_score": rng.normal(0, 2, (1, 2 * A, H, W)),
        "rpn_labels": labels,
        "rpn_bbox_pred": rng.normal(0, 0.3, (1, 4 * A, H, W)),
        "rpn_bbox_targets": rng.normal(0, 0.3, (1, 4 * A, H, W)),
        "rpn_bbox_inside_weights": inside.astype(float),
        "rpn_bbox_outside_weights": np.full((1, 4 * A, H, W), 1.0 / max(1, (labels >= 0).sum())),
    }


def test_rpn_head_equals_loops_over_anchors():
    feed = {k: v.astype(np.float32) for k, v in inputs().items()}
    net = Net(text_format.Parse(NET, caffe_pb2.NetParameter()), source="rpn_head.prototxt")
    blobs = net.forward(feed, retain_diffs=True)
    net.backward(blobs)
    diffs = net.blob_diffs()
    blobs = {k: v.detach() for k, v in blobs.items()}
    x = feed["rpn_cls_score"].astype(np.float64)
    labels = feed["rpn_labels"]
    assert tuple(blobs["rpn_cls_score_reshape"].shape) == (1, 2, A * H, W)
    assert tuple(blobs["rpn_cls_prob_reshape"].shape) == (1, 2 * A, H, W)
    loss, count = 0.0, 0
    grad = np.zeros_like(x)
    for a in range(A):
        for h in range(H):
            for w in range(W):
                bg, fg = x[0, a, h, w], x[0, A + a, h, w]  # anchor a: channels a and A + a
                p_fg = 1.0 / (1.0 + math.exp(bg - fg))
                got = float(blobs["rpn_cls_prob_reshape"][0, A + a, h, w])
                assert abs(got - p_fg) < 1e-6
                label = labels[0, 0, a * H + h, w]  # the AnchorTargetLayer's layout
                if label == -1:
                    continue
                count += 1
                loss -= math.log(p_fg if label == 1 else 1 - p_fg)
                grad[0, a, h, w] = (1 - p_fg) - (label == 0)
                grad[0, A + a, h, w] = p_fg - (label == 1)
    assert 0 < count < A * H * W
    assert abs(float(blobs["rpn_cls_loss"]) - loss / count) < 1e-6
    np.testing.assert_allclose(diffs["rpn_cls_score"].numpy(), grad / count, atol=1e-7)

    # SmoothL1, sigma 3: 0.5 (3 d)^2 below |d| = 1/9, else |d| - 0.5 / 9; summed over the
    # blob, weighted, over the batch size (1)
    d = feed["rpn_bbox_inside_weights"] * (feed["rpn_bbox_pred"] - feed["rpn_bbox_targets"])
    want, want_grad = 0.0, np.zeros_like(d, dtype=np.float64)
    for i, v in np.ndenumerate(d.astype(np.float64)):
        out_w = float(feed["rpn_bbox_outside_weights"][i])
        if abs(v) < 1 / 9:
            want += out_w * 0.5 * 9 * v * v
            want_grad[i] = out_w * 9 * v * feed["rpn_bbox_inside_weights"][i]
        else:
            want += out_w * (abs(v) - 0.5 / 9)
            want_grad[i] = out_w * np.sign(v) * feed["rpn_bbox_inside_weights"][i]
    assert abs(float(blobs["rpn_loss_bbox"]) - want) < 1e-6
    np.testing.assert_allclose(diffs["rpn_bbox_pred"].numpy(), want_grad, atol=1e-7)
    assert (np.abs(d) < 1 / 9).any() and (np.abs(d[d != 0]) >= 1 / 9).any()  # both branches
