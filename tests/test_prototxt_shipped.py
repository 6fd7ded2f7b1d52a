"""The shipped specs in prototxt/: they parse, the generated ones are up to date, the VGG ones are
layer for layer the original's (../shared/reference_prototxt), the COCO ones py-faster-rcnn's
models/coco edit of them, and the OHEM heads agree."""

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from readonly_ohem.caffe import spec
from readonly_ohem.config import load_config
from readonly_ohem.caffe.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]
PROTOTXT = REPO / "prototxt"
MODELS = ("VGG16", "VGG_CNN_M_1024", "small")
COCO_MODELS = ("coco/VGG16", "coco/VGG_CNN_M_1024")
NETS = [("fast_rcnn", "train"), ("fast_rcnn", "test"), ("fast_rcnn_ohem", "train")]
SOLVERS = ["fast_rcnn", "fast_rcnn_ohem"]


def load_generator():
    path = REPO / "scripts" / "make_prototxt.py"
    mod_spec = importlib.util.spec_from_file_location("make_prototxt", path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module  # dataclasses look their module up there
    mod_spec.loader.exec_module(module)
    return module


def net_path(model, method, kind):
    return PROTOTXT / model / method / f"{kind}.prototxt"


@pytest.mark.parametrize("model", MODELS + COCO_MODELS)
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
        if model.startswith("coco/"):  # py-faster-rcnn's models/coco solvers
            assert s.stepsize == 200000 and s.base_lr == pytest.approx(0.001)


def test_generated_files_are_up_to_date():
    gen = load_generator()
    outputs = gen.outputs()
    coco = {f"coco/{m}/{method}/{kind}.prototxt" for m in ("VGG16", "VGG_CNN_M_1024")
            for method, kinds in (("fast_rcnn", ("train", "test", "solver")),
                                  ("fast_rcnn_ohem", ("train", "solver"))) for kind in kinds}
    e2e = {f"{m}/faster_rcnn_end2end_{variant}/{kind}.prototxt"
           for m in ("VGG16", "VGG_CNN_M_1024", "ZF", "small")
           for variant in ("ohem", "focal") for kind in ("train", "solver")}
    assert {p.relative_to(PROTOTXT).as_posix() for p in outputs} == {
        "VGG16/fast_rcnn_ohem/train.prototxt", "VGG_CNN_M_1024/fast_rcnn_ohem/train.prototxt",
        "small/fast_rcnn_ohem/train.prototxt", "small/fast_rcnn/test.prototxt",
        "small/faster_rcnn_end2end/test.prototxt"} | coco | e2e
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


@pytest.mark.parametrize("model, method", [(m, "fast_rcnn_ohem") for m in MODELS + COCO_MODELS]
                         + [(m, "faster_rcnn_end2end_ohem") for m in ("VGG16", "VGG_CNN_M_1024", "ZF", "small")])
def test_ohem_heads_agree(model, method):
    net = spec.read_net(net_path(model, method, "train"))
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


def _coco_edit(voc, k=81):
    """py-faster-rcnn's models/coco net from its models/pascal_voc one, as its files differ:
    num_classes, cls_score and bbox_pred outputs, and no drop6/drop7 (transcribed from a diff)."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(voc)
    out.ClearField("layer")
    for layer in voc.layer:
        if layer.name in ("drop6", "drop7"):
            continue
        new = out.layer.add()
        new.CopyFrom(layer)
        if layer.name == "data":
            new.python_param.param_str = f"'num_classes': {k}"
        if layer.name in ("cls_score", "bbox_pred"):
            new.inner_product_param.num_output = k if layer.name == "cls_score" else 4 * k
    return out


@pytest.mark.parametrize("model", ["VGG16", "VGG_CNN_M_1024"])
def test_coco_nets_are_the_voc_nets_for_81_classes(model):
    for kind in ("train", "test"):
        voc = spec.read_net(net_path(model, "fast_rcnn", kind))
        coco = spec.read_net(net_path(f"coco/{model}", "fast_rcnn", kind))
        assert [l.type for l in voc.layer].count("Dropout") == 2
        assert "Dropout" not in [l.type for l in coco.layer]
        assert coco == _coco_edit(voc), kind
    # the OHEM COCO net is the generator's OHEM form of the COCO Fast R-CNN net
    gen = load_generator()
    frcn = spec.read_net(net_path(f"coco/{model}", "fast_rcnn", "train"))
    assert spec.read_net(net_path(f"coco/{model}", "fast_rcnn_ohem", "train")) == gen.ohem_train(frcn)[0]
    for method in SOLVERS:
        voc = spec.read_solver(PROTOTXT / model / method / "solver.prototxt")
        coco = spec.read_solver(PROTOTXT / "coco" / model / method / "solver.prototxt")
        voc.stepsize = 200000
        assert coco == voc, method


def test_with_num_classes_edits_only_the_count():
    gen = load_generator()
    assert gen.with_num_classes("'num_classes': 21", 81) == "'num_classes': 81"
    assert gen.with_num_classes("{'num_classes': 21, 'policy': 'ratio'}", 7) == \
        "{'num_classes': 7, 'policy': 'ratio'}"
    assert gen.with_num_classes('num_classes: 3', 12) == "num_classes: 12"
    for bad in ("'classes': 21", "'num_classes': 21, 'num_classes': 3"):
        with pytest.raises(ValueError, match="one integer num_classes"):
            gen.with_num_classes(bad, 5)


def test_retarget_keeps_dropout_unless_told_and_refuses_a_dropout_not_in_place():
    gen = load_generator()
    voc = spec.read_net(net_path("small", "fast_rcnn", "train"))
    outputs = gen.head_outputs(voc)
    assert outputs == ("cls_score", "bbox_pred")
    net = gen.retarget(voc, outputs, gen.Dataset(5))
    ip = {l.name: l.inner_product_param.num_output for l in net.layer if l.type == "InnerProduct"}
    assert ip == {"fc6": 128, "fc7": 128, "cls_score": 5, "bbox_pred": 20}
    assert [l.name for l in net.layer] == [l.name for l in voc.layer]  # Dropout kept
    assert net.layer[0].python_param.param_str == "'num_classes': 5"
    bad = caffe_pb2.NetParameter()
    bad.CopyFrom(voc)
    drop = next(l for l in bad.layer if l.type == "Dropout")
    drop.top[0] = "fc6_dropped"
    with pytest.raises(ValueError, match="'drop6': only an in-place Dropout"):
        gen.retarget(bad, outputs, gen.Dataset(5, dropout=False))


def test_generator_writes_any_model_for_any_class_count(tmp_path, capsys):
    gen = load_generator()
    assert gen.main(["--model", "small", "--num-classes", "7", "--out", str(tmp_path / "s7")]) == 0
    assert gen.main(["--model", "small", "--dataset", "coco", "--out", str(tmp_path / "sc")]) == 0
    assert gen.main(["--model", "VGG16", "--dataset", "coco", "--out", str(tmp_path / "v")]) == 0
    assert capsys.readouterr().out.count("wrote ") == 15
    for out, k, dropout in (("s7", 7, True), ("sc", 81, False)):
        for method, kind in NETS:
            net = spec.read_net(tmp_path / out / method / f"{kind}.prototxt")
            types = [l.type for l in net.layer]
            assert ("Dropout" in types) == dropout, (out, method, kind)
            sizes = {t: l.inner_product_param.num_output for l in net.layer for t in l.top
                     if l.type == "InnerProduct"}
            assert sizes["cls_score"] == k and sizes["bbox_pred"] == 4 * k
            assert all(f"'num_classes': {k}" == l.python_param.param_str
                       for l in net.layer if l.type == "Python")
        for method in SOLVERS:  # the small net keeps its mini-VOC schedule
            s = spec.read_solver(tmp_path / out / method / "solver.prototxt")
            assert (s.stepsize, s.max_iter) == (400, 600)
    # VGG16 --dataset coco: the shipped COCO files but for the header's second line
    shipped = {p.relative_to(PROTOTXT / "coco" / "VGG16"): text for p, text in gen.outputs().items()
               if p.is_relative_to(PROTOTXT / "coco" / "VGG16")}
    assert len(shipped) == 5
    for rel, text in shipped.items():
        ours, theirs = (tmp_path / "v" / rel).read_text().splitlines(), text.splitlines()
        assert ours[1] == "# generator, not this one." and ours[:1] + ours[2:] == theirs[:1] + theirs[2:]
    with pytest.raises(SystemExit):
        gen.main(["--model", "small", "--num-classes", "1", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        gen.main(["--num-classes", "5"])
    assert not (tmp_path / "x").exists()


# -- Faster R-CNN end-to-end ---------------------------------------------------------------------
E2E_MODELS = ("VGG16", "VGG_CNN_M_1024", "ZF", "small")
E2E_METHODS = ("faster_rcnn_end2end", "faster_rcnn_end2end_ohem", "faster_rcnn_end2end_focal")


@pytest.mark.parametrize("model", E2E_MODELS)
def test_end2end_files_parse_and_solvers_find_their_nets(model, monkeypatch, tmp_path):
    for method in E2E_METHODS:
        for phase in ("TRAIN", "TEST"):
            n = spec.load_net_spec(net_path(model, method, "train"), phase)
            assert n.layer[0].type == "Python" and list(n.layer[0].top) == ["data", "im_info", "gt_boxes"]
    test = spec.load_net_spec(net_path(model, "faster_rcnn_end2end", "test"), "TEST")
    assert [layer.name for layer in test.layer][-1] == "cls_prob"
    assert {"data", "im_info"} <= {t for layer in test.layer for t in layer.top}
    monkeypatch.chdir(tmp_path)
    prefixes = []
    for method in E2E_METHODS:
        s = spec.read_solver(PROTOTXT / model / method / "solver.prototxt")
        got = spec.solver_net_path(s, PROTOTXT / model / method / "solver.prototxt")
        assert got.resolve() == net_path(model, method, "train").resolve()
        prefixes.append(s.snapshot_prefix)
        s.ClearField("snapshot_prefix")
        if method == E2E_METHODS[0]:
            plain = s
        assert s == plain  # the variants train with the plain end-to-end solver
    assert prefixes[1:] == [prefixes[0] + "_ohem", prefixes[0] + "_focal"]


@pytest.mark.parametrize("model", ["VGG16", "VGG_CNN_M_1024", "ZF"])
def test_end2end_equivalent_to_reference(model, shared_dir):
    ref = shared_dir / "reference_prototxt" / "pascal_voc" / model / "faster_rcnn_end2end"
    for kind in ("train", "test"):
        ours = net_path(model, "faster_rcnn_end2end", kind)
        assert spec.read_net(ours) == spec.read_net(ref / f"{kind}.prototxt"), ours
        for phase in ("TRAIN", "TEST"):
            assert spec.load_net_spec(ours, phase) == spec.load_net_spec(ref / f"{kind}.prototxt", phase)
    ours = spec.read_solver(PROTOTXT / model / "faster_rcnn_end2end" / "solver.prototxt")
    theirs = spec.read_solver(ref / "solver.prototxt")
    assert Path(theirs.train_net).parts[-2:] == ("faster_rcnn_end2end", "train.prototxt")
    ours.ClearField("train_net")
    theirs.ClearField("train_net")
    assert ours == theirs


def _without_learning_settings(net):
    """A net as a test net reads: no param specs, fillers, propagate_down, or a Softmax's stray
    loss_param (the original ZF test net's cls_prob carries one)."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    out.ClearField("input_shape")
    for layer in out.layer:
        for field in ("param", "propagate_down"):
            layer.ClearField(field)
        if layer.type == "Softmax":
            layer.ClearField("loss_param")
        for name in ("convolution_param", "inner_product_param"):
            if layer.HasField(name):
                getattr(layer, name).ClearField("weight_filler")
                getattr(layer, name).ClearField("bias_filler")
    return out


@pytest.mark.parametrize("model", ["VGG16", "VGG_CNN_M_1024", "ZF"])
def test_end2end_test_net_generator_gives_the_original_test_nets(model):
    """The generator that writes small/faster_rcnn_end2end/test.prototxt, run on each original
    train net, gives that model's original test net (layers, blobs, the proposals named rois)."""
    gen = load_generator()
    train = spec.read_net(net_path(model, "faster_rcnn_end2end", "train"))
    made, _ = gen.e2e_test(train, inputs=(("data", (1, 3, 224, 224)), ("im_info", (1, 3))))
    original = spec.read_net(net_path(model, "faster_rcnn_end2end", "test"))
    assert list(made.input) == list(original.input) == ["data", "im_info"]
    assert _without_learning_settings(made) == _without_learning_settings(original)


def test_end2end_cfgs(shared_dir):
    ours = yaml.safe_load((PROTOTXT / "cfgs" / "faster_rcnn_end2end.yml").read_text())
    theirs = yaml.safe_load((shared_dir / "reference_cfgs" / "faster_rcnn_end2end.yml").read_text())
    assert ours == theirs
    cfg = load_config([PROTOTXT / "cfgs" / n for n in ("small.yml", "faster_rcnn_end2end.yml",
                                                       "faster_rcnn_end2end_ohem.yml")])
    assert cfg.TRAIN.HAS_RPN and cfg.TEST.HAS_RPN and cfg.TRAIN.PROPOSAL_METHOD == "gt"
    assert cfg.TRAIN.BATCH_SIZE == -1 and cfg.TRAIN.OHEM_BATCH_SIZE == 128
    assert cfg.TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED and cfg.TRAIN.IMS_PER_BATCH == 1
    assert (cfg.TRAIN.RPN_PRE_NMS_TOP_N, cfg.TRAIN.RPN_POST_NMS_TOP_N) == (2000, 300)
    assert (cfg.TEST.RPN_PRE_NMS_TOP_N, cfg.TEST.RPN_POST_NMS_TOP_N) == (2000, 300)


@pytest.mark.parametrize("model", E2E_MODELS)
def test_end2end_ohem_and_focal_nets(model):
    plain = spec.read_net(net_path(model, "faster_rcnn_end2end", "train"))
    ohem = spec.read_net(net_path(model, "faster_rcnn_end2end_ohem", "train"))
    layers = {layer.name: layer for layer in ohem.layer}
    # everything up to the RoI head is the plain net's: RPN, its losses, proposals, targets
    roi = next(i for i, layer in enumerate(plain.layer) if layer.type == "ROIPooling")
    assert list(ohem.layer[:roi]) == list(plain.layer[:roi])
    mining = layers["hard_roi_mining"]
    assert list(mining.bottom)[2:] == list(layers["roi-data"].top)  # the ProposalTargetLayer's tops
    assert mining.python_param.param_str == layers["roi-data"].python_param.param_str
    focal = spec.read_net(net_path(model, "faster_rcnn_end2end_focal", "train"))
    diff = [(a, b) for a, b in zip(plain.layer, focal.layer) if a != b]
    assert len(focal.layer) == len(plain.layer) and len(diff) == 1
    old, new = diff[0]
    assert old.type == "SoftmaxWithLoss" and old.name == new.name == "loss_cls"
    assert new.type == "Python" and new.python_param.layer == "FocalLossLayer"
    assert list(new.bottom) == list(old.bottom) and list(new.top) == list(old.top)
    assert list(new.propagate_down) == [True, False] and list(new.loss_weight) == [1]


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
