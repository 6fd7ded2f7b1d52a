"""Generate the OHEM train nets (and the small nets' test nets) from the plain train nets.

The RoI head is described once, in ``prototxt/<model>/fast_rcnn/train.prototxt`` and
``prototxt/<model>/faster_rcnn_end2end/train.prototxt`` (the layers from the ROIPooling layer to
the last layer before the RoI head's losses). From that description:

- ``<model>/fast_rcnn_ohem/train.prototxt`` and ``<model>/faster_rcnn_end2end_ohem/train.prototxt``
  = the plain net up to the RoI head (data layer, trunk; end-to-end: the RPN, its losses, the
  proposal and proposal-target layers) + the **readonly** copy of the head (``*_readonly`` names
  and blobs, every bottom ``propagate_down: false``, params shared by name ``<layer>_w``/``<layer>_b``
  and owned here, without mults) + ``cls_prob_readonly`` + ``hard_roi_mining`` (OHEMDataLayer, on
  the RoIs and targets of the layer that makes them: RoIDataLayer, or end-to-end the
  ProposalTargetLayer) + the **trainable** copy on ``rois_hard`` (same param names, supplying
  the mults: weights lr x1 decay 1, biases lr x2 decay 0) + the losses on the ``*_hard`` blobs,
  ``propagate_down`` false on everything but the predictions. Both copies come from the same
  layers, so they cannot drift apart.
- ``<model>/faster_rcnn_end2end_focal/train.prototxt`` = the plain end-to-end net with the RoI
  head's SoftmaxWithLoss replaced by the focal loss (``FocalLossLayer``, Python).
- their solvers: the plain end-to-end solver, snapshots named ``<prefix>_ohem`` / ``<prefix>_focal``.
- ``small/fast_rcnn/test.prototxt`` = net inputs ``data``/``rois`` + trunk + head + ``cls_prob``;
  ``small/faster_rcnn_end2end/test.prototxt`` = inputs ``data``/``im_info`` + trunk + RPN +
  ProposalLayer (top ``rois``) + head + ``cls_prob``: the training-only layers (those fed by
  ``gt_boxes``, directly or not) left out. (The VGG/ZF test nets are the original files, whose
  param specs differ cosmetically.)

Run from anywhere:  python scripts/make_prototxt.py        (rewrites the generated files)
                    python scripts/make_prototxt.py --check (exit 1 if one is out of date)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from google.protobuf import text_format

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from readonly_ohem.caffe import spec  # noqa: E402
from readonly_ohem.caffe.proto import caffe_pb2  # noqa: E402

PROTOTXT = ROOT / "prototxt"
MODELS = ("VGG16", "VGG_CNN_M_1024", "small")  # fast_rcnn
E2E_MODELS = ("VGG16", "VGG_CNN_M_1024", "ZF", "small")  # faster_rcnn_end2end
LOSS_TYPES = ("SoftmaxWithLoss", "SmoothL1Loss")
SMALL_TEST_INPUTS = (("data", (1, 3, 240, 320)), ("rois", (1, 5)))
SMALL_E2E_TEST_INPUTS = (("data", (1, 3, 240, 320)), ("im_info", (1, 3)))
FOCAL_LOSS = ("ohem.focal_loss_layer", "FocalLossLayer", "{'alpha': 0.25, 'gamma': 2.0}")


def split_frcn(net) -> tuple:
    """A Fast R-CNN or Faster R-CNN end-to-end train net -> (data layer, trunk layers, head
    layers, loss layers): the trunk runs to the ROIPooling layer (end-to-end: RPN included), the
    head from there to the first loss after it."""
    layers = list(net.layer)
    if layers[0].type != "Python":
        raise ValueError(f"{net.name}: the first layer must be the Python RoIDataLayer")
    roi = next(i for i, l in enumerate(layers) if l.type == "ROIPooling")
    first_loss = next(i for i, l in enumerate(layers) if l.type in LOSS_TYPES and i > roi)
    return layers[0], layers[1:roi], layers[roi:first_loss], layers[first_loss:]


def roi_source(data, trunk, head):
    """(layer, its tops from the RoIs on) of the layer making the head's RoIs: the RoIDataLayer
    (``rois, labels, bbox_targets, ...``) or, end-to-end, the ProposalTargetLayer."""
    rois = head[0].bottom[1]
    layer = next(l for l in reversed([data] + list(trunk)) if rois in l.top)
    tops = list(layer.top)
    return layer, tops[tops.index(rois):]


def _copy(layer) -> caffe_pb2.LayerParameter:
    out = caffe_pb2.LayerParameter()
    out.CopyFrom(layer)
    return out


def readonly_head(head) -> list:
    """The readonly copy: renamed, no gradient anywhere, owning the shared params (no mults)."""
    inside = {t for l in head for t in l.top}
    out = []
    for layer in head:
        ro = _copy(layer)
        ro.name = layer.name + "_readonly"
        ro.ClearField("bottom")
        ro.bottom.extend(b + "_readonly" if b in inside else b for b in layer.bottom)
        ro.ClearField("top")
        ro.top.extend(t + "_readonly" for t in layer.top)
        ro.ClearField("propagate_down")
        ro.propagate_down.extend([False] * len(layer.bottom))
        ro.ClearField("param")
        for suffix, _ in zip(("_w", "_b"), layer.param):
            ro.param.add(name=layer.name + suffix)
        out.append(ro)
    return out


def trainable_head(head, data_tops) -> list:
    """The trainable copy on the mined RoIs: supplies the shared params' mults."""
    out = []
    for layer in head:
        tr = _copy(layer)
        tr.ClearField("bottom")
        tr.bottom.extend(b + "_hard" if b in data_tops else b for b in layer.bottom)
        if layer.type == "ROIPooling":  # gradient to the features, none to the RoIs
            tr.ClearField("propagate_down")
            tr.propagate_down.extend([True, False])
        tr.ClearField("param")
        for i, (suffix, src) in enumerate(zip(("_w", "_b"), layer.param)):
            p = tr.param.add(name=layer.name + suffix, lr_mult=src.lr_mult)
            # OHEM nets: weights decayed (x1), trainable biases not (SPEC.md section 2).
            p.decay_mult = (src.decay_mult if src.HasField("decay_mult") else 1.0) if i == 0 else 0.0
        out.append(tr)
    return out


