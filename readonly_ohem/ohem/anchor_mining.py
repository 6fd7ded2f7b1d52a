"""Hard anchors for the RPN: which labelled anchors it learns from, by its own classification loss.

The original AnchorTargetLayer labels every anchor inside the image positive (1), negative (0)
or neither (-1), then keeps ``RPN_BATCHSIZE`` labelled anchors at random (at most
``RPN_FG_FRACTION`` of them positive) and sets the rest to -1. ``TRAIN.RPN_MINING`` replaces that
random draw with a ranking of the labelled anchors by the loss the RPN's ``SoftmaxWithLoss``
gives each of them now (``-log p[label]`` of the current ``rpn_cls_score``, float64 as
``ohem.loss.cls_loss``), through the pure rankings of ``ohem.policies``:

- ``"random"``: the original (``AnchorTargetLayer``'s own seeded draw);
- ``"topk_threshold"``: write-up 001's rule (Keras Mask R-CNN's RPN class loss): every anchor
  whose loss is >= the ``RPN_BATCHSIZE``-th largest, so anchors tied at the cut are all kept;
- ``"topk"``: the hardest ``RPN_BATCHSIZE`` (ties by the higher index);
- ``"neg_pos"``: write-up 003's suggestion for the RPN: every positive plus the hardest
  negatives, ``RPN_NEG_POS_RATIO`` (3) per positive.

The anchors not kept get label -1, so the RPN's losses (``ignore_label: -1``, normalized over
the valid labels; the box loss's outside weights 1 / #labelled) average over the kept anchors,
as 001 averages over them. (003's torchcv loss divides the sum by the positives instead; with 3
negatives per positive that is 4 x the mean here, a constant factor.) The positive-fraction cap
of the random draw does not apply: the hardest anchors are kept whatever their label.

``anchor_sampler(train_cfg, rpn_cls_score)`` is what ``AnchorTargetLayer`` calls: None for
``"random"``, else ``sample(labels, inside) -> labels``.
"""

from __future__ import annotations

from typing import Callable

import torch

from readonly_ohem.errors import ConfigError
from readonly_ohem.ohem.loss import cls_loss
from readonly_ohem.ohem.policies import MiningResult, neg_pos, topk, topk_threshold

RPN_MINING = ("random", "topk_threshold", "topk", "neg_pos")


def anchor_losses(rpn_cls_score: torch.Tensor, inside: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """(N,) float64 ``-log(max(p[label], eps))`` of the N inside anchors.

    rpn_cls_score: (1, 2A, H, W), channels 0..A-1 background and A..2A-1 foreground scores of the
    A anchors (the layout the RPN's ``Reshape`` to (1, 2, A*H, W) reads); inside: (N,) long rows
    of the (H*W*A) anchors in (h, w, a) order; labels: (N,) in {1, 0, -1} (-1 scored as 0).
    Softmax in the scores' dtype, as Caffe's Softmax on float32.
    """
    a = rpn_cls_score.shape[1] // 2
    pairs = rpn_cls_score.detach()[0].reshape(2, a, -1).permute(2, 1, 0).reshape(-1, 2)  # (HWA, 2)
    prob = torch.softmax(pairs.index_select(0, inside.to(pairs.device)), dim=1)
    return cls_loss(prob, labels.clamp_min(0).long().to(prob.device))


def rank_anchors(loss: torch.Tensor, labels: torch.Tensor, train_cfg) -> MiningResult:
    """The ``TRAIN.RPN_MINING`` ranking (not "random") of the labelled anchors (labels >= 0)."""
    name, lab = train_cfg.RPN_MINING, labels.long()
    if name == "topk_threshold":
        return topk_threshold(loss, lab, k=int(train_cfg.RPN_BATCHSIZE))
    if name == "topk":
        return topk(loss, lab, k=int(train_cfg.RPN_BATCHSIZE))
    if name == "neg_pos":
        return neg_pos(loss, lab, neg_pos_ratio=float(train_cfg.RPN_NEG_POS_RATIO))
    raise ConfigError(f"TRAIN.RPN_MINING {name!r} is not one of {', '.join(RPN_MINING)}")


def hard_anchor_labels(labels: torch.Tensor, inside: torch.Tensor, rpn_cls_score: torch.Tensor,
                       train_cfg) -> torch.Tensor:
    """(N,) float32 labels with only the mined anchors' kept, the rest -1 (a new tensor)."""
    loss = anchor_losses(rpn_cls_score, inside, labels)
    keep = rank_anchors(loss, labels.to(loss.device), train_cfg).keep.to(labels.device)
    out = torch.full_like(labels, -1.0)
    out[keep] = labels[keep]
    return out


def anchor_sampler(train_cfg, rpn_cls_score: torch.Tensor
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """None for ``TRAIN.RPN_MINING: random`` (the original draw), else ``sample(labels, inside)``
    for ``AnchorTargetLayer``. An unknown name is a ``ConfigError`` naming the key."""
    name = train_cfg.RPN_MINING
    if name == "random":
        return None
    if name not in RPN_MINING:
        raise ConfigError(f"TRAIN.RPN_MINING {name!r} is not one of {', '.join(RPN_MINING)}")
    return lambda labels, inside: hard_anchor_labels(labels, inside, rpn_cls_score, train_cfg)
