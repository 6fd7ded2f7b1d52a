"""Transcriptions of the original py-faster-rcnn / OHEM code that several tests (and
``scripts/bench_mining.py``) compare against: ``py_cpu_nms``, the OHEMDataLayer's
``ohem_loss``, ``select_hard_examples``, ``get_ohem_minibatch``, ``voc_eval``, the test-time
image pyramid and RoI levels of ``fast_rcnn/test.py``, and the random calls of a minibatch.

Kept line for line (only made parametrizable where tests need a deterministic variant, e.g.
``argsort_desc``), so a test's reference is the original algorithm, not a second implementation
of ours. There is one copy of each: tests and benchmarks import it.
"""

import xml.etree.ElementTree as ET

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


# -- the original OHEMDataLayer (roi_data_layer/layer.py + minibatch.py), SPEC §5 ----------------
def ohem_loss(cls_prob, bbox_pred, labels, bbox_target=None, bbox_inside_weights=None,
              bbox_outside_weights=None):
    """``OHEMDataLayer.forward``'s per-RoI loss, float64 (R,): -log(max(p[label], eps)) plus, with
    TRAIN.BBOX_REG (``bbox_target`` given), the smooth-L1 term of the foreground RoIs.

    The list ``loss`` plus the ndarray ``bbox_loss`` is numpy's elementwise sum (SPEC §5).
    """
    flt_min = np.finfo(float).eps
    # classification loss
    loss = [-1 * np.log(max(float(x), flt_min))
            for x in [cls_prob[i, int(label)] for i, label in enumerate(labels)]]
    if bbox_target is None:
        return np.array(loss)

    # bounding-box regression loss
    # d := w * (b0 - b1)
    # smoothL1(x) = 0.5 * x^2    if |x| < 1
    #               |x| - 0.5    otherwise
    def smoothL1(x):
        if abs(x) < 1:
            return 0.5 * x * x
        else:
            return abs(x) - 0.5

    bbox_loss = np.zeros(labels.shape[0])
    for i in np.where(labels > 0)[0]:
        indices = np.where(bbox_inside_weights[i, :] != 0)[0]
        d = bbox_inside_weights[i, indices].astype(np.float64) * (
            bbox_pred[i, indices].astype(np.float64) - bbox_target[i, indices].astype(np.float64))
        bbox_loss[i] = sum(bbox_outside_weights[i, indices].astype(np.float64) * [smoothL1(x) for x in d])
    loss += bbox_loss
    return np.array(loss)


def select_hard_examples(loss, batch_size, argsort_desc=argsort_desc_numpy):
    """``minibatch.select_hard_examples``: the hardest min(len(loss), BATCH_SIZE), hardest first."""
    # Sort and select top hard examples.
    sorted_indices = argsort_desc(loss)
    hard_keep_inds = sorted_indices[0:np.minimum(len(loss), batch_size)]
    return hard_keep_inds


def get_ohem_minibatch(loss, rois, labels, batch_size, use_nms, nms_thresh,
                       argsort_desc=argsort_desc_numpy):
    """``minibatch.get_ohem_minibatch`` up to the hard indices (the blobs are row gathers of them).

    With TRAIN.OHEM_USE_NMS: for each image id, for each label, NMS over the group's float32
    boxes with the loss as score; then the hardest survivors. Returns (hard_inds, keep_inds):
    keep_inds the NMS survivors in the original's (image, label, NMS) order, None without NMS.
    ``argsort_desc`` is used for both the NMS visiting order and the final ranking.
    """
    loss = np.array(loss)
    keep_inds = None
    if use_nms:
        # Do NMS using loss for de-dup and diversity
        keep_inds = []
        source_img_ids = np.array([roi[0] for roi in rois])
        for img_id in np.unique(source_img_ids):
            for label in np.unique(labels):
                sel_indx = np.where(np.logical_and(labels == label, source_img_ids == img_id))[0]
                if not len(sel_indx):
                    continue
                boxes = np.concatenate((rois[sel_indx, 1:], loss[sel_indx][:, np.newaxis]),
                                       axis=1).astype(np.float32)
                keep_inds.extend(sel_indx[py_cpu_nms(boxes, nms_thresh, argsort_desc)])
        hard_keep_inds = select_hard_examples(loss[keep_inds], batch_size, argsort_desc)
        hard_inds = np.array(keep_inds)[hard_keep_inds]
    else:
        hard_inds = select_hard_examples(loss, batch_size, argsort_desc)
    return hard_inds, keep_inds