def ohem_train(frcn) -> tuple:
    """(NetParameter, [(layer index, comment)]) of the OHEM train net made from a FRCN (or Faster
    R-CNN end-to-end) train net."""
    data, trunk, head, losses = split_frcn(frcn)
    source, data_tops = roi_source(data, trunk, head)
    cls_score = next(l for l in losses if l.type == "SoftmaxWithLoss").bottom[0]
    bbox_pred = next(l for l in losses if l.type == "SmoothL1Loss").bottom[0]

    net = caffe_pb2.NetParameter(name=frcn.name)
    net.layer.add().CopyFrom(data)
    for layer in trunk:
        net.layer.add().CopyFrom(layer)
    start = len(net.layer)
    for layer in readonly_head(head):
        net.layer.add().CopyFrom(layer)
    net.layer.add(name="cls_prob_readonly", type="Softmax", bottom=[cls_score + "_readonly"],
                  top=["cls_prob_readonly"], propagate_down=[False])
    mining_bottoms = ["cls_prob_readonly", bbox_pred + "_readonly"] + data_tops
    mining = net.layer.add(name="hard_roi_mining", type="Python", bottom=mining_bottoms,
                           top=[t + "_hard" for t in data_tops],
                           propagate_down=[False] * len(mining_bottoms))
    mining.python_param.module = "roi_data_layer.layer"
    mining.python_param.layer = "OHEMDataLayer"
    mining.python_param.param_str = source.python_param.param_str
    end = len(net.layer)
    for layer in trainable_head(head, data_tops):
        net.layer.add().CopyFrom(layer)
    for layer in losses:
        loss = net.layer.add()
        loss.CopyFrom(layer)
        loss.ClearField("bottom")
        loss.bottom.extend(b + "_hard" if b in data_tops else b for b in layer.bottom)
        loss.ClearField("propagate_down")
        loss.propagate_down.extend([b not in data_tops for b in layer.bottom])
    comments = [(start, "Readonly RoI network: forward only, over all RoIs; owns the shared params"),
                (end, "Trainable RoI network: the same head on the hard RoIs; supplies the mults")]
    return net, comments


def frcn_test(frcn, inputs=SMALL_TEST_INPUTS) -> tuple:
    """The test net of a FRCN train net: net inputs, trunk, head, cls_prob."""
    _, trunk, head, losses = split_frcn(frcn)
    cls_score = next(l for l in losses if l.type == "SoftmaxWithLoss").bottom[0]
    net = caffe_pb2.NetParameter(name=frcn.name)
    for name, shape in inputs:
        net.input.append(name)
        net.input_shape.add(dim=shape)
    for layer in trunk + head:
        net.layer.add().CopyFrom(layer)
    net.layer.add(name="cls_prob", type="Softmax", bottom=[cls_score], top=["cls_prob"])
    return net, []


def focal_train(plain) -> tuple:
    """(NetParameter, comments) of the plain train net with the RoI head's SoftmaxWithLoss
    replaced by the focal loss on the same bottoms (``FocalLossLayer``; same name and top)."""
    losses = split_frcn(plain)[3]
    net = caffe_pb2.NetParameter()
    net.CopyFrom(plain)
    first = len(plain.layer) - len(losses)
    i = next(first + k for k, l in enumerate(losses) if l.type == "SoftmaxWithLoss")
    old = plain.layer[i]
    focal = caffe_pb2.LayerParameter(name=old.name, type="Python", bottom=old.bottom,
                                     top=old.top, propagate_down=[True, False],
                                     loss_weight=list(old.loss_weight) or [1.0])
    module, layer, param_str = FOCAL_LOSS
    focal.python_param.module, focal.python_param.layer = module, layer
    focal.python_param.param_str = param_str
    net.layer[i].CopyFrom(focal)
    return net, [(i, "The RoI head's classification loss: focal loss (Lin et al. 2017) on every "
                     "sampled RoI, in place of SoftmaxWithLoss")]


