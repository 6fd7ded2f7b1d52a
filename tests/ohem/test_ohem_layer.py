"""OHEMDataLayer against a plain-Python reference of the original algorithm (per-RoI loops,
py_cpu_nms with +1 and IoU > thresh, argsort()[::-1]); edge cases; config keys; records."""

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import readonly_ohem.ops.nms as nms_mod
from readonly_ohem.config import default_config, load_config
from readonly_ohem.errors import ConfigError, DataError, SpecError
from readonly_ohem.caffe.layers.base import PYTHON_LAYERS, LayerContext
from readonly_ohem.ohem.layer import OHEMDataLayer
from readonly_ohem.ohem.loss import bbox_loss, cls_loss
from readonly_ohem.ops.boxes import bbox_overlaps
from readonly_ohem.caffe.proto import caffe_pb2

from original_code import argsort_desc_stable as argsort_desc, get_ohem_minibatch
from original_code import ohem_loss as ref_loss

C = 21


# -- the reference: the original OHEMDataLayer (tests/original_code.py), ties made deterministic --
def ref_select(loss, rois, labels, batch_size, use_nms, thresh):
    """(hard indices, sorted NMS survivors or None) of the original, with a stable argsort."""
    hard, keep_inds = get_ohem_minibatch(loss, rois, labels, batch_size, use_nms,
                                         np.float32(thresh), argsort_desc)
    if keep_inds is None:
        return hard, None
    return hard, np.array(sorted(keep_inds), dtype=np.int64)


# -- inputs ---------------------------------------------------------------------------------------
def make_inputs(rng, n_img, r_per_img, num_classes=C, fg_frac=0.3, general_weights=False):
    rois, labels = [], []
    for im in range(n_img):
        n_obj = 4
        ctr = rng.uniform(80, 500, size=(n_obj, 2))
        size = rng.uniform(30, 250, size=(n_obj, 2))
        src = rng.integers(0, n_obj, size=r_per_img)
        c = ctr[src] + rng.normal(0, 0.2, size=(r_per_img, 2)) * size[src]
        s = size[src] * np.exp(rng.normal(0, 0.2, size=(r_per_img, 2)))
        boxes = np.concatenate((c - s / 2, c + s / 2), 1) * 0.937
        rois.append(np.concatenate((np.full((r_per_img, 1), im), boxes), 1))
        lab = np.where(rng.random(r_per_img) < fg_frac, rng.integers(1, max(num_classes, 2), r_per_img), 0)
        labels.append(np.minimum(lab, num_classes - 1))
    rois = np.concatenate(rois).astype(np.float32)
    labels = np.concatenate(labels)
    r = rois.shape[0]
    logits = rng.normal(0, 2, size=(r, num_classes))
    logits[np.arange(r), labels] += np.where(rng.random(r) < 0.5, 6.0, 0.0)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob = (prob / prob.sum(1, keepdims=True)).astype(np.float32)
    prob[rng.random(r) < 0.02, 0] = 0.0  # some p[label] = 0 for background: the eps clamp
    w = 4 * num_classes
    targets = np.zeros((r, w), np.float32)
    inside = np.zeros((r, w), np.float32)
    if general_weights:  # weights anywhere, fg and bg rows alike (the layer must not assume)
        inside[:] = (rng.random((r, w)) < 0.1) * rng.choice([0.5, 1.0, 2.0], size=(r, w))
        targets[:] = rng.normal(0, 1, size=(r, w))
    else:
        for k in range(4):
            inside[np.arange(r), 4 * labels + k] = (labels > 0)
            targets[np.arange(r), 4 * labels + k] = rng.normal(0, 1, size=r) * (labels > 0)
    outside = (inside > 0).astype(np.float32) * (2.0 if general_weights else 1.0)
    pred = (targets + rng.normal(0, 1.0, size=(r, w))).astype(np.float32)
    return [prob, pred, rois, labels.astype(np.float32), targets, inside, outside]


def make_layer(cfg=None, bbox_reg=True, param_str="'num_classes': 21", extras=None):
    nb, nt = (7, 5) if bbox_reg else (4, 2)
    text = (f'name: "hard_roi_mining" type: "Python" python_param {{ module: "roi_data_layer.layer" '
            f'layer: "OHEMDataLayer" param_str: "{param_str}" }}'
            + "".join(f' bottom: "b{i}"' for i in range(nb)) + "".join(f' top: "t{i}"' for i in range(nt)))
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return OHEMDataLayer(param, LayerContext(cfg=cfg, extras=extras or {}))


