"""Which RoIs the original OHEM keeps: NMS per image and label with the loss as score, then top-B.

The original (``get_ohem_minibatch``) does, for each image id (ascending) and each label
(ascending): NMS over that group's float32 boxes with the float32 loss as score at
``OHEM_NMS_THRESH``; it concatenates the kept indices in that (image, label, NMS) order and
takes ``np.argsort(loss[keep])[::-1][:BATCH_SIZE]`` on the float64 loss. Without NMS it takes
``np.argsort(loss)[::-1][:BATCH_SIZE]``.

We get the same rows without visiting every group: a RoI's survival depends only on the
higher-loss RoIs of its own group, so one global visit by descending float32 loss (ties: higher
index first, which is each group's own NMS order) decides groups in the original's way, and it
can stop after BATCH_SIZE survivors (plus any float32 ties with the last, which the float64
ranking may still reorder). Equal float64 losses rank as the original's concatenated list with a
stable argsort reversed: later (image, label) group first, and inside a group the lower index
first. Without NMS, equal losses rank the higher index first.

Fast path (no record asked for): when the top K + 1 losses are distinct in float32 (no tie rule
needed), the K highest are a prefix of the visiting order; ``ops.nms.prefix_nms`` decides them in
a fixed number of vectorized ops (K = 2 x BATCH_SIZE, doubled while fewer than BATCH_SIZE
survive), and the first BATCH_SIZE survivors are the hard RoIs. Ties, non-integral image ids or
a huge candidate set take the general path above, with the same result. After one ``topk`` the
fast path works on numpy arrays on the host (tensors on another device are copied there): for a
few hundred candidates that is a fraction of the cost of the same steps as torch launches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from readonly_ohem.ops.nms import descending_order, greedy_nms, prefix_nms, top_descending


@dataclass
class Selection:
    """The hard RoIs and, when asked for (``full``), every RoI's NMS outcome.

    keep: (B,) long, hard RoI indices, hardest first.
    survived: (R,) bool, True for RoIs that survived NMS (all of them when NMS is off);
    None unless ``full``.
    """

    keep: torch.Tensor
    survived: torch.Tensor | None = None


def group_ids(image_ids: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(R,) long group id, ordered as the original's loops: by image id value, then label."""
    img = image_ids.long()
    if img.numel() and bool((img.to(image_ids.dtype) == image_ids).all()):
        return (img - img.min()) * num_labels + labels  # integral ids (always, in practice)
    _, img_rank = torch.unique(image_ids, sorted=True, return_inverse=True)
    return img_rank * num_labels + labels


def nms_survivors(loss: torch.Tensor, boxes: torch.Tensor, groups: torch.Tensor, thresh: float,
                  max_keep: int | None = None) -> torch.Tensor:
    """Survivors of per-group NMS with the float32 loss as score, in visiting order.

    loss (R,) float64; boxes (R, 4) float32; groups (R,) long. ``max_keep`` stops the visit
    early (see ``greedy_nms``): then only the survivors up to there are returned.
    """
    loss32 = loss.float()
    keep, _ = greedy_nms(boxes.float(), thresh, scores=loss32, groups=groups, max_keep=max_keep,
                         tie_scores=loss32)
    return keep


