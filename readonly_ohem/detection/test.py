"""Detection on an image set, exactly as the original ``fast_rcnn/test.py`` (SPEC §6).

``im_detect``: the image scaled by ``TEST.SCALES``/``TEST.MAX_SIZE`` (several scales, the paper's
+M: an image pyramid in one blob, each RoI pooled from one level, see ``project_im_rois``),
proposals projected to the scaled image, duplicate RoIs (equal after
``round(roi * DEDUP_BOXES)``) scored once, class scores from ``cls_prob``, per-class boxes from
``bbox_pred`` by the inverse transform, clipped.

``test_net``: per class j >= 1 keep scores > ``thresh`` (strict), NMS at ``TEST.NMS`` (suppress
IoU > 0.3), then at most ``max_per_image`` over all classes (scores >= the max_per_image-th);
with ``TEST.ITER_BBOX_REG`` / ``TEST.BBOX_VOTE``, the paper's +B (``detection.iterative``), on
the way; then the dataset's ``evaluate_detections`` (for VOC: devkit result files with 1-based
boxes and the AP table).

Settings of the original scripts: the Fast R-CNN baseline was tested with ``max_per_image=100,
thresh=0.05`` (``test_net.py``'s defaults, ours too); the OHEM script
(``experiments/scripts/fast_rcnn_ohem.sh``) tested with ``max_per_image=2000, thresh=1e-5``, so
the published FRCN-vs-OHEM comparison did not use the same detection settings. Pass
``--max-per-image 2000 --thresh 1e-5`` to reproduce the OHEM numbers as published; compare the
two methods with equal settings.

Faster R-CNN (``TEST.HAS_RPN``): no proposals are given; the net gets ``data`` and ``im_info``
``[[h, w, scale]]`` and scores its own ``rois`` (the ProposalLayer's, with the TEST-phase
``RPN_*`` keys), mapped back to the image by dividing by the scale (``im_detect_rpn``; one
scale, no dedup, as the original ``test.py``). ``test_net`` then reads no proposals file.
With ``TEST.MULTISCALE_RPN`` (ours, +M; the original refuses several scales with an RPN) the net
runs at every ``TEST.SCALES`` entry and the scales' detections are concatenated before the usual
per-class NMS (``im_detect_rpn_multiscale``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from readonly_ohem.detection.iterative import SecondPass, box_voting, check_config, iterative_bbox_reg
from readonly_ohem.detection.vis import draw_detections
from readonly_ohem.errors import ConfigError, DataError
from readonly_ohem.ops.boxes import bbox_transform_inv, clip_boxes
from readonly_ohem.ops.nms import greedy_nms
from readonly_ohem.progress import Progress
from readonly_ohem.datasets.image import load_image_bgr
from readonly_ohem.roi_data.blob import im_list_to_blob, prep_im_for_blob


def image_blob(im_bgr: np.ndarray, cfg) -> tuple[torch.Tensor, np.ndarray]:
    """The original test ``_get_image_blob``: (N, 3, h, w) float32 blob, one image per
    ``TEST.SCALES`` entry (capped by ``TEST.MAX_SIZE``, zero-padded), and the (N,) scales."""
    ims, scales = [], []
    for target in cfg.TEST.SCALES:
        im, s = prep_im_for_blob(im_bgr, cfg.PIXEL_MEANS, target, cfg.TEST.MAX_SIZE)
        ims.append(im)
        scales.append(s)
    return im_list_to_blob(ims), np.array(scales, dtype=np.float64)


def project_im_rois(im_rois: np.ndarray, im_scales: np.ndarray) -> np.ndarray:
    """(R, 4) float64 image boxes -> (R, 5) float32 rois ``[level, x1*s, y1*s, x2*s, y2*s]``.

    The original ``_project_im_rois`` + ``_get_rois_blob``. With several scales (+M) each box
    goes to the level (the image of the pyramid) where its scaled area, (w+1)(h+1)·s² in float64,
    is nearest 224²; on a tie the first such level in ``TEST.SCALES`` order (``argmin``), e.g.
    two scales that ``TEST.MAX_SIZE`` caps to the same factor. One scale: level 0 for all.
    """
    im_rois = im_rois.astype(np.float64, copy=False)
    if len(im_scales) > 1:
        widths = im_rois[:, 2] - im_rois[:, 0] + 1
        heights = im_rois[:, 3] - im_rois[:, 1] + 1
        scaled_areas = (widths * heights)[:, None] * (im_scales[None, :] ** 2)
        levels = np.abs(scaled_areas - 224 * 224).argmin(axis=1)[:, None]
    else:
        levels = np.zeros((im_rois.shape[0], 1), dtype=np.int64)
    rois = im_rois * im_scales[levels]
    return np.hstack((levels, rois)).astype(np.float32, copy=False)


def dedup_rois(rois: np.ndarray, dedup_boxes: float):
    """The original's duplicate-RoI removal: ``(index, inv_index)`` with rois[index] unique.

    rois: (R, 5) float32 blob rows. Rows hash to ``round(rois * DEDUP_BOXES) · [1, 1e3, 1e6, 1e9,
    1e12]``; ``np.unique`` gives the unique hashes in increasing order, ``index`` the first row of
    each and ``inv_index`` (R,) the unique row of every row (results are mapped back with it).
    """
    v = np.array([1, 1e3, 1e6, 1e9, 1e12])
    hashes = np.round(rois * rois.dtype.type(dedup_boxes)).dot(v)
    _, index, inv_index = np.unique(hashes, return_index=True, return_inverse=True)
    return index, inv_index.reshape(-1)


def _as_2d(t) -> np.ndarray:
    a = t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)
    return a.reshape(a.shape[0], -1)


def im_detect(net, im_bgr: np.ndarray, boxes: np.ndarray | None, cfg):
    """Score the proposals of one image: returns ``(scores (R, C) float32, pred_boxes (R, 4C))``.

    im_bgr: (H, W, 3) uint8 BGR. boxes: (R, 4) float64 0-based proposals (None with
    ``TEST.HAS_RPN``: the net's own, ``im_detect_rpn``).
    pred_boxes: 0-based per-class boxes (bbox_pred applied to each proposal, clipped to
    [0, W-1] × [0, H-1]), float32 as the original (computed in the deltas' dtype); the float64
    proposals tiled C times when ``TEST.BBOX_REG`` is off. A duplicate
    RoI gets the scores and boxes of the first proposal of its group (the original's mapping).
    """
    if cfg.TEST.HAS_RPN:
        if boxes is not None:
            raise ConfigError("TEST.HAS_RPN: the net scores its own RoIs; im_detect takes no "
                              "proposals (boxes=None)")
        if cfg.TEST.MULTISCALE_RPN:  # +M with an RPN: each scale's own proposals, merged
            return im_detect_rpn_multiscale(net, im_bgr, cfg)
        return im_detect_rpn(net, im_bgr, cfg)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0))
    device = getattr(net, "device", torch.device("cpu"))
    data, im_scales = image_blob(im_bgr, cfg)
    rois = project_im_rois(boxes, im_scales)
    dedup = cfg.DEDUP_BOXES > 0 and not cfg.TEST.HAS_RPN
    if dedup:
        index, inv_index = dedup_rois(rois, cfg.DEDUP_BOXES)
        rois, boxes = rois[index], boxes[index]

    with torch.no_grad():
        blobs = net.forward({"data": data.to(device), "rois": torch.from_numpy(rois).to(device)})
    scores, pred_boxes = _scores_and_boxes(blobs, boxes, im_bgr.shape[:2], cfg)
    if dedup:
        scores, pred_boxes = scores[inv_index], pred_boxes[inv_index]
    return scores, pred_boxes


def im_detect_rpn(net, im_bgr: np.ndarray, cfg):
    """``im_detect`` of a net with its own RPN (``TEST.HAS_RPN``): the net is fed ``data`` and
    ``im_info`` (1, 3) float32 ``[blob height, blob width, scale]``; the boxes scored are its
    ``rois`` blob ``[0, x1, y1, x2, y2]`` divided by the scale (float64, as the original's
    float32 / float64 division). One image scale only, as the original asserts."""
    if len(cfg.TEST.SCALES) != 1:
        raise ConfigError(f"TEST.HAS_RPN: the net makes its RoIs on one image scale; "
                          f"TEST.SCALES has {len(cfg.TEST.SCALES)} ({list(cfg.TEST.SCALES)}); "
                          f"TEST.MULTISCALE_RPN True runs the net at each and merges them")
    device = getattr(net, "device", torch.device("cpu"))
    data, im_scales = image_blob(im_bgr, cfg)
    im_info = torch.tensor([[data.shape[2], data.shape[3], im_scales[0]]], dtype=torch.float32)
    with torch.no_grad():
        blobs = net.forward({"data": data.to(device), "im_info": im_info.to(device)})
    if "rois" not in blobs:
        raise DataError("TEST.HAS_RPN: the test net has no 'rois' blob (a Faster R-CNN test net "
                        "names its ProposalLayer's top rois)")
    rois = _as_2d(blobs["rois"])
    boxes = rois[:, 1:5] / im_scales[0]
    return _scores_and_boxes(blobs, boxes, im_bgr.shape[:2], cfg)


def im_detect_rpn_multiscale(net, im_bgr: np.ndarray, cfg):
    """+M for Faster R-CNN (``TEST.MULTISCALE_RPN``; no original code): ``im_detect_rpn`` at each
    ``TEST.SCALES`` entry in turn (capped by ``TEST.MAX_SIZE``), each scale with its own proposals
    (its ProposalLayer run on that scale's features, up to ``TEST.RPN_POST_NMS_TOP_N`` each),
    scored and regressed there and divided by that scale; the rows concatenated in
    ``TEST.SCALES`` order: ``(scores (R_1+..+R_S, C) float32, pred_boxes (R_1+..+R_S, 4C))``.

    Detectron's ``im_detect_bbox_aug`` with the UNION heuristic, the one it allows for Faster
    R-CNN: no cross-scale dedup, re-scoring or averaging; ``test_net``'s per-class thresh, NMS and
    ``max_per_image`` merge the scales. One scale: exactly ``im_detect_rpn``.
    """
    scores, pred_boxes = [], []
    for target in cfg.TEST.SCALES:
        one = cfg.clone()
        one.TEST.SCALES = (target,)
        s, b = im_detect_rpn(net, im_bgr, one)
        scores.append(s)
        pred_boxes.append(b)
    return np.vstack(scores), np.vstack(pred_boxes)


def _scores_and_boxes(blobs: dict, boxes: np.ndarray, im_hw, cfg):
    """(scores (R, C) float32, pred_boxes (R, 4C)) of the net's outputs for ``boxes`` (R, 4)."""
    scores = _as_2d(blobs["cls_score"] if cfg.TEST.SVM else blobs["cls_prob"])
    if cfg.TEST.BBOX_REG:
        # float32, as the original: its bbox_transform_inv casts the float64 boxes to the dtype
        # of the deltas (Caffe's float32 bbox_pred) before any arithmetic
        deltas = _as_2d(blobs["bbox_pred"])
        pred_boxes = clip_boxes(bbox_transform_inv(boxes.astype(deltas.dtype), deltas), im_hw)
    else:
        pred_boxes = np.tile(boxes, (1, scores.shape[1]))
    return scores, pred_boxes


def detect_classes(scores: np.ndarray, pred_boxes: np.ndarray, num_classes: int, thresh: float,
                   nms_thresh: float, max_per_image: int, second: SecondPass | None = None,
                   vote_thresh: float | None = None) -> list:
    """One image's final detections: ``[dets of class j]``, j = 0..C-1 (class 0 left empty).

    dets: (N, 5) float32 ``[x1, y1, x2, y2, score]`` in NMS keep order (the result files' line
    order, which decides voc_eval's order among equal scores). Scores > ``thresh``
    (strict), NMS per class, then scores >= the ``max_per_image``-th best over all classes.
    +B (``detection.iterative``): ``second``, the R2 pass, adds its class-j rows after R1's
    before the threshold; ``vote_thresh`` replaces each kept box by the weighted vote of the
    class's candidates (scores > thresh) with IoU >= it. Neither given: the original's path.
    """
    out = [np.zeros((0, 5), np.float32) for _ in range(num_classes)]
    if scores.shape[0] == 0:
        return out
    for j in range(1, num_classes):
        inds = np.where(scores[:, j] > thresh)[0]
        cls_dets = np.hstack((pred_boxes[inds, j * 4:(j + 1) * 4],
                              scores[inds, j][:, None])).astype(np.float32, copy=False)
        if second is not None:
            sel = (second.cls == j) & (second.scores > thresh)
            cls_dets = np.vstack((cls_dets, np.hstack((second.boxes[sel],
                                                       second.scores[sel][:, None])))).astype(np.float32)
        if cls_dets.shape[0] > 0:
            # visiting order: the original's own ``scores.argsort()[::-1]`` (numpy's default
            # sort, whose order of equal scores is numpy's), so ties resolve as the original
            order = np.argsort(cls_dets[:, 4])[::-1].copy()
            t = torch.from_numpy(np.ascontiguousarray(cls_dets))
            keep, _ = greedy_nms(t[:, :4], nms_thresh, order=torch.from_numpy(order))
            kept = cls_dets[keep.cpu().numpy().astype(np.int64).reshape(-1)]
            cls_dets = kept if vote_thresh is None else box_voting(kept, cls_dets, vote_thresh)
        out[j] = cls_dets
    if max_per_image > 0:
        image_scores = np.hstack([out[j][:, -1] for j in range(1, num_classes)])
        if len(image_scores) > max_per_image:
            image_thresh = np.sort(image_scores)[-max_per_image]
            for j in range(1, num_classes):
                out[j] = out[j][out[j][:, -1] >= image_thresh]
    return out


def test_net(net, imdb, cfg, max_per_image: int = 100, thresh: float = 0.05,
             output_dir="output", vis: int = 0) -> dict:
    """Detect on every image of ``imdb``, then ``imdb.evaluate_detections`` (result files, AP).

    Returns ``{"all_boxes": all_boxes[class][image] (N, 5) float32, "result_files": {class: path},
    "images_per_second": float, "eval": {"mAP", "per_class", "metric"} or None}``.
    """
    check_config(cfg)
    vote_thresh = cfg.TEST.BBOX_VOTE_THRESH if cfg.TEST.BBOX_VOTE else None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    num_images, num_classes = imdb.num_images, len(imdb.classes)
    all_boxes = [[None] * num_images for _ in range(num_classes)]
    detect_time = 0.0
    with Progress(num_images, desc=f"test {getattr(imdb, 'name', '')}", unit="im") as bar:
        for i in range(num_images):
            im = load_image_bgr(imdb.image_path_at(i))
            t0 = time.perf_counter()
            proposals = None if cfg.TEST.HAS_RPN else imdb.proposal_boxes(i)
            scores, pred_boxes = im_detect(net, im, proposals, cfg)
            if scores.shape[0] and scores.shape[1] != num_classes:
                raise DataError(f"{getattr(net, 'source', 'the net')}: scores "
                                f"{scores.shape[1]} classes, the dataset {imdb.name} has "
                                f"{num_classes}")
            second = None
            if cfg.TEST.ITER_BBOX_REG:  # +B: the R2 pass
                second = iterative_bbox_reg(lambda b: im_detect(net, im, b, cfg), scores, pred_boxes,
                                            cfg.TEST.ITER_BBOX_REG_THRESH)
            dets = detect_classes(scores, pred_boxes, num_classes, thresh, cfg.TEST.NMS, max_per_image,
                                  second, vote_thresh)
            detect_time += time.perf_counter() - t0
            for j in range(num_classes):
                all_boxes[j][i] = dets[j]
            if i < vis:
                draw_detections(im, {imdb.classes[j]: dets[j] for j in range(1, num_classes)},
                                output_dir / f"{imdb.image_index[i]}_dets.png", classes=imdb.classes)
            bar.update()

    rate = num_images / detect_time if detect_time > 0 else 0.0
    evaluation = imdb.evaluate_detections(all_boxes, output_dir)
    print(f"{num_images} images, {rate:.2f} images/s (detection incl. post-processing); "
          f"result files: {evaluation['results_at']}")
    print(evaluation["report"])
    return {"all_boxes": all_boxes, "result_files": evaluation["result_files"],
            "images_per_second": rate, "eval": evaluation["eval"]}


# a ``test_*`` name: keep pytest from collecting it when a test module imports it.
test_net.__test__ = False
