"""Plain-loop references shared by the detection tests (not the original's code: that is in
``original_code.py``; these are the obviously-correct float64 forms the vectorized code is held to)."""

import math


def ref_transform_clip(box, d, height, width):
    """Plain float64: one box (4,) and one class's deltas (4,) -> the inverse bbox transform
    (+1 widths) of the box, clipped to the image."""
    w, h = box[2] - box[0] + 1.0, box[3] - box[1] + 1.0
    cx, cy = box[0] + 0.5 * w, box[1] + 0.5 * h
    pcx, pcy, pw, ph = d[0] * w + cx, d[1] * h + cy, math.exp(d[2]) * w, math.exp(d[3]) * h
    out = [pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph]
    return [min(max(out[0], 0), width - 1), min(max(out[1], 0), height - 1),
            min(max(out[2], 0), width - 1), min(max(out[3], 0), height - 1)]
