"""PASCAL VOC average precision, exactly as the original devkit Python (``datasets/voc_eval.py``).

Detections are the devkit's result-file rows ``(image_id, score, x1, y1, x2, y2)`` with 1-based
boxes; ground truth is the XML annotation (1-based boxes, ``difficult`` flags), read by
``parse_voc_xml`` (the devkit's ``parse_rec``; ``pascal_voc`` reads its training gt with it too).
``evaluate_detections(imdb, ...)`` is the whole evaluation of an imdb (write, read back, AP).
Rules (SPEC §6):

* a detection matches the ground-truth box of its image with the highest IoU (+1 pixel widths);
  it is a true positive when that IoU is > ``ovthresh`` (strict) and the box is not yet taken;
* a hit on an already matched box is a false positive; a hit on a difficult box is neither
  (and difficult boxes are not counted in ``npos``);
* detections are visited by descending score, in the order of ``np.argsort(-scores)`` as the
  original (ties keep numpy's order, so the APs agree with the original to the last bit);
* AP: VOC07 11-point (``use_07_metric``, the original picks it for years < 2010) or the area under
  the precision envelope.

Deliberate difference: a class with no detections crashes the original (``BB[sorted_ind, :]`` on
an empty array) and a class with no non-difficult ground truth gives it NaN (area metric) or 0
(VOC07: NaN recalls compare false); we report AP 0 for both.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from readonly_ohem.errors import DataError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
               "sofa", "train", "tvmonitor")

RESULT_LINE = "{:s} {:.3f} {:.1f} {:.1f} {:.1f} {:.1f}\n"  # id, score, x1+1, y1+1, x2+1, y2+1


# -- annotations ---------------------------------------------------------------------------------
def _num(text: str | None, path, what):
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {what} is {text!r}, not a number") from None
    return int(v) if v.is_integer() else v


def parse_voc_xml(path: str | Path) -> list[dict]:
    """Objects of one VOC annotation file, in file order.

    Returns ``[{name, bbox: (xmin, ymin, xmax, ymax) as in the XML (1-based), difficult: bool,
    truncated: bool}]``; ``name`` lower-cased and stripped as the original. A missing
    ``difficult``/``truncated`` tag counts as 0 (VOC2012 omits some).
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except ET.ParseError as e:
        raise DataError(f"{path}: malformed XML ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read annotation ({e.strerror})") from None
    objs = []
    for k, obj in enumerate(root.iter("object")):
        name = obj.findtext("name")
        box = obj.find("bndbox")
        if name is None or box is None:
            raise DataError(f"{path}: object {k + 1} lacks <name> or <bndbox>")
        bbox = tuple(_num(box.findtext(t), path, f"object {k + 1} <{t}>")
                     for t in ("xmin", "ymin", "xmax", "ymax"))
        if not all(math.isfinite(v) for v in bbox):
            raise DataError(f"{path}: object {k + 1} ({name.strip()}) has a non-finite "
                            f"coordinate {bbox}")
        if bbox[2] < bbox[0] or bbox[3] < bbox[1]:
            raise DataError(f"{path}: object {k + 1} ({name.strip()}) has an inverted box {bbox}")
        objs.append(dict(
            name=name.lower().strip(),
            bbox=bbox,
            difficult=bool(int(_num(obj.findtext("difficult") or "0", path, f"object {k + 1} <difficult>"))),
            truncated=bool(int(_num(obj.findtext("truncated") or "0", path, f"object {k + 1} <truncated>"))),
        ))
    return objs


