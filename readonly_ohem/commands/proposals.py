"""``readonly-ohem proposals VOC_YEAR_DIR --out FILE.mat``: selective-search proposals of an image
set (OpenCV's, ``readonly_ohem.datasets.selective_search``) in the Fast R-CNN ``.mat`` layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from readonly_ohem.datasets.proposals import save_proposals_mat
from readonly_ohem.datasets.image import load_image_bgr
from readonly_ohem.datasets.selective_search import segmentation, selective_search_boxes
from readonly_ohem.errors import DataError


def proposals_command(voc_dir, imageset: str = "trainval", out: str = "proposals.mat",
                      mode: str = "fast") -> int:
    """Compute proposals for ``VOC<year>/ImageSets/Main/<imageset>.txt`` and save them as ``out``."""
    voc = Path(voc_dir)
    set_file = voc / "ImageSets" / "Main" / f"{imageset}.txt"
    try:
        ids = [ln.split()[0] for ln in set_file.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        raise DataError(f"{set_file}: image set file not found") from None
    ss = segmentation(mode)
    boxes = []
    for k, i in enumerate(ids):
        boxes.append(selective_search_boxes(load_image_bgr(voc / "JPEGImages" / f"{i}.jpg"), mode, ss))
        if (k + 1) % 50 == 0 or k + 1 == len(ids):
            print(f"selective search: {k + 1}/{len(ids)} images", flush=True)
    save_proposals_mat(out, boxes)
    print(f"wrote {out} ({len(ids)} images, {np.mean([b.shape[0] for b in boxes]):.0f} boxes per image)")
    return 0
