"""``readonly-ohem eval``: the VOC AP table of devkit result files (``comp4_det_<set>_<class>.txt``)
against a VOC year directory's annotations (``readonly_ohem.datasets.voc_eval``), or with
``--coco instances.json`` pycocotools' summary of a COCO results json
(``readonly_ohem.datasets.coco_eval``)."""

from __future__ import annotations

import json
from pathlib import Path

from readonly_ohem.errors import ConfigError
from readonly_ohem.datasets.coco_eval import evaluate_coco, format_coco_report
from readonly_ohem.datasets.voc_eval import (
    VOC_CLASSES,
    evaluate_classes,
    format_ap_table,
    load_voc_annotations,
    load_voc_image_set,
    read_results_dir,
)


def eval_command(voc_dir, imageset, dets, metric="voc07", json_path=None, coco=None):
    """``readonly-ohem eval``: AP table of the result files in ``dets`` against ``voc_dir``'s XML.

    Classes: the 20 VOC classes (a missing file means no detections, AP 0), then any other class
    a result file names. ``metric``: ``voc07`` (11-point) or ``area``. With ``coco`` (an
    annotation json), ``dets`` is a COCO results json and pycocotools evaluates it.
    """
    if coco is not None:
        if voc_dir is not None:
            raise ConfigError(f"give either VOC_YEAR_DIR ({voc_dir}) or --coco {coco}, not both")
        result = evaluate_coco(coco, dets)
        print(format_coco_report(result))
        if json_path:
            Path(json_path).write_text(json.dumps({k: v for k, v in result.items() if k != "summary"},
                                                  indent=1) + "\n")
        return 0
    if voc_dir is None:
        raise ConfigError("give a VOC year directory (VOC_YEAR_DIR) or --coco instances.json")
    dets_by_class = read_results_dir(dets, imageset)
    annotations = load_voc_annotations(voc_dir, imageset)
    classes = list(VOC_CLASSES) + sorted(set(dets_by_class) - set(VOC_CLASSES))
    result = evaluate_classes(dets_by_class, annotations, classes, use_07_metric=(metric == "voc07"),
                              image_set=load_voc_image_set(voc_dir, imageset))
    missing = [c for c in VOC_CLASSES if c not in dets_by_class]
    if missing:
        print(f"no result file (AP 0) for: {', '.join(missing)}")
    print(format_ap_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    return 0
