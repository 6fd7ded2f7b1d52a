"""VOC and COCO AP50 of the same detections: how much the two evaluators differ (docs/coco.md).

    python scripts/voc_vs_coco_ap.py VOC_YEAR_DIR DETS_DIR [--imageset test]

DETS_DIR holds devkit result files (``readonly-ohem test`` on a VOC imdb writes them). The image
set is converted with ``voc2coco`` (difficult objects become crowds) and the detections likewise
(the same boxes and rounded scores), then evaluated by the devkit (VOC07 11-point and area) and
by pycocotools (AP50, 101 recall points). The ``VOC->101`` column samples the devkit's own
precision/recall curve at COCO's 101 recall points: COCO AP50 minus it is what the matching
rules change (crowd vs difficult, COCO letting a detection take the next unmatched gt box where
the devkit counts a false positive, and COCO keeping at most 100 detections per image and
class); it minus the area AP is the interpolation alone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from readonly_ohem.datasets.coco_eval import evaluate_coco
from readonly_ohem.datasets.voc2coco import voc_results_to_coco, voc_to_coco, write_coco_json
from readonly_ohem.datasets.voc_eval import (
    load_voc_annotations,
    load_voc_image_set,
    read_results_dir,
    voc_eval,
)


def ap_101(rec: np.ndarray, prec: np.ndarray) -> float:
    """pycocotools' interpolation of one precision/recall curve: the precision envelope read at
    recall 0, 0.01, ..., 1 (the first detection reaching each), 0 past the last recall."""
    if rec.size == 0:
        return 0.0
    envelope = np.maximum.accumulate(prec[::-1])[::-1]
    inds = np.searchsorted(rec, np.linspace(0, 1, 101), side="left")
    return float(np.mean([envelope[i] if i < envelope.size else 0.0 for i in inds]))


def compare(voc_dir: Path, dets_dir: Path, imageset: str) -> list[dict]:
    coco = voc_to_coco(voc_dir, imageset)
    dets = read_results_dir(dets_dir, imageset)
    with tempfile.TemporaryDirectory() as tmp:
        ann = write_coco_json(coco, Path(tmp) / "instances.json")
        res = Path(tmp) / "results.json"
        res.write_text(json.dumps(voc_results_to_coco(dets, coco)))
        coco_ap = evaluate_coco(ann, res)["per_class_ap50"]
    annotations = load_voc_annotations(voc_dir, imageset)
    image_set = load_voc_image_set(voc_dir, imageset)
    rows = []
    for cls, ap50 in coco_ap.items():
        if ap50 is None:  # no ground truth: COCO leaves the class out of its mean
            continue
        rec, prec, ap07 = voc_eval(dets.get(cls, []), annotations, cls, 0.5, True, image_set)
        _, _, area = voc_eval(dets.get(cls, []), annotations, cls, 0.5, False, image_set)
        npos = sum(1 for objs in annotations.values() for o in objs if o["name"] == cls and not o["difficult"])
        rows.append(dict(cls=cls, npos=npos, voc07=ap07, area=area, voc101=ap_101(rec, prec), coco50=ap50))
    return rows


def _diff(a: float, b: float) -> str:
    return f"{round(a - b, 4) + 0.0:+.4f}"  # no "-0.0000"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("voc_dir", type=Path, metavar="VOC_YEAR_DIR")
    p.add_argument("dets_dir", type=Path, metavar="DETS_DIR")
    p.add_argument("--imageset", default="test")
    args = p.parse_args(argv)
    rows = compare(args.voc_dir, args.dets_dir, args.imageset)
    cols = ("voc07", "area", "voc101", "coco50")
    print(f"{'class':<12} {'npos':>5} {'VOC07':>7} {'area':>7} {'VOC->101':>8} {'COCO50':>7} "
          f"{'C-VOC07':>8} {'C-area':>7}")
    for r in rows:
        print(f"{r['cls']:<12} {r['npos']:>5} {r['voc07']:>7.4f} {r['area']:>7.4f} {r['voc101']:>8.4f} "
              f"{r['coco50']:>7.4f} {_diff(r['coco50'], r['voc07']):>8} {_diff(r['coco50'], r['area']):>7}")
    mean = {c: float(np.mean([r[c] for r in rows])) for c in cols}
    print(f"{'mean':<12} {'':>5} {mean['voc07']:>7.4f} {mean['area']:>7.4f} {mean['voc101']:>8.4f} "
          f"{mean['coco50']:>7.4f} {_diff(mean['coco50'], mean['voc07']):>8} {_diff(mean['coco50'], mean['area']):>7}")
    worst = max(rows, key=lambda r: abs(r["coco50"] - r["area"]))
    print(f"largest per-class |COCO AP50 - area AP|: {abs(worst['coco50'] - worst['area']):.4f} ({worst['cls']}); "
          f"interpolation alone (VOC->101 - area) at most "
          f"{max(abs(r['voc101'] - r['area']) for r in rows):.4f}, matching rules (COCO50 - VOC->101) "
          f"at most {max(abs(r['coco50'] - r['voc101']) for r in rows):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
