"""Generate the OHEM (and focal) train nets, the small nets' test nets and the COCO nets from the plain nets.

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
- ``coco/<model>/{fast_rcnn,fast_rcnn_ohem}/*`` (VGG16, VGG_CNN_M_1024): the nets and solvers
  above for another dataset (``DATASETS``): the data layers' ``num_classes``, ``cls_score``'s
  K outputs and ``bbox_pred``'s 4K set to the dataset's class count, and, for COCO, the Dropout
  layers after fc6/fc7 removed and the lr step at 200000 — py-faster-rcnn's
  ``models/coco/<model>/fast_rcnn`` differ from its ``models/pascal_voc`` ones in exactly that.
  The OHEM COCO nets (never released) are made from the COCO Fast R-CNN nets as above.

Run from anywhere:  python scripts/make_prototxt.py        (rewrites the generated files)
                    python scripts/make_prototxt.py --check (exit 1 if one is out of date)
                    python scripts/make_prototxt.py --model small --num-classes 11 --out DIR
                        (any model for any class count: DIR/fast_rcnn/{train,test,solver}.prototxt,
                        DIR/fast_rcnn_ohem/{train,solver}.prototxt; ``--dataset coco`` for the
                        COCO form: 81 classes unless --num-classes, no Dropout, its lr step)
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from google.protobuf import text_format

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from readonly_ohem.caffe import spec  # noqa: E402
from readonly_ohem.caffe.layers.python import parse_param_str  # noqa: E402
from readonly_ohem.caffe.proto import caffe_pb2  # noqa: E402
from readonly_ohem.ohem.focal_layer import focal_in_place_of  # noqa: E402

PROTOTXT = ROOT / "prototxt"
MODELS = ("VGG16", "VGG_CNN_M_1024", "small")  # fast_rcnn
E2E_MODELS = ("VGG16", "VGG_CNN_M_1024", "ZF", "small")  # faster_rcnn_end2end
LOSS_TYPES = ("SoftmaxWithLoss", "SmoothL1Loss")
SMALL_TEST_INPUTS = (("data", (1, 3, 240, 320)), ("rois", (1, 5)))
SMALL_E2E_TEST_INPUTS = (("data", (1, 3, 240, 320)), ("im_info", (1, 3)))
FOCAL_PARAM_STR = "{'alpha': 0.25, 'gamma': 2.0}"


@dataclass(frozen=True)
class Dataset:
    """What a dataset changes in a model's nets and solvers (py-faster-rcnn's models/<dataset>).

    ``num_classes``: with ``__background__`` (cls_score has K outputs, bbox_pred 4K);
    ``dropout``: whether the head keeps its Dropout layers; ``stepsize``: the solvers' lr step
    (None: the model's own; the small net always keeps its mini-VOC schedule)."""
    num_classes: int
    dropout: bool = True
    stepsize: int | None = None


DATASETS = {
    "pascal_voc": Dataset(21),  # the source nets: prototxt/<model>/
    # py-faster-rcnn's models/coco/<model>/fast_rcnn: 80 categories + background, no Dropout
    # after fc6/fc7, stepsize 200000 (its experiments/scripts/fast_rcnn.sh trains 280000 iterations)
    "coco": Dataset(81, dropout=False, stepsize=200000),
}
COCO_MODELS = ("VGG16", "VGG_CNN_M_1024")  # shipped as prototxt/coco/<model>/, as py-faster-rcnn


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


def head_outputs(frcn) -> tuple[str, str]:
    """(classifier, regressor) blob names of a Fast R-CNN train net: the bottoms of its losses."""
    losses = split_frcn(frcn)[3]
    cls_score = next(l for l in losses if l.type == "SoftmaxWithLoss").bottom[0]
    bbox_pred = next(l for l in losses if l.type == "SmoothL1Loss").bottom[0]
    return cls_score, bbox_pred


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
    cls_score, bbox_pred = head_outputs(frcn)

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
    _, trunk, head, _ = split_frcn(frcn)
    cls_score = head_outputs(frcn)[0]
    net = caffe_pb2.NetParameter(name=frcn.name)
    for name, shape in inputs:
        net.input.append(name)
        net.input_shape.add(dim=shape)
    for layer in trunk + head:
        net.layer.add().CopyFrom(layer)
    net.layer.add(name="cls_prob", type="Softmax", bottom=[cls_score], top=["cls_prob"])
    return net, []


NUM_CLASSES = re.compile(r"""(['"]?num_classes['"]?\s*:\s*)\d+""")


def with_num_classes(param_str: str, k: int) -> str:
    """``"'num_classes': 21"`` -> ``"'num_classes': 81"``, the rest of the param_str as written."""
    text, n = NUM_CLASSES.subn(lambda m: f"{m.group(1)}{k}", param_str)
    if n != 1:
        raise ValueError(f"param_str {param_str!r}: expected one integer num_classes")
    return text


def retarget(net, outputs: tuple[str, str], dataset: Dataset) -> caffe_pb2.NetParameter:
    """``net`` for ``dataset``: every Python layer's param_str ``num_classes`` and the InnerProduct
    layers making the ``outputs`` blobs (classifier: K outputs, regressor: 4K) set to its class
    count; without ``dataset.dropout``, the (in-place) Dropout layers left out."""
    k = dataset.num_classes
    sizes = {outputs[0]: k, outputs[1]: 4 * k}
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    out.ClearField("layer")
    for layer in net.layer:
        if layer.type == "Dropout" and not dataset.dropout:
            if list(layer.top) != list(layer.bottom):
                raise ValueError(f"{net.name}: layer {layer.name!r}: only an in-place Dropout "
                                 "can be left out")
            continue
        new = out.layer.add()
        new.CopyFrom(layer)
        if layer.type == "Python" and "num_classes" in parse_param_str(layer):
            new.python_param.param_str = with_num_classes(layer.python_param.param_str, k)
        if layer.type == "InnerProduct" and layer.top[0] in sizes:
            new.inner_product_param.num_output = sizes[layer.top[0]]
    made = {l.top[0] for l in out.layer if l.type == "InnerProduct"}
    if not set(sizes) <= made:
        raise ValueError(f"{net.name}: no InnerProduct layer makes {sorted(set(sizes) - made)}")
    return out


def header(source: str, note: str = "", checked: bool = True) -> list[str]:
    """The comment lines opening a generated file: its source, what was changed, who checks it."""
    lines = [f"# GENERATED by scripts/make_prototxt.py from {source}: edit that file and the",
             "# generator, not this one (tests/test_prototxt_shipped.py checks it is up to date)."
             if checked else "# generator, not this one."]
    return lines + ([f"# {note}"] if note else [])


def focal_train(plain) -> tuple:
    """(NetParameter, comments) of the plain train net with the RoI head's SoftmaxWithLoss
    replaced by the focal loss on the same bottoms (``FocalLossLayer``; same name and top)."""
    losses = split_frcn(plain)[3]
    net = caffe_pb2.NetParameter()
    net.CopyFrom(plain)
    first = len(plain.layer) - len(losses)
    i = next(first + k for k, l in enumerate(losses) if l.type == "SoftmaxWithLoss")
    old = plain.layer[i]
    focal = focal_in_place_of(old, FOCAL_PARAM_STR)
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


def to_text(net, source: str, comments=(), note: str = "", checked: bool = True) -> str:
    """Readable prototxt: a header, the net-level fields, one block per layer, section comments."""
    notes = dict(comments)
    head = caffe_pb2.NetParameter()
    head.CopyFrom(net)
    head.ClearField("layer")
    lines = header(source, note, checked) + [text_format.MessageToString(head).rstrip("\n")]
    for i, layer in enumerate(net.layer):
        if i in notes:
            lines.append(f"\n## {notes[i]}")
        # protobuf escapes ' inside "..." strings; unescaped reads the same and reads better.
        body = text_format.MessageToString(layer, indent=2).rstrip("\n").replace("\\'", "'")
        lines.append("layer {\n" + body + "\n}")
    return "\n".join(l for l in lines if l) + "\n"


def solver_text(model: str, method: str, dataset: Dataset, note: str = "",
                checked: bool = True) -> str:
    """The solver of ``prototxt/<model>/<method>`` with ``dataset``'s lr step (its train_net,
    ``train.prototxt``, resolves beside the solver file)."""
    src = PROTOTXT / model / method / "solver.prototxt"
    param = spec.read_solver(src)
    if dataset.stepsize is not None and model != "small":  # small: its own mini-VOC schedule
        param.stepsize = dataset.stepsize
    lines = header(src.relative_to(ROOT).as_posix(), note, checked)
    return "\n".join(lines + [text_format.MessageToString(param).rstrip("\n")]) + "\n"


def dataset_files(model: str, dataset: Dataset, out_dir: Path, name: str,
                  checked: bool = True) -> dict[Path, str]:
    """``model``'s Fast R-CNN and OHEM nets and solvers for ``dataset`` (called ``name`` in the
    headers), as ``out_dir/fast_rcnn/{train,test,solver}.prototxt`` and
    ``out_dir/fast_rcnn_ohem/{train,solver}.prototxt``."""
    train_src = PROTOTXT / model / "fast_rcnn" / "train.prototxt"
    voc = spec.read_net(train_src)
    blobs = head_outputs(voc)
    frcn = retarget(voc, blobs, dataset)
    if model == "small":  # the small test net is generated from its train net
        test_src, test = train_src, frcn_test(frcn)[0]
    else:
        test_src = PROTOTXT / model / "fast_rcnn" / "test.prototxt"
        test = retarget(spec.read_net(test_src), blobs, dataset)
    ohem, comments = ohem_train(frcn)
    note = f"For {name}: {dataset.num_classes} classes"
    if not dataset.dropout:
        note += ", no Dropout"
    kw = dict(note=note, checked=checked)
    rel = {p: p.relative_to(ROOT).as_posix() for p in (train_src, test_src)}
    frcn_dir, ohem_dir = out_dir / "fast_rcnn", out_dir / "fast_rcnn_ohem"
    return {
        frcn_dir / "train.prototxt": to_text(frcn, rel[train_src], **kw),
        frcn_dir / "test.prototxt": to_text(test, rel[test_src], **kw),
        frcn_dir / "solver.prototxt": solver_text(model, "fast_rcnn", dataset, **kw),
        ohem_dir / "train.prototxt": to_text(ohem, rel[train_src], comments, **kw),
        ohem_dir / "solver.prototxt": solver_text(model, "fast_rcnn_ohem", dataset, **kw),
    }


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
    for model in COCO_MODELS:
        out.update(dataset_files(model, DATASETS["coco"], PROTOTXT / "coco" / model, "coco"))
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


def write_for(model: str, dataset: Dataset, out_dir: Path, name: str) -> int:
    """``--model --out``: write ``dataset_files`` under ``out_dir`` (not checked in)."""
    for path, text in dataset_files(model, dataset, out_dir, name, checked=False).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale")
    ap.add_argument("--model", choices=MODELS, help="with --out: make this model's nets")
    ap.add_argument("--dataset", choices=sorted(DATASETS), help="with --model: for this "
                    "dataset's form (class count, Dropout, lr step); default pascal_voc")
    ap.add_argument("--num-classes", type=int, help="with --model: this many classes, "
                    "__background__ included (default: the dataset's)")
    ap.add_argument("--out", type=Path, help="with --model: the folder to write into")
    args = ap.parse_args(argv)
    if args.model or args.out or args.dataset or args.num_classes is not None:
        if not (args.model and args.out) or args.check:
            ap.error("--model and --out go together (and with --dataset, --num-classes), "
                     "not with --check")
        if args.num_classes is not None and args.num_classes < 2:
            ap.error(f"--num-classes counts __background__ too: at least 2, got {args.num_classes}")
        name = args.dataset or "pascal_voc"
        dataset = DATASETS[name]
        if args.num_classes is not None:
            dataset, name = replace(dataset, num_classes=args.num_classes), f"{name} form"
        return write_for(args.model, dataset, args.out, name)
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
