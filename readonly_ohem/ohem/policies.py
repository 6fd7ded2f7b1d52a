"""The OHEM family: ways to pick (and weigh) hard examples from per-sample losses.

These are the pure rankings, free of RoIs and configs: ``ranking(loss, labels=None, **options)
-> MiningResult``, and ``mine(loss, labels, policy="topk", ...)`` applies one by name
(``RANKINGS``), so a training loop can switch by a string. The OHEMDataLayer does not call them
directly: its policies (``ohem.registry``, ``policy(loss, labels, context) -> MiningResult``)
run NMS among the RoIs first and then one of these on the survivors.

Labels < 0 (-1, -2, ...) mark samples to ignore: they are never kept. Ranking is by descending
loss, equal losses higher index first (the original's ``argsort()[::-1]``, see
``ops.nms.descending_order``).

- ``topk``: the hardest ``k`` (OHEM, Shrivastava et al. 2016; the OHEMDataLayer's rule after NMS).
- ``ratio``: the hardest ``int(n_valid * keep_ratio)`` of the valid samples, averaged (MTCNN).
- ``neg_pos``: every positive (label > 0) plus, per image, the hardest negatives (label 0) up to
  ``int(neg_pos_ratio * n_pos)``, normalized by the number of positives (SSD).
- ``topk_threshold``: every sample whose loss is >= the k-th largest (ties at the cut all kept).
- ``focal_loss``: not a selection but a re-weighting of every sample, for comparison.

Each generalizes a loss of the reference write-ups, kept exact in ``ohem.family``; their
docstrings say which and how they differ (tests/ohem/test_family.py pins the references).

A ``MiningResult`` holds the kept indices (hardest first), a weight per kept sample and the
normalizer: ``result.reduce(loss)`` is the policy's scalar loss. A layer policy also fills
``survived``, each RoI's NMS outcome, for the selection records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from readonly_ohem.ops.nms import descending_order


@dataclass
class MiningResult:
    """keep: (K,) long indices, hardest first; weight: (K,) per kept sample; normalizer > 0.

    survived: (R,) bool, each sample's NMS outcome (all True when NMS is off), set by the layer's
    policies when they decided NMS for every sample; None otherwise (and for the pure rankings).
    """

    keep: torch.Tensor
    weight: torch.Tensor
    normalizer: float
    survived: torch.Tensor | None = None

    @classmethod
    def uniform(cls, keep: torch.Tensor, loss: torch.Tensor, normalizer: float,
                survived: torch.Tensor | None = None) -> MiningResult:
        """Weight 1 per kept sample, normalizer ``max(normalizer, 1)`` (a mean over ``normalizer``)."""
        weight = torch.ones(keep.shape[0], dtype=loss.dtype, device=loss.device)
        return cls(keep, weight, float(max(normalizer, 1)), survived)

    def reduce(self, loss: torch.Tensor) -> torch.Tensor:
        """sum(weight * loss[keep]) / normalizer: the policy's loss (differentiable in ``loss``)."""
        return (loss[self.keep] * self.weight.to(loss.dtype)).sum() / self.normalizer