def voc_ap(rec, prec, use_07_metric: bool = True) -> float:
    """AP from a recall/precision curve: (D,), (D,) float64 in detection order -> float.

    VOC07: mean over t in ``np.arange(0., 1.1, 0.1)`` (the original's thresholds, so 0.3 is
    really 0.30000000000000004) of the max precision at recall >= t, 0 where none; else the area
    under the monotone precision envelope, summed where recall changes.
    """
    rec = np.asarray(rec, dtype=np.float64)
    prec = np.asarray(prec, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            reached = rec >= t
            p = np.max(prec[reached]) if reached.any() else 0
            ap = ap + p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the envelope: max precision to the right
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _overlaps(bb: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU (D, G) of detections bb (D, 4) with gt (G, 4), 1-based float64, in the original
    devkit loop's arithmetic: iw = max(min(x2) - max(x1) + 1, 0), union = area_det + area_gt -
    inter, inter / union with no special case (a zero union gives NaN there, which then makes
    ``np.max`` NaN and the detection a false positive, as in the original)."""
    ixmin = np.maximum(gt[None, :, 0], bb[:, None, 0])
    iymin = np.maximum(gt[None, :, 1], bb[:, None, 1])
    ixmax = np.minimum(gt[None, :, 2], bb[:, None, 2])
    iymax = np.minimum(gt[None, :, 3], bb[:, None, 3])
    iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
    ih = np.maximum(iymax - iymin + 1.0, 0.0)
    inters = iw * ih
    uni = ((bb[:, None, 2] - bb[:, None, 0] + 1.0) * (bb[:, None, 3] - bb[:, None, 1] + 1.0)
           + (gt[None, :, 2] - gt[None, :, 0] + 1.0) * (gt[None, :, 3] - gt[None, :, 1] + 1.0)
           - inters)
    with np.errstate(divide="ignore", invalid="ignore"):
        return inters / uni


def voc_eval(detections, annotations: dict, classname: str, ovthresh: float = 0.5,
             use_07_metric: bool = True, image_set=None):
    """Evaluate one class: returns ``(rec, prec, ap)`` as the original ``voc_eval``.

    detections: sequence of rows ``(image_id, score, x1, y1, x2, y2)``, 1-based boxes (all
        classes' rows may not be mixed: these are this class's detections).
    annotations: ``{image_id: [dict(name, bbox=[x1, y1, x2, y2] 1-based, difficult), ...]}`` for
        every image of the image set (the set evaluated; its order does not matter).
    image_set: the image set's ids in file order, repeats included (default: the keys of
        ``annotations``). The original counts ``npos`` once per image-set line, so an id listed
        twice counts its objects twice.
    rec, prec: (D,) float64 in descending-score order; empty when there are no detections.
    """
    gt_boxes, gt_difficult = {}, {}
    for image_id, objs in annotations.items():
        objs = [o for o in objs if o["name"] == classname]
        gt_boxes[image_id] = np.array([o["bbox"] for o in objs], dtype=np.float64).reshape(-1, 4)
        gt_difficult[image_id] = np.array([bool(int(o["difficult"])) for o in objs], dtype=bool)
    image_set = list(annotations) if image_set is None else [str(i) for i in image_set]
    missing = [i for i in image_set if i not in gt_boxes]
    if missing:
        raise DataError(f"{classname}: no annotations for image-set ids {', '.join(missing[:5])}")
    npos = sum(int((~gt_difficult[i]).sum()) for i in image_set)

    image_ids = [str(d[0]) for d in detections]
    nd = len(image_ids)
    if nd == 0 or npos == 0:
        return np.zeros(0), np.zeros(0), 0.0
    unknown = sorted(set(image_ids) - set(gt_boxes))
    if unknown:
        raise DataError(f"{classname}: detections for images not in the image set: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    confidence = np.array([float(d[1]) for d in detections], dtype=np.float64)
    BB = np.array([[float(z) for z in d[2:6]] for d in detections], dtype=np.float64)

    sorted_ind = np.argsort(-confidence)  # the original's call, ties in numpy's order
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]

    # Best ground-truth box of each detection, computed per image (the same IoU arithmetic as the
    # original's per-detection loop: +1 widths, union = area_det + area_gt - inter).
    uniq, inv = np.unique(np.array(image_ids), return_inverse=True)
    by_image = np.argsort(inv.reshape(-1), kind="stable")
    bounds = np.searchsorted(inv.reshape(-1)[by_image], np.arange(len(uniq) + 1))
    ovmax = np.full(nd, -np.inf)
    jmax = np.zeros(nd, dtype=np.int64)
    for u, image_id in enumerate(uniq.tolist()):
        rows = by_image[bounds[u]:bounds[u + 1]]
        gt = gt_boxes[image_id]
        if gt.shape[0] > 0:
            overlaps = _overlaps(BB[rows], gt)
            ovmax[rows] = overlaps.max(axis=1)
            jmax[rows] = overlaps.argmax(axis=1)

    # Greedy matching in score order: only bookkeeping remains in the loop.
    taken = {image_id: np.zeros(len(gt_difficult[image_id]), dtype=bool) for image_id in gt_boxes}
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        if ovmax[d] > ovthresh:
            j, image_id = jmax[d], image_ids[d]
            if not gt_difficult[image_id][j]:
                if not taken[image_id][j]:
                    tp[d] = 1.0
                    taken[image_id][j] = True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0

    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    # avoid dividing by zero when the first detections hit difficult boxes (as the original)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return rec, prec, voc_ap(rec, prec, use_07_metric)


# -- devkit result files ---------------------------------------------------------------------

def write_voc_results(all_dets, image_index, classes, out_dir, prefix: str = "comp4_det_test_"):
    """Write one devkit result file per class (``{prefix}{class}.txt``); returns {class: path}.

    all_dets[j][i]: (N, 5) float32 ``[x1, y1, x2, y2, score]``, 0-based boxes, for class j of
    ``classes`` (index 0 = background, skipped) and image i of ``image_index``. Lines are
    ``'{:s} {:.3f} {:.1f} {:.1f} {:.1f} {:.1f}'`` with boxes +1 (the devkit is 1-based), the +1
    done in the array's dtype as the original.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for j, cls in enumerate(classes):
        if cls == "__background__":
            continue
        path = out_dir / f"{prefix}{cls}.txt"
        with open(path, "wt") as f:
            for i, index in enumerate(image_index):
                dets = all_dets[j][i]
                if dets is None or len(dets) == 0:
                    continue
                dets = np.asarray(dets)
                one = dets.dtype.type(1)
                for k in range(dets.shape[0]):
                    f.write(RESULT_LINE.format(str(index), dets[k, -1], dets[k, 0] + one,
                                               dets[k, 1] + one, dets[k, 2] + one, dets[k, 3] + one))
        paths[cls] = path
    return paths


def read_results_file(path) -> list:
    """Rows ``(image_id, score, x1, y1, x2, y2)`` of one devkit result file (1-based boxes)."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) != 6:
                    raise ValueError
                rows.append((parts[0], *(float(x) for x in parts[1:])))
            except ValueError:
                raise DataError(f"{path}:{lineno}: expected 'image_id score x1 y1 x2 y2', "
                                f"got {line.strip()!r}") from None
    return rows


def read_results_dir(dets_dir, imageset: str) -> dict:
    """All result files ``*det_<imageset>_<class>.txt`` in a directory -> {class: rows}.

    Any prefix works (``comp4_det_test_cat.txt``, ``det_test_cat.txt``, ``mine_det_test_cat.txt``);
    two files for the same class are an error.
    """
    dets_dir = Path(dets_dir)
    if not dets_dir.is_dir():
        raise DataError(f"{dets_dir}: detections directory not found")
    pattern = re.compile(r"^(.*)det_" + re.escape(imageset) + r"_(.+)\.txt$")
    found = {}
    for path in sorted(dets_dir.iterdir()):
        m = pattern.match(path.name)
        if not m or not path.is_file():
            continue
        cls = m.group(2)
        if cls in found:
            raise DataError(f"{dets_dir}: two result files for class {cls!r}: "
                            f"{found[cls][0].name} and {path.name}")
        found[cls] = (path, read_results_file(path))
    if not found:
        raise DataError(f"{dets_dir}: no result files named *det_{imageset}_<class>.txt")
    return {cls: rows for cls, (_, rows) in found.items()}


# -- evaluation of a whole image set -------------------------------------------------------------

def evaluate_classes(dets_by_class: dict, annotations: dict, classes, use_07_metric: bool = True,
                     ovthresh: float = 0.5, image_set=None) -> dict:
    """AP of every class (a class without rows has AP 0): returns {"mAP", "per_class"}.

    The mean is over all ``classes``, those without ground truth included (as the original).
    ``image_set``: the set's ids in file order, repeats included (see ``voc_eval``).
    """
    per_class = {}
    for cls in classes:
        _, _, ap = voc_eval(dets_by_class.get(cls, []), annotations, cls, ovthresh, use_07_metric,
                            image_set)
        per_class[cls] = float(ap)
    m_ap = float(np.mean([per_class[c] for c in classes])) if classes else 0.0
    return {"mAP": m_ap, "per_class": per_class}


def format_ap_table(result: dict) -> str:
    """The per-class AP table and the mAP, one class a line."""
    width = max([len(c) for c in result["per_class"]] + [5])
    lines = [f"{'class':<{width}}  AP"]
    lines += [f"{c:<{width}}  {ap:.4f}" for c, ap in result["per_class"].items()]
    lines.append(f"{'mAP':<{width}}  {result['mAP']:.4f}")
    return "\n".join(lines)


def load_voc_image_set(voc_dir, imageset: str) -> list:
    """The ids of ``ImageSets/Main/<imageset>.txt``, in file order, repeats kept (blank lines
    skipped)."""
    set_file = Path(voc_dir) / "ImageSets" / "Main" / f"{imageset}.txt"
    try:
        return [x.strip() for x in set_file.read_text().splitlines() if x.strip()]
    except OSError as e:
        raise DataError(f"{set_file}: cannot read image set ({e.strerror})") from None


def load_voc_annotations(voc_dir, imageset: str) -> dict:
    """``{image_id: objects}`` for the ids of ``ImageSets/Main/<imageset>.txt`` of a VOC year dir."""
    voc_dir = Path(voc_dir)
    ids = load_voc_image_set(voc_dir, imageset)
    return {i: parse_voc_xml(voc_dir / "Annotations" / f"{i}.xml") for i in ids}


def evaluate_detections(imdb, all_boxes, output_dir) -> dict:
    """The devkit evaluation of an imdb's detections (``Imdb.evaluate_detections`` of VOC-style
    datasets: they give ``annotations_at(i)`` and may give ``image_set`` and ``year``).

    Writes ``comp4_det_<image_set>_<class>.txt`` (``test`` without an image set) into
    ``output_dir`` and evaluates what was written, read back as the original (scores rounded to 3
    decimals, boxes to 0.1): VOC07 11-point metric for years < 2010 (and without a year), else
    the area. Not evaluated (``eval`` None) when an annotation is missing. Returns
    ``{"eval": {"mAP", "per_class", "metric"} or None, "result_files": {class: path},
    "results_at": str, "report": str}``.
    """
    output_dir = Path(output_dir)
    prefix = f"comp4_det_{getattr(imdb, 'image_set', 'test')}_"
    paths = write_voc_results(all_boxes, imdb.image_index, imdb.classes, output_dir, prefix)
    out = {"eval": None, "result_files": paths, "results_at": f"{output_dir}/{prefix}<class>.txt"}
    try:
        annotations = {imdb.image_index[i]: imdb.annotations_at(i) for i in range(imdb.num_images)}
    except DataError as e:
        return {**out, "report": f"not evaluated (no annotations): {e}"}
    year = getattr(imdb, "year", None)
    use_07 = True if year is None else int(year) < 2010
    classes = [c for c in imdb.classes if c != "__background__"]
    dets = {c: read_results_file(output_dir / f"{prefix}{c}.txt") for c in classes}
    result = evaluate_classes(dets, annotations, classes, use_07_metric=use_07,
                              image_set=list(imdb.image_index))
    result["metric"] = "voc07" if use_07 else "area"
    report = f"VOC AP ({'11-point VOC07' if use_07 else 'area'} metric):\n{format_ap_table(result)}"
    return {**out, "eval": result, "report": report}

