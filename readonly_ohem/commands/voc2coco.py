"""``readonly-ohem voc2coco VOC_YEAR_DIR --split test --out instances.json``: a VOC image set as a
COCO-format json (``readonly_ohem.datasets.voc2coco``)."""

from __future__ import annotations

from pathlib import Path

from readonly_ohem.datasets.voc2coco import voc_to_coco, write_coco_json


def voc2coco_command(voc_dir, split="test", out="instances.json") -> int:
    """``readonly-ohem voc2coco``: write the json, say how to use it."""
    data = voc_to_coco(voc_dir, split)
    path = write_coco_json(data, out)
    crowd = sum(a["iscrowd"] for a in data["annotations"])
    print(f"{path}: {len(data['images'])} images, {len(data['annotations'])} objects "
          f"({crowd} difficult, as iscrowd), {len(data['categories'])} categories; use it as "
          f"--imdb coco:{path} --images {Path(voc_dir) / 'JPEGImages'}")
    return 0
