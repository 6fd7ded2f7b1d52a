"""Transcriptions of the five reference write-ups' losses (../shared/references/000-004), which
tests/ohem/test_family.py compares ``readonly_ohem.ohem.family`` against.

Line for line as the write-ups print them, so a test's reference is the reference, not a second
implementation of ours: TensorFlow/Keras code in numpy float32 (each TF op by its numpy
equivalent, ``tf_top_k`` and ``tf_sparse_softmax_cross_entropy`` below), PyTorch code in plain
torch loops. Only what cannot run today is ported, each change marked ``# port:``: modern torch
API names, and the references' bugs that stop them from running (marked with their intent).
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# -- TensorFlow ops in numpy --------------------------------------------------------------------
def tf_top_k(x, k):
    """``tf.nn.top_k`` on a vector: the k largest, descending, equal values lower index first;
    raises when k is negative or larger than the input, as TF does."""
    if not 0 <= k <= x.shape[-1]:
        raise ValueError(f"input must have at least k={k} columns (has {x.shape[-1]})")
    idx = np.argsort(-x, kind="stable")[:k]
    return x[idx], idx


def tf_softmax(logits):
    """``tf.nn.softmax`` / ``slim.softmax`` over the last axis."""
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def tf_sparse_softmax_cross_entropy(labels, logits):
    """``tf.nn.sparse_softmax_cross_entropy_with_logits`` (and Keras' sparse CE from logits):
    logsumexp(logits) - logits[label], by the max shift; raises on a label outside [0, C)."""
    if labels.size and not (0 <= labels.min() and labels.max() < logits.shape[-1]):
        raise ValueError("Received a label value outside the valid range")
    shifted = logits - logits.max(-1, keepdims=True)
    lse = np.log(np.sum(np.exp(shifted), -1))
    return lse - shifted[np.arange(labels.shape[0]), labels]


def tf_reduce_mean(x):
    """``tf.reduce_mean``: NaN for an empty tensor (numpy's mean warns first)."""
    return x.dtype.type(np.nan) if x.size == 0 else np.mean(x)


# -- 000: MTCNN cls_ohem (TensorFlow) ------------------------------------------------------------
def cls_ohem(cls_prob, label, num_keep_radio=0.7):
    """cls_prob (N, 2) float32, label (N,) in {1, 0, -1, -2} -> float32 scalar."""
    ones = np.ones_like(label)
    zeros = np.zeros_like(label)
    sample_num = cls_prob.shape[0]
    cls_prob_size = cls_prob.size
    cls_prob_reshape = np.reshape(cls_prob, [cls_prob_size, -1])
    raw = np.arange(sample_num) * 2
    label_filter_one = np.where(label < 0, zeros, label)
    cls_prob_pos_index = label_filter_one + raw
    cls_prob_face_noface = np.squeeze(cls_prob_reshape[cls_prob_pos_index], axis=1)
    loss = -np.log(cls_prob_face_noface + np.float32(1e-10))  # TF casts 1e-10 to float32
    label_filter_two = np.where(label < 0, zeros, ones)
    label_filter_two = label_filter_two.astype(np.float32)
    loss = loss * label_filter_two
    pos_neg_count = np.sum(label_filter_two)
    pos_neg_hard = int(pos_neg_count * np.float32(num_keep_radio))  # tf.to_int32: truncation
    loss, _ = tf_top_k(loss, k=pos_neg_hard)
    return tf_reduce_mean(loss)


# -- 001: Keras Mask R-CNN rpn_class_loss_graph with top-k anchors ---------------------------------
def rpn_class_loss_graph(rpn_train_anchors_per_image, rpn_match, rpn_class_logits):
    """rpn_match (B, A, 1), rpn_class_logits (B, A, 2) float32 -> float32 scalar.
    (port: ``config`` is reduced to its RPN_TRAIN_ANCHORS_PER_IMAGE.)"""
    rpn_match = np.squeeze(rpn_match, -1)
    anchor_class = (rpn_match == 1).astype(np.int32)
    indices = np.argwhere(rpn_match != 0)  # tf.where: row-major
    rpn_class_logits = rpn_class_logits[indices[:, 0], indices[:, 1]]
    anchor_class = anchor_class[indices[:, 0], indices[:, 1]]
    ce_loss = tf_sparse_softmax_cross_entropy(anchor_class, rpn_class_logits)
    n_selected = int(rpn_train_anchors_per_image)
    vals, _ = tf_top_k(ce_loss, k=n_selected)
    thresh = vals[-1]  # IndexError when nothing was selected, as TF's strided slice
    samples = ce_loss >= thresh
    loss_weight = samples.astype(np.float32)
    loss = np.sum(ce_loss * loss_weight) / np.sum(loss_weight)
    return loss


# -- 001: PyTorch topk_crossEntrophy ------------------------------------------------------------
class topk_crossEntrophy(nn.Module):
    def __init__(self, top_k=0.7):
        super(topk_crossEntrophy, self).__init__()
        self.loss = nn.NLLLoss()
        self.top_k = top_k
        self.softmax = nn.LogSoftmax(dim=1)  # port: the implicit dim of a 2-D input
        return

    def forward(self, input, target):
        softmax_result = self.softmax(input)
        loss = torch.zeros(1)  # port: Variable(torch.Tensor(1).zero_())
        for idx, row in enumerate(softmax_result):
            gt = target[idx:idx + 1]  # port: old torch took target[idx] for a (1, C) input
            pred = torch.unsqueeze(row, 0)
            cost = self.loss(pred, gt)
            loss = torch.cat((loss, cost.view(1)), 0)  # port: old losses were (1,), now 0-d
        loss = loss[1:]
        if self.top_k == 1:  # port: the reference reads self.k, never set (AttributeError)
            valid_loss = loss
        index = torch.topk(loss, int(self.top_k * loss.size()[0]))
        valid_loss = loss[index[1]]
        return torch.mean(valid_loss)


# -- 003: FocalLoss with batch-frequency class weights -------------------------------------------
def compute_class_weights(histogram):
    classWeights = np.ones(histogram.shape[0], dtype=np.float32)
    normHist = histogram / np.sum(histogram)
    for i in range(histogram.shape[0]):
        classWeights[i] = (1 / (np.log(1.10 + normHist[i])))[0]  # port: [0], numpy 2 needs a scalar
    return classWeights


class FocalLoss(nn.Module):
    def __init__(self, gamma=2):
        super(FocalLoss, self).__init__()
        self.gamma = gamma  # port: the reference uses self.gamma without setting it

    def forward(self, cls_prob, rois_label):
        proposal_num = cls_prob.shape[0]
        num_class = cls_prob.shape[1]
        # port: .zero_(), the reference's new() is uninitialized memory
        class_mask = cls_prob.data.new(proposal_num, num_class).zero_()
        ids = rois_label.view(-1, 1)
        class_mask.scatter_(1, ids.data, 1.)
        frequency = torch.zeros(num_class, 1)
        for ij in range(torch.max(rois_label) + 1):
            frequency[ij] = torch.sum(rois_label == ij)
        frequency = frequency.numpy()
        classWeights = compute_class_weights(frequency)
        alpha = torch.from_numpy(classWeights).view(-1, 1)  # port: no .cuda()
        alpha_class = alpha[ids.view(-1)]
        gamma = 2  # noqa: F841  (the reference's unused local)
        probs = (cls_prob * class_mask).sum(1).view(-1, 1)
        log_p = probs.log()
        batch_loss = -alpha_class * (torch.pow((1 - probs), self.gamma)) * log_p
        loss = batch_loss.mean()
        return loss


# -- 003: torchcv SSDLoss ----------------------------------------------------------------------
class SSDLoss(nn.Module):
    def __init__(self, num_classes, stable=False):
        super(SSDLoss, self).__init__()
        self.num_classes = num_classes
        self.stable = stable  # port: True for a deterministic tie order (the reference: False)

    def _hard_negative_mining(self, cls_loss, pos):
        cls_loss = cls_loss * (pos.float() - 1)
        _, idx = cls_loss.sort(dim=1, stable=self.stable)
        _, rank = idx.sort(1)
        num_neg = 3 * pos.sum(1)
        neg = rank < num_neg[:, None]
        return neg

    def forward(self, loc_preds, loc_targets, cls_preds, cls_targets):
        pos = cls_targets > 0
        batch_size = pos.size(0)
        num_pos = pos.sum().item()
        mask = pos.unsqueeze(2).expand_as(loc_preds)
        loc_loss = F.smooth_l1_loss(loc_preds[mask], loc_targets[mask], reduction="sum")
        # port: cross_entropy raises on a target < 0; the next line's intent is a loss of 0 there
        cls_loss = F.cross_entropy(cls_preds.view(-1, self.num_classes),
                                   cls_targets.view(-1).clamp(min=0), reduction="none")
        cls_loss = cls_loss.view(batch_size, -1)
        cls_loss[cls_targets < 0] = 0
        neg = self._hard_negative_mining(cls_loss, pos)
        cls_loss = cls_loss[pos | neg].sum()
        # port: the debug print dropped (it divides by num_pos as Python floats)
        loss = (loc_loss + cls_loss) / num_pos
        return loss


# -- 004: SSD-TensorFlow ssd_losses ------------------------------------------------------------
def abs_smooth(x):
    absx = np.abs(x)
    minx = np.minimum(absx, 1)
    r = 0.5 * ((absx - 1) * minx + absx)
    return r


def ssd_losses(logits, localisations, gclasses, glocalisations, gscores, batch_size,
               match_threshold=0.5, negative_ratio=3., alpha=1.):
    """On the flattened tensors (port: the per-layer lists, their reshapes and the concat are
    left out; ``batch_size`` is lshape[0]). Returns (cross_entropy_pos, cross_entropy_neg,
    localization), the three losses it adds to the collection."""
    dtype = logits.dtype.type
    pmask = gscores > dtype(match_threshold)
    fpmask = pmask.astype(dtype)
    n_positives = np.sum(fpmask)
    no_classes = pmask.astype(np.int32)
    predictions = tf_softmax(logits)
    nmask = np.logical_and(np.logical_not(pmask), gscores > -0.5)
    fnmask = nmask.astype(dtype)
    nvalues = np.where(nmask, predictions[:, 0], 1. - fnmask)
    nvalues_flat = np.reshape(nvalues, [-1])
    max_neg_entries = int(np.sum(fnmask))
    n_neg = int(dtype(negative_ratio) * n_positives) + batch_size
    n_neg = min(n_neg, max_neg_entries)
    val, idxes = tf_top_k(-nvalues_flat, k=n_neg)
    max_hard_pred = -val[-1]  # IndexError when n_neg is 0, as TF's strided slice
    nmask = np.logical_and(nmask, nvalues < max_hard_pred)
    fnmask = nmask.astype(dtype)
    loss = tf_sparse_softmax_cross_entropy(gclasses, logits)
    cross_entropy_pos = np.sum(loss * fpmask) / dtype(batch_size)
    loss = tf_sparse_softmax_cross_entropy(no_classes, logits)
    cross_entropy_neg = np.sum(loss * fnmask) / dtype(batch_size)
    weights = np.expand_dims(dtype(alpha) * fpmask, axis=-1)
    loss = abs_smooth(localisations - glocalisations)
    localization = np.sum(loss * weights) / dtype(batch_size)
    return cross_entropy_pos, cross_entropy_neg, localization
