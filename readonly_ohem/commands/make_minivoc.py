"""``readonly-ohem make-minivoc DIR``: write the built-in mini-VOC (``readonly_ohem.datasets.minivoc``),
with ``--format coco`` also its COCO layout (``readonly_ohem.datasets.voc2coco.write_coco_layout``)."""

from __future__ import annotations

from readonly_ohem.datasets.minivoc import DEFAULT_IMAGES, make_minivoc
from readonly_ohem.datasets.voc2coco import write_coco_layout


def make_minivoc_command(dir, seed: int = 0, images: int | None = None, format: str = "voc") -> int:
    """``readonly-ohem make-minivoc DIR [--seed S] [--images N] [--format voc|coco]``."""
    make_minivoc(dir, seed=seed, num_images=images or DEFAULT_IMAGES)
    if format == "coco":
        for path in write_coco_layout(dir):
            print(f"COCO json: {path}")
        print(f"use it as --imdb coco_2007_trainval / coco_2007_test --data {dir}")
    return 0