def _valid(loss: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        return torch.ones(loss.shape[0], dtype=torch.bool, device=loss.device)
    if labels.shape[0] != loss.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries, loss has {loss.shape[0]}")
    return labels >= 0


def _hardest(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Indices where ``mask`` holds, by descending loss (ties: higher index first)."""
    order = descending_order(loss.detach())
    return order[mask[order]]


def topk(loss: torch.Tensor, labels: torch.Tensor | None = None, *, k: int) -> MiningResult:
    """The hardest min(k, n_valid) valid samples, averaged (Fast R-CNN's mean over the batch).

    Generalizes the original OHEMDataLayer's hardest BATCH_SIZE (002; the layer runs NMS first)
    and ``family.topk_cross_entropy`` (001, the mean of the int(top_k * N) largest row NLLs).
    Unlike the latter: k is a count, not a share; labels < 0 are never kept; k > n_valid keeps
    every valid sample (its torch.topk raises); zero kept gives 0 (its mean gives NaN); ties
    go to the higher index (the original's ``argsort()[::-1]``), not torch.topk's order; any
    per-sample loss, not only the cross-entropy.
    """
    keep = _hardest(loss, _valid(loss, labels))[:max(int(k), 0)]
    return MiningResult.uniform(keep, loss, keep.shape[0])


def ratio(loss: torch.Tensor, labels: torch.Tensor | None = None, *,
          keep_ratio: float = 0.7) -> MiningResult:
    """MTCNN: among valid samples keep the hardest ``int(n_valid * keep_ratio)``, averaged.

    Generalizes ``family.mtcnn_cls_ohem`` (000), which differs in: its count is a float32
    product (n_valid = 90 at 0.7 keeps 63 there, 62 here, in float64); it ranks all N samples,
    the ignored ones as zeros (the same loss for losses >= 0, but a zero-loss valid sample may
    lose its gradient to an ignored one); zero kept gives NaN there, 0 here; ties go to the
    lower index there (tf.nn.top_k), the higher here; its loss is -log(p + 1e-10) of two
    classes, here any per-sample loss.
    """
    order = _hardest(loss, _valid(loss, labels))
    n_keep = int(order.shape[0] * keep_ratio)
    keep = order[:n_keep]
    return MiningResult.uniform(keep, loss, n_keep)


def neg_pos(loss: torch.Tensor, labels: torch.Tensor, *, neg_pos_ratio: float = 3.0,
            image_ids: torch.Tensor | None = None) -> MiningResult:
    """SSD: all positives (label > 0) plus, per image, the hardest negatives (label == 0), at most
    ``int(n_pos * neg_pos_ratio)`` of them; normalized by the total number of positives.

    Generalizes ``family.ssd_loss_torchcv`` (003: per image, 3 x its positives, / all
    positives), which differs in: it ranks every anchor, positives and ignored ones as zeros,
    so once its negatives of loss > 0 run out those take the places (same loss, zero-loss
    anchors aside); here only negatives count. No positive gives NaN there (0 / 0), 0 here;
    ties go to the lower index there, the higher here; it ranks the cross-entropy alone (our
    negatives have no bbox loss, so the same order). And ``family.ssd_losses_tf`` (004),
    further away: over the whole batch, int(3 * n_pos) + batch_size negatives ranked by
    background probability with a strict cut (at most that number - 1), each loss divided by
    batch_size.
    """
    if labels is None:
        raise ValueError("neg_pos mining needs labels")
    _valid(loss, labels)
    device = loss.device
    if image_ids is None:
        image_ids = torch.zeros(loss.shape[0], dtype=torch.long, device=device)
    _, img = torch.unique(image_ids, return_inverse=True)
    n_img = int(img.max()) + 1 if img.numel() else 0
    pos = labels > 0
    n_pos = torch.bincount(img[pos], minlength=n_img)
    quota = torch.floor(n_pos.double() * float(neg_pos_ratio)).long()  # int(n_pos * ratio)
    negs = _hardest(loss, labels == 0)  # all negatives, hardest first
    negs = negs[torch.sort(img[negs], stable=True).indices]  # grouped by image, hardest first
    counts = torch.bincount(img[negs], minlength=n_img)
    rank = torch.arange(negs.shape[0], device=device) - (torch.cumsum(counts, 0) - counts)[img[negs]]
    chosen = pos.clone()
    chosen[negs[rank < quota[img[negs]]]] = True
    idx = torch.nonzero(chosen).squeeze(1)
    keep = idx[descending_order(loss.detach()[idx])]
    return MiningResult.uniform(keep, loss, int(n_pos.sum()))


def topk_threshold(loss: torch.Tensor, labels: torch.Tensor | None = None, *,
                   k: int) -> MiningResult:
    """Every valid sample with loss >= the k-th largest valid loss (all of them when fewer than
    k are valid), averaged.

    Generalizes ``family.rpn_topk_class_loss`` (001, Keras: the same rule over the non-neutral
    anchors of the whole batch, k = RPN_TRAIN_ANCHORS_PER_IMAGE), which differs in: k > the
    candidates raises there (tf.nn.top_k), keeps all here; k <= 0 raises there, keeps none
    here; its loss is the anchors' 2-class cross-entropy, here any per-sample loss of the
    samples with label >= 0.
    """
    order = _hardest(loss, _valid(loss, labels))
    if order.shape[0] == 0 or k <= 0:
        return MiningResult.uniform(order[:0], loss, 0)
    kth = loss.detach()[order[min(int(k), order.shape[0]) - 1]]
    keep = order[loss.detach()[order] >= kth]
    return MiningResult.uniform(keep, loss, keep.shape[0])


RANKINGS: dict[str, Callable[..., MiningResult]] = {
    "topk": topk,
    "ratio": ratio,
    "neg_pos": neg_pos,
    "topk_threshold": topk_threshold,
}


def mine(loss: torch.Tensor, labels: torch.Tensor | None = None, policy: str = "topk",
         **options) -> MiningResult:
    """Apply the named ranking: ``mine(loss, labels, "ratio", keep_ratio=0.7)``."""
    try:
        fn = RANKINGS[policy]
    except KeyError:
        raise ValueError(f"unknown mining policy {policy!r} (one of {sorted(RANKINGS)})") from None
    return fn(loss, labels, **options)


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25,
               gamma: float = 2.0, reduction: str = "none") -> torch.Tensor:
    """Softmax focal loss (Lin et al. 2017) per sample: -a_t (1 - p_t)^gamma log p_t.

    logits (N, C), labels (N,) in [0, C) with 0 = background; a_t = alpha for foreground,
    1 - alpha for background; labels < 0 are ignored (loss 0). ``reduction``: "none" (N,),
    "sum", "mean" (over valid samples) or "pos" (sum / max(1, #foreground), RetinaNet's).

    The reference write-up's focal loss is ``family.batch_weighted_focal_loss`` (003), which
    differs in: a weight per class, 1 / log(1.10 + its share of the batch's labels), instead
    of a fixed alpha for foreground and 1 - alpha for background; it takes probabilities and
    their plain log (p = 0 gives inf), here logits and log_softmax (finite); labels < 0 raise
    there; it is the "mean" over all N samples.
    """
    valid = labels >= 0
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp_t = F.log_softmax(logits, dim=1).gather(1, safe[:, None])[:, 0]
    p_t = logp_t.exp()
    alpha_t = torch.where(safe > 0, torch.full_like(p_t, alpha), torch.full_like(p_t, 1 - alpha))
    fl = -alpha_t * (1 - p_t).pow(gamma) * logp_t
    fl = torch.where(valid, fl, torch.zeros_like(fl))
    if reduction == "none":
        return fl
    if reduction == "sum":
        return fl.sum()
    if reduction == "mean":
        return fl.sum() / valid.sum().clamp_min(1)
    if reduction == "pos":
        return fl.sum() / (valid & (labels > 0)).sum().clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}")
