"""The per-RoI loss OHEM ranks by: the original OHEMDataLayer's, in float64.

loss = -log(max(p[label], eps)) + [label > 0] * sum_j out_w[j] * smoothL1(in_w[j] * (pred[j] - t[j]))
over the columns j with in_w[j] != 0, smoothL1 with sigma = 1 (0.5 d^2 if |d| < 1 else |d| - 0.5),
unnormalized; eps = 2.22e-16 (numpy's float eps, as the original's ``flt_min``). The float32 blobs
are read into float64 first (SPEC §5); each RoI's bbox terms are summed left to right in column
order, as the original's Python ``sum``, so equal rows give bit-equal losses on every device.

The usual layout (the original minibatch's) puts a foreground row's non-zero inside weights in its
label's 4 columns only: then the bbox term reads just those (R, 4) blocks. One exact count over
the inside weights tells whether that holds; otherwise every non-zero weight of a foreground row
is visited, O(R + #entries).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

FLT_MIN = float(np.finfo(float).eps)  # the original's "flt_min" (really the float64 epsilon)


def cls_loss(cls_prob: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log(max(p[label], eps)) in float64: cls_prob (R, C), labels (R,) long -> (R,) float64."""
    p = cls_prob.gather(1, labels[:, None])[:, 0].double()
    return p.clamp_min_(FLT_MIN).log_().neg_()


def bbox_loss(labels: torch.Tensor, bbox_pred: torch.Tensor, bbox_targets: torch.Tensor,
              inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """Unnormalized smooth-L1 (sigma 1) per foreground RoI, float64: (R, 4C) x 4 -> (R,).

    Background rows (label <= 0) get 0; columns whose inside weight is 0 are skipped.
    """
    r = labels.shape[0]
    if r == 0:
        return torch.zeros(0, dtype=torch.float64, device=labels.device)
    out = None
    if inside.shape[1] % 4 == 0:
        out = _label_block_loss(labels, bbox_pred, bbox_targets, inside, outside)
    if out is not None:
        return out
    return _general_loss(labels, bbox_pred, bbox_targets, inside, outside)


def _label_block_loss(labels, bbox_pred, bbox_targets, inside, outside):
    """The loss from each row's label block (R, 4), or None when some foreground row has a
    non-zero inside weight outside its label's 4 columns (or a background row has any)."""
    r, width = inside.shape
    c = width // 4
    # row of each RoI's label block in the (R * C, 4) view of a (R, 4C) blob
    rows = torch.arange(0, r * c, c, device=labels.device).add_(labels)
    blocks = [t.reshape(-1, 4).index_select(0, rows)
              for t in (bbox_pred, bbox_targets, inside, outside)]
    pred, target, w, w_out = torch.stack(blocks).double().unbind(0)  # (R, 4) float64 each
    counted = (w != 0) & (labels > 0)[:, None]  # (R, 4) the entries the original visits
    # Exact test that no other entry of inside is non-zero: read each 4 bytes of the 0/1 maps as
    # one int32 (byte m = column m of a block) and compare the sums. The label-block entries are
    # a subset of all entries, so the sums are equal only when both sets of non-zeros are.
    if not torch.equal(inside.bool().view(-1).view(torch.int32).sum(),
                       counted.view(torch.int32).sum()):
        return None
    d = (pred - target).mul_(w)
    # smooth_l1_loss(d, 0) is 0.5 |d| |d| if |d| < 1 else |d| - 0.5: the original's, bit for bit
    terms = F.smooth_l1_loss(d, torch.zeros_like(d), reduction="none", beta=1.0).mul_(w_out)
    terms = torch.where(counted, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    return _sum_columns(terms)


def _general_loss(labels, bbox_pred, bbox_targets, inside, outside):
    """Inside weights anywhere: visit every non-zero entry of the foreground rows."""
    r = labels.shape[0]
    out = torch.zeros(r, dtype=torch.float64, device=labels.device)
    fg = torch.nonzero(labels > 0).squeeze(1)  # (F,)
    if fg.numel() == 0:
        return out
    width = inside.shape[1]
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


def _sum_columns(table):
    """(F, n) -> (F,): ((t0 + t1) + t2) + ..., the order of Python's ``sum`` over a row."""
    total = table[:, 0]
    for j in range(1, table.shape[1]):
        total = total + table[:, j]
    return total
