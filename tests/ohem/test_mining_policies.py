"""The OHEM family on hand-worked examples (ignore labels -1/-2, fewer samples than k), the
layer's ``policy`` option, and the policy registry (a policy registered here is used by name)."""

import inspect
import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from readonly_ohem.config import default_config
from readonly_ohem.caffe.layers.base import LayerContext
from readonly_ohem.errors import SpecError
from readonly_ohem.ohem.layer import OHEMDataLayer
from readonly_ohem.ohem.policies import (
    MiningResult,
    focal_loss,
    mine,
    neg_pos,
    ratio,
    topk,
    topk_threshold,
)
from readonly_ohem.ohem.registry import MINING_POLICIES, MiningContext, register_policy
from readonly_ohem.ops.nms import descending_order
from readonly_ohem.caffe.proto import caffe_pb2

LOSS = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.3], dtype=torch.float64)
LABELS = torch.tensor([0, 1, -1, 0, -2])  # valid: 0, 1, 3


def test_topk():
    r = topk(LOSS, LABELS, k=2)
    assert r.keep.tolist() == [3, 1]  # equal losses: higher index first
    assert r.normalizer == 2 and r.weight.tolist() == [1.0, 1.0]
    assert r.reduce(LOSS).item() == pytest.approx(0.9)
    r = topk(LOSS, LABELS, k=10)  # fewer valid samples than k: all of them
    assert r.keep.tolist() == [3, 1, 0] and r.normalizer == 3
    assert topk(LOSS, None, k=3).keep.tolist() == [3, 1, 2]  # no labels: all valid
    assert topk(LOSS, LABELS, k=0).keep.tolist() == []


def test_ratio_mtcnn():
    r = ratio(LOSS, LABELS, keep_ratio=0.7)  # int(3 * 0.7) = 2
    assert r.keep.tolist() == [3, 1] and r.normalizer == 2
    ten = torch.arange(10, dtype=torch.float64)
    assert ratio(ten, torch.zeros(10, dtype=torch.long)).keep.tolist() == [9, 8, 7, 6, 5, 4, 3]
    one = ratio(torch.tensor([2.0, 5.0]), torch.tensor([-1, 1]))  # int(1 * 0.7) = 0
    assert one.keep.tolist() == [] and one.reduce(torch.tensor([2.0, 5.0])).item() == 0.0
    assert ratio(LOSS, LABELS, keep_ratio=1.0).keep.tolist() == [3, 1, 0]


def test_neg_pos_ssd_per_image():
    loss = torch.tensor([5, 1, 4, 3, 2, 0.5, 6, 7], dtype=torch.float64)
    labels = torch.tensor([1, 0, 0, 0, 0, 0, -1, 0])
    image = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    # image 0: one positive -> 3 hardest of its 4 negatives; image 1: no positive -> none
    r = neg_pos(loss, labels, neg_pos_ratio=3, image_ids=image)
    assert r.keep.tolist() == [0, 2, 3, 4] and r.normalizer == 1
    r = neg_pos(loss, labels, neg_pos_ratio=1.5, image_ids=image)  # int(1.5) = 1
    assert r.keep.tolist() == [0, 2]
    # one image for all: quota 3 of the 6 negatives, the ignored 6 never taken
    r = neg_pos(loss, labels, neg_pos_ratio=3)
    assert r.keep.tolist() == [7, 0, 2, 3]
    # positives in image 1 too (label 2): its quota 3 covers its two negatives
    labels2 = torch.tensor([1, 0, 0, 0, 0, 0, 2, 0])
    r = neg_pos(loss, labels2, neg_pos_ratio=3, image_ids=image)
    assert r.keep.tolist() == [7, 6, 0, 2, 3, 4, 5] and r.normalizer == 2
    with pytest.raises(ValueError):
        neg_pos(loss, None)


def test_topk_threshold_keeps_ties_at_the_cut():
    loss = torch.tensor([3, 1, 2, 2, 2, 0], dtype=torch.float64)
    assert topk_threshold(loss, k=2).keep.tolist() == [0, 4, 3, 2]
    labels = torch.tensor([0, 0, 0, -1, 0, 0])
    r = topk_threshold(loss, labels, k=2)
    assert r.keep.tolist() == [0, 4, 2] and r.normalizer == 3
    assert topk_threshold(loss, labels, k=10).keep.tolist() == [0, 4, 2, 1, 5]
    assert topk_threshold(loss, torch.full((6,), -1), k=2).keep.tolist() == []


