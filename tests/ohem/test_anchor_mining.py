"""TRAIN.RPN_MINING: the RPN learns from its hardest anchors (write-ups 001 and 003) instead of a
random RPN_BATCHSIZE. Plain-loop references of the per-anchor loss and of each rule, the
AnchorTargetLayer wired to them, and the RPN loss of a small net averaged over the kept anchors."""

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from readonly_ohem import python_layers  # noqa: F401  (registers the RPN layers)
from readonly_ohem.caffe.layers import LAYERS, LayerContext
from readonly_ohem.caffe.net import Net
from readonly_ohem.caffe.proto import caffe_pb2
from readonly_ohem.config import default_config
from readonly_ohem.errors import ConfigError
from readonly_ohem.ohem.anchor_mining import anchor_losses, anchor_sampler, hard_anchor_labels

EPS = float(np.finfo(float).eps)
PARAM_STR = "{'feat_stride': 16, 'scales': [1, 2]}"  # 6 anchors of 11..45 pixels
H, W, A = 5, 5, 6
IM_INFO = torch.tensor([[80.0, 80.0, 1.0]])
GT = torch.tensor([[10, 12, 40, 38, 3], [44, 40, 70, 76, 7]], dtype=torch.float32)


def config(**train):
    cfg = default_config()
    for k, v in train.items():
        cfg.TRAIN[k] = v
    return cfg


def anchor_target_layer(cfg):
    text = ('name: "rpn-data" type: "Python" bottom: "rpn_cls_score" bottom: "gt_boxes" '
            'bottom: "im_info" bottom: "data" top: "rpn_labels" top: "rpn_bbox_targets" '
            'top: "rpn_bbox_inside_weights" top: "rpn_bbox_outside_weights" python_param { '
            f'module: "rpn.anchor_target_layer" layer: "AnchorTargetLayer" param_str: "{PARAM_STR}" }}')
    return LAYERS["Python"](text_format.Parse(text, caffe_pb2.LayerParameter()),
                            LayerContext(cfg=cfg))


def scores(seed=0):
    return torch.randn(1, 2 * A, H, W, generator=torch.Generator().manual_seed(seed))


def flat_labels(top):
    """(1, 1, A*H, W) rpn_labels -> (H*W*A,) in anchor order (h, w, a)."""
    return top.reshape(A, H, W).permute(1, 2, 0).reshape(-1)


# -- plain-loop references ---------------------------------------------------------------------
def loop_loss(score, r, label):
    """-log(max(p[label], eps)) of anchor row r = (h * W + w) * A + a, from (1, 2A, H, W) scores
    (channel a: background, A + a: foreground), float64."""
    h, w, a = r // (W * A), (r // A) % W, r % A
    bg, fg = float(score[0, a, h, w]), float(score[0, A + a, h, w])
    m = max(bg, fg)
    p = [math.exp(bg - m), math.exp(fg - m)]
    return -math.log(max(p[int(max(label, 0))] / sum(p), EPS))


def loop_mine(labels, losses, rule, k=None, ratio=3.0):
    """The kept anchors (set of rows) of a rule over labelled rows (label >= 0)."""
    valid = [r for r in range(len(labels)) if labels[r] >= 0]
    if rule == "topk_threshold":
        ranked = sorted((losses[r] for r in valid), reverse=True)
        kth = ranked[min(k, len(ranked)) - 1]
        return {r for r in valid if losses[r] >= kth}
    if rule == "topk":  # ties: the higher row first
        order = sorted(valid, key=lambda r: (-losses[r], -r))
        return set(order[:k])
    pos = [r for r in valid if labels[r] == 1]
    negs = sorted((r for r in valid if labels[r] == 0), key=lambda r: (-losses[r], -r))
    return set(pos) | set(negs[: int(len(pos) * ratio)])


def unsampled_labels(score):
    """The labels before any subsampling: RPN_BATCHSIZE larger than the anchors."""
    layer = anchor_target_layer(config(RPN_BATCHSIZE=10**6, RPN_FG_FRACTION=1.0))
    return flat_labels(layer([score, GT, IM_INFO, torch.zeros(1)], [])[0])


