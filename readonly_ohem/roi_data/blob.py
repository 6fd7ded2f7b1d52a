"""Image preparation for the network (the original ``utils/blob.py`` and ``_get_image_blob``).

BGR, 0-255, float32, minus ``PIXEL_MEANS``; scaled so the shorter side is ``target_size`` unless
the longer side would then exceed ``max_size`` (``round(s * max) > max_size``); several images
zero-padded top-left into one (N, 3, H, W) blob.

The resize copies OpenCV's ``cv2.resize(im, None, fx=s, fy=s, INTER_LINEAR)`` on float32: the
output size is ``round(n * s)`` (cvRound) and source coordinates are ``(d + 0.5) / s - 0.5``
(clamped to the image). SPEC §4 suggests ``F.interpolate(scale_factor=s,
recompute_scale_factor=False)``; we do not use it because it floors the output size (375 x 0.5
gives 187 rows where OpenCV gives 188) and its result changes by an ulp with the thread count,
which would make prefetch workers (1 thread) differ from the main process.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from readonly_ohem.datasets.image import load_image_bgr


def blob_scale(height: int, width: int, target_size: int, max_size: int) -> float:
    """The original's im_scale: target/min side, or max_size/max side if round(s*max) > max_size."""
    im_min, im_max = min(height, width), max(height, width)
    s = float(target_size) / float(im_min)
    if np.round(s * im_max) > max_size:
        s = float(max_size) / float(im_max)
    return s


def _linear_coeffs(n_in: int, n_out: int, scale: float):
    """OpenCV's INTER_LINEAR taps for one axis: (i0, i1, w0, w1), weights float32.

    f = float((d + 0.5) / scale - 0.5); i0 = floor(f); f -= i0; clamped at both ends (weight 1 on
    the border pixel), as ``cv::resize`` computes ``xofs`` and ``alpha``.
    """
    d = np.arange(n_out, dtype=np.float64)
    f = ((d + 0.5) * (1.0 / scale) - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    f = (f - i0).astype(np.float32)
    lo, hi = i0 < 0, i0 >= n_in - 1
    f[lo | hi] = 0
    i0[lo] = 0
    i0[hi] = n_in - 1
    i1 = np.minimum(i0 + 1, n_in - 1)
    return (torch.from_numpy(i0), torch.from_numpy(i1),
            torch.from_numpy((1 - f).astype(np.float32)), torch.from_numpy(f))


def resize_like_cv2(hwc: torch.Tensor, scale: float) -> torch.Tensor:
    """(H, W, C) float32 -> (C, round(H s), round(W s)): ``cv2.resize(fx=s, fy=s, INTER_LINEAR)``.

    OpenCV's separable scheme (rows first, then columns, float32 ``a*w0 + b*w1``), written with
    whole-tensor gathers and separate mul/add so that every element is rounded the same way for
    any thread count (torch's own bilinear kernel differs by an ulp between 1 and 2 threads, and
    floors the output size where OpenCV rounds it). Measured against OpenCV on the reference
    fixtures: within 2e-3 on values of +-130.
    """
    h, w, _ = hwc.shape
    oh, ow = int(round(h * scale)), int(round(w * scale))  # cvRound (half to even, as round())
    if (oh, ow) == (h, w):
        return hwc.permute(2, 0, 1).contiguous()  # cv2.resize copies when the size does not change
    x0, x1, a0, a1 = _linear_coeffs(w, ow, scale)
    y0, y1, b0, b1 = _linear_coeffs(h, oh, scale)
    t = hwc.transpose(0, 1).contiguous()  # (W, H, C): gathers along dim 0 copy whole rows
    hp = t.index_select(0, x0).mul_(a0[:, None, None]).add_(t.index_select(0, x1).mul_(a1[:, None, None]))
    u = hp.transpose(0, 1).contiguous()  # (H, OW, C)
    out = u.index_select(0, y0).mul_(b0[:, None, None]).add_(u.index_select(0, y1).mul_(b1[:, None, None]))
    return out.permute(2, 0, 1).contiguous()


def prep_im_for_blob(im_bgr: np.ndarray, pixel_means, target_size: int, max_size: int,
                     flipped: bool = False) -> tuple[torch.Tensor, float]:
    """(H, W, 3) uint8 BGR -> ((3, h, w) float32 tensor, scale): flip, float32, minus means, resize."""
    if flipped:
        im_bgr = im_bgr[:, ::-1, :]
    # the original's ``im_float32 -= PIXEL_MEANS`` subtracts the float64 means in float64, then
    # rounds to float32 (subtracting float32 means differs by up to an ulp)
    im = torch.from_numpy(np.ascontiguousarray(im_bgr)).double()
    im = (im - torch.as_tensor(np.asarray(pixel_means, dtype=np.float64).reshape(3))).float()
    s = blob_scale(im.shape[0], im.shape[1], target_size, max_size)
    return resize_like_cv2(im, s), s


def im_list_to_blob(ims: Sequence[torch.Tensor]) -> torch.Tensor:
    """(3, h_i, w_i) images -> (N, 3, max h, max w) float32, zero-padded at the bottom/right."""
    h = max(im.shape[1] for im in ims)
    w = max(im.shape[2] for im in ims)
    blob = torch.zeros((len(ims), 3, h, w), dtype=torch.float32)
    for i, im in enumerate(ims):
        blob[i, :, : im.shape[1], : im.shape[2]] = im
    return blob


def get_image_blob(entries: Sequence[dict], scale_inds: Sequence[int], cfg) -> tuple[torch.Tensor, list[float]]:
    """The original ``_get_image_blob``: (N, 3, H, W) float32 blob and the per-image scales."""
    ims, scales = [], []
    for e, k in zip(entries, scale_inds):
        im, s = prep_im_for_blob(load_image_bgr(e["image"]), cfg.PIXEL_MEANS,
                                 cfg.TRAIN.SCALES[int(k)], cfg.TRAIN.MAX_SIZE, e["flipped"])
        ims.append(im)
        scales.append(s)
    return im_list_to_blob(ims), scales
