"""Selective-search proposals for any VOC-format dataset, with OpenCV's contrib implementation.

``readonly-ohem proposals VOC_YEAR_DIR --imageset trainval --out FILE.mat [--mode fast|quality]``
writes the Fast R-CNN ``.mat`` layout (``boxes`` cell, rows [y1 x1 y2 x2] 1-based, image-set
order), which ``get_imdb(..., proposals=FILE.mat)`` reads. Needs the optional extra
``opencv-contrib-python-headless`` (``pip install readonly-ohem[proposals]``). OpenCV's version
is not the MATLAB code Fast R-CNN used, so its boxes (and the resulting mAP) differ somewhat.
"""

from __future__ import annotations

import numpy as np

from readonly_ohem.errors import DataError


def segmentation(mode: str):
    """OpenCV's selective-search segmentation object (one per run: it is reused per image)."""
    try:
        import cv2
        ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    except (ImportError, AttributeError):
        raise DataError("selective search needs OpenCV's contrib modules: "
                        "pip install opencv-contrib-python-headless") from None
    return ss


def selective_search_boxes(im_bgr: np.ndarray, mode: str = "fast", ss=None) -> np.ndarray:
    """(K, 4) float64 [x1 y1 x2 y2] 0-based inclusive boxes of one (H, W, 3) uint8 BGR image."""
    ss = ss or segmentation(mode)
    ss.setBaseImage(np.ascontiguousarray(im_bgr))
    ss.switchToSelectiveSearchFast() if mode == "fast" else ss.switchToSelectiveSearchQuality()
    rects = np.asarray(ss.process(), dtype=np.float64).reshape(-1, 4)  # x, y, w, h
    return np.stack([rects[:, 0], rects[:, 1], rects[:, 0] + rects[:, 2] - 1,
                     rects[:, 1] + rects[:, 3] - 1], axis=1)