def test_mine_dispatch_and_reduce_gradient():
    loss = torch.tensor([0.2, 0.8, 0.5, 0.1], dtype=torch.float64, requires_grad=True)
    r = mine(loss, torch.tensor([0, 1, 0, -1]), "topk", k=2)
    assert r.keep.tolist() == [1, 2]
    r.reduce(loss).backward()
    assert loss.grad.tolist() == [0.0, 0.5, 0.5, 0.0]
    assert mine(loss.detach(), None, "ratio", keep_ratio=0.5).keep.tolist() == [1, 2]
    with pytest.raises(ValueError, match="unknown mining policy"):
        mine(loss, None, "hardest")


def test_focal_loss_hand_worked():
    logits = torch.zeros((4, 2), dtype=torch.float64)  # p = 0.5 for both classes
    labels = torch.tensor([1, 0, -1, -2])
    fl = focal_loss(logits, labels, alpha=0.25, gamma=2.0)
    ln2 = math.log(2)
    assert fl.tolist() == pytest.approx([0.25 * 0.25 * ln2, 0.75 * 0.25 * ln2, 0.0, 0.0], rel=1e-15)
    assert focal_loss(logits, labels, reduction="sum").item() == pytest.approx(0.25 * ln2)
    assert focal_loss(logits, labels, reduction="mean").item() == pytest.approx(0.125 * ln2)
    assert focal_loss(logits, labels, reduction="pos").item() == pytest.approx(0.25 * ln2)
    # gamma 0, alpha 0.5: half the cross-entropy
    x = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]], dtype=torch.float64)
    y = torch.tensor([2, 0])
    ce = torch.nn.functional.cross_entropy(x, y, reduction="none")
    assert torch.allclose(focal_loss(x, y, alpha=0.5, gamma=0.0), 0.5 * ce)
    # confident, correct samples are down-weighted much more than hard ones
    easy = focal_loss(torch.tensor([[0.0, 6.0]]), torch.tensor([1]))
    hard = focal_loss(torch.tensor([[6.0, 0.0]]), torch.tensor([1]))
    ce_e = torch.nn.functional.cross_entropy(torch.tensor([[0.0, 6.0]]), torch.tensor([1]))
    ce_h = torch.nn.functional.cross_entropy(torch.tensor([[6.0, 0.0]]), torch.tensor([1]))
    assert (easy / ce_e).item() < 1e-4 < (hard / ce_h).item()


def _layer(policy_str, **train):
    cfg = default_config()
    for k, v in train.items():
        cfg.set_key(f"TRAIN.{k}", v)
    text = ('name: "mine" type: "Python" python_param { module: "roi_data_layer.layer" '
            f'layer: "OHEMDataLayer" param_str: "{policy_str}" }}'
            + "".join(f' bottom: "b{i}"' for i in range(7)) + "".join(f' top: "t{i}"' for i in range(5)))
    return OHEMDataLayer(text_format.Parse(text, caffe_pb2.LayerParameter()), LayerContext(cfg=cfg))


def _inputs(r=60, seed=0):
    rng = np.random.default_rng(seed)
    prob = rng.dirichlet(np.ones(21), size=r).astype(np.float32)
    boxes = rng.uniform(0, 300, size=(r, 2))
    rois = np.concatenate((np.arange(r)[:, None] % 2, boxes, boxes + 40), 1).astype(np.float32)
    labels = np.where(rng.random(r) < 0.2, rng.integers(1, 21, r), 0).astype(np.float32)
    z = np.zeros((r, 84), np.float32)
    return [torch.from_numpy(a) for a in (prob, z, rois, labels, z, z, z)]


@pytest.mark.parametrize("policy", ["ratio", "neg_pos", "topk_threshold"])
def test_layer_policies_without_nms(policy):
    bottoms = _inputs()
    layer = _layer(f"{{'num_classes': 21, 'policy': '{policy}'}}", OHEM_USE_NMS=False, BATCH_SIZE=10)
    records = []
    layer.recorder = records.append
    tops = layer.forward(bottoms, [])
    rec = records[0]
    labels = bottoms[3].long()
    want = mine(rec.loss, labels, policy, **({"k": 10} if policy == "topk_threshold" else {}),
                **({"image_ids": bottoms[2][:, 0]} if policy == "neg_pos" else {}))
    assert rec.keep.tolist() == want.keep.tolist()
    assert torch.equal(tops[0], bottoms[2][want.keep])
    assert rec.policy == policy
    if policy == "ratio":
        assert len(want.keep) == int(60 * 0.7)


def test_layer_policy_with_nms_mines_among_survivors():
    bottoms = _inputs(seed=1)
    layer = _layer("{'num_classes': 21, 'policy': 'ratio', 'keep_ratio': 0.5}")
    records = []
    layer.recorder = records.append
    layer.forward(bottoms, [])
    rec = records[0]
    surv = torch.nonzero(~rec.suppressed).squeeze(1)
    want = surv[mine(rec.loss[surv], rec.labels[surv], "ratio", keep_ratio=0.5).keep]
    assert rec.keep.tolist() == want.tolist() and len(want) == int(len(surv) * 0.5)


