"""A VOC image set as a COCO-format json, so one dataset can be trained and evaluated both ways.

``voc_to_coco(voc_dir, split)``: the images of ``ImageSets/Main/<split>.txt`` in file order
(``file_name`` ``<id>.jpg``, size from the image header; ``id`` the VOC id as an integer where it
is digits, ``2008_000123`` -> 2008000123, else its line number), the 20 VOC categories (ids 1..20
in VOC order, then any other class an XML names, sorted) and one annotation per object:

- ``bbox`` ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``: the 1-based inclusive
  corners made 0-based (as ``pascal_voc`` reads them) and widths +1 (as the original's COCO imdb
  writes detections), so reading it back with ``coco.py`` gives the VOC reader's training boxes,
  and COCO's IoU of two converted boxes is the devkit's +1 IoU of the originals;
- ``area`` = w·h; ``iscrowd`` = ``difficult``: pycocotools then ignores detections on a
  difficult object and does not count it, as the devkit does (its crowd match is looser:
  intersection over the detection's area, and several detections may fall on one).

``write_coco_layout(root)`` adds the COCO layout of a VOC2007-style dataset under ``root`` (the
mini-VOC): ``coco/annotations/instances_<split>2007.json``, the images copied to
``coco/images/<split>2007/`` and the proposals to ``selective_search_data/coco_2007_<split>.mat``
(same image order), so ``--imdb coco_2007_<split> --data root`` reads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from readonly_ohem.atomic import atomic_write
from readonly_ohem.datasets.image import image_size
from readonly_ohem.datasets.voc_eval import VOC_CLASSES, load_voc_image_set, parse_voc_xml
from readonly_ohem.errors import DataError


def coco_image_ids(voc_ids: list[str]) -> list[int]:
    """Integer ids for VOC ids: the digits (``000005`` -> 5, ``2008_000123`` -> 2008000123) where
    every id is digits and they stay distinct, else the line numbers 1..N."""
    digits = [i.replace("_", "") for i in voc_ids]
    if all(d.isdigit() for d in digits):
        ids = [int(d) for d in digits]
        if len(set(ids)) == len(ids):
            return ids
    return list(range(1, len(voc_ids) + 1))


def voc_to_coco(voc_dir, split: str) -> dict:
    """The COCO json (a dict) of ``voc_dir``'s image set ``split`` (see the module docstring)."""
    voc_dir = Path(voc_dir)
    voc_ids = load_voc_image_set(voc_dir, split)
    if len(set(voc_ids)) != len(voc_ids):
        raise DataError(f"{voc_dir / 'ImageSets' / 'Main' / f'{split}.txt'}: an image is listed twice")
    objects = {i: parse_voc_xml(voc_dir / "Annotations" / f"{i}.xml") for i in voc_ids}
    names = list(VOC_CLASSES) + sorted({o["name"] for objs in objects.values() for o in objs}
                                       - set(VOC_CLASSES))
    cat_id = {n: k + 1 for k, n in enumerate(names)}
    images, annotations = [], []
    for voc_id, image_id in zip(voc_ids, coco_image_ids(voc_ids)):
        w, h = image_size(voc_dir / "JPEGImages" / f"{voc_id}.jpg")
        images.append({"id": image_id, "file_name": f"{voc_id}.jpg", "width": w, "height": h})
        for o in objects[voc_id]:
            xmin, ymin, xmax, ymax = o["bbox"]
            bw, bh = xmax - xmin + 1, ymax - ymin + 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": cat_id[o["name"]],
                                "bbox": [xmin - 1, ymin - 1, bw, bh], "area": bw * bh,
                                "iscrowd": int(o["difficult"])})
    return {"info": {"description": f"{voc_dir} {split}, converted by readonly-ohem voc2coco"},
            "images": images, "annotations": annotations,
            "categories": [{"id": cat_id[n], "name": n, "supercategory": "none"} for n in names]}


def voc_results_to_coco(dets_by_class: dict, coco: dict) -> list[dict]:
    """Devkit result rows ``{class: [(voc_id, score, x1, y1, x2, y2)]}`` (1-based, as
    ``voc_eval.read_results_dir`` gives them) as COCO results against ``voc_to_coco``'s json
    ``coco`` of the same image set: ``bbox`` ``[x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1]``, so
    both evaluators see the same boxes (``scripts/voc_vs_coco_ap.py`` compares them)."""
    image_id = {Path(im["file_name"]).stem: im["id"] for im in coco["images"]}
    cat_id = {c["name"]: c["id"] for c in coco["categories"]}
    results = []
    for cls, rows in dets_by_class.items():
        if cls not in cat_id:
            raise DataError(f"detections of class {cls!r}, which the COCO json does not have")
        for voc_id, score, x1, y1, x2, y2 in rows:
            if voc_id not in image_id:
                raise DataError(f"detections of image {voc_id!r}, which the COCO json does not have")
            results.append({"image_id": image_id[voc_id], "category_id": cat_id[cls],
                            "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], "score": score})
    return results


def write_coco_json(data: dict, path) -> Path:
    """Write a COCO json atomically (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump(data, f)
    return path


def write_coco_layout(root, splits=("trainval", "test"), year: str = "2007") -> list[Path]:
    """The COCO layout of ``root/VOCdevkit/VOC<year>`` beside it (module docstring); returns the
    json files written."""
    root = Path(root)
    voc = root / "VOCdevkit" / f"VOC{year}"
    written = []
    for split in splits:
        data = voc_to_coco(voc, split)
        images = root / "coco" / "images" / f"{split}{year}"
        images.mkdir(parents=True, exist_ok=True)
        for im in data["images"]:
            shutil.copyfile(voc / "JPEGImages" / im["file_name"], images / im["file_name"])
        props = root / "selective_search_data" / f"voc_{year}_{split}.mat"
        if props.is_file():
            shutil.copyfile(props, props.with_name(f"coco_{year}_{split}.mat"))
        written.append(write_coco_json(data, root / "coco" / "annotations" / f"instances_{split}{year}.json"))
    return written