def cfg_with(**train):
    cfg = default_config()
    for k, v in train.items():
        cfg.set_key(f"TRAIN.{k}", v)
    return cfg


def run_layer(layer, arrays):
    records = []
    layer.recorder = records.append
    tops = layer.forward([torch.from_numpy(a) for a in arrays], [])
    return tops, records[0]


def check_against_reference(arrays, cfg, bbox_reg=True):
    tcfg = cfg.TRAIN
    prob, pred, rois, labels = arrays[:4]
    regs = arrays[4:7] if bbox_reg else [None] * 3
    loss = ref_loss(prob, pred, labels, *regs)
    hard, survivors = ref_select(loss, rois, labels, tcfg.BATCH_SIZE, tcfg.OHEM_USE_NMS,
                                 tcfg.OHEM_NMS_THRESH)
    layer = make_layer(cfg, bbox_reg)
    tops, rec = run_layer(layer, arrays)
    assert rec.keep.tolist() == hard.tolist()
    # float64 logs differ in the last bit between libms (torch, numpy, math): a few ulp
    np.testing.assert_allclose(rec.loss.numpy(), loss, rtol=1e-15, atol=0)
    assert len(tops) == (5 if bbox_reg else 2)
    np.testing.assert_array_equal(tops[0].numpy(), rois[hard])
    np.testing.assert_array_equal(tops[1].numpy(), labels[hard])
    if bbox_reg:
        for t, a in zip(tops[2:], arrays[4:7]):
            np.testing.assert_array_equal(t.numpy(), a[hard])
    if survivors is not None:
        assert np.flatnonzero(~rec.suppressed.numpy()).tolist() == survivors.tolist()
    # without a recorder the layer stops NMS early: same rows
    layer.recorder = None
    tops2 = layer.forward([torch.from_numpy(a) for a in arrays], [])
    np.testing.assert_array_equal(tops2[0].numpy(), rois[hard])
    return hard


@pytest.mark.parametrize("r_per_img", [40, 300, 2000])
@pytest.mark.parametrize("n_img", [1, 2])
@pytest.mark.parametrize("use_nms", [True, False])
def test_matches_reference_random(r_per_img, n_img, use_nms):
    rng = np.random.default_rng(r_per_img * 10 + n_img)
    arrays = make_inputs(rng, n_img, r_per_img)
    hard = check_against_reference(arrays, cfg_with(OHEM_USE_NMS=use_nms, BATCH_SIZE=128))
    assert len(hard) == min(128, n_img * r_per_img) or use_nms


def test_matches_reference_4000_rois_batch_64():
    rng = np.random.default_rng(11)
    arrays = make_inputs(rng, 2, 2000, fg_frac=0.1)
    check_against_reference(arrays, cfg_with(BATCH_SIZE=64))


def test_matches_reference_weights_outside_the_label_block():
    rng = np.random.default_rng(12)
    arrays = make_inputs(rng, 2, 150, general_weights=True)
    check_against_reference(arrays, cfg_with(BATCH_SIZE=32))


def test_matches_reference_on_the_original_minibatches(fixtures_dir):
    d = np.load(fixtures_dir / "ohem" / "original_minibatches.npz")
    rng = np.random.default_rng(13)
    parts = []
    for im, key in enumerate(("0", "6")):
        rois = d[f"{key}/rois"].astype(np.float32)
        rois[:, 0] = im
        parts.append([rois, d[f"{key}/labels"].astype(np.float32)]
                     + [d[f"{key}/{b}"] for b in ("bbox_targets", "bbox_inside_weights",
                                                   "bbox_outside_weights")])
    for sel in ([parts[0]], parts):  # one image, then two
        rois, labels, targets, inside, outside = (np.concatenate(x) for x in zip(*sel))
        r = rois.shape[0]
        logits = rng.normal(0, 2, size=(r, C))
        prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        pred = (targets + rng.normal(0, 0.5, size=targets.shape)).astype(np.float32)
        arrays = [prob.astype(np.float32), pred, rois, labels, targets, inside, outside]
        hard = check_against_reference(arrays, cfg_with(BATCH_SIZE=64, IMS_PER_BATCH=1))
        assert 0 < len(hard) <= 64