# -- datasets/voc_eval.py (Python 3 syntax only) ---------------------------------------------

def voc_ap(rec, prec, use_07_metric):
    """The original devkit AP: 11-point (VOC07) or area under the precision envelope."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.0
    else:
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return ap


def voc_eval(lines, recs, classname, ovthresh, use_07_metric, imagenames=None):
    """The original ``voc_eval`` on result-file ``lines`` and parsed ``recs`` (the pickle cache
    aside); ``imagenames``: the image-set lines (default: every annotated image)."""
    class_recs, npos = {}, 0
    for imagename in (recs if imagenames is None else imagenames):
        R = [obj for obj in recs[imagename] if obj["name"] == classname]
        bbox = np.array([x["bbox"] for x in R])
        difficult = np.array([x["difficult"] for x in R]).astype(bool)
        det = [False] * len(R)
        npos = npos + sum(~difficult)
        class_recs[imagename] = {"bbox": bbox, "difficult": difficult, "det": det}
    splitlines = [x.strip().split(" ") for x in lines]
    image_ids = [x[0] for x in splitlines]
    confidence = np.array([float(x[1]) for x in splitlines])
    BB = np.array([[float(z) for z in x[2:]] for x in splitlines])
    sorted_ind = np.argsort(-confidence)
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    with np.errstate(invalid="ignore"):  # npos 0 -> NaN recalls, as the original
        rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return rec, prec, voc_ap(rec, prec, use_07_metric)


def parse_rec(filename):
    """The original devkit's XML reader, so the tests' reference needs no module of ours."""
    objects = []
    for obj in ET.parse(filename).findall("object"):
        bbox = obj.find("bndbox")
        objects.append({"name": obj.find("name").text, "difficult": int(obj.find("difficult").text),
                        "bbox": [int(bbox.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]})
    return objects


# -- fast_rcnn/test.py: the test-time image pyramid and RoI levels (+M), SPEC §6 -------------------
# Names end in ``_test`` (test.py's, not pytest's). ``cv2.resize(im, None, None, fx=s, fy=s,
# interpolation=cv2.INTER_LINEAR)`` is a parameter (``resize(im, s)``): OpenCV is not a test dependency.

def im_list_to_blob(ims):
    """``utils/blob.py: im_list_to_blob``: (H, W, 3) images -> (N, 3, max H, max W), zero-padded."""
    max_shape = np.array([im.shape for im in ims]).max(axis=0)
    num_images = len(ims)
    blob = np.zeros((num_images, max_shape[0], max_shape[1], 3), dtype=np.float32)
    for i in range(num_images):
        im = ims[i]
        blob[i, 0:im.shape[0], 0:im.shape[1], :] = im
    channel_swap = (0, 3, 1, 2)
    blob = blob.transpose(channel_swap)
    return blob


def get_image_blob_test(im, test_scales, test_max_size, pixel_means, resize):
    """``_get_image_blob``: one image per TEST.SCALES entry, and the scale factors."""
    im_orig = im.astype(np.float32, copy=True)
    im_orig -= pixel_means

    im_shape = im_orig.shape
    im_size_min = np.min(im_shape[0:2])
    im_size_max = np.max(im_shape[0:2])

    processed_ims = []
    im_scale_factors = []

    for target_size in test_scales:
        im_scale = float(target_size) / float(im_size_min)
        # Prevent the biggest axis from being more than MAX_SIZE
        if np.round(im_scale * im_size_max) > test_max_size:
            im_scale = float(test_max_size) / float(im_size_max)
        im = resize(im_orig, im_scale)
        im_scale_factors.append(im_scale)
        processed_ims.append(im)

    # Create a blob to hold the input images
    blob = im_list_to_blob(processed_ims)

    return blob, np.array(im_scale_factors)


def project_im_rois_test(im_rois, scales):
    """``_project_im_rois``: each RoI to the level where its scaled area is nearest 224²."""
    im_rois = im_rois.astype(np.float64, copy=False)

    if len(scales) > 1:
        widths = im_rois[:, 2] - im_rois[:, 0] + 1
        heights = im_rois[:, 3] - im_rois[:, 1] + 1

        areas = widths * heights
        scaled_areas = areas[:, np.newaxis] * (scales[np.newaxis, :] ** 2)
        diff_areas = np.abs(scaled_areas - 224 * 224)
        levels = diff_areas.argmin(axis=1)[:, np.newaxis]
    else:
        levels = np.zeros((im_rois.shape[0], 1), dtype=np.int64)

    rois = im_rois * scales[levels]

    return rois, levels


def get_rois_blob_test(im_rois, im_scale_factors):
    """``_get_rois_blob``: (R, 5) float32 ``[level, x1, y1, x2, y2]`` in the pyramid."""
    rois, levels = project_im_rois_test(im_rois, im_scale_factors)
    rois_blob = np.hstack((levels, rois))
    return rois_blob.astype(np.float32, copy=False)


def dedup_rois_test(rois_blob, dedup_boxes):
    """``im_detect``'s duplicate removal: (rois_blob[index], index, inv_index)."""
    v = np.array([1, 1e3, 1e6, 1e9, 1e12])
    hashes = np.round(rois_blob * dedup_boxes).dot(v)
    _, index, inv_index = np.unique(hashes, return_index=True, return_inverse=True)
    return rois_blob[index, :], index, inv_index


