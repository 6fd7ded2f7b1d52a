"""Caffe's loss and metric layers: SoftmaxWithLoss, the Fast R-CNN SmoothL1Loss, Accuracy.

The two losses use custom autograd Functions so that the backward is Caffe's, not the
derivative of our forward: SoftmaxWithLoss's gradient is (prob − onehot) / normalizer even where
the FLT_MIN clamp of the log is active; SmoothL1Loss sends (−)out_w·in_w·f'(d)/N to both
``pred`` and ``target`` (the fork allows force_backward on both) and nothing to the weights.

Labels arrive as float class ids (Caffe's convention) and are truncated toward zero like C's
``static_cast<int>``.
"""

from __future__ import annotations

import numpy as np
import torch

from readonly_ohem.errors import DataError
from readonly_ohem.caffe.layers.base import Layer, register
from readonly_ohem.caffe.layers.util import canonical_axis
from readonly_ohem.caffe.proto import caffe_pb2

FLT_MIN = float(np.finfo(np.float32).tiny)  # 1.17549435e-38, Caffe's clamp before log
_Norm = caffe_pb2.LossParameter


def _rows(layer: Layer, scores: torch.Tensor, labels: torch.Tensor, axis: int):
    """scores (outer, C, inner) at ``axis`` → (outer·inner, C); labels → (outer·inner,) int64.

    Row r = i·inner + j is Caffe's label index ``i * inner_num_ + j``."""
    c = scores.shape[axis]
    rows = scores.movedim(axis, -1).reshape(-1, c)
    if labels.numel() != rows.shape[0]:
        raise layer.error(
            f"number of labels ({labels.numel()}) must match number of predictions "
            f"({rows.shape[0]}); e.g., if the axis is 1 and prediction shape is (N, C, H, W), "
            f"label count must be N*H*W, with integer values in {{0, 1, ..., C-1}}")
    return rows, labels.reshape(-1).to(torch.int64)


