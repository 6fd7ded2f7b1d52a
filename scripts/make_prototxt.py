"""Generate the OHEM train nets (and the small net's test net) from the Fast R-CNN train nets.

The RoI head is described once, in ``prototxt/<model>/fast_rcnn/train.prototxt`` (the layers from
the ROIPooling layer to the last layer before the losses). From that description:

- ``<model>/fast_rcnn_ohem/train.prototxt`` = data layer + trunk + the **readonly** copy of the head
  (``*_readonly`` names and blobs, every bottom ``propagate_down: false``, params shared by
  name ``<layer>_w``/``<layer>_b`` and owned here, without mults) + ``cls_prob_readonly`` +
  ``hard_roi_mining`` (OHEMDataLayer) + the **trainable** copy on ``rois_hard`` (same param
  names, supplying the mults: weights lr x1 decay 1, biases lr x2 decay 0) + the losses on the
  ``*_hard`` blobs, ``propagate_down`` false on everything but the predictions.
  Both copies come from the same layers, so they cannot drift apart.
- ``small/fast_rcnn/test.prototxt`` = net inputs ``data``/``rois`` + trunk + head + ``cls_prob``.
  (The VGG test nets are the original files, whose param specs differ cosmetically.)

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
MODELS = ("VGG16", "VGG_CNN_M_1024", "small")
LOSS_TYPES = ("SoftmaxWithLoss", "SmoothL1Loss")
SMALL_TEST_INPUTS = (("data", (1, 3, 240, 320)), ("rois", (1, 5)))


def split_frcn(net) -> tuple:
    """A Fast R-CNN train net -> (data layer, trunk layers, head layers, loss layers)."""
    layers = list(net.layer)
    if layers[0].type != "Python":
        raise ValueError(f"{net.name}: the first layer must be the Python RoIDataLayer")
    roi = next(i for i, l in enumerate(layers) if l.type == "ROIPooling")
    first_loss = next(i for i, l in enumerate(layers) if l.type in LOSS_TYPES)
    return layers[0], layers[1:roi], layers[roi:first_loss], layers[first_loss:]


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
    """(NetParameter, [(layer index, comment)]) of the OHEM train net made from a FRCN train net."""
    data, trunk, head, losses = split_frcn(frcn)
    data_tops = list(data.top)
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
    mining_bottoms = ["cls_prob_readonly", bbox_pred + "_readonly"] + data_tops[1:]
    mining = net.layer.add(name="hard_roi_mining", type="Python", bottom=mining_bottoms,
                           top=[t + "_hard" for t in data_tops[1:]],
                           propagate_down=[False] * len(mining_bottoms))
    mining.python_param.module = "roi_data_layer.layer"
    mining.python_param.layer = "OHEMDataLayer"
    mining.python_param.param_str = data.python_param.param_str
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