# -- roi_data_layer/minibatch.py: the random calls of one minibatch (+M training), SPEC §4 ---------
# ``npr`` is a parameter (the original uses the global ``numpy.random``); ``scale_count`` is
# len(cfg.TRAIN.SCALES). Returns what the calls decided: the scale indices and each image's
# kept RoI indices (fg first) and fg count.

def minibatch_random_calls(roidb, scale_count, batch_size, fg_fraction, fg_thresh, bg_thresh_hi,
                           bg_thresh_lo, use_ohem, npr):
    num_images = len(roidb)
    # Sample random scales to use for each image in this batch
    random_scale_inds = npr.randint(0, high=scale_count, size=num_images)
    rois_per_image = batch_size // num_images
    fg_rois_per_image = np.round(fg_fraction * rois_per_image)
    keeps, num_fgs = [], []
    for im_i in range(num_images):
        overlaps = roidb[im_i]["max_overlaps"]
        fg_inds = np.where(overlaps >= fg_thresh)[0]
        if use_ohem:  # _all_rois
            bg_inds = np.where(overlaps < bg_thresh_hi)[0]
            keep_inds = np.append(fg_inds, bg_inds)
            num_fg = len(fg_inds)
        else:  # _sample_rois
            fg_rois_per_this_image = int(np.minimum(fg_rois_per_image, fg_inds.size))
            if fg_inds.size > 0:
                fg_inds = npr.choice(fg_inds, size=fg_rois_per_this_image, replace=False)
            bg_inds = np.where((overlaps < bg_thresh_hi) & (overlaps >= bg_thresh_lo))[0]
            bg_rois_per_this_image = rois_per_image - fg_rois_per_this_image
            bg_rois_per_this_image = np.minimum(bg_rois_per_this_image, bg_inds.size)
            if bg_inds.size > 0:
                bg_inds = npr.choice(bg_inds, size=bg_rois_per_this_image, replace=False)
            keep_inds = np.append(fg_inds, bg_inds)
            num_fg = fg_rois_per_this_image
        keeps.append(keep_inds)
        num_fgs.append(num_fg)
    return random_scale_inds, keeps, num_fgs