def test_ties_follow_the_reversed_stable_argsort():
    # identical RoIs (same box, label, probabilities): all losses tie
    r = 12
    rois = np.array([[i % 2, 10, 10, 50, 50] for i in range(r)], np.float32)
    rois[::3, 1] += 100  # some far apart, so NMS keeps more than one per group
    rois[::3, 3] += 100
    labels = np.array([0, 1, 2] * 4, np.float32)
    prob = np.full((r, 3), 1 / 3, np.float32)
    arrays = [prob, np.zeros((r, 12), np.float32), rois, labels] + [np.zeros((r, 12), np.float32)] * 3
    for use_nms in (True, False):
        cfg = cfg_with(OHEM_USE_NMS=use_nms, BATCH_SIZE=5)
        hard = check_against_reference(arrays, cfg)
        assert len(hard) == 5
    # without NMS, equal losses: the higher index first
    assert check_against_reference(arrays, cfg_with(OHEM_USE_NMS=False, BATCH_SIZE=4)).tolist() == [11, 10, 9, 8]


def test_fewer_rois_than_batch_size():
    rng = np.random.default_rng(14)
    arrays = make_inputs(rng, 1, 9)
    for use_nms in (True, False):
        hard = check_against_reference(arrays, cfg_with(OHEM_USE_NMS=use_nms))
        assert len(hard) <= 9
    layer = make_layer(cfg_with(OHEM_USE_NMS=False))
    tops = layer.forward([torch.from_numpy(a) for a in arrays], [])
    assert [tuple(t.shape) for t in tops] == [(9, 5), (9,), (9, 84), (9, 84), (9, 84)]


def test_one_class_only_and_empty_foreground():
    rng = np.random.default_rng(15)
    arrays = make_inputs(rng, 2, 100, num_classes=1)  # cls_prob (R, 1): background only
    assert arrays[0].shape == (200, 1) and (arrays[3] == 0).all()
    hard = check_against_reference(arrays, cfg_with(BATCH_SIZE=16))
    assert len(hard) == 16
    arrays = make_inputs(rng, 1, 100, fg_frac=0.0)  # 21 classes, no foreground
    layer = make_layer(cfg_with(BATCH_SIZE=16))
    tops, rec = run_layer(layer, arrays)
    assert (rec.loss_bbox == 0).all()
    check_against_reference(arrays, cfg_with(BATCH_SIZE=16))


def test_all_rois_one_label():
    rng = np.random.default_rng(16)
    arrays = make_inputs(rng, 2, 200, fg_frac=1.0)
    arrays[3][:] = 7
    check_against_reference(arrays, cfg_with(BATCH_SIZE=50))


def test_bbox_reg_off_has_four_bottoms_two_tops():
    cfg = cfg_with(BBOX_REG=False, BATCH_SIZE=20)
    rng = np.random.default_rng(17)
    arrays = make_inputs(rng, 2, 120)
    check_against_reference(arrays[:4], cfg, bbox_reg=False)
    with pytest.raises(SpecError, match="2 tops"):
        make_layer(cfg, bbox_reg=True)
    with pytest.raises(SpecError, match="7 bottoms"):
        make_layer(default_config(), bbox_reg=False)


def test_config_keys_via_set_and_the_ohem_yml(shared_dir):
    cfg = load_config([shared_dir / "reference_cfgs" / "fast_rcnn_ohem.yml"],
                      [["TRAIN.OHEM_NMS_THRESH", "0.5"], ["TRAIN.BATCH_SIZE", "24"]])
    assert cfg.TRAIN.BATCH_SIZE == 24 and cfg.TRAIN.USE_OHEM
    rng = np.random.default_rng(18)
    arrays = make_inputs(rng, 1, 400)
    assert len(check_against_reference(arrays, cfg)) == 24
    cfg.set_key("TRAIN.OHEM_USE_NMS", "False")
    layer = make_layer(cfg)
    _, rec = run_layer(layer, arrays)
    assert not rec.use_nms and rec.keep.tolist() == argsort_desc(rec.loss.numpy())[:24].tolist()
    assert not rec.suppressed.any()