def e2e_test(train, inputs=SMALL_E2E_TEST_INPUTS) -> tuple:
    """The test net of a Faster R-CNN end-to-end train net: net inputs ``data``/``im_info``, the
    layers not fed by ``gt_boxes`` (directly or through another), the proposals renamed
    ``rois`` (the original test nets' name), ``cls_prob``."""
    data, trunk, head, losses = split_frcn(train)
    source, _ = roi_source(data, trunk, head)
    proposals = source.bottom[0]  # rpn_rois: what the ProposalTargetLayer samples from
    dropped = {"gt_boxes"}
    net = caffe_pb2.NetParameter(name=train.name)
    for name, shape in inputs:
        net.input.append(name)
        net.input_shape.add(dim=shape)
    for layer in list(trunk) + list(head):
        if any(b in dropped for b in layer.bottom):
            # the proposal target layer's "rois" are the proposals themselves at test time
            dropped.update(t for t in layer.top if layer is not source or t != "rois")
            continue
        out = net.layer.add()
        out.CopyFrom(layer)
        for field in ("bottom", "top"):
            names = [("rois" if n == proposals else n) for n in getattr(layer, field)]
            out.ClearField(field)
            getattr(out, field).extend(names)
    cls_score = next(l for l in losses if l.type == "SoftmaxWithLoss").bottom[0]
    net.layer.add(name="cls_prob", type="Softmax", bottom=[cls_score], top=["cls_prob"])
    return net, []


def variant_solver(plain_path: Path, suffix: str, what: str) -> str:
    """A generated variant's solver: the plain one's settings, snapshots ``<prefix>_<suffix>``."""
    rel = plain_path.relative_to(ROOT).as_posix()
    lines = [f"# GENERATED by scripts/make_prototxt.py from {rel}: the same solver for {what};",
             f"# snapshots named <prefix>_{suffix}. train_net resolves relative to the current",
             "# directory, then to this file's directory."]
    for line in plain_path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("snapshot_prefix:"):
            prefix = line.split(":", 1)[1].strip().strip('"')
            line = f'snapshot_prefix: "{prefix}_{suffix}"'
        lines.append(line)
    return "\n".join(lines) + "\n"


def to_text(net, source: str, comments=()) -> str:
    """Readable prototxt: a header, the net-level fields, one block per layer, section comments."""
    notes = dict(comments)
    head = caffe_pb2.NetParameter()
    head.CopyFrom(net)
    head.ClearField("layer")
    lines = [f"# GENERATED by scripts/make_prototxt.py from {source}: edit that file and the",
             "# generator, not this one (tests/test_prototxt_shipped.py checks it is up to date).",
             text_format.MessageToString(head).rstrip("\n")]
    for i, layer in enumerate(net.layer):
        if i in notes:
            lines.append(f"\n## {notes[i]}")
        # protobuf escapes ' inside "..." strings; unescaped reads the same and reads better.
        body = text_format.MessageToString(layer, indent=2).rstrip("\n").replace("\\'", "'")
        lines.append("layer {\n" + body + "\n}")
    return "\n".join(l for l in lines if l) + "\n"


def outputs() -> dict[Path, str]:
    """Every generated file and its text."""
    out = {}
    for model in MODELS:
        src = PROTOTXT / model / "fast_rcnn" / "train.prototxt"
        rel = src.relative_to(ROOT).as_posix()
        frcn = spec.read_net(src)
        net, notes = ohem_train(frcn)
        out[PROTOTXT / model / "fast_rcnn_ohem" / "train.prototxt"] = to_text(net, rel, notes)
        if model == "small":
            out[PROTOTXT / model / "fast_rcnn" / "test.prototxt"] = to_text(frcn_test(frcn)[0], rel)
    for model in E2E_MODELS:
        plain_dir = PROTOTXT / model / "faster_rcnn_end2end"
        src = plain_dir / "train.prototxt"
        rel = src.relative_to(ROOT).as_posix()
        plain = spec.read_net(src)
        for variant, make, what in (("ohem", ohem_train, "OHEM"), ("focal", focal_train, "focal loss")):
            d = PROTOTXT / model / f"faster_rcnn_end2end_{variant}"
            net, notes = make(plain)
            out[d / "train.prototxt"] = to_text(net, rel, notes)
            out[d / "solver.prototxt"] = variant_solver(plain_dir / "solver.prototxt", variant, what)
        if model == "small":
            out[plain_dir / "test.prototxt"] = to_text(e2e_test(plain)[0], rel)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale")
    args = ap.parse_args(argv)
    stale = 0
    for path, text in outputs().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            print(f"stale: {path.relative_to(ROOT)}")
            stale += 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