def _valid_labels(layer: Layer, labels: torch.Tensor, n_classes: int, ignore: int | None):
    """Mask of rows that count (label != ignore_label); raises on an out-of-range label."""
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore is None else labels != ignore
    bad = valid & ((labels < 0) | (labels >= n_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise DataError(f"layer {layer.name!r} ({layer.param.type}): label {value} (bottom "
                        f"{layer.param.bottom[1]!r}) is outside [0, {n_classes})")
    return valid


class _SoftmaxLoss(torch.autograd.Function):
    """rows (R, C), labels (R,) int64, valid (R,) bool, normalizer () → (loss (), prob (R, C)).

    backward: (prob − onehot) · top_diff / normalizer, 0 on ignored rows (Caffe's, clamp or
    not)."""

    @staticmethod
    def forward(ctx, rows, labels, valid, normalizer):
        prob = torch.softmax(rows, dim=1)
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        p = prob.gather(1, safe[:, None]).squeeze(1)
        nll = torch.where(valid, -torch.log(p.clamp_min(FLT_MIN)), torch.zeros_like(p))
        ctx.save_for_backward(prob, safe, valid, normalizer)
        ctx.mark_non_differentiable(prob)
        return nll.sum() / normalizer, prob

    @staticmethod
    def backward(ctx, grad_loss, grad_prob):
        prob, safe, valid, normalizer = ctx.saved_tensors
        diff = prob.clone()
        rows = torch.arange(diff.shape[0], device=diff.device)
        diff[rows, safe] -= 1
        diff = torch.where(valid[:, None], diff, torch.zeros_like(diff))
        return diff * (grad_loss / normalizer), None, None, None


def get_normalizer(mode: int, outer: int, inner: int, valid: torch.Tensor) -> torch.Tensor:
    """Caffe's ``get_normalizer``: FULL outer·inner, VALID the non-ignored count, BATCH_SIZE
    outer, NONE 1; never below 1. Returns a 0-d float64 tensor on ``valid``'s device."""
    if mode == _Norm.VALID:
        value = valid.sum().to(torch.float64)
    else:
        n = {_Norm.FULL: outer * inner, _Norm.BATCH_SIZE: outer, _Norm.NONE: 1}[mode]
        value = torch.tensor(float(n), dtype=torch.float64, device=valid.device)
    return value.clamp_min(1.0)


@register("SoftmaxWithLoss")
class SoftmaxWithLoss(Layer):
    """−Σ log(max(softmax(x)[label], FLT_MIN)) / normalizer over non-ignored positions.

    bottoms: scores (outer, C, inner...) with C at ``softmax_param.axis``, labels (outer·inner
    values). tops: loss (), optional prob (softmax of the scores; it carries no gradient).
    ``loss_param``: ignore_label, normalization (VALID default, FULL, BATCH_SIZE, NONE), legacy
    ``normalize`` (true = VALID, false = BATCH_SIZE) when normalization is unset.
    """

    loss_by_default = True
    min_bottoms = max_bottoms = 2
    min_tops, max_tops = 1, 2

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        lp = param.loss_param
        self.ignore = int(lp.ignore_label) if lp.HasField("ignore_label") else None
        if not lp.HasField("normalization") and lp.HasField("normalize"):
            self.mode = _Norm.VALID if lp.normalize else _Norm.BATCH_SIZE
        else:
            self.mode = lp.normalization

    def forward(self, bottoms, params):
        scores, labels = bottoms
        if labels.requires_grad:
            labels = labels.detach()  # Caffe: "cannot backpropagate to label inputs"
        axis = canonical_axis(self, self.param.softmax_param.axis, scores.dim())
        if scores.shape[0] != labels.shape[0]:
            raise self.error(f"the data {tuple(scores.shape)} and label {tuple(labels.shape)} "
                             f"should have the same first dimension")
        rows, lab = _rows(self, scores, labels, axis)
        valid = _valid_labels(self, lab, rows.shape[1], self.ignore)
        outer = int(np.prod(scores.shape[:axis], dtype=np.int64))
        normalizer = get_normalizer(self.mode, outer, rows.shape[0] // max(outer, 1), valid)
        loss, prob = _SoftmaxLoss.apply(rows, lab, valid, normalizer.to(rows.dtype))
        tops = [loss]
        if len(self.param.top) == 2:
            moved = scores.movedim(axis, -1).shape
            tops.append(prob.reshape(moved).movedim(-1, axis))
        return tops

    def top_shapes(self, bottom_shapes):
        return [()] + [tuple(bottom_shapes[0])] * (len(self.param.top) - 1)


class _SmoothL1(torch.autograd.Function):
    """Fast R-CNN fork's SmoothL1Loss (its CUDA kernels, op by op)."""

    @staticmethod
    def forward(ctx, pred, target, in_w, out_w, sigma2, num):
        d = pred - target
        if in_w is not None:
            d = d * in_w
        absd = d.abs()
        quad = absd < 1.0 / sigma2
        err = torch.where(quad, 0.5 * d * d * sigma2, absd - 0.5 / sigma2)
        if out_w is not None:
            err = err * out_w
        grad_d = torch.where(quad, sigma2 * d, torch.sign(d))
        ctx.save_for_backward(grad_d, in_w, out_w)
        ctx.num = num
        return err.sum() / num

    @staticmethod
    def backward(ctx, grad_loss):
        grad_d, in_w, out_w = ctx.saved_tensors
        grads = []
        for sign in (1.0, -1.0):  # pred, target
            g = grad_d * (sign * grad_loss / ctx.num)
            if in_w is not None:
                g = g * in_w * out_w
            grads.append(g)
        return grads[0], grads[1], None, None, None, None


@register("SmoothL1Loss")
class SmoothL1Loss(Layer):
    """Fast R-CNN's smooth L1: Σ out_w ⊙ f(in_w ⊙ (pred − target)) / N, N = pred.shape[0].

    f(d) = 0.5·(σd)² if |d| < 1/σ² else |d| − 0.5/σ² (σ = ``smooth_l1_loss_param.sigma``).
    bottoms: pred, target (same count), optionally inside and outside weights (both or none).
    Quirk of the fork (SPEC §3): it skips the loss-layer set-up, so without an explicit
    ``loss_weight`` its weight is 0 — hence ``loss_by_default = False``.
    """

    loss_by_default = False
    grad_bottoms = (0, 1)  # the fork's backward: pred gets +grad, target −grad, the weights none
    min_bottoms, max_bottoms = 2, 4
    min_tops = max_tops = 1

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        if len(param.bottom) == 3:
            raise self.error("if weights are used, must specify both inside and outside weights")
        sigma = np.float32(param.smooth_l1_loss_param.sigma)
        self.sigma2 = float(sigma * sigma)  # Caffe's Dtype sigma2_

    def forward(self, bottoms, params):
        pred = bottoms[0]
        if pred.dim() == 0:
            raise self.error("bottom 0 must have at least one axis")
        rest = []
        for name, b in zip(self.param.bottom[1:], bottoms[1:]):
            if b.numel() != pred.numel() or b.dim() == 0 or b.shape[0] != pred.shape[0]:
                raise self.error(f"bottom {name!r} shape {tuple(b.shape)} does not match "
                                 f"{self.param.bottom[0]!r} {tuple(pred.shape)}")
            rest.append(b.reshape(pred.shape))
        target = rest[0]
        in_w, out_w = (rest[1].detach(), rest[2].detach()) if len(rest) == 3 else (None, None)
        return [_SmoothL1.apply(pred, target, in_w, out_w, self.sigma2, pred.shape[0])]

    def top_shapes(self, bottom_shapes):
        return [()]


@register("Accuracy")
class Accuracy(Layer):
    """Fraction of non-ignored positions whose true class is within the top k.

    Caffe counts the classes scoring >= the true class's score (itself excluded): a hit when
    that count < top_k, so a tie counts against the true class. Optional second top: per-class
    accuracy (C,), 0 for a class with no (non-ignored) examples. No backward.
    """

    backprop_to_bottoms = False
    min_bottoms = max_bottoms = 2
    min_tops, max_tops = 1, 2

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        ap = param.accuracy_param
        self.top_k = int(ap.top_k)
        self.ignore = int(ap.ignore_label) if ap.HasField("ignore_label") else None

    def forward(self, bottoms, params):
        scores, labels = (b.detach() for b in bottoms)
        axis = canonical_axis(self, self.param.accuracy_param.axis, scores.dim())
        n_classes = scores.shape[axis]
        if labels.numel() and self.top_k > scores.numel() // labels.numel():
            raise self.error(f"top_k ({self.top_k}) must be less than or equal to the number "
                             f"of classes ({scores.numel() // labels.numel()})")
        rows, lab = _rows(self, scores, labels, axis)
        valid = _valid_labels(self, lab, n_classes, self.ignore)
        safe = torch.where(valid, lab, torch.zeros_like(lab))
        true = rows.gather(1, safe[:, None])
        better = (rows >= true).sum(dim=1) - 1
        hit = valid & (better < self.top_k)
        count = valid.sum()
        acc = torch.where(count > 0, hit.sum().to(rows.dtype) / count.clamp_min(1).to(rows.dtype),
                          torch.zeros((), dtype=rows.dtype, device=rows.device))
        tops = [acc]
        if len(self.param.top) == 2:
            nums = torch.bincount(lab[valid], minlength=n_classes).to(rows.dtype)
            hits = torch.bincount(lab[hit], minlength=n_classes).to(rows.dtype)
            tops.append(torch.where(nums > 0, hits / nums.clamp_min(1), torch.zeros_like(nums)))
        return tops

    def top_shapes(self, bottom_shapes):
        axis = canonical_axis(self, self.param.accuracy_param.axis, len(bottom_shapes[0]))
        return [()] + [(int(bottom_shapes[0][axis]),)] * (len(self.param.top) - 1)