def test_config_is_read_at_every_forward():
    cfg = default_config()
    layer = make_layer(cfg)
    arrays = make_inputs(np.random.default_rng(19), 1, 300)
    assert layer.forward([torch.from_numpy(a) for a in arrays], [])[0].shape[0] <= 128
    cfg.set_key("TRAIN.BATCH_SIZE", "7")
    assert layer.forward([torch.from_numpy(a) for a in arrays], [])[0].shape[0] == 7


def test_loss_hand_worked():
    # RoI 0: label 1, p = 0.25; bbox d = in_w * (pred - t) = [0.5, -2, (skipped), 3 * 0.5]
    #   smoothL1: 0.125, 1.5, -, 1.0; out_w: 1, 2, -, 1 -> 0.125 + 3.0 + 1.0 = 4.125
    # RoI 1: label 0, p = 0 -> -log(eps); bbox ignored for background
    prob = torch.tensor([[0.75, 0.25], [0.0, 1.0]])
    labels = torch.tensor([1, 0])
    pred = torch.tensor([[9, 9, 9, 9, 1.5, -1, 7, 3], [5, 5, 5, 5, 5, 5, 5, 5]])
    tgt = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0.0]])
    inw = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 0.5], [1, 1, 1, 1, 1, 1, 1, 1.0]])
    outw = torch.tensor([[5, 5, 5, 5, 1, 2, 9, 1], [1, 1, 1, 1, 1, 1, 1, 1.0]])
    lc = cls_loss(prob, labels)
    lb = bbox_loss(labels, pred, tgt, inw, outw)
    assert lc.dtype == torch.float64
    assert lc.tolist() == [-np.log(np.float64(np.float32(0.25))), -np.log(np.finfo(float).eps)]
    assert lb.tolist() == [4.125, 0.0]


def test_tops_reach_no_gradient_and_flags():
    assert OHEMDataLayer.backprop_to_bottoms is False
    assert PYTHON_LAYERS[("roi_data_layer.layer", "OHEMDataLayer")] is OHEMDataLayer
    arrays = make_inputs(np.random.default_rng(20), 1, 50)
    bottoms = [torch.from_numpy(a).requires_grad_(a.dtype == np.float32) for a in arrays]
    tops = make_layer().forward(bottoms, [])
    assert not any(t.requires_grad for t in tops)


def test_top_shapes_is_an_upper_bound():
    layer = make_layer(cfg_with(BATCH_SIZE=64))
    shapes = [(300, 21), (300, 84), (300, 5), (300,), (300, 84), (300, 84), (300, 84)]
    assert layer.top_shapes(shapes) == [(64, 5), (64,), (64, 84), (64, 84), (64, 84)]
    assert layer.top_shapes([(10, 21)] + shapes[1:])[0] == (10, 5)


def test_bad_inputs_name_the_layer_and_blob():
    arrays = make_inputs(np.random.default_rng(21), 1, 20)
    bad = list(arrays)
    bad[3] = arrays[3].copy()
    bad[3][0] = 21
    with pytest.raises(DataError, match="hard_roi_mining.*labels"):
        make_layer().forward([torch.from_numpy(a) for a in bad], [])
    bad[3][0] = 1.5
    with pytest.raises(DataError, match="labels"):
        make_layer().forward([torch.from_numpy(a) for a in bad], [])
    bad = list(arrays)
    bad[2] = arrays[2][:, :4].copy()
    with pytest.raises(SpecError, match="rois"):
        make_layer().forward([torch.from_numpy(a) for a in bad], [])
    bad = list(arrays)
    bad[5] = arrays[5][:, :80].copy()
    with pytest.raises(SpecError, match="bbox_inside_weights"):
        make_layer().forward([torch.from_numpy(a) for a in bad], [])
    with pytest.raises(SpecError, match="num_classes"):
        make_layer(param_str="'foo': 1")
    with pytest.raises(SpecError, match="policy"):
        make_layer(param_str="{'num_classes': 21, 'policy': 'nope'}")


def test_vectorized_nms_steps_path_in_the_layer(monkeypatch):
    monkeypatch.setattr(nms_mod, "_FORCE_STEPS", True)
    arrays = make_inputs(np.random.default_rng(22), 2, 500)
    check_against_reference(arrays, cfg_with(BATCH_SIZE=64))