# -- the registry: one contract, a new policy is one registration ------------------------------
@pytest.fixture
def scratch_registry():
    """The registry as it was after the test (policies registered by the test are removed)."""
    saved = dict(MINING_POLICIES)
    yield MINING_POLICIES
    MINING_POLICIES.clear()
    MINING_POLICIES.update(saved)


def test_a_registered_policy_is_used_by_name(scratch_registry):
    contexts = []

    @register_policy("above", options={"min_loss": 1.0},
                     max_kept=lambda r, cfg: min(r, int(cfg.TRAIN.BATCH_SIZE)))
    def above(loss, labels, context):
        """The hardest BATCH_SIZE RoIs with loss >= min_loss (no NMS)."""
        contexts.append(context)
        order = descending_order(loss)
        keep = order[loss[order] >= context.options["min_loss"]][:context.batch_size]
        survived = torch.ones_like(labels, dtype=torch.bool) if context.full else None
        return MiningResult.uniform(keep, loss, keep.shape[0], survived)

    bottoms = _inputs()
    layer = _layer("{'num_classes': 21, 'policy': 'above', 'min_loss': 2.5}", BATCH_SIZE=10)
    shapes = [tuple(b.shape) for b in bottoms]
    assert layer.top_shapes(shapes)[:2] == [(10, 5), (10,)]
    records = []
    layer.recorder = records.append
    tops = layer.forward(bottoms, [])
    rec = records[0]
    order = descending_order(rec.loss)
    want = order[rec.loss[order] >= 2.5][:10]
    assert 0 < len(want) and rec.keep.tolist() == want.tolist()
    assert torch.equal(tops[0], bottoms[2][want]) and torch.equal(tops[1], bottoms[3][want])
    assert rec.policy == "above" and rec.batch_size == 10 and not rec.suppressed.any()
    ctx = contexts[0]
    assert isinstance(ctx, MiningContext) and ctx.full and ctx.num_labels == 21
    assert ctx.options == {"min_loss": 2.5}
    assert torch.equal(ctx.image_ids, bottoms[2][:, 0]) and torch.equal(ctx.boxes, bottoms[2][:, 1:5])
    assert (ctx.batch_size, ctx.use_nms, ctx.nms_thresh) == (10, True, 0.7)
    # without a recorder: not full, the same rows
    layer.recorder = None
    assert torch.equal(layer.forward(bottoms, [])[0], tops[0]) and not contexts[1].full
    # the declared default, and an undeclared option refused
    assert _layer("{'num_classes': 21, 'policy': 'above'}").policy_options == {"min_loss": 1.0}
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['keep_ratio'\].*'above'"):
        _layer("{'num_classes': 21, 'policy': 'above', 'keep_ratio': 0.5}")
    # an unknown policy names the registered ones, this one included
    with pytest.raises(SpecError, match=r"policy 'nope' is not one of \['above', "):
        _layer("{'num_classes': 21, 'policy': 'nope'}")
    with pytest.raises(ValueError, match="already registered"):
        register_policy("above")(above)


def test_the_registry_keeps_no_test_policy():
    assert "above" not in MINING_POLICIES
    assert {"topk", "ratio", "neg_pos", "topk_threshold"} <= set(MINING_POLICIES)


def test_declared_options_are_the_rankings_defaults():
    for name, fn in (("ratio", ratio), ("neg_pos", neg_pos)):
        declared = MINING_POLICIES[name].options
        params = inspect.signature(fn).parameters
        assert declared and all(params[k].default == v for k, v in declared.items())
    assert MINING_POLICIES["topk"].options == {} == MINING_POLICIES["topk_threshold"].options
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['neg_pos_ratio'\]"):
        _layer("{'num_classes': 21, 'policy': 'ratio', 'neg_pos_ratio': 2}")
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['keep_ratio'\]"):
        _layer("{'num_classes': 21, 'keep_ratio': 0.5}")  # topk, the original, takes none


def test_max_kept_bounds_the_top_shapes():
    cfg = default_config()
    cfg.set_key("TRAIN.BATCH_SIZE", 64)
    assert MINING_POLICIES["topk"].max_kept(300, cfg) == 64
    assert MINING_POLICIES["topk"].max_kept(10, cfg) == 10
    for name in ("ratio", "neg_pos", "topk_threshold"):
        assert MINING_POLICIES[name].max_kept(300, cfg) == 300
        layer = _layer(f"{{'num_classes': 21, 'policy': '{name}'}}", BATCH_SIZE=10)
        assert layer.top_shapes([tuple(b.shape) for b in _inputs()])[0] == (60, 5)
