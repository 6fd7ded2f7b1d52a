"""The shipped specs in prototxt/: they parse, the generated ones are up to date, the VGG ones are
layer for layer the original's (../shared/reference_prototxt), and the OHEM heads agree."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from readonly_ohem.caffe import spec
from readonly_ohem.config import load_config
from readonly_ohem.caffe.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]
PROTOTXT = REPO / "prototxt"
MODELS = ("VGG16", "VGG_CNN_M_1024", "small")
NETS = [("fast_rcnn", "train"), ("fast_rcnn", "test"), ("fast_rcnn_ohem", "train")]
SOLVERS = ["fast_rcnn", "fast_rcnn_ohem"]


def load_generator():
    path = REPO / "scripts" / "make_prototxt.py"
    mod_spec = importlib.util.spec_from_file_location("make_prototxt", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def net_path(model, method, kind):
    return PROTOTXT / model / method / f"{kind}.prototxt"


@pytest.mark.parametrize("model", MODELS)
def test_shipped_files_parse_and_solvers_find_their_nets(model, monkeypatch, tmp_path):
    for method, kind in NETS:
        p = net_path(model, method, kind)
        for phase in ("TRAIN", "TEST"):
            n = spec.load_net_spec(p, phase)
            assert len(n.layer) > 10 and n.layer[0].type in ("Python", "Input"), p
    monkeypatch.chdir(tmp_path)  # train_net resolves next to the solver from any directory
    for method in SOLVERS:
        s = spec.read_solver(PROTOTXT / model / method / "solver.prototxt")
        got = spec.solver_net_path(s, PROTOTXT / model / method / "solver.prototxt")
        assert got.resolve() == net_path(model, method, "train").resolve()
        # small: both methods 1 image x iter_size 2 (the demo compares them on the same images per step)
        assert s.iter_size == (2 if method == "fast_rcnn_ohem" or model == "small" else 1)
        assert s.lr_policy == "step" and s.momentum == pytest.approx(0.9)
        assert s.weight_decay == pytest.approx(0.0005)


def test_generated_files_are_up_to_date():
    gen = load_generator()
    outputs = gen.outputs()
    assert len(outputs) == 4
    for path, text in outputs.items():
        assert path.read_text() == text, f"{path} is stale: run python scripts/make_prototxt.py"


@pytest.mark.parametrize("model", ["VGG16", "VGG_CNN_M_1024"])
def test_equivalent_to_reference(model, shared_dir):
    ref = shared_dir / "reference_prototxt" / "pascal_voc" / model
    for method, kind in NETS:
        ours, theirs = net_path(model, method, kind), ref / method / f"{kind}.prototxt"
        assert spec.read_net(ours) == spec.read_net(theirs), ours
        for phase in ("TRAIN", "TEST"):
            assert spec.load_net_spec(ours, phase) == spec.load_net_spec(theirs, phase)
    for method in SOLVERS:
        ours = spec.read_solver(PROTOTXT / model / method / "solver.prototxt")
        theirs = spec.read_solver(ref / method / "solver.prototxt")
        assert Path(theirs.train_net).parts[-2:] == (method, "train.prototxt")
        ours.ClearField("train_net")
        theirs.ClearField("train_net")
        assert ours == theirs


def test_reference_cfg_copied(shared_dir):
    ours = yaml.safe_load((PROTOTXT / "cfgs" / "fast_rcnn_ohem.yml").read_text())
    theirs = yaml.safe_load((shared_dir / "reference_cfgs" / "fast_rcnn_ohem.yml").read_text())
    assert ours == theirs


def test_cfgs_load():
    cfg = load_config([PROTOTXT / "cfgs" / "small.yml"])
    assert cfg.TRAIN.SCALES == (240,) and cfg.TRAIN.MAX_SIZE == 400
    assert cfg.TEST.SCALES == (240,) and cfg.TEST.MAX_SIZE == 400
    assert cfg.TRAIN.SNAPSHOT_ITERS >= 10**6 and not cfg.TRAIN.USE_OHEM
    cfg = load_config([PROTOTXT / "cfgs" / "small.yml", PROTOTXT / "cfgs" / "fast_rcnn_ohem.yml"])
    assert cfg.TRAIN.USE_OHEM and cfg.TRAIN.IMS_PER_BATCH == 1 and cfg.TRAIN.BATCH_SIZE == 64
    assert cfg.TRAIN.BG_THRESH_LO == 0.0 and not cfg.TRAIN.ASPECT_GROUPING
    assert cfg.TRAIN.SCALES == (240,)


def _strip_readonly(layer):
    """A readonly layer as its trainable twin would read without mults and gradient settings."""
    out = caffe_pb2.LayerParameter()
    out.CopyFrom(layer)
    out.name = layer.name.removesuffix("_readonly")
    for field in ("bottom", "top"):
        names = [n.removesuffix("_readonly") for n in getattr(layer, field)]
        out.ClearField(field)
        getattr(out, field).extend(n + "_hard" if n == "rois" else n for n in names)
    out.ClearField("propagate_down")
    for p in out.param:
        p.ClearField("lr_mult")
        p.ClearField("decay_mult")
    return out


@pytest.mark.parametrize("model", MODELS)
def test_ohem_heads_agree(model):
    net = spec.read_net(net_path(model, "fast_rcnn_ohem", "train"))
    layers = {l.name: l for l in net.layer}
    readonly = [l for l in net.layer if l.name.endswith("_readonly")]
    assert readonly and "hard_roi_mining" in layers and "cls_prob_readonly" in layers
    for ro in readonly:
        assert list(ro.propagate_down) == [False] * len(ro.bottom), ro.name
        assert all(p.name and not p.HasField("lr_mult") and not p.HasField("decay_mult")
                   for p in ro.param), ro.name  # the owner sets no mults
        if ro.name == "cls_prob_readonly":
            continue
        tr = layers[ro.name.removesuffix("_readonly")]
        assert _strip_readonly(ro) == _strip_readonly(tr), ro.name
        if tr.param:
            assert [p.name for p in tr.param] == [tr.name + "_w", tr.name + "_b"]
            assert [(p.lr_mult, p.decay_mult) for p in tr.param] == [(1, 1), (2, 0)], tr.name
    mining = layers["hard_roi_mining"]
    assert mining.python_param.layer == "OHEMDataLayer" and len(mining.bottom) == 7
    assert list(mining.top) == ["rois_hard", "labels_hard", "bbox_targets_hard",
                                "bbox_inside_weights_hard", "bbox_outside_weights_hard"]
    assert list(layers["loss_cls"].bottom)[1] == "labels_hard"
    assert list(layers["loss_bbox"].propagate_down) == [True, False, False, False]
    assert list(layers["loss_cls"].loss_weight) == [1] == list(layers["loss_bbox"].loss_weight)


def test_small_net_shape():
    net = spec.read_net(net_path("small", "fast_rcnn", "train"))
    layers = {l.name: l for l in net.layer}
    convs = [l for l in net.layer if l.type == "Convolution"]
    assert [c.convolution_param.num_output for c in convs] == [16, 32, 64]
    assert all(c.convolution_param.weight_filler.type in ("msra", "xavier") for c in convs)
    pools = [l for l in net.layer if l.type == "Pooling"]
    assert len(pools) == 2 and all(p.pooling_param.stride == 2 for p in pools)
    roi = next(l for l in net.layer if l.type == "ROIPooling").roi_pooling_param
    assert (roi.pooled_h, roi.pooled_w, roi.spatial_scale) == (4, 4, 0.25)
    ip = {n: layers[n].inner_product_param for n in ("fc6", "fc7", "cls_score", "bbox_pred")}
    assert [ip[n].num_output for n in ip] == [128, 128, 21, 84]
    assert ip["cls_score"].weight_filler.std == pytest.approx(0.01)
    assert ip["bbox_pred"].weight_filler.std == pytest.approx(0.001)
    assert ip["fc6"].weight_filler.type == "xavier"
    test = spec.load_net_spec(net_path("small", "fast_rcnn", "test"), "TEST")
    assert test.layer[0].type == "Input" and list(test.layer[0].top) == ["data", "rois"]
    assert test.layer[-1].name == "cls_prob"


def test_multiscale_and_bbox_vote_cfgs_load():
    paper_test = (480, 576, 688, 864, 1000)
    cfg = load_config([PROTOTXT / "cfgs" / "fast_rcnn_multiscale.yml"])
    assert cfg.TRAIN.SCALES == (480, 576, 688, 864, 900) and cfg.TRAIN.MAX_SIZE == 1000
    assert cfg.TEST.SCALES == paper_test and cfg.TEST.MAX_SIZE == 1000
    both = load_config([PROTOTXT / "cfgs" / "fast_rcnn_ohem.yml",
                        PROTOTXT / "cfgs" / "fast_rcnn_multiscale.yml"])
    assert both.TRAIN.USE_OHEM and both.TRAIN.SCALES == cfg.TRAIN.SCALES
    # the small net's: the paper's scales times 240/600 (small.yml's scale), max side 400
    small = load_config([PROTOTXT / "cfgs" / "small.yml", PROTOTXT / "cfgs" / "small_multiscale.yml"])
    assert small.TRAIN.SCALES == tuple(round(s * 0.4) for s in cfg.TRAIN.SCALES) == (192, 230, 275, 346, 360)
    assert small.TEST.SCALES == tuple(round(s * 0.4) for s in paper_test) and small.TEST.MAX_SIZE == 400
    assert small.TRAIN.MAX_SIZE == 400 and small.TRAIN.IMS_PER_BATCH == 1  # small.yml's keys stay
    plain = load_config([])
    assert not (plain.TEST.ITER_BBOX_REG or plain.TEST.BBOX_VOTE)  # +B is off by default
    b = load_config([PROTOTXT / "cfgs" / "iter_bbox_reg_vote.yml"])
    assert b.TEST.ITER_BBOX_REG and b.TEST.BBOX_VOTE and b.TEST.BBOX_VOTE_THRESH == 0.5
    assert b.TEST.NMS == 0.3 and b.TEST.SCALES == (600,)  # +B changes nothing else