def test_record_contents():
    arrays = make_inputs(np.random.default_rng(23), 2, 80)
    layer = make_layer(cfg_with(BATCH_SIZE=30), extras={"recorder": None})
    tops, rec = run_layer(layer, arrays)
    r = 160
    assert rec.num_rois == r and rec.keep.shape == (30,)
    assert rec.kept.sum() == 30 and rec.kept[rec.keep].all()
    assert torch.equal(rec.loss, rec.loss_cls + rec.loss_bbox)
    assert rec.labels.tolist() == arrays[3].astype(int).tolist()
    assert rec.image.tolist() == [0] * 80 + [1] * 80
    np.testing.assert_array_equal(rec.boxes.numpy(), arrays[2][:, 1:5])
    assert not (rec.kept & rec.suppressed).any()
    # a suppressed RoI overlaps a kept-by-NMS RoI of its image and label with a higher loss
    surv = ~rec.suppressed
    for i in torch.nonzero(rec.suppressed).squeeze(1).tolist()[:20]:
        same = surv & (rec.labels == rec.labels[i]) & (rec.image == rec.image[i]) & (rec.loss >= rec.loss[i])
        iou = bbox_overlaps(rec.boxes[i:i + 1], rec.boxes[same])
        assert (iou > 0.7).any()
    d = rec.to_numpy()
    assert isinstance(d["loss"], np.ndarray) and d["policy"] == "topk" and d["batch_size"] == 30
    assert d["keep"].tolist() == rec.keep.tolist()


def test_inactive_recorder_gets_a_cheap_record():
    class Rec(list):
        active = False

        def __call__(self, record):
            self.append(record)

    arrays = make_inputs(np.random.default_rng(24), 1, 200)
    layer = make_layer(cfg_with(BATCH_SIZE=16))
    layer.recorder = Rec()
    layer.forward([torch.from_numpy(a) for a in arrays], [])
    assert layer.recorder[0].suppressed is None and layer.recorder[0].keep.numel() == 16


def test_two_recorders_on_one_layer():
    """``add_recorder``: both get every record; NMS is decided for every RoI when either is active."""
    from readonly_ohem.ohem.record import Recorders, add_recorder

    class Rec(list):
        def __init__(self, active):
            super().__init__()
            self.active = active

        def __call__(self, record):
            self.append(record)

    arrays = make_inputs(np.random.default_rng(24), 1, 200)
    layer = make_layer(cfg_with(BATCH_SIZE=16))
    a, b, c = Rec(False), Rec(False), Rec(True)
    add_recorder(layer, a)
    assert layer.recorder is a
    add_recorder(layer, b)
    layer.forward([torch.from_numpy(x) for x in arrays], [])
    assert a[0] is b[0] and a[0].suppressed is None  # neither active: the cheap record
    add_recorder(layer, c)
    assert isinstance(layer.recorder, Recorders) and layer.recorder.recorders == [a, b, c]
    layer.forward([torch.from_numpy(x) for x in arrays], [])
    assert a[1] is b[1] is c[0] and c[0].suppressed is not None
    assert torch.equal(c[0].keep, a[0].keep)  # the same rows kept either way
    layer.recorder = Recorders(a, b)
    assert not layer.recorder.active