# -- tests -------------------------------------------------------------------------------------
def test_anchor_losses_match_a_plain_loop():
    score = scores()
    inside = torch.tensor([0, 5, 17, 60, 149])
    labels = torch.tensor([1.0, 0.0, -1.0, 1.0, 0.0])
    got = anchor_losses(score, inside, labels)
    assert got.dtype == torch.float64
    want = [loop_loss(score, int(r), int(lab)) for r, lab in zip(inside, labels)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("rule, k", [("topk_threshold", 12), ("topk", 12), ("neg_pos", None)])
def test_anchor_target_layer_keeps_the_hardest(rule, k):
    score = scores(1)
    before = unsampled_labels(score)
    n_pos, n_neg = int((before == 1).sum()), int((before == 0).sum())
    assert n_pos >= 2 and n_neg > 3 * n_pos  # the case mines something
    cfg = config(RPN_MINING=rule, RPN_BATCHSIZE=k or 256)
    tops = anchor_target_layer(cfg)([score, GT, IM_INFO, torch.zeros(1)], [])
    labels = flat_labels(tops[0])
    losses = [loop_loss(score, r, int(before[r])) for r in range(before.numel())]
    kept = loop_mine(before.tolist(), losses, rule, k)
    assert set(torch.nonzero(labels >= 0).squeeze(1).tolist()) == kept
    assert all(labels[r] == before[r] for r in kept)  # kept anchors keep their label
    if rule == "neg_pos":
        assert int((labels == 1).sum()) == n_pos and int((labels == 0).sum()) == 3 * n_pos
    # outside weights 1 / #kept on the kept anchors (RPN_POSITIVE_WEIGHT -1): the box loss
    # averages over them too
    out = tops[3].permute(0, 2, 3, 1).reshape(-1, 4)  # (1, 4A, H, W) -> rows (h, w, a)
    np.testing.assert_array_equal(out[labels >= 0].numpy(), np.full((len(kept), 4), 1 / len(kept),
                                                                    np.float32))
    assert not out[labels < 0].any()


def test_ties_at_the_cut_are_all_kept():
    """001's rule: equal losses at the k-th place are all kept; topk cuts at exactly k."""
    score = torch.zeros(1, 2 * A, H, W)  # every anchor's loss is log 2
    before = unsampled_labels(score)
    n = int((before >= 0).sum())
    tied = anchor_target_layer(config(RPN_MINING="topk_threshold", RPN_BATCHSIZE=5))
    labels = flat_labels(tied([score, GT, IM_INFO, torch.zeros(1)], [])[0])
    assert int((labels >= 0).sum()) == n > 5
    cut = anchor_target_layer(config(RPN_MINING="topk", RPN_BATCHSIZE=5))
    labels = flat_labels(cut([score, GT, IM_INFO, torch.zeros(1)], [])[0])
    labelled = torch.nonzero(before >= 0).squeeze(1)
    assert torch.nonzero(labels >= 0).squeeze(1).tolist() == sorted(labelled[-5:].tolist())


def test_rpn_loss_is_the_mean_over_the_kept_anchors():
    """In a net (AnchorTargetLayer -> Reshape -> SoftmaxWithLoss ignore_label -1, as the
    end-to-end nets), the RPN classification loss is the mean of the kept anchors' losses."""
    text = f"""
    layer {{ name: "in" type: "Input" top: "rpn_cls_score" top: "gt_boxes" top: "im_info" top: "data"
            input_param {{ shape {{ dim: 1 dim: {2 * A} dim: {H} dim: {W} }} shape {{ dim: 2 dim: 5 }}
                          shape {{ dim: 1 dim: 3 }} shape {{ dim: 1 }} }} }}
    layer {{ name: "rpn_cls_score_reshape" type: "Reshape" bottom: "rpn_cls_score"
            top: "rpn_cls_score_reshape" reshape_param {{ shape {{ dim: 0 dim: 2 dim: -1 dim: 0 }} }} }}
    layer {{ name: "rpn-data" type: "Python" bottom: "rpn_cls_score" bottom: "gt_boxes"
            bottom: "im_info" bottom: "data" top: "rpn_labels" top: "t" top: "wi" top: "wo"
            python_param {{ module: "rpn.anchor_target_layer" layer: "AnchorTargetLayer"
                           param_str: "{PARAM_STR}" }} }}
    layer {{ name: "rpn_loss_cls" type: "SoftmaxWithLoss" bottom: "rpn_cls_score_reshape"
            bottom: "rpn_labels" propagate_down: 1 propagate_down: 0 top: "rpn_cls_loss"
            loss_weight: 1 loss_param {{ ignore_label: -1 normalize: true }} }}
    """
    net_param = text_format.Parse(text, caffe_pb2.NetParameter())
    net = Net(net_param, cfg=config(RPN_MINING="topk_threshold", RPN_BATCHSIZE=10))
    score = scores(2)
    blobs = net.forward({"rpn_cls_score": score, "gt_boxes": GT, "im_info": IM_INFO,
                         "data": torch.zeros(1)})
    labels = flat_labels(blobs["rpn_labels"])
    kept = torch.nonzero(labels >= 0).squeeze(1).tolist()
    mean = sum(loop_loss(score, r, int(labels[r])) for r in kept) / len(kept)
    assert len(kept) >= 10
    assert float(blobs["rpn_cls_loss"]) == pytest.approx(mean, rel=1e-5)


def test_random_is_the_original_and_unknown_names_fail():
    assert anchor_sampler(config().TRAIN, scores()) is None  # the layer's own seeded draw
    with pytest.raises(ConfigError, match="TRAIN.RPN_MINING 'hardest' is not one of random"):
        anchor_sampler(config(RPN_MINING="hardest").TRAIN, scores())
    labels = torch.tensor([1.0, 0.0, 0.0, -1.0])
    out = hard_anchor_labels(labels, torch.tensor([0, 1, 2, 3]), scores(),
                             config(RPN_MINING="neg_pos", RPN_NEG_POS_RATIO=1.0).TRAIN)
    assert out[0] == 1 and int((out == 0).sum()) == 1 and out[3] == -1
    assert labels.tolist() == [1.0, 0.0, 0.0, -1.0]  # a new tensor: the input is untouched
