"""Which RoIs would OHEM keep now? One forward of a trained OHEM train net on one image.

``inspect --def TRAIN_PROTOTXT --net MODEL --image IMG.jpg [--proposals FILE] --out PNG``
builds the OHEM train net in TRAIN phase (dropout on in the readonly head, as in training;
seeded with ``RNG_SEED``), feeds the data layer's tops as ``RoIDataLayer`` would for this one
image (all RoIs, OHEM style: labels from the ground truth, bbox targets), and draws the
selection of the OHEM layer.

- Ground truth: ``IMG.xml`` beside the image, or ``../Annotations/<id>.xml`` (VOC layout);
  without it every RoI is labelled background (the picture says so).
- Proposals: ``.npz``/``.json`` keyed by image id (or holding ``boxes``), a one-image ``.mat``;
  without ``--proposals`` a sliding-window grid (the picture says so).
- bbox loss: a ``.caffemodel`` snapshot holds ``bbox_pred`` un-normalized with the training
  set's target means/stds, which it does not record; we normalize back with
  ``TRAIN.BBOX_NORMALIZE_MEANS/STDS`` (the config's), so the bbox part is approximate unless
  training used those (``BBOX_NORMALIZE_TARGETS_PRECOMPUTED``).
- Faster R-CNN end-to-end OHEM nets (``TRAIN.HAS_RPN``, e.g. ``--cfg faster_rcnn_end2end.yml
  --cfg faster_rcnn_end2end_ohem.yml``): the data layer's tops are ``data``, ``im_info`` and
  ``gt_boxes``; the net's own RPN makes the RoIs (no ``--proposals``), and its proposal target
  layer labels them, so the bbox targets are the exact precomputed-normalized ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from readonly_ohem import python_layers  # noqa: F401  (registers RoIDataLayer, OHEMDataLayer)
from readonly_ohem.caffe.net import Net
from readonly_ohem.config import load_config
from readonly_ohem.datasets.voc_eval import parse_voc_xml
from readonly_ohem.datasets.image import image_size
from readonly_ohem.datasets.imdb import merge_gt_and_proposals
from readonly_ohem.datasets.pascal_voc import gt_boxes, gt_outside_policy
from readonly_ohem.datasets.proposals import load_image_proposals
from readonly_ohem.errors import ConfigError, DataError
from readonly_ohem.inspect.draw import render_selection
from readonly_ohem.inspect.log import default_classes, split_record
from readonly_ohem.roi_data.blob import blob_scale
from readonly_ohem.roi_data.minibatch import build_minibatch, plan_minibatch
from readonly_ohem.roi_data.roidb import add_bbox_regression_targets, prepare_roidb
from readonly_ohem.train import (
    bbox_targets_normalized,
    find_bbox_pred,
    find_data_layers,
    find_ohem_layers,
    normalize_bbox_pred,
)

# the OHEM experiment settings (reference_cfgs/fast_rcnn_ohem.yml), applied before --cfg/--set
OHEM_KEYS = dict(USE_OHEM=True, BG_THRESH_LO=0.0, IMS_PER_BATCH=1, BATCH_SIZE=64, ASPECT_GROUPING=False)


def find_annotation(image: Path) -> Path | None:
    for p in (image.with_suffix(".xml"), image.parent.parent / "Annotations" / f"{image.stem}.xml"):
        if p.is_file():
            return p
    return None


def read_gt(xml: Path, classes, size: tuple[int, int], outside: str) -> dict:
    """Non-difficult objects of a VOC XML as the training roidb has them (0-based, floored; a box
    outside the (width, height) image as ``TRAIN.GT_OUTSIDE_IMAGE`` = ``outside`` says)."""
    objs = [o for o in parse_voc_xml(xml) if not o["difficult"]]
    unknown = sorted({o["name"] for o in objs} - set(classes[1:]))
    if unknown:
        raise DataError(f"{xml}: class(es) {unknown} are not among the net's {len(classes)} classes")
    boxes = gt_boxes(objs, xml, size, outside)
    return dict(boxes=boxes, gt_classes=np.array([list(classes).index(o["name"]) for o in objs], np.int32))


def grid_proposals(width: int, height: int, max_boxes: int = 2000) -> np.ndarray:
    """(K, 4) sliding windows: 6 sizes x 3 aspect ratios, half-window strides, clipped."""
    out = []
    for frac in (0.12, 0.2, 0.3, 0.45, 0.65, 0.9):
        for aspect in (0.5, 1.0, 2.0):
            base = frac * min(width, height)
            w = min(base * np.sqrt(aspect), width)
            h = min(base / np.sqrt(aspect), height)
            xs = np.arange(0, max(width - w, 0) + 1, max(w / 2, 1))
            ys = np.arange(0, max(height - h, 0) + 1, max(h / 2, 1))
            x, y = np.meshgrid(xs, ys)
            out.append(np.stack([x.ravel(), y.ravel(), x.ravel() + w - 1, y.ravel() + h - 1], 1))
    boxes = np.floor(np.concatenate(out))
    boxes[:, 2] = np.minimum(boxes[:, 2], width - 1)
    boxes[:, 3] = np.minimum(boxes[:, 3], height - 1)
    boxes = np.unique(boxes, axis=0)
    if boxes.shape[0] > max_boxes:
        boxes = boxes[np.round(np.linspace(0, boxes.shape[0] - 1, max_boxes)).astype(int)]
    return boxes


def _bbox_targets(entry: dict, cfg, num_classes: int) -> None:
    """``entry["bbox_targets"]`` (N, 5) as the training roidb has them, normalized with the
    config's means/stds (``TRAIN.BBOX_NORMALIZE_MEANS/STDS``: the model file does not record the
    training set's)."""
    precomputed = cfg.clone()
    precomputed.TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED = True
    add_bbox_regression_targets([entry], precomputed, num_classes, verbose=False)


