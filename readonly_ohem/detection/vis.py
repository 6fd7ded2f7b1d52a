"""Detections drawn on an image with Pillow: one colour per class, a "class score" tag per box.

The original drew with matplotlib, one window per class, boxes scoring above 0.3; we draw every
class on one PNG with the same default threshold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# 20 distinct colours (Trubetskoy's list, saturated ones first), one per class index; every box
# and tag also gets a thin black halo so light colours stay visible on any image.
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
           (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
           (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128))


def class_color(index: int) -> tuple[int, int, int]:
    """The colour of class ``index`` (1-based foreground classes start at the palette's first)."""
    return PALETTE[(index - 1) % len(PALETTE)] if index > 0 else (255, 255, 255)


def load_font(size: int):
    """Pillow's default font at ``size`` px where it scales (FreeType), else its bitmap font."""
    try:
        return ImageFont.load_default(size=size)  # a scalable font when Pillow has FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def draw_detections(im_bgr: np.ndarray, dets_by_class: dict, out_path, classes=None,
                    thresh: float = 0.3) -> Image.Image:
    """Draw and save a PNG; returns the drawn RGB image.

    im_bgr: (H, W, 3) uint8 BGR (as the test pipeline reads images).
    dets_by_class: ``{class_name: (N, 5) [x1, y1, x2, y2, score]}`` 0-based pixel boxes; boxes
        scoring below ``thresh`` are left out.
    classes: the dataset's class list (fixes each class's colour across images); default: the
        dict's order.
    """
    im = Image.fromarray(np.ascontiguousarray(np.asarray(im_bgr, dtype=np.uint8)[:, :, ::-1]), "RGB")
    W, H = im.size
    classes = list(classes) if classes is not None else ["__background__", *dets_by_class]
    line = max(2, round(min(W, H) / 200))
    font = load_font(max(11, round(min(W, H) / 28)))
    draw = ImageDraw.Draw(im)

    items = []
    for name, dets in dets_by_class.items():
        dets = np.asarray(dets, dtype=np.float64).reshape(-1, 5)
        index = classes.index(name) if name in classes else len(classes)
        items += [(float(d[4]), name, index, d[:4]) for d in dets if d[4] >= thresh]
    items.sort(key=lambda t: t[0])  # low scores first: the best boxes end up on top

    for score, name, index, (x1, y1, x2, y2) in items:
        color = class_color(index)
        draw.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=(0, 0, 0), width=line + 2)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
        text = f"{name} {score:.2f}"
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l + 4, b - t + 4
        ty = y1 - th if y1 - th >= 0 else y1  # above the box, or inside it at the image top
        tx = min(max(x1, 0), max(W - tw, 0))
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=color, outline=(0, 0, 0))
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        draw.text((tx + 2 - l, ty + 2 - t), text, font=font,
                  fill=(0, 0, 0) if luminance > 150 else (255, 255, 255))

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    im.save(out_path, format="PNG")
    return im