def test_runs_through_the_cli(tmp_path):
    from readonly_ohem.cli import main

    names = ["cls_prob_readonly", "bbox_pred_readonly", "rois", "labels", "bbox_targets",
             "bbox_inside_weights", "bbox_outside_weights"]
    arrays = make_inputs(np.random.default_rng(25), 2, 300)
    inputs = dict(zip(names, arrays))
    proto = ['name: "ohem_only"']
    for n, a in inputs.items():
        dims = " ".join(f"dim: {d}" for d in a.shape)
        proto.append(f'layer {{ name: "{n}" type: "Input" top: "{n}" input_param {{ shape {{ {dims} }} }} }}')
    proto.append('layer { name: "hard_roi_mining" type: "Python" '
                 + " ".join(f'bottom: "{n}"' for n in names) + " "
                 + " ".join(f'top: "{t}"' for t in ("rois_hard", "labels_hard", "bbox_targets_hard",
                                                    "bbox_inside_weights_hard",
                                                    "bbox_outside_weights_hard"))
                 + ' python_param { module: "roi_data_layer.layer" layer: "OHEMDataLayer" '
                 "param_str: \"'num_classes': 21\" } }")
    (tmp_path / "net.prototxt").write_text("\n".join(proto))
    np.savez(tmp_path / "in.npz", **inputs)
    for set_pairs, use_nms in (([], True), (["--set", "TRAIN.OHEM_USE_NMS", "False"], False)):
        rc = main(["run", str(tmp_path / "net.prototxt"), "--inputs", str(tmp_path / "in.npz"),
                   "--out", str(tmp_path / "out.npz"), "--set", "TRAIN.BATCH_SIZE", "40"] + set_pairs)
        assert rc == 0
        out = np.load(tmp_path / "out.npz")
        loss = ref_loss(arrays[0], arrays[1], arrays[3], *arrays[4:7])
        hard, _ = ref_select(loss, arrays[2], arrays[3], 40, use_nms, 0.7)
        np.testing.assert_array_equal(out["rois_hard"], arrays[2][hard])
        np.testing.assert_array_equal(out["labels_hard"], arrays[3][hard])
        np.testing.assert_array_equal(out["bbox_outside_weights_hard"], arrays[6][hard])


# -- the fast paths (label blocks, top-K candidates) against the reference and their fallbacks ---
def test_label_block_loss_equals_the_general_loss_bit_for_bit():
    from readonly_ohem.ohem import loss as loss_mod

    rng = np.random.default_rng(30)
    prob, pred, rois, labels, targets, inside, outside = make_inputs(rng, 2, 300)
    inside = inside.copy()
    fg = np.flatnonzero(labels > 0)
    inside[fg[0], 4 * int(labels[fg[0]])] = -0.0  # a -0.0 weight: skipped by the original
    inside[fg[1], 4 * int(labels[fg[1]]) + 1] = 0.0
    pred = pred.copy()
    pred[fg[1], 4 * int(labels[fg[1]]) + 1] = np.inf  # under a zero weight: must stay skipped
    pred[fg[2], 4 * int(labels[fg[2]]) + 2] = 0.3 + targets[fg[2], 4 * int(labels[fg[2]]) + 2]
    t = [torch.from_numpy(a) for a in (labels, pred, targets, inside, outside)]
    lab = t[0].long()
    fast = bbox_loss(lab, *t[1:])
    general = loss_mod._general_loss(torch.zeros(lab.shape[0], dtype=torch.float64),
                                     torch.nonzero(lab > 0).squeeze(1), *t[1:])
    assert torch.equal(fast, general)
    # the original's bbox term: its loss with p[label] = 1 (a classification term of -0.0)
    want = ref_loss(np.ones_like(prob), pred, labels, targets, inside, outside)
    assert np.array_equal(fast.numpy(), want) and np.isfinite(want).all()


def test_weights_in_background_rows_fall_back_exactly():
    rng = np.random.default_rng(31)
    arrays = make_inputs(rng, 2, 300)
    inside = arrays[5].copy()
    bg = np.flatnonzero(arrays[3] == 0)
    inside[bg[:5], 7] = 1.0  # ignored by the original (background rows have no bbox loss)
    arrays[5] = inside
    check_against_reference(arrays, cfg_with(BATCH_SIZE=64))


def distinct_losses(arrays, rng):
    """make_inputs with its p[label] = 0 rows (equal losses at the top: the tie path) made small
    distinct probabilities instead, so that the top-K fast path decides."""
    prob = arrays[0].copy()
    zero = prob == 0
    prob[zero] = rng.uniform(1e-7, 1e-5, size=int(zero.sum())).astype(np.float32)
    return [prob] + list(arrays[1:])


def spy_fast_path(monkeypatch):
    from readonly_ohem.ohem import selection

    used, sizes = [], []
    fast, prefix = selection._first_survivors, selection.prefix_nms

    def first_survivors(*args, **kwargs):
        out = fast(*args, **kwargs)
        used.append(out is not None)
        return out

    def prefix_nms(boxes, *args, **kwargs):
        sizes.append(int(boxes.shape[0]))
        return prefix(boxes, *args, **kwargs)

    monkeypatch.setattr(selection, "_first_survivors", first_survivors)
    monkeypatch.setattr(selection, "prefix_nms", prefix_nms)
    return used, sizes