def _normalize_bbox_pred(net, cfg, num_classes: int) -> bool:
    """Undo the snapshot's un-normalization of bbox_pred (or bbox_pred_readonly) with the config's
    means/stds; False (the net left as it is) where there is nothing to undo or they do not fit."""
    if not bbox_targets_normalized(cfg):
        return False
    layer = find_bbox_pred(net, ("bbox_pred", "bbox_pred_readonly"))
    if layer is None:
        return False
    means = np.tile(cfg.TRAIN.BBOX_NORMALIZE_MEANS, num_classes)
    stds = np.tile(cfg.TRAIN.BBOX_NORMALIZE_STDS, num_classes)
    try:
        normalize_bbox_pred(net, means, stds, layer)
    except ConfigError:  # not num_classes × 4 outputs
        return False
    return True


def inspect_image(def_path, net_path, image, proposals=None, cfg_files=(), set_pairs=(), out=None,
                  device: str = "cpu") -> dict:
    """Run the readonly head + OHEM layer once on ``image``; draw to ``out``.

    Returns ``{meta, arrays, classes, notes, summary, picture}`` (``meta``/``arrays`` as a log
    record's, so ``render_selection`` and the stats code read them)."""
    image = Path(image)
    if not image.is_file():
        raise DataError(f"--image {image}: file not found")
    cfg = load_config(cfg_files, set_pairs, defaults={"TRAIN": OHEM_KEYS})
    net = Net.from_file(str(def_path), phase="TRAIN", cfg=cfg)
    ohem = find_ohem_layers(net)
    data = find_data_layers(net)
    if not ohem or not data:
        raise ConfigError(f"--def {def_path}: needs an OHEM train net (a RoIDataLayer and an "
                          f"OHEMDataLayer); this one has {'no OHEM layer' if not ohem else 'no RoIDataLayer'}")
    report = net.load_caffemodel(str(net_path))
    net.to(device)
    num_classes = int(data[0].num_classes)
    classes = default_classes(num_classes)
    notes = [f"model {Path(net_path).name}, TRAIN phase (dropout on, seed {cfg.RNG_SEED})"]
    missing = list(getattr(report, "missing", []) or [])
    if missing:
        notes.append(f"not in the model file (left at their fillers): {', '.join(missing[:4])}")
    if _normalize_bbox_pred(net, cfg, num_classes):
        notes.append("bbox loss: targets normalized with TRAIN.BBOX_NORMALIZE_MEANS/STDS")
    rpn = bool(cfg.TRAIN.HAS_RPN)
    if rpn and proposals:
        raise ConfigError(f"--proposals {proposals}: with TRAIN.HAS_RPN the net's own RPN makes "
                          "the RoIs")

    width, height = image_size(image)
    xml = find_annotation(image)
    gt = read_gt(xml, classes, (width, height), gt_outside_policy(cfg)) if xml else None
    if gt is None:
        notes.append("no annotation found: every RoI labelled background")
    if rpn:
        props = None
        notes.append("RoIs: the net's RPN proposals (+ gt boxes), as in training")
    elif proposals:
        props = load_image_proposals(Path(proposals), image.stem)
    else:
        props = grid_proposals(width, height)
        notes.append(f"no --proposals: a sliding-window grid of {props.shape[0]} boxes")
    entry = merge_gt_and_proposals(gt, props, num_classes)
    entry.update(image=str(image), image_id=image.stem, width=width, height=height)
    prepare_roidb([entry])
    if not rpn:
        _bbox_targets(entry, cfg, num_classes)
    plan = plan_minibatch([entry], cfg, np.random.RandomState(cfg.RNG_SEED), ohem=True)
    blobs = build_minibatch([entry], plan, num_classes, cfg)
    feed = {top: blobs[name].to(device)
            for top, name in zip(data[0].param.top, data[0].top_names)}
    records = []
    for layer in ohem:
        layer.recorder = records.append
    torch.manual_seed(cfg.RNG_SEED)
    net.forward(feed)
    if not records:
        raise ConfigError(f"--def {def_path}: the OHEM layer did not run")
    keep = None if rpn else np.asarray(plan["keep"][0])  # RPN: proposals, no roidb rows
    scale = blob_scale(height, width, cfg.TRAIN.SCALES[int(plan["scale_inds"][0])], cfg.TRAIN.MAX_SIZE)
    meta_in = dict(image_id=image.stem, image_path=str(image), flipped=False, width=width, height=height,
                   scale=scale, roidb_rows=keep, roidb_boxes=None if rpn else entry["boxes"][keep])
    (meta, arrays), = split_record(records[-1], [meta_in])
    meta.update(iter=None, **{"pass": 0})
    title = f"OHEM would keep now  -  image {image.name}  -  scale {scale:.3f}"
    if gt is None:
        title += "  -  no ground truth: every RoI labelled background"
    picture = render_selection(meta, arrays, classes, out, title=title, notes=notes) if out else None
    summary = (f"{image.name}: kept {meta['num_kept']} of {meta['num_rois']} RoIs "
               f"({meta['num_kept_fg']} fg of {meta['num_fg']}), NMS suppressed {meta['num_suppressed']} "
               f"({meta['num_harder_than_kept']} harder than the easiest kept); loss of kept "
               f"{meta['kept_loss_min']:.3f}..{meta['kept_loss_max']:.3f}" + "".join(f"\n  note: {n}" for n in notes))
    return dict(meta=meta, arrays=arrays, classes=classes, notes=notes, summary=summary, picture=picture)
