"""The per-RoI loss OHEM ranks by: the original OHEMDataLayer's, in float64.

loss = -log(max(p[label], eps)) + [label > 0] * sum_j out_w[j] * smoothL1(in_w[j] * (pred[j] - t[j]))
over the columns j with in_w[j] != 0, smoothL1 with sigma = 1 (0.5 d^2 if |d| < 1 else |d| - 0.5),
unnormalized; eps = 2.22e-16 (numpy's float eps, as the original's ``flt_min``). The float32 blobs
are read into float64 first (SPEC §5); each RoI's bbox terms are summed left to right in column
order, as the original's Python ``sum``, so equal rows give bit-equal losses on every device.

Only foreground rows' non-zero inside-weight entries are touched, so the cost is O(R + #entries),
not O(R x 4C).
"""

from __future__ import annotations

import numpy as np
import torch

FLT_MIN = float(np.finfo(float).eps)  # the original's "flt_min" (really the float64 epsilon)


def cls_loss(cls_prob: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log(max(p[label], eps)) in float64: cls_prob (R, C), labels (R,) long -> (R,) float64."""
    p = cls_prob.gather(1, labels[:, None])[:, 0].double()
    return -torch.log(p.clamp_min(FLT_MIN))


def bbox_loss(labels: torch.Tensor, bbox_pred: torch.Tensor, bbox_targets: torch.Tensor,
              inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """Unnormalized smooth-L1 (sigma 1) per foreground RoI, float64: (R, 4C) x 4 -> (R,).

    Background rows (label <= 0) get 0; columns whose inside weight is 0 are skipped.
    """
    r = labels.shape[0]
    out = torch.zeros(r, dtype=torch.float64, device=labels.device)
    fg = torch.nonzero(labels > 0).squeeze(1)  # (F,)
    if fg.numel() == 0:
        return out
    width = inside.shape[1]
    lab = labels.index_select(0, fg)
    block = 4 * lab[:, None] + torch.arange(4, device=lab.device)  # (F, 4) columns of the label
    rest = inside.index_select(0, fg).scatter_(1, block, 0)
    if bool(rest.abs_().sum() == 0):  # the usual layout: weights only in the label's 4 columns
        out[fg] = _row_sums(fg[:, None] * width + block, labels, bbox_pred, bbox_targets,
                            inside, outside)
        return out
    nz = torch.nonzero(inside.index_select(0, fg) != 0)  # (E, 2) row-major: [fg row, column]
    if nz.numel() == 0:
        return out
    rows, cols = nz[:, 0], nz[:, 1]
    terms = _terms(fg[rows] * width + cols, bbox_pred, bbox_targets, inside, outside)
    # Left-to-right sum per row: lay each row's terms out in a (F, max count) table (zeros after
    # the last term, which add exactly) and add its columns in order.
    counts = torch.bincount(rows, minlength=fg.numel())
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    table = terms.new_zeros((fg.numel(), int(counts.max())))
    table[rows, pos] = terms
    out[fg] = _sum_columns(table)
    return out


def _terms(flat, bbox_pred, bbox_targets, inside, outside):
    """out_w * smoothL1(in_w * (pred - target)) in float64 at flat indices (any shape); entries
    with in_w == 0 give 0 (the original skips them)."""

    def take(t):
        return t.reshape(-1)[flat].double()

    w = take(inside)
    d = w * (take(bbox_pred) - take(bbox_targets))
    ad = d.abs()
    terms = take(outside) * torch.where(ad < 1, 0.5 * d * d, ad - 0.5)
    return torch.where(w != 0, terms, torch.zeros_like(terms))


def _row_sums(flat, labels, bbox_pred, bbox_targets, inside, outside):
    return _sum_columns(_terms(flat, bbox_pred, bbox_targets, inside, outside))


def _sum_columns(table):
    """(F, n) -> (F,): ((t0 + t1) + t2) + ..., the order of Python's ``sum`` over a row."""
    total = table[:, 0]
    for j in range(1, table.shape[1]):
        total = total + table[:, j]
    return total
