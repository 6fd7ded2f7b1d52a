"""RoIDataLayer: tops, order rules, determinism with prefetch workers, resume state."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from readonly_ohem.config import default_config
from readonly_ohem.roi_data.layer import MinibatchPlanner, RoIDataLayer
from readonly_ohem.datasets import get_imdb
from readonly_ohem.roi_data.roidb import training_roidb
from readonly_ohem.errors import ConfigError, DataError, SpecError
from readonly_ohem.caffe.layers.base import PYTHON_LAYERS, LayerContext
from readonly_ohem.caffe.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[2]
TOPS = ("data", "rois", "labels", "bbox_targets", "bbox_inside_weights", "bbox_outside_weights")


def make_layer(cfg, tops=TOPS, param_str="'num_classes': 21"):
    text = "name: 'data' type: 'Python' " + " ".join(f"top: '{t}'" for t in tops)
    text += f" python_param {{ module: 'roi_data_layer.layer' layer: 'RoIDataLayer' param_str: \"{param_str}\" }}"
    cls = PYTHON_LAYERS[("roi_data_layer.layer", "RoIDataLayer")]
    return cls(text_format.Parse(text, caffe_pb2.LayerParameter()), LayerContext(cfg=cfg))


@pytest.fixture
def setup(fixtures_dir):
    cfg = default_config()
    cfg.TRAIN.SCALES = (300, 250)
    cfg.TRAIN.MAX_SIZE = 500
    d = fixtures_dir / "original_pipeline" / "train"
    imdb = get_imdb("voc_2007_trainval", d, proposals=d / "voc_2007_trainval.mat", cfg=cfg, cache_dir=False)
    roidb, _, _ = training_roidb(imdb, cfg, verbose=False)
    return cfg, roidb


def run(cfg, roidb, n, workers=0, state_at=None):
    layer = make_layer(cfg)
    layer.set_roidb(roidb, prefetch=workers > 0, num_workers=workers)
    outs, state = [], None
    for k in range(n):
        if k == state_at:
            state = layer.data_order_state()
        outs.append(layer([], []))
    return layer, outs, state


def test_registered_and_tops(setup):
    cfg, roidb = setup
    assert PYTHON_LAYERS[("roi_data_layer.layer", "RoIDataLayer")] is RoIDataLayer
    assert RoIDataLayer.backprop_to_bottoms is False
    layer, outs, _ = run(cfg, roidb, 1)
    data, rois, labels, t, wi, wo = outs[0]
    assert data.shape[:2] == (2, 3) and min(data.shape[2:]) in (250, 300)
    r = rois.shape[0]
    assert rois.shape == (r, 5) and labels.shape == (r,) and t.shape == wi.shape == wo.shape == (r, 84)
    assert all(x.dtype == torch.float32 for x in outs[0])
    assert torch.equal(wo, (wi > 0).float())
    assert layer.top_shapes([]) == [(2, 3, 300, 500), (1, 5), (1,), (1, 84), (1, 84), (1, 84)]
    # rois are the roidb boxes of the planned images times their scale, batch index first
    plan = layer.last_plan
    assert sorted(set(rois[:, 0].tolist())) == [0.0, 1.0]
    e = roidb[plan["db_inds"][0]]
    h, w = e["height"], e["width"]
    s = cfg.TRAIN.SCALES[plan["scale_inds"][0]] / min(h, w)
    n0 = plan["keep"][0].size
    np.testing.assert_allclose(rois[:n0, 1:].numpy(), e["boxes"][plan["keep"][0]] * s, rtol=1e-6)


def test_fewer_tops_without_bbox_reg(setup):
    cfg, roidb = setup
    cfg.TRAIN.BBOX_REG = False
    layer = make_layer(cfg, TOPS[:3])
    layer.set_roidb(roidb)
    assert len(layer([], [])) == 3
    with pytest.raises(SpecError, match="'data'.*BBOX_REG"):
        make_layer(cfg, TOPS)


def test_bad_param_str_and_no_roidb():
    cfg = default_config()
    with pytest.raises(SpecError, match="num_classes"):
        make_layer(cfg, param_str="'classes': 3")
    with pytest.raises(DataError, match="set_roidb"):
        make_layer(cfg)([], [])


def test_same_minibatches_with_and_without_workers_and_resume(setup):
    cfg, roidb = setup
    _, a, st = run(cfg, roidb, 8, workers=0, state_at=3)
    layer, b, st2 = run(cfg, roidb, 8, workers=2, state_at=3)
    for x, y in zip(a, b):
        assert all(torch.equal(p, q) for p, q in zip(x, y))
    assert st == st2
    json.dumps(st)  # JSON-friendly
    layer.load_data_order_state(st)  # resume: minibatches 3.. again
    for k in range(3, 8):
        assert all(torch.equal(p, q) for p, q in zip(layer([], []), a[k]))
    layer.close()


def test_order_rules(setup):
    cfg, roidb = setup
    cfg.TRAIN.IMS_PER_BATCH = 2
    p = MinibatchPlanner(roidb, cfg)
    first = p.perm.copy()
    # aspect grouping: every pair of the permutation has the same orientation
    horz = np.array([e["width"] >= e["height"] for e in roidb])
    assert (horz[first[0::2]] == horz[first[1::2]]).all()
    assert sorted(first) == list(range(len(roidb)))
    # reshuffle when cur + IMS_PER_BATCH >= len: 10 entries -> 4 batches per pass, last pair skipped
    assert len(roidb) == 10
    seen = [tuple(p.next_inds()) for _ in range(4)]
    assert [i for s in seen for i in s] == list(first[:8])
    nxt = p.next_inds()
    assert p.cur == 2 and tuple(nxt) == tuple(p.perm[:2])
    # seeded: the same seed gives the same order
    assert (MinibatchPlanner(roidb, cfg).perm == first).all()
    cfg.TRAIN.ASPECT_GROUPING = False
    q = MinibatchPlanner(roidb, cfg)
    assert (q.perm == np.random.RandomState(cfg.RNG_SEED).permutation(len(roidb))).all()


def test_state_dict_is_nn_modules_and_data_order_is_explicit(setup):
    cfg, roidb = setup
    layer = make_layer(cfg)
    assert layer.data_order_state() == {}  # before set_roidb
    layer.set_roidb(roidb)
    assert isinstance(layer.state_dict(), dict) and len(layer.state_dict()) == 0  # no persistent buffers
    st = layer.data_order_state()
    assert set(st) == {"perm", "cur", "rng"} and st == MinibatchPlanner(roidb, cfg).data_order_state()
    layer.load_data_order_state({})  # an empty state changes nothing
    assert layer.data_order_state() == st


# -- the HAS_RPN form (Faster R-CNN end-to-end) -------------------------------------------------
RPN_TOPS = ("data", "im_info", "gt_boxes")


@pytest.fixture
def rpn_setup(fixtures_dir):
    """The original's end-to-end config (HAS_RPN, PROPOSAL_METHOD gt) on the fixture VOC set,
    which has no proposals file in reach: the gt-only roidb must not need one."""
    cfg = default_config()
    cfg.merge_file(REPO / "prototxt" / "cfgs" / "faster_rcnn_end2end.yml")
    cfg.TRAIN.SCALES = (300, 250)
    cfg.TRAIN.MAX_SIZE = 500
    d = fixtures_dir / "original_pipeline" / "train"
    imdb = get_imdb("voc_2007_trainval", d, proposals=d / "missing.mat", cfg=cfg, cache_dir=False)
    roidb, means, stds = training_roidb(imdb, cfg, verbose=False)
    return cfg, imdb, roidb, means, stds


def test_gt_proposal_method_trains_on_gt_rows_only(rpn_setup):
    cfg, imdb, roidb, means, stds = rpn_setup
    gt = imdb.gt_roidb()
    # 6 images x 2 (flipped), two without a non-difficult object filtered: as the original
    assert len(roidb) == 10 and sum(e["flipped"] for e in roidb) == 5
    for e in roidb:
        i = imdb.image_index.index(e["image_id"])
        assert (e["gt_classes"] > 0).all() and (e["max_overlaps"] == 1).all()
        expect = gt[i]["boxes"]
        if e["flipped"]:
            expect = np.stack([e["width"] - expect[:, 2] - 1, expect[:, 1],
                               e["width"] - expect[:, 0] - 1, expect[:, 3]], 1)
        np.testing.assert_array_equal(e["boxes"], expect)
    # BBOX_NORMALIZE_TARGETS_PRECOMPUTED: the means/stds the snapshot un-normalizes with
    np.testing.assert_array_equal(means, np.zeros(84))
    np.testing.assert_array_equal(stds, np.tile([0.1, 0.1, 0.2, 0.2], 21))


def test_rpn_tops_are_the_image_its_info_and_scaled_gt(rpn_setup):
    cfg, _, roidb, _, _ = rpn_setup
    layer = make_layer(cfg, RPN_TOPS)
    assert layer.top_shapes([]) == [(1, 3, 300, 500), (1, 3), (1, 4)]  # the original's setup shapes
    layer.set_roidb(roidb)
    for _ in range(3):
        data, im_info, gt_boxes = layer([], [])
        plan = layer.last_plan
        e = roidb[plan["db_inds"][0]]
        s = cfg.TRAIN.SCALES[plan["scale_inds"][0]] / min(e["height"], e["width"])  # < MAX_SIZE here
        assert data.shape == (1, 3, round(e["height"] * s), round(e["width"] * s))
        assert im_info.dtype == gt_boxes.dtype == torch.float32
        np.testing.assert_array_equal(im_info.numpy(),
                                      np.array([[data.shape[2], data.shape[3], s]], np.float32))
        rows = np.nonzero(e["gt_classes"] != 0)[0]
        want = np.hstack([e["boxes"][rows] * s, e["gt_classes"][rows, None]]).astype(np.float32)
        np.testing.assert_array_equal(gt_boxes.numpy(), want)
    assert plan["keep"] is None and plan["num_fg"] is None  # nothing sampled: the RPN makes the RoIs


def test_rpn_form_errors(rpn_setup):
    cfg, _, roidb, _, _ = rpn_setup
    with pytest.raises(SpecError, match="'data'.*HAS_RPN the tops are data, im_info, gt_boxes"):
        make_layer(cfg, TOPS)
    cfg.TRAIN.IMS_PER_BATCH = 2
    with pytest.raises(SpecError, match="IMS_PER_BATCH 1"):
        make_layer(cfg, RPN_TOPS)
    cfg.TRAIN.IMS_PER_BATCH = 1
    cfg.TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED = False
    with pytest.raises(ConfigError, match="HAS_RPN.*BBOX_NORMALIZE_TARGETS_PRECOMPUTED True"):
        training_roidb(None, cfg, verbose=False)
