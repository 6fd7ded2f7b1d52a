"""Transcriptions of the original py-faster-rcnn / OHEM code that several tests (and
``scripts/bench_mining.py``) compare against: ``py_cpu_nms``, and the OHEMDataLayer's
``ohem_loss``, ``select_hard_examples``, ``get_ohem_minibatch``; the devkit's ``voc_eval``; the
COCO imdb's roidb (``load_coco_annotation``, ``create_roidb_from_box_list``, ``merge_roidbs``,
``filter_crowd_proposals``) and results (``coco_results_one_category``); the RPN layers'
forwards (``anchor_target_layer_forward``, ``proposal_layer_forward``,
``proposal_target_layer_forward``, with ``generate_anchors``; the Cython ``bbox_overlaps`` is
``bbox_overlaps_loop``); the test-time image pyramid and RoI levels of ``fast_rcnn/test.py``, and
the random calls of a minibatch.

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


# -- py-faster-rcnn lib/rpn/*.py, lib/utils/bbox.pyx, lib/fast_rcnn/bbox_transform.py ------------
# Python 3 / NumPy 2 syntax only: ``xrange`` -> ``range``, ``np.float`` -> ``np.float64``, ``/``
# -> ``//`` where Python 2 divided ints, ``int()`` where NumPy 2 refuses a float size or index.
# The global ``cfg`` and ``npr`` become arguments (``cfg``: our Config; ``npr``: a RandomState);
# the Caffe blobs become arrays in, arrays out. ``argsort_desc`` is the sort of both the proposal
# layer and the NMS it calls (the GPU NMS sorts again, as ``py_cpu_nms`` does).

def generate_anchors(base_size=16, ratios=[0.5, 1, 2], scales=2 ** np.arange(3, 6)):
    """Generate anchor (reference) windows by enumerating aspect ratios X
    scales wrt a reference (0, 0, 15, 15) window."""
    base_anchor = np.array([1, 1, base_size, base_size]) - 1
    ratio_anchors = _ratio_enum(base_anchor, ratios)
    anchors = np.vstack([_scale_enum(ratio_anchors[i, :], scales)
                         for i in range(ratio_anchors.shape[0])])
    return anchors


def _whctrs(anchor):
    w = anchor[2] - anchor[0] + 1
    h = anchor[3] - anchor[1] + 1
    x_ctr = anchor[0] + 0.5 * (w - 1)
    y_ctr = anchor[1] + 0.5 * (h - 1)
    return w, h, x_ctr, y_ctr


def _mkanchors(ws, hs, x_ctr, y_ctr):
    ws = ws[:, np.newaxis]
    hs = hs[:, np.newaxis]
    anchors = np.hstack((x_ctr - 0.5 * (ws - 1),
                         y_ctr - 0.5 * (hs - 1),
                         x_ctr + 0.5 * (ws - 1),
                         y_ctr + 0.5 * (hs - 1)))
    return anchors


def _ratio_enum(anchor, ratios):
    w, h, x_ctr, y_ctr = _whctrs(anchor)
    size = w * h
    size_ratios = size / ratios
    ws = np.round(np.sqrt(size_ratios))
    hs = np.round(ws * ratios)
    anchors = _mkanchors(ws, hs, x_ctr, y_ctr)
    return anchors


def _scale_enum(anchor, scales):
    w, h, x_ctr, y_ctr = _whctrs(anchor)
    ws = w * scales
    hs = h * scales
    anchors = _mkanchors(ws, hs, x_ctr, y_ctr)
    return anchors



def np_bbox_transform(ex_rois, gt_rois):
    ex_widths = ex_rois[:, 2] - ex_rois[:, 0] + 1.0
    ex_heights = ex_rois[:, 3] - ex_rois[:, 1] + 1.0
    ex_ctr_x = ex_rois[:, 0] + 0.5 * ex_widths
    ex_ctr_y = ex_rois[:, 1] + 0.5 * ex_heights
    gt_widths = gt_rois[:, 2] - gt_rois[:, 0] + 1.0
    gt_heights = gt_rois[:, 3] - gt_rois[:, 1] + 1.0
    gt_ctr_x = gt_rois[:, 0] + 0.5 * gt_widths
    gt_ctr_y = gt_rois[:, 1] + 0.5 * gt_heights
    targets_dx = (gt_ctr_x - ex_ctr_x) / ex_widths
    targets_dy = (gt_ctr_y - ex_ctr_y) / ex_heights
    targets_dw = np.log(gt_widths / ex_widths)
    targets_dh = np.log(gt_heights / ex_heights)
    targets = np.vstack((targets_dx, targets_dy, targets_dw, targets_dh)).transpose()
    return targets


def np_bbox_transform_inv(boxes, deltas):
    if boxes.shape[0] == 0:
        return np.zeros((0, deltas.shape[1]), dtype=deltas.dtype)
    boxes = boxes.astype(deltas.dtype, copy=False)
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    dx = deltas[:, 0::4]
    dy = deltas[:, 1::4]
    dw = deltas[:, 2::4]
    dh = deltas[:, 3::4]
    pred_ctr_x = dx * widths[:, np.newaxis] + ctr_x[:, np.newaxis]
    pred_ctr_y = dy * heights[:, np.newaxis] + ctr_y[:, np.newaxis]
    pred_w = np.exp(dw) * widths[:, np.newaxis]
    pred_h = np.exp(dh) * heights[:, np.newaxis]
    pred_boxes = np.zeros(deltas.shape, dtype=deltas.dtype)
    pred_boxes[:, 0::4] = pred_ctr_x - 0.5 * pred_w
    pred_boxes[:, 1::4] = pred_ctr_y - 0.5 * pred_h
    pred_boxes[:, 2::4] = pred_ctr_x + 0.5 * pred_w
    pred_boxes[:, 3::4] = pred_ctr_y + 0.5 * pred_h
    return pred_boxes


def np_clip_boxes(boxes, im_shape):
    boxes[:, 0::4] = np.maximum(np.minimum(boxes[:, 0::4], im_shape[1] - 1), 0)
    boxes[:, 1::4] = np.maximum(np.minimum(boxes[:, 1::4], im_shape[0] - 1), 0)
    boxes[:, 2::4] = np.maximum(np.minimum(boxes[:, 2::4], im_shape[1] - 1), 0)
    boxes[:, 3::4] = np.maximum(np.minimum(boxes[:, 3::4], im_shape[0] - 1), 0)
    return boxes


def _unmap(data, count, inds, fill=0):
    if len(data.shape) == 1:
        ret = np.empty((count, ), dtype=np.float32)
        ret.fill(fill)
        ret[inds] = data
    else:
        ret = np.empty((count, ) + data.shape[1:], dtype=np.float32)
        ret.fill(fill)
        ret[inds, :] = data
    return ret


def anchor_target_layer_forward(rpn_cls_score, gt_boxes, im_info, cfg, npr, feat_stride=16,
                                scales=(8, 16, 32), allowed_border=0):
    """``AnchorTargetLayer.setup`` + ``forward``: (labels, bbox_targets, bbox_inside_weights,
    bbox_outside_weights) as the tops hold them."""
    _anchors = generate_anchors(scales=np.array(scales))
    _num_anchors = _anchors.shape[0]
    _feat_stride = feat_stride
    _allowed_border = allowed_border
    assert rpn_cls_score.shape[0] == 1, 'Only single item batches are supported'
    height, width = rpn_cls_score.shape[-2:]
    im_info = im_info[0, :]
    shift_x = np.arange(0, width) * _feat_stride
    shift_y = np.arange(0, height) * _feat_stride
    shift_x, shift_y = np.meshgrid(shift_x, shift_y)
    shifts = np.vstack((shift_x.ravel(), shift_y.ravel(),
                        shift_x.ravel(), shift_y.ravel())).transpose()
    A = _num_anchors
    K = shifts.shape[0]
    all_anchors = (_anchors.reshape((1, A, 4)) +
                   shifts.reshape((1, K, 4)).transpose((1, 0, 2)))
    all_anchors = all_anchors.reshape((K * A, 4))
    total_anchors = int(K * A)
    inds_inside = np.where(
        (all_anchors[:, 0] >= -_allowed_border) &
        (all_anchors[:, 1] >= -_allowed_border) &
        (all_anchors[:, 2] < im_info[1] + _allowed_border) &  # width
        (all_anchors[:, 3] < im_info[0] + _allowed_border)    # height
    )[0]
    anchors = all_anchors[inds_inside, :]
    labels = np.empty((len(inds_inside), ), dtype=np.float32)
    labels.fill(-1)
    overlaps = bbox_overlaps_loop(
        np.ascontiguousarray(anchors, dtype=np.float64),
        np.ascontiguousarray(gt_boxes, dtype=np.float64))
    argmax_overlaps = overlaps.argmax(axis=1)
    max_overlaps = overlaps[np.arange(len(inds_inside)), argmax_overlaps]
    gt_argmax_overlaps = overlaps.argmax(axis=0)
    gt_max_overlaps = overlaps[gt_argmax_overlaps,
                               np.arange(overlaps.shape[1])]
    gt_argmax_overlaps = np.where(overlaps == gt_max_overlaps)[0]
    if not cfg.TRAIN.RPN_CLOBBER_POSITIVES:
        labels[max_overlaps < cfg.TRAIN.RPN_NEGATIVE_OVERLAP] = 0
    labels[gt_argmax_overlaps] = 1
    labels[max_overlaps >= cfg.TRAIN.RPN_POSITIVE_OVERLAP] = 1
    if cfg.TRAIN.RPN_CLOBBER_POSITIVES:
        labels[max_overlaps < cfg.TRAIN.RPN_NEGATIVE_OVERLAP] = 0
    num_fg = int(cfg.TRAIN.RPN_FG_FRACTION * cfg.TRAIN.RPN_BATCHSIZE)
    fg_inds = np.where(labels == 1)[0]
    if len(fg_inds) > num_fg:
        disable_inds = npr.choice(
            fg_inds, size=(len(fg_inds) - num_fg), replace=False)
        labels[disable_inds] = -1
    num_bg = cfg.TRAIN.RPN_BATCHSIZE - np.sum(labels == 1)
    bg_inds = np.where(labels == 0)[0]
    if len(bg_inds) > num_bg:
        disable_inds = npr.choice(
            bg_inds, size=(len(bg_inds) - num_bg), replace=False)
        labels[disable_inds] = -1
    bbox_targets = np.zeros((len(inds_inside), 4), dtype=np.float32)
    bbox_targets = _anchor_compute_targets(anchors, gt_boxes[argmax_overlaps, :])
    bbox_inside_weights = np.zeros((len(inds_inside), 4), dtype=np.float32)
    bbox_inside_weights[labels == 1, :] = np.array(cfg.TRAIN.RPN_BBOX_INSIDE_WEIGHTS)
    bbox_outside_weights = np.zeros((len(inds_inside), 4), dtype=np.float32)
    with np.errstate(divide="ignore"):  # a count of 0 gives an unused inf, as in the original
        if cfg.TRAIN.RPN_POSITIVE_WEIGHT < 0:
            num_examples = np.sum(labels >= 0)
            positive_weights = np.ones((1, 4)) * 1.0 / num_examples
            negative_weights = np.ones((1, 4)) * 1.0 / num_examples
        else:
            assert ((cfg.TRAIN.RPN_POSITIVE_WEIGHT > 0) &
                    (cfg.TRAIN.RPN_POSITIVE_WEIGHT < 1))
            positive_weights = (cfg.TRAIN.RPN_POSITIVE_WEIGHT /
                                np.sum(labels == 1))
            negative_weights = ((1.0 - cfg.TRAIN.RPN_POSITIVE_WEIGHT) /
                                np.sum(labels == 0))
    bbox_outside_weights[labels == 1, :] = positive_weights
    bbox_outside_weights[labels == 0, :] = negative_weights
    labels = _unmap(labels, total_anchors, inds_inside, fill=-1)
    bbox_targets = _unmap(bbox_targets, total_anchors, inds_inside, fill=0)
    bbox_inside_weights = _unmap(bbox_inside_weights, total_anchors, inds_inside, fill=0)
    bbox_outside_weights = _unmap(bbox_outside_weights, total_anchors, inds_inside, fill=0)
    labels = labels.reshape((1, height, width, A)).transpose(0, 3, 1, 2)
    labels = labels.reshape((1, 1, A * height, width))
    bbox_targets = bbox_targets \
        .reshape((1, height, width, A * 4)).transpose(0, 3, 1, 2)
    bbox_inside_weights = bbox_inside_weights \
        .reshape((1, height, width, A * 4)).transpose(0, 3, 1, 2)
    bbox_outside_weights = bbox_outside_weights \
        .reshape((1, height, width, A * 4)).transpose(0, 3, 1, 2)
    return labels, bbox_targets, bbox_inside_weights, bbox_outside_weights


def _anchor_compute_targets(ex_rois, gt_rois):
    assert ex_rois.shape[0] == gt_rois.shape[0]
    assert ex_rois.shape[1] == 4
    assert gt_rois.shape[1] == 5
    return np_bbox_transform(ex_rois, gt_rois[:, :4]).astype(np.float32, copy=False)


def proposal_layer_forward(rpn_cls_prob_reshape, rpn_bbox_pred, im_info, cfg, phase="TRAIN",
                           feat_stride=16, scales=(8, 16, 32), argsort_desc=argsort_desc_numpy):
    """``ProposalLayer.setup`` + ``forward`` with the NMS of the released code as
    ``py_cpu_nms`` (IoU > thresh suppresses, float32, sorting again): (rois, scores)."""
    _feat_stride = feat_stride
    _anchors = generate_anchors(scales=np.array(scales))
    _num_anchors = _anchors.shape[0]
    assert rpn_cls_prob_reshape.shape[0] == 1, 'Only single item batches are supported'
    cfg_key = phase
    pre_nms_topN = cfg[cfg_key].RPN_PRE_NMS_TOP_N
    post_nms_topN = cfg[cfg_key].RPN_POST_NMS_TOP_N
    nms_thresh = cfg[cfg_key].RPN_NMS_THRESH
    min_size = cfg[cfg_key].RPN_MIN_SIZE
    scores = rpn_cls_prob_reshape[:, _num_anchors:, :, :]
    bbox_deltas = rpn_bbox_pred
    im_info = im_info[0, :]
    height, width = scores.shape[-2:]
    shift_x = np.arange(0, width) * _feat_stride
    shift_y = np.arange(0, height) * _feat_stride
    shift_x, shift_y = np.meshgrid(shift_x, shift_y)
    shifts = np.vstack((shift_x.ravel(), shift_y.ravel(),
                        shift_x.ravel(), shift_y.ravel())).transpose()
    A = _num_anchors
    K = shifts.shape[0]
    anchors = _anchors.reshape((1, A, 4)) + \
        shifts.reshape((1, K, 4)).transpose((1, 0, 2))
    anchors = anchors.reshape((K * A, 4))
    bbox_deltas = bbox_deltas.transpose((0, 2, 3, 1)).reshape((-1, 4))
    scores = scores.transpose((0, 2, 3, 1)).reshape((-1, 1))
    proposals = np_bbox_transform_inv(anchors, bbox_deltas)
    proposals = np_clip_boxes(proposals, im_info[:2])
    keep = _filter_boxes(proposals, min_size * im_info[2])
    proposals = proposals[keep, :]
    scores = scores[keep]
    order = argsort_desc(scores.ravel())
    if pre_nms_topN > 0:
        order = order[:pre_nms_topN]
    proposals = proposals[order, :]
    scores = scores[order]
    dets = np.hstack((proposals, scores))
    keep = py_cpu_nms(dets, nms_thresh, argsort_desc) if dets.shape[0] else []
    if post_nms_topN > 0:
        keep = keep[:post_nms_topN]
    proposals = proposals[keep, :]
    scores = scores[keep]
    batch_inds = np.zeros((proposals.shape[0], 1), dtype=np.float32)
    blob = np.hstack((batch_inds, proposals.astype(np.float32, copy=False)))
    return blob, scores


def _filter_boxes(boxes, min_size):
    ws = boxes[:, 2] - boxes[:, 0] + 1
    hs = boxes[:, 3] - boxes[:, 1] + 1
    keep = np.where((ws >= min_size) & (hs >= min_size))[0]
    return keep


def proposal_target_layer_forward(all_rois, gt_boxes, num_classes, cfg, npr):
    """``ProposalTargetLayer.forward``: (rois, labels, bbox_targets, bbox_inside_weights,
    bbox_outside_weights). ``TRAIN.BATCH_SIZE: -1`` is every RoI (py-R-FCN's line)."""
    zeros = np.zeros((gt_boxes.shape[0], 1), dtype=gt_boxes.dtype)
    all_rois = np.vstack(
        (all_rois, np.hstack((zeros, gt_boxes[:, :-1])))
    )
    assert np.all(all_rois[:, 0] == 0), 'Only single item batches are supported'
    num_images = 1
    rois_per_image = np.inf if cfg.TRAIN.BATCH_SIZE == -1 else cfg.TRAIN.BATCH_SIZE // num_images
    fg_rois_per_image = np.round(cfg.TRAIN.FG_FRACTION * rois_per_image)
    labels, rois, bbox_targets, bbox_inside_weights = _sample_rois(
        all_rois, gt_boxes, fg_rois_per_image, rois_per_image, num_classes, cfg, npr)
    bbox_outside_weights = np.array(bbox_inside_weights > 0).astype(np.float32)
    return rois, labels, bbox_targets, bbox_inside_weights, bbox_outside_weights


def _get_bbox_regression_labels(bbox_target_data, num_classes, cfg):
    clss = bbox_target_data[:, 0]
    bbox_targets = np.zeros((clss.size, 4 * num_classes), dtype=np.float32)
    bbox_inside_weights = np.zeros(bbox_targets.shape, dtype=np.float32)
    inds = np.where(clss > 0)[0]
    for ind in inds:
        cls = clss[ind]
        start = int(4 * cls)
        end = start + 4
        bbox_targets[ind, start:end] = bbox_target_data[ind, 1:]
        bbox_inside_weights[ind, start:end] = cfg.TRAIN.BBOX_INSIDE_WEIGHTS
    return bbox_targets, bbox_inside_weights


def _roi_compute_targets(ex_rois, gt_rois, labels, cfg):
    assert ex_rois.shape[0] == gt_rois.shape[0]
    assert ex_rois.shape[1] == 4
    assert gt_rois.shape[1] == 4
    targets = np_bbox_transform(ex_rois, gt_rois)
    if cfg.TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED:
        targets = ((targets - np.array(cfg.TRAIN.BBOX_NORMALIZE_MEANS))
                   / np.array(cfg.TRAIN.BBOX_NORMALIZE_STDS))
    return np.hstack(
        (labels[:, np.newaxis], targets)).astype(np.float32, copy=False)


def _sample_rois(all_rois, gt_boxes, fg_rois_per_image, rois_per_image, num_classes, cfg, npr):
    overlaps = bbox_overlaps_loop(
        np.ascontiguousarray(all_rois[:, 1:5], dtype=np.float64),
        np.ascontiguousarray(gt_boxes[:, :4], dtype=np.float64))
    gt_assignment = overlaps.argmax(axis=1)
    max_overlaps = overlaps.max(axis=1)
    labels = gt_boxes[gt_assignment, 4]
    fg_inds = np.where(max_overlaps >= cfg.TRAIN.FG_THRESH)[0]
    fg_rois_per_this_image = int(min(fg_rois_per_image, fg_inds.size))
    if fg_inds.size > 0:
        fg_inds = npr.choice(fg_inds, size=fg_rois_per_this_image, replace=False)
    bg_inds = np.where((max_overlaps < cfg.TRAIN.BG_THRESH_HI) &
                       (max_overlaps >= cfg.TRAIN.BG_THRESH_LO))[0]
    bg_rois_per_this_image = rois_per_image - fg_rois_per_this_image
    bg_rois_per_this_image = int(min(bg_rois_per_this_image, bg_inds.size))
    if bg_inds.size > 0:
        bg_inds = npr.choice(bg_inds, size=bg_rois_per_this_image, replace=False)
    keep_inds = np.append(fg_inds, bg_inds)
    labels = labels[keep_inds]
    labels[fg_rois_per_this_image:] = 0
    rois = all_rois[keep_inds]
    bbox_target_data = _roi_compute_targets(
        rois[:, 1:5], gt_boxes[gt_assignment[keep_inds], :4], labels, cfg)
    bbox_targets, bbox_inside_weights = \
        _get_bbox_regression_labels(bbox_target_data, num_classes, cfg)
    return labels, rois, bbox_targets, bbox_inside_weights


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
