"""COCO box AP through pycocotools: the field's own evaluator, called as its README does.

``evaluate_coco(ann_file, res_file)`` runs exactly ``COCO(ann_file)``, ``loadRes(results)``,
``COCOeval(gt, dt, "bbox")``, ``evaluate()``, ``accumulate()``, ``summarize()`` with pycocotools'
default parameters (every image and category of the annotations, IoU 0.50:0.05:0.95, 101 recall
points, maxDets 1/10/100, areas all/small/medium/large), so its 12 numbers are pycocotools' own;
crowd regions (``iscrowd``) are pycocotools' business: a detection matching one is ignored.
Per class it adds AP, AP50 and AP75 from the same precision array (area all, 100 detections),
as the original ``coco.py`` prints them. pycocotools is an optional extra
(``pip install 'readonly-ohem[coco]'``), imported only here and only when evaluating.

Deliberate difference: an empty results list crashes pycocotools' ``loadRes`` (it reads
``anns[0]``); we evaluate it as a detector that found nothing (AP 0 where there is ground truth).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from readonly_ohem.errors import DataError, OhemError

# the 12 numbers of ``COCOeval.summarize()`` (``COCOeval.stats``), in its order
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def pycocotools():
    """``(COCO, COCOeval)`` from pycocotools, or an error naming the extra that installs it."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise OhemError("COCO evaluation needs pycocotools: pip install 'readonly-ohem[coco]' "
                        "(or pip install pycocotools)") from None
    return COCO, COCOeval


def read_results(res_file) -> list:
    """The detections of a COCO results json: ``[{image_id, category_id, bbox [x, y, w, h], score}]``
    (checked, so a bad file is one line naming it, not a pycocotools traceback)."""
    res_file = Path(res_file)
    try:
        dets = json.loads(res_file.read_text())
    except FileNotFoundError:
        raise DataError(f"{res_file}: results file not found") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{res_file}: cannot read results json ({e})") from None
    if not isinstance(dets, list):
        raise DataError(f"{res_file}: a COCO results file is a list of "
                        f"{{image_id, category_id, bbox, score}} objects")
    for k, d in enumerate(dets):
        missing = [key for key in ("image_id", "category_id", "bbox", "score")
                   if not isinstance(d, dict) or key not in d]
        if missing:
            raise DataError(f"{res_file}: result {k} lacks {', '.join(repr(m) for m in missing)}")
        if not (isinstance(d["bbox"], list) and len(d["bbox"]) == 4):
            raise DataError(f"{res_file}: result {k}: bbox {d['bbox']!r} is not [x, y, w, h]")
    return dets


def _load_gt(COCO, ann_file):
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DataError(f"{ann_file}: annotation file not found")
    try:
        gt = COCO(str(ann_file))
    except (ValueError, AssertionError, KeyError, TypeError) as e:
        raise DataError(f"{ann_file}: not a COCO annotation file ({type(e).__name__}: {e})") from None
    if "annotations" not in gt.dataset:
        raise DataError(f"{ann_file}: has no 'annotations' (an image-info file): nothing to evaluate against")
    return gt


def _no_detections(COCO, gt):
    """What ``gt.loadRes([])`` would give if it did not crash: the images, no annotations."""
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]),
                  "categories": list(gt.dataset.get("categories", [])), "annotations": []}
    dt.createIndex()
    return dt


def _class_ap(precision: np.ndarray) -> float | None:
    """Mean of the valid (> -1) precisions, None where the class has no ground truth."""
    valid = precision[precision > -1]
    return float(np.mean(valid)) if valid.size else None


def evaluate_coco(ann_file, res_file) -> dict:
    """pycocotools' box evaluation of a results json against an annotation json.

    Returns ``{"mAP": AP@[.50:.95], "AP50", "AP75", "stats": the 12 numbers (``STAT_NAMES``),
    "per_class": {category name: AP or None (no ground truth)}, "per_class_ap50",
    "per_class_ap75", "metric": "coco", "summary": summarize()'s 12 lines}``.
    """
    COCO, COCOeval = pycocotools()
    dets = read_results(res_file)
    noise = io.StringIO()  # pycocotools' progress prints ("loading annotations...", timings)
    with contextlib.redirect_stdout(noise):
        gt = _load_gt(COCO, ann_file)
        unknown = sorted({d["image_id"] for d in dets} - set(gt.getImgIds()), key=str)
        if unknown:
            raise DataError(f"{res_file}: detections for {len(unknown)} image id(s) not in {ann_file}, "
                            f"e.g. {unknown[:3]}")
        dt = gt.loadRes(dets) if dets else _no_detections(COCO, gt)
        coco_eval = COCOeval(gt, dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()
    stats = [float(s) for s in coco_eval.stats]
    precision = coco_eval.eval["precision"]  # (iou, recall, category, area, maxDets)
    ious = coco_eval.params.iouThrs
    at50 = int(np.flatnonzero(np.isclose(ious, 0.5))[0])
    at75 = int(np.flatnonzero(np.isclose(ious, 0.75))[0])
    names = {c["id"]: c["name"] for c in gt.loadCats(coco_eval.params.catIds)}
    per_class, per50, per75 = {}, {}, {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        name = names[cat_id]
        per_class[name] = _class_ap(precision[:, :, k, 0, -1])
        per50[name] = _class_ap(precision[at50, :, k, 0, -1])
        per75[name] = _class_ap(precision[at75, :, k, 0, -1])
    return {"mAP": stats[0], "AP50": stats[1], "AP75": stats[2], "stats": stats,
            "per_class": per_class, "per_class_ap50": per50, "per_class_ap75": per75,
            "metric": "coco", "summary": summary.getvalue().rstrip("\n")}


def format_coco_table(result: dict) -> str:
    """Per class AP, AP50, AP75 (``-`` for a class without ground truth), then the overall row."""
    classes = list(result["per_class"])
    width = max([len(c) for c in classes] + [5])

    def cell(v):
        return f"{v:>7.4f}" if v is not None else f"{'-':>7}"

    lines = [f"{'class':<{width}}  {'AP':>7}  {'AP50':>7}  {'AP75':>7}"]
    for c in classes:
        lines.append(f"{c:<{width}}  {cell(result['per_class'][c])}  "
                     f"{cell(result['per_class_ap50'][c])}  {cell(result['per_class_ap75'][c])}")
    lines.append(f"{'all':<{width}}  {cell(result['mAP'])}  {cell(result['AP50'])}  {cell(result['AP75'])}")
    return "\n".join(lines)


def format_coco_report(result: dict) -> str:
    """The text ``test`` and ``eval --coco`` print: pycocotools' summary, then the class table."""
    return f"COCO box AP (pycocotools):\n{result['summary']}\n{format_coco_table(result)}"