@pytest.mark.parametrize("n_img,r_per_img,batch", [(1, 300, 64), (2, 2000, 128), (1, 2000, 32)])
def test_top_candidates_fast_path_matches_reference(monkeypatch, n_img, r_per_img, batch):
    rng = np.random.default_rng(34 + n_img + r_per_img)
    arrays = distinct_losses(make_inputs(rng, n_img, r_per_img), rng)
    used, _ = spy_fast_path(monkeypatch)
    check_against_reference(arrays, cfg_with(BATCH_SIZE=batch))
    assert used == [True]  # (the recorded forward decides NMS for all RoIs: the general path)


def test_heavy_suppression_grows_the_candidates(monkeypatch):
    # 3 stacks of near-identical boxes: few survive among the top 2 x BATCH_SIZE candidates
    rng = np.random.default_rng(32)
    arrays = distinct_losses(make_inputs(rng, 1, 600, fg_frac=0.0), rng)
    rois = arrays[2].copy()
    rois[:, 1:] = np.array([[10, 10, 60, 60], [200, 200, 300, 280], [90, 300, 180, 420]],
                           np.float32)[np.arange(600) % 3] + rng.normal(0, 0.5, (600, 4)).astype(np.float32)
    arrays[2] = rois
    used, sizes = spy_fast_path(monkeypatch)
    for b in (16, 128):
        hard = check_against_reference(arrays, cfg_with(BATCH_SIZE=b))
        assert 3 <= len(hard) < 20
    assert used == [True, True] and sizes == [64, 128, 256, 512, 600, 256, 512, 600]


def test_float32_ties_among_the_candidates_take_the_general_path(monkeypatch):
    rng = np.random.default_rng(33)
    arrays = distinct_losses(make_inputs(rng, 2, 200), rng)
    rows = np.arange(0, 400, 7)
    arrays[0][0, int(arrays[3][0])] = 1e-4  # a hard RoI, copied (all its blobs) to every 7th row
    for i in (0, 1, 3, 4, 5, 6):
        arrays[i][rows] = arrays[i][0]
    arrays[2][rows, 1:] = arrays[2][0, 1:] + 300 * rng.random((rows.size, 1)).astype(np.float32)
    used, _ = spy_fast_path(monkeypatch)
    for use_nms in (True, False):
        check_against_reference(arrays, cfg_with(BATCH_SIZE=48, OHEM_USE_NMS=use_nms))
    assert used == [False]


# -- random cases full of ties: both selection paths against the reference, index for index ----
def tied_inputs(rng, n_img, r_per_img):
    """Inputs whose losses and IoUs tie often: p[label] from a small palette (a share nudged by
    1e-12, equal in float32 but not in float64), bbox errors from a palette, boxes on a 10 px grid
    with repeats (IoU exactly 0.7 and 1 occur); half the rows, the hardest, with distinct losses."""
    arrays = make_inputs(rng, n_img, r_per_img)
    r = n_img * r_per_img
    labels = arrays[3].astype(np.int64)
    p = rng.choice([1e-3, 0.05, 0.3, 0.7], size=r)
    p = np.where(rng.random(r) < 0.15, p * (1 + 1e-12), p)  # float32 ties, float64 distinct
    distinct = rng.random(r) < 0.5  # the hardest: distinct losses (the top-K fast path's case)
    p[distinct] = rng.uniform(1e-9, 1e-6, size=int(distinct.sum()))
    prob = np.full((r, C), 1e-3, np.float32)
    prob[np.arange(r), labels] = p.astype(np.float32)
    targets, inside = arrays[4], arrays[5]
    err = rng.choice([0.0, 0.5, 2.0], size=(r, 1)) * (inside > 0)
    pred = (targets + err).astype(np.float32)
    xy = rng.integers(0, 8, size=(r, 2)) * 10.0
    wh = rng.choice([70.0, 100.0], size=(r, 2))  # 100 x 100 and 100 x 70 at one corner: IoU 0.7
    rois = arrays[2].copy()
    rois[:, 1:] = np.concatenate((xy, xy + wh - 1), 1)
    rois[rng.random(r) < 0.05, 1:] = rois[0, 1:]  # exact repeats across labels and images
    return [prob, pred, rois] + list(arrays[3:])


