"""Transcriptions of the original py-faster-rcnn / OHEM code that several tests (and
``scripts/bench_mining.py``) compare against: ``py_cpu_nms``, and the OHEMDataLayer's
``ohem_loss``, ``select_hard_examples``, ``get_ohem_minibatch``; the devkit's ``voc_eval``; the
COCO imdb's roidb (``load_coco_annotation``, ``create_roidb_from_box_list``, ``merge_roidbs``,
``filter_crowd_proposals``) and results (``coco_results_one_category``).

Kept line for line (only made parametrizable where tests need a deterministic variant, e.g.
``argsort_desc``), so a test's reference is the original algorithm, not a second implementation
of ours. There is one copy of each: tests and benchmarks import it.
"""

import xml.etree.ElementTree as ET

import numpy as np
import scipy.sparse


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


# -- datasets/coco.py, imdb.py, ds_utils.py (py-faster-rcnn's, shipped with the OHEM code) --------
# Python 3 syntax only; the COCO API calls (loadImgs, getAnnIds, loadAnns) become the json's
# lists, and the Cython ``bbox_overlaps`` its loop.

def bbox_overlaps_loop(boxes, query_boxes):
    """The original Cython ``utils/bbox.pyx`` ``bbox_overlaps``, as its loop."""
    N, K = boxes.shape[0], query_boxes.shape[0]
    overlaps = np.zeros((N, K), dtype=np.float64)
    for k in range(K):
        box_area = ((query_boxes[k, 2] - query_boxes[k, 0] + 1) * (query_boxes[k, 3] - query_boxes[k, 1] + 1))
        for n in range(N):
            iw = min(boxes[n, 2], query_boxes[k, 2]) - max(boxes[n, 0], query_boxes[k, 0]) + 1
            if iw > 0:
                ih = min(boxes[n, 3], query_boxes[k, 3]) - max(boxes[n, 1], query_boxes[k, 1]) + 1
                if ih > 0:
                    ua = float((boxes[n, 2] - boxes[n, 0] + 1) * (boxes[n, 3] - boxes[n, 1] + 1)
                               + box_area - iw * ih)
                    overlaps[n, k] = iw * ih / ua
    return overlaps


def xyxy_to_xywh(boxes):
    return np.hstack((boxes[:, 0:2], boxes[:, 2:4] - boxes[:, 0:2] + 1))


def load_coco_annotation(im_ann, objs, num_classes, coco_cat_id_to_class_ind):
    """``coco._load_coco_annotation`` for one image: ``im_ann`` its json image, ``objs`` its
    annotations (``getAnnIds(imgIds=index, iscrowd=None)``, file order)."""
    width = im_ann['width']
    height = im_ann['height']
    valid_objs = []
    for obj in objs:
        x1 = np.max((0, obj['bbox'][0]))
        y1 = np.max((0, obj['bbox'][1]))
        x2 = np.min((width - 1, x1 + np.max((0, obj['bbox'][2] - 1))))
        y2 = np.min((height - 1, y1 + np.max((0, obj['bbox'][3] - 1))))
        if obj['area'] > 0 and x2 >= x1 and y2 >= y1:
            obj['clean_bbox'] = [x1, y1, x2, y2]
            valid_objs.append(obj)
    objs = valid_objs
    num_objs = len(objs)
    boxes = np.zeros((num_objs, 4), dtype=np.uint16)
    gt_classes = np.zeros((num_objs), dtype=np.int32)
    overlaps = np.zeros((num_objs, num_classes), dtype=np.float32)
    for ix, obj in enumerate(objs):
        cls = coco_cat_id_to_class_ind[obj['category_id']]
        boxes[ix, :] = obj['clean_bbox']
        gt_classes[ix] = cls
        if obj['iscrowd']:
            overlaps[ix, :] = -1.0
        else:
            overlaps[ix, cls] = 1.0
    return {'boxes': boxes, 'gt_classes': gt_classes,
            'gt_overlaps': scipy.sparse.csr_matrix(overlaps), 'flipped': False}


def create_roidb_from_box_list(box_list, gt_roidb, num_classes):
    """``imdb.create_roidb_from_box_list``."""
    roidb = []
    for i in range(len(box_list)):
        boxes = box_list[i]
        num_boxes = boxes.shape[0]
        overlaps = np.zeros((num_boxes, num_classes), dtype=np.float32)
        if gt_roidb is not None and gt_roidb[i]['boxes'].size > 0:
            gt_boxes = gt_roidb[i]['boxes']
            gt_classes = gt_roidb[i]['gt_classes']
            gt_overlaps = bbox_overlaps_loop(boxes.astype(float), gt_boxes.astype(float))
            argmaxes = gt_overlaps.argmax(axis=1)
            maxes = gt_overlaps.max(axis=1)
            I = np.where(maxes > 0)[0]
            overlaps[I, gt_classes[argmaxes[I]]] = maxes[I]
        roidb.append({'boxes': boxes, 'gt_classes': np.zeros((num_boxes,), dtype=np.int32),
                      'gt_overlaps': scipy.sparse.csr_matrix(overlaps), 'flipped': False})
    return roidb


def merge_roidbs(a, b):
    """``imdb.merge_roidbs``."""
    for i in range(len(a)):
        a[i]['boxes'] = np.vstack((a[i]['boxes'], b[i]['boxes']))
        a[i]['gt_classes'] = np.hstack((a[i]['gt_classes'], b[i]['gt_classes']))
        a[i]['gt_overlaps'] = scipy.sparse.vstack([a[i]['gt_overlaps'], b[i]['gt_overlaps']])
    return a


def filter_crowd_proposals(roidb, crowd_thresh):
    """``coco._filter_crowd_proposals`` (with pycocotools' ``mask.iou``, as the original)."""
    from pycocotools import mask as COCOmask

    for ix, entry in enumerate(roidb):
        overlaps = entry['gt_overlaps'].toarray()
        crowd_inds = np.where(overlaps.max(axis=1) == -1)[0]
        non_gt_inds = np.where(entry['gt_classes'] == 0)[0]
        if len(crowd_inds) == 0 or len(non_gt_inds) == 0:
            continue
        iscrowd = [int(True) for _ in range(len(crowd_inds))]
        crowd_boxes = xyxy_to_xywh(entry['boxes'][crowd_inds, :])
        non_gt_boxes = xyxy_to_xywh(entry['boxes'][non_gt_inds, :])
        ious = COCOmask.iou(non_gt_boxes, crowd_boxes, iscrowd)
        bad_inds = np.where(ious.max(axis=1) > crowd_thresh)[0]
        overlaps[non_gt_inds[bad_inds], :] = -1
        roidb[ix]['gt_overlaps'] = scipy.sparse.csr_matrix(overlaps)
    return roidb


def coco_results_one_category(boxes, cat_id, image_index):
    """``coco._coco_results_one_category`` (``dets == []`` read as an empty array)."""
    results = []
    for im_ind, index in enumerate(image_index):
        dets = boxes[im_ind].astype(float)
        if len(dets) == 0:
            continue
        scores = dets[:, -1]
        xs = dets[:, 0]
        ys = dets[:, 1]
        ws = dets[:, 2] - xs + 1
        hs = dets[:, 3] - ys + 1
        results.extend([{'image_id': index, 'category_id': cat_id,
                         'bbox': [xs[k], ys[k], ws[k], hs[k]], 'score': scores[k]}
                        for k in range(dets.shape[0])])
    return results
