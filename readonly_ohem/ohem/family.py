"""The OHEM family exactly as its references wrote it: one loss per reference write-up.

Each function gives the numbers of its reference (``../shared/references/000``-``004``, see
docs/family.md) on the same inputs, its corner cases included; where the reference has a bug
that stops it from running, we follow its evident intent and say so. They are here to check and
compare against; the detector trains with the general rankings in ``ohem.policies``, whose
docstrings say which of these each one generalizes and how it differs.

- ``mtcnn_cls_ohem``             000: MTCNN's ``cls_ohem`` (TensorFlow)
- ``rpn_topk_class_loss``        001: Keras Mask R-CNN's ``rpn_class_loss_graph`` with top-k
- ``topk_cross_entropy``         001: the PyTorch ``topk_crossEntrophy``
- ``batch_weighted_focal_loss``  003: the ``FocalLoss`` with batch-frequency class weights
- ``ssd_loss_torchcv``           003: torchcv's ``SSDLoss.forward``
- ``ssd_losses_tf``              004: SSD-TensorFlow's ``ssd_losses``

Shared rules: everything is computed in the input's dtype (the references ran float32), except
where a reference fixes float32 itself (MTCNN's keep count, the focal class weights). A mean
over no samples is NaN, as TensorFlow's ``reduce_mean`` and torch's ``mean`` are. Which of
several tied samples is kept decides only where the gradient goes, never the loss; each function
states its reference's rule. The results are differentiable in the predictions wherever the
reference's are (the selection itself carries no gradient). Bad arguments raise ``ValueError``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["mtcnn_cls_ohem", "rpn_topk_class_loss", "topk_cross_entropy",
           "batch_weighted_focal_loss", "ssd_loss_torchcv", "ssd_losses_tf"]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_labels(labels: torch.Tensor, name: str, low: int, high: int) -> None:
    """Every value of ``labels`` in [low, high) (an empty tensor passes)."""
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        _require(low <= lo and hi < high, f"{name} must lie in [{low}, {high}), "
                                          f"got values in [{lo}, {hi}]")


def mtcnn_cls_ohem(cls_prob: torch.Tensor, label: torch.Tensor,
                   keep_ratio: float = 0.7) -> torch.Tensor:
    """MTCNN's ``cls_ohem`` (000): the mean of the hardest ``keep_ratio`` of the face samples.

    cls_prob: (N, 2) probabilities [non-face, face]; label: (N,) in {1, 0, -1, -2} (1 face,
    0 non-face, -1 part, -2 landmark: the last two have no class loss). Returns a scalar.

    loss_i = -log(cls_prob[i, label_i] + 1e-10), set to 0 where label_i < 0; k =
    int(float32(n_valid) * float32(keep_ratio)), the reference's float32 product (int(90 * 0.7)
    is 63 here, 62 in float64); the mean of the k largest of all N losses (the zeros of the
    ignored samples take part in the ranking, as in the reference). Ties at the cut: lower index
    first (``tf.nn.top_k``). A probability of exactly 1 gives loss 0 (-log(1 + 1e-10) in
    float32), whose gradient -1 still flows when it is kept; a probability of 0 gives
    -log(1e-10) = 23.03. The reference runs in float32 only; a float64 cls_prob takes the same
    steps in float64 (the keep count stays float32).

    Corner cases: k = 0 (fewer than two valid samples at 0.7) gives NaN, the reference's mean of
    nothing; k > N (keep_ratio > 1) makes the reference's top_k raise, ours keeps all N; a
    negative keep_ratio raises ValueError (a negative k, the reference raises too).
    """
    _require(cls_prob.dim() == 2 and cls_prob.shape[1] == 2,
             f"cls_prob must be (N, 2), got {tuple(cls_prob.shape)}")
    label = torch.as_tensor(label, device=cls_prob.device)
    _require(label.shape == cls_prob.shape[:1],
             f"label must be ({cls_prob.shape[0]},), got {tuple(label.shape)}")
    _require(keep_ratio >= 0, f"keep_ratio must be >= 0, got {keep_ratio}")
    if label.numel():
        _require(int(label.max()) <= 1, f"label values must be <= 1, got {int(label.max())}")
    valid = label >= 0
    column = torch.where(valid, label, torch.zeros_like(label)).long()
    prob = cls_prob.gather(1, column[:, None])[:, 0]
    loss = -torch.log(prob + 1e-10) * valid.to(cls_prob.dtype)
    n_valid = valid.to(torch.float32).sum()
    k = int(n_valid * torch.tensor(keep_ratio, dtype=torch.float32, device=n_valid.device))
    k = min(k, loss.shape[0])
    key = loss.detach() + 0.0  # -0.0 (p = 1, or an ignored p = 1) ties with 0.0 on every device
    order = torch.sort(key, descending=True, stable=True).indices[:k]
    return loss[order].mean()


def rpn_topk_class_loss(rpn_match: torch.Tensor, rpn_class_logits: torch.Tensor,
                        anchors_per_image: int) -> torch.Tensor:
    """Keras Mask R-CNN's ``rpn_class_loss_graph`` with top-k anchors (001). Returns a scalar.

    rpn_match: (B, A, 1) in {1, -1, 0} (positive, negative, neutral); rpn_class_logits:
    (B, A, 2) [bg, fg] logits. The cross-entropy of every non-neutral anchor of the whole batch
    (class fg where rpn_match == 1), then every anchor whose loss is >= the k-th largest with
    k = ``anchors_per_image`` over the whole batch (not per image: ties at the cut all kept, so
    more than k may be), sum / number kept.

    Corner cases: more than the candidates (k > non-neutral anchors) makes the reference's top_k
    raise, ours keeps them all; no non-neutral anchor gives 0 (Matterport's own guard, commented
    out in the reference, whose top_k raises); anchors_per_image < 1 raises ValueError (the
    reference's ``vals[-1]`` of nothing raises too).
    """
    _require(rpn_match.dim() == 3 and rpn_match.shape[2] == 1,
             f"rpn_match must be (B, A, 1), got {tuple(rpn_match.shape)}")
    _require(rpn_class_logits.shape == (*rpn_match.shape[:2], 2),
             f"rpn_class_logits must be {(*rpn_match.shape[:2], 2)}, "
             f"got {tuple(rpn_class_logits.shape)}")
    _require(int(anchors_per_image) >= 1,
             f"anchors_per_image must be >= 1, got {anchors_per_image}")
    match = rpn_match[..., 0]
    candidate = match != 0
    ce = F.cross_entropy(rpn_class_logits[candidate], (match[candidate] == 1).long(),
                         reduction="none")
    if ce.shape[0] == 0:
        return ce.sum()
    k = min(int(anchors_per_image), ce.shape[0])
    thresh = torch.topk(ce.detach(), k).values[-1]
    weight = (ce.detach() >= thresh).to(ce.dtype)
    return (ce * weight).sum() / weight.sum()


def topk_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                       top_k: float = 0.7) -> torch.Tensor:
    """The PyTorch ``topk_crossEntrophy`` (001): the mean of the hardest ``top_k`` share of rows.

    logits: (N, C); target: (N,) long in [0, C). Per row the NLL of the log-softmax, then the
    mean of the ``int(top_k * N)`` largest (Python float arithmetic, as the reference), picked
    by ``torch.topk`` as the reference does (its tie order). Returns a scalar.

    The reference's ``if self.k == 1`` reads an attribute it never set (AttributeError); its
    intent, keeping every row at top_k = 1, is what int(1 * N) = N gives anyway. Corner cases:
    k = 0 gives NaN, the reference's mean of nothing; top_k > 1 makes its topk raise, ours keeps
    all N; a negative top_k raises ValueError (so does the reference's topk). A target outside
    [0, C) raises ValueError (the reference's NLLLoss gives NaN for -100, raises otherwise).
    """
    _require(logits.dim() == 2, f"logits must be (N, C), got {tuple(logits.shape)}")
    _require(target.shape == logits.shape[:1],
             f"target must be ({logits.shape[0]},), got {tuple(target.shape)}")
    _require(top_k >= 0, f"top_k must be >= 0, got {top_k}")
    _check_labels(target, "target", 0, logits.shape[1])
    loss = -F.log_softmax(logits, dim=1).gather(1, target.long()[:, None])[:, 0]
    k = min(int(top_k * loss.shape[0]), loss.shape[0])
    index = torch.topk(loss.detach(), k).indices
    return loss[index].mean()


def _batch_class_weights(labels: torch.Tensor, num_class: int) -> torch.Tensor:
    """The focal reference's ``compute_class_weights`` on the batch's label histogram (003).

    (C,) float32: 1 / log(1.10 + n_c / N) with n_c the count of class c in ``labels`` (N,) (a
    class absent from the batch gets 1 / log(1.10) = 10.49). Computed in numpy float32 as the
    reference, so the weights are its bits.
    """
    histogram = torch.bincount(labels.long(), minlength=num_class).cpu().numpy().astype(np.float32)
    with np.errstate(invalid="ignore"):  # an empty batch: 0 / 0, NaN weights, never used
        share = histogram / np.sum(histogram)
        weights = np.float32(1) / np.log(np.float32(1.10) + share)
    return torch.from_numpy(weights.astype(np.float32)).to(labels.device)


def batch_weighted_focal_loss(cls_prob: torch.Tensor, labels: torch.Tensor,
                              gamma: float = 2.0) -> torch.Tensor:
    """The ``FocalLoss`` with batch-frequency class weights (003). Returns a scalar.

    cls_prob: (N, C) softmax probabilities; labels: (N,) long in [0, C). alpha_c =
    ``_batch_class_weights`` (float32, from this batch's label counts over classes
    0..max(label)), then the mean over the N samples of -alpha_label (1 - p)^gamma log p with
    p = cls_prob[i, label_i]. No clamp, as the reference: p = 0 gives inf; p = 1 gives 0.

    The reference does not run as printed: its one-hot mask is ``new()`` (uninitialized memory;
    ours is the zeros-then-ones it means) and it raises on ``self.gamma`` (never set; ours uses
    the ``gamma`` argument, the reference's local ``gamma = 2`` being its default). An empty
    batch makes its ``torch.max`` raise; ours gives NaN (the mean of nothing).
    """
    _require(cls_prob.dim() == 2, f"cls_prob must be (N, C), got {tuple(cls_prob.shape)}")
    _require(labels.shape == cls_prob.shape[:1],
             f"labels must be ({cls_prob.shape[0]},), got {tuple(labels.shape)}")
    _check_labels(labels, "labels", 0, cls_prob.shape[1])
    ids = labels.long()
    alpha = _batch_class_weights(ids, cls_prob.shape[1])[ids][:, None]  # (N, 1) float32
    probs = cls_prob.gather(1, ids[:, None])  # (N, 1): the one-hot product's row sum
    batch_loss = -alpha * torch.pow(1 - probs, gamma) * probs.log()
    return batch_loss.mean()


def ssd_loss_torchcv(loc_preds: torch.Tensor, loc_targets: torch.Tensor,
                     cls_preds: torch.Tensor, cls_targets: torch.Tensor) -> torch.Tensor:
    """torchcv's ``SSDLoss.forward`` (003): 3:1 hard negatives per image, by rank. Returns a scalar.

    loc_preds, loc_targets: (N, A, 4); cls_preds: (N, A, C) logits; cls_targets: (N, A) long,
    > 0 positive, 0 background, < 0 ignored. Positives: cls_targets > 0. Cross-entropy per
    anchor, 0 for the ignored; per image every anchor is ranked by its key (-loss for background
    and ignored anchors, 0 for positives; ascending) and those of rank < 3 x its positives are
    the negatives (so a zero-loss anchor can take a place: it adds nothing to the loss). Loss =
    (smooth L1 summed over the positives' 4 coordinates + cross-entropy summed over positives
    and negatives) / positives of the whole batch.

    Ties in the ranking: lower index first on every device (torch's stable sort, with -0.0
    keys made +0.0). The reference's unstable ``sort`` may order ties otherwise; they are equal
    losses, so only the gradient's place can differ. Corner cases: a target < 0 makes the
    reference's ``cross_entropy`` raise (-100 excepted) before its ``cls_loss[cls_targets < 0] =
    0``; ours gives those anchors loss 0, the intent. No positive in the batch gives NaN (0 / 0;
    the reference raises ZeroDivisionError in its debug print, NaN without it).
    """
    _require(cls_preds.dim() == 3, f"cls_preds must be (N, A, C), got {tuple(cls_preds.shape)}")
    n, a, c = cls_preds.shape
    _require(loc_preds.shape == (n, a, 4) and loc_targets.shape == (n, a, 4),
             f"loc_preds and loc_targets must be {(n, a, 4)}, "
             f"got {tuple(loc_preds.shape)} and {tuple(loc_targets.shape)}")
    _require(cls_targets.shape == (n, a),
             f"cls_targets must be {(n, a)}, got {tuple(cls_targets.shape)}")
    if cls_targets.numel():
        _require(int(cls_targets.max()) < c, f"cls_targets values must be < {c}, "
                                              f"got {int(cls_targets.max())}")
    pos = cls_targets > 0
    num_pos = int(pos.sum())
    loc_loss = F.smooth_l1_loss(loc_preds[pos], loc_targets[pos], reduction="sum")
    ignored = cls_targets < 0
    safe = torch.where(ignored, torch.zeros_like(cls_targets), cls_targets).long()
    cls_loss = F.cross_entropy(cls_preds.reshape(-1, c), safe.reshape(-1), reduction="none")
    cls_loss = cls_loss.view(n, a).masked_fill(ignored, 0)
    key = cls_loss.detach() * (pos.to(cls_loss.dtype) - 1) + 0.0  # + 0.0: -0.0 -> 0.0
    rank = torch.sort(key, dim=1, stable=True).indices.argsort(dim=1)
    neg = rank < 3 * pos.sum(1, keepdim=True)
    return (loc_loss + cls_loss[pos | neg].sum()) / num_pos


def _abs_smooth(x: torch.Tensor) -> torch.Tensor:
    """SSD-TensorFlow's smooth L1, written its way: 0.5 ((|x| - 1) min(|x|, 1) + |x|)."""
    absx = x.abs()
    minx = torch.clamp(absx, max=1)
    return 0.5 * ((absx - 1) * minx + absx)


def ssd_losses_tf(logits: torch.Tensor, localisations: torch.Tensor, gclasses: torch.Tensor,
                  glocalisations: torch.Tensor, gscores: torch.Tensor, batch_size: int,
                  match_threshold: float = 0.5, negative_ratio: float = 3.0,
                  alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SSD-TensorFlow's ``ssd_losses`` (004) on its already flattened tensors.

    logits: (M, C); localisations, glocalisations: (M, 4); gclasses: (M,) long, in [0, C) for
    the positives (the others' class is multiplied by 0; ours reads none of them);
    gscores: (M,) matching scores; batch_size: the images the M anchors came from. Returns the
    three scalars it adds to the loss collection: (cross_entropy_pos, cross_entropy_neg,
    localization), each a sum divided by batch_size.

    Positives: gscores > match_threshold. Negative candidates: the rest with gscores > -0.5
    (gscores <= -0.5 are ignored). n_neg = int(negative_ratio * n_pos) + batch_size (the
    product in the logits' dtype), at most the candidates, over the whole batch; the negatives
    are the candidates whose background probability is strictly < the n_neg-th smallest: the
    n_neg-th itself and every tie with it are left out, so at most n_neg - 1 are kept.
    cross_entropy_pos: CE(gclasses) over positives; cross_entropy_neg: CE(class 0) over
    negatives; localization: SSD-TensorFlow's ``abs_smooth`` over the positives' coordinates,
    times alpha.

    Corner case: no negative candidate (n_neg = 0) makes the reference's ``val[-1]`` raise; ours
    keeps no negative (cross_entropy_neg = 0). ``label_smoothing``, ``device`` and ``scope`` of
    the reference are unused there and left out here.
    """
    _require(logits.dim() == 2, f"logits must be (M, C), got {tuple(logits.shape)}")
    m, c = logits.shape
    for name, t, shape in (("localisations", localisations, (m, 4)),
                           ("glocalisations", glocalisations, (m, 4)),
                           ("gclasses", gclasses, (m,)), ("gscores", gscores, (m,))):
        _require(t.shape == shape, f"{name} must be {shape}, got {tuple(t.shape)}")
    _require(int(batch_size) >= 1, f"batch_size must be >= 1, got {batch_size}")
    pmask = gscores > match_threshold
    _check_labels(gclasses[pmask], "gclasses of the positives", 0, c)
    dtype = logits.dtype
    fpmask = pmask.to(dtype)
    n_positives = fpmask.sum()
    no_classes = pmask.long()
    nmask = ~pmask & (gscores > -0.5)
    fnmask = nmask.to(dtype)
    predictions = torch.softmax(logits.detach(), dim=1)
    nvalues = torch.where(nmask, predictions[:, 0], 1.0 - fnmask)
    max_neg_entries = int(fnmask.sum())
    n_neg = int(torch.tensor(negative_ratio, dtype=dtype, device=logits.device) * n_positives)
    n_neg = min(n_neg + int(batch_size), max_neg_entries)
    if n_neg > 0:
        max_hard_pred = -torch.topk(-nvalues, n_neg).values[-1]
        nmask = nmask & (nvalues < max_hard_pred)
    else:
        nmask = torch.zeros_like(nmask)
    fnmask = nmask.to(dtype)
    ce_pos = F.cross_entropy(logits, torch.where(pmask, gclasses, 0).long(), reduction="none")
    cls_pos = (ce_pos * fpmask).sum() / batch_size
    ce_neg = F.cross_entropy(logits, no_classes, reduction="none")
    cls_neg = (ce_neg * fnmask).sum() / batch_size
    weights = (alpha * fpmask)[:, None]
    loc = (_abs_smooth(localisations - glocalisations) * weights).sum() / batch_size
    return cls_pos, cls_neg, loc