def kept_indices(arrays, cfg, active):
    """The layer's hard indices with a recorder: ``active`` decides NMS for every RoI (the
    general path); inactive leaves the layer its fast path."""
    class Recorder(list):
        def __call__(self, record):
            self.append(record)

    layer = make_layer(cfg)
    layer.recorder = Recorder()
    layer.recorder.active = active
    layer.forward([torch.from_numpy(a) for a in arrays], [])
    return layer.recorder[0].keep.tolist()


def test_random_ties_keep_the_original_rows_on_both_paths(monkeypatch):
    used, _ = spy_fast_path(monkeypatch)
    for seed in range(16):
        rng = np.random.default_rng(100 + seed)
        arrays = tied_inputs(rng, int(rng.integers(1, 3)), int(rng.integers(60, 200)))
        batch = int(rng.choice([8, 16, 32, 128]))
        use_nms = bool(seed % 4)
        cfg = cfg_with(BATCH_SIZE=batch, OHEM_USE_NMS=use_nms, OHEM_NMS_THRESH=0.7)
        loss = ref_loss(arrays[0], arrays[1], arrays[3], *arrays[4:7])
        hard, _ = ref_select(loss, arrays[2], arrays[3], batch, use_nms, 0.7)
        assert kept_indices(arrays, cfg, active=True) == hard.tolist(), seed
        assert kept_indices(arrays, cfg, active=False) == hard.tolist(), seed
    assert True in used and False in used  # both the top-K fast path and the tie path decided


def test_device_gathers_and_counts_equal_the_in_place_host_reads(monkeypatch):
    from readonly_ohem.ohem import loss as loss_mod

    rng = np.random.default_rng(35)
    for arrays in (make_inputs(rng, 2, 300), make_inputs(rng, 1, 200, general_weights=True)):
        t = [torch.from_numpy(a) for a in arrays]
        lab = t[3].long()
        want = cls_loss(t[0], lab), bbox_loss(lab, t[1], *t[4:7])
        monkeypatch.setattr(loss_mod, "_FORCE_DEVICE_PATH", True)  # torch gathers, as on a GPU
        got = cls_loss(t[0], lab), bbox_loss(lab, t[1], *t[4:7])
        monkeypatch.setattr(loss_mod, "_FORCE_DEVICE_PATH", False)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        np.testing.assert_allclose((want[0] + want[1]).numpy(),
                                   ref_loss(arrays[0], arrays[1], arrays[3], *arrays[4:7]),
                                   rtol=1e-15, atol=0)
    monkeypatch.setattr(loss_mod, "_FORCE_DEVICE_PATH", True)
    check_against_reference(make_inputs(rng, 2, 400), cfg_with(BATCH_SIZE=64))


def test_end2end_count_key_ohem_batch_size():
    """End-to-end OHEM: BATCH_SIZE -1 (the ProposalTargetLayer passes every RoI) and the hard
    count in TRAIN.OHEM_BATCH_SIZE; the same rows as the original with that BATCH_SIZE."""
    rng = np.random.default_rng(7)
    arrays = make_inputs(rng, 1, 90)
    e2e = cfg_with(BATCH_SIZE=-1, OHEM_BATCH_SIZE=20)
    tops, _ = run_layer(make_layer(e2e), arrays)
    plain, _ = run_layer(make_layer(cfg_with(BATCH_SIZE=20)), arrays)
    assert tops[0].shape == (20, 5) and all(torch.equal(a, b) for a, b in zip(tops, plain))
    assert make_layer(e2e).top_shapes([(90, C)] + [(90, 4 * C)] * 6)[0] == (20, 5)
    check_against_reference(arrays, cfg_with(BATCH_SIZE=20))
    # OHEM_BATCH_SIZE set wins over BATCH_SIZE (Fast R-CNN OHEM leaves it 0)
    tops, _ = run_layer(make_layer(cfg_with(BATCH_SIZE=64, OHEM_BATCH_SIZE=5)), arrays)
    assert tops[0].shape == (5, 5)
    with pytest.raises(ConfigError, match="OHEM_BATCH_SIZE 0 with TRAIN.BATCH_SIZE -1.*set TRAIN.OHEM_BATCH_SIZE"):
        run_layer(make_layer(cfg_with(BATCH_SIZE=-1)), arrays)
