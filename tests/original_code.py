"""Transcriptions of the original py-faster-rcnn code that several tests compare against.

Kept line for line (only made parametrizable where tests need a deterministic variant), so a
test's reference is the original algorithm, not a second implementation of ours.
"""

import numpy as np


def argsort_desc_numpy(scores):
    """The original's ``scores.argsort()[::-1]``: numpy's default (unstable) sort."""
    return scores.argsort()[::-1]


def argsort_desc_stable(scores):
    """The same with ties made deterministic by a stable sort (ties: higher index first)."""
    return np.argsort(scores, kind="stable")[::-1]


def py_cpu_nms(dets, thresh, argsort_desc=argsort_desc_numpy):
    """The original ``nms/py_cpu_nms.py`` (keeps IoU <= thresh, as the GPU kernel).

    dets: (N, 5) [x1, y1, x2, y2, score]; ``argsort_desc`` gives the visiting order.
    """
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = argsort_desc(scores)
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        w = np.maximum(0.0, xx2 - xx1 + 1)
        h = np.maximum(0.0, yy2 - yy1 + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        inds = np.where(ovr <= thresh)[0]
        order = order[inds + 1]
    return keep