def rank_survivors(survivors: torch.Tensor, loss: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Survivors by descending float64 loss; ties as the original's reversed stable argsort over
    its (image, label, NMS rank)-ordered list: higher group first, then lower index first."""
    r = loss.shape[0]
    tie_key = groups[survivors] * r + (r - 1 - survivors)
    by_key = survivors[torch.argsort(tie_key)]
    return by_key[descending_order(loss[by_key])]


def select_hard_rois(loss: torch.Tensor, rois: torch.Tensor, labels: torch.Tensor, batch_size: int,
                     use_nms: bool = True, nms_thresh: float = 0.7, num_labels: int | None = None,
                     full: bool = False) -> Selection:
    """The original's hard RoIs: loss (R,) float64, rois (R, 5) [batch_idx, x1, y1, x2, y2],
    labels (R,) long in [0, num_labels). ``full`` decides NMS for every RoI (for records) instead
    of stopping once ``batch_size`` survivors are known; the kept rows are the same."""
    r = loss.shape[0]
    b = max(0, min(int(batch_size), r))
    if num_labels is None:
        num_labels = int(labels.max()) + 1 if r else 1
    if not use_nms:
        survived = torch.ones(r, dtype=torch.bool, device=loss.device) if full else None
        keep = _top_distinct(loss, b)
        return Selection(keep if keep is not None else top_descending(loss, b), survived)
    if not full and b:
        keep = _first_survivors(loss, rois, labels, b, nms_thresh, num_labels)
        if keep is not None:
            return Selection(keep)
    groups = group_ids(rois[:, 0], labels, num_labels)
    survivors = nms_survivors(loss, rois[:, 1:5], groups, nms_thresh,
                              max_keep=None if full else b)
    keep = rank_survivors(survivors, loss, groups)[:b]
    survived = None
    if full:
        survived = torch.zeros(r, dtype=torch.bool, device=loss.device)
        survived[survivors] = True
    return Selection(keep, survived)


def _top_distinct(scores: torch.Tensor, k: int) -> torch.Tensor | None:
    """The ``k`` highest of ``scores`` (R,), highest first, when they and the next one are all
    distinct (then no tie rule is needed: one ``topk``); None otherwise. k <= R."""
    n = int(scores.numel())
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    values, idx = torch.topk(scores, min(k + 1, n))
    if values.numel() > 1 and not bool((values[1:] < values[:-1]).all()):
        return None  # ties (or NaN) among them: the general path orders them
    return idx[:k]


def _first_survivors(loss, rois, labels, b, thresh, num_labels):
    """The ``b`` hard RoIs with NMS, from the highest-loss candidates only, or None when a tie in
    float32 loss (or non-integral image ids, or too many pairs) needs the general path.

    The candidates are the K highest float32 losses (K grows until b of them survive); when
    those K and the next are all distinct, they are a prefix of the visiting order, NMS decides
    them exactly (``prefix_nms``), and the first b survivors in that order are also the first b
    by float64 loss (float32 rounding keeps strict order), with no tie to break. After the one
    ``topk`` on the losses' device, the K candidates are decided on the host in numpy (a few
    hundred values: cheaper there than as torch launches).
    """
    r = loss.shape[0]
    k = min(r, max(_MIN_CANDIDATES, _CANDIDATE_FACTOR * b))
    while True:
        # the top k + 1 float64 losses, distinct once rounded to float32: then they are also the
        # top k + 1 in float32 (every other loss rounds to at most the (k + 1)-th)
        values, cand = torch.topk(loss, min(k + 1, r))
        values = values.numpy(force=True).astype(np.float32)
        if values.size > 1 and not (values[1:] < values[:-1]).all():
            return None  # float32 ties (or NaN): the general path orders them
        cand = cand.numpy(force=True)[:k]
        sub = rois.numpy(force=True).take(cand, axis=0)  # (K, 5)
        img = sub[:, 0]
        if not ((np.abs(img) < 2.0 ** 31) & (np.trunc(img) == img)).all():
            return None  # not integral (or NaN): the general path ranks image ids by value
        groups = img.astype(np.int64) * num_labels + labels.numpy(force=True).take(cand)
        kept = prefix_nms(sub[:, 1:5], groups, thresh, max_pairs=_MAX_PAIRS)
        if kept is None:
            return None
        survivors = cand[kept]
        if survivors.size >= b or k == r:
            return torch.from_numpy(survivors[:b]).to(loss.device)
        k = min(r, 2 * k)


_MIN_CANDIDATES = 64
_CANDIDATE_FACTOR = 2  # first K = this many times BATCH_SIZE (doubled while too few survive)
_MAX_PAIRS = 1 << 18  # same-group candidate pairs beyond which the chunked NMS is used
