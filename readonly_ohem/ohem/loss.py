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
    out = torch.zeros(r, dtype=torch.float64, device=labels.device)
    if r == 0:
        return out
    fg = torch.nonzero(labels > 0).squeeze(1)  # (F,)
    if inside.shape[1] % 4 == 0 and _label_block_loss(out, fg, labels, bbox_pred, bbox_targets,
                                                      inside, outside):
        return out
    return _general_loss(out, fg, bbox_pred, bbox_targets, inside, outside)


def _label_block_loss(out, fg, labels, bbox_pred, bbox_targets, inside, outside) -> bool:
    """Fill ``out`` (R,) from the foreground rows' label blocks (F, 4) and return True, or return
    False (``out`` untouched) when some other entry of ``inside`` is non-zero."""
    c = inside.shape[1] // 4
    # each foreground RoI's label block: row fg * C + label of the (R * C, 4) view of a blob
    rows = labels.index_select(0, fg).add_(fg * c)
    blocks = torch.stack([_blocks(t, rows) for t in (bbox_pred, bbox_targets, inside, outside)])
    blocks = blocks.view(4, -1, 4)  # (4, F, 4): pred, target, inside, outside
    all_counted, every_weight = _only_block_nonzeros(inside, blocks[2])
    if not all_counted:
        return False
    if fg.numel() == 0:
        return True
    pred, target, w, w_out = blocks.double().unbind(0)  # (F, 4) float64 each
    d = (pred - target).mul_(w)
    # smooth_l1_loss(d, 0) is 0.5 |d| |d| if |d| < 1 else |d| - 0.5: the original's, bit for bit
    terms = torch.ops.aten.smooth_l1_loss(d, torch.zeros_like(d), 0, 1.0).mul_(w_out)  # 0: none
    if not every_weight:  # the original skips zero weights (their term is not 0 for inf or NaN)
        terms = torch.where(w != 0, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    out.index_copy_(0, fg, _sum_columns(terms))
    return True


def _blocks(blob: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the (R * C, 4) view of a (R, 4C) blob -> (F, 4) (or (4F,)). A float32 block is 16 bytes, one
    complex128: gathering those is several times faster than gathering rows of 4 floats."""
    if blob.dtype == torch.float32 and blob.is_contiguous() and blob.storage_offset() % 4 == 0:
        return blob.view(torch.complex128).view(-1).index_select(0, rows).view(torch.float32)
    return blob.reshape(-1, 4).index_select(0, rows)


def _only_block_nonzeros(inside: torch.Tensor, block: torch.Tensor) -> tuple[bool, bool]:
    """(every non-zero entry of ``inside`` (R, 4C) lies in the foreground label blocks ``block``
    (F, 4), every entry of ``block`` is non-zero). Exact: the blocks are a subset of inside, so
    equal counts of non-zeros suffice. A float32 blob is counted 8 bytes at a time (faster); a
    -0.0 weight then counts as non-zero on both sides alike."""
    if inside.dtype == torch.float32 and inside.is_contiguous() and inside.storage_offset() % 2 == 0:
        n_all = torch.count_nonzero(inside.view(torch.int64))
        n_block = torch.count_nonzero(block.reshape(-1).view(torch.int64))
    else:
        n_all = torch.count_nonzero(inside)
        n_block = torch.count_nonzero(block)
    n_weights = torch.count_nonzero(block)
    n_all, n_block, n_weights = torch.stack((n_all, n_block, n_weights)).tolist()
    return n_all == n_block, n_weights == block.numel()


def _general_loss(out, fg, bbox_pred, bbox_targets, inside, outside):
    """Inside weights anywhere: visit every non-zero entry of the foreground rows."""
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
    """(F, n) -> (F,): ((t0 + t1) + t2) + ..., the order of Python's ``sum`` over a row (the CPU
    ``cumsum`` adds in that order; other devices' scans may pair terms differently)."""
    if table.device.type == "cpu":
        return table.cumsum(1)[:, -1]
    total = table[:, 0]
    for j in range(1, table.shape[1]):
        total = total + table[:, j]
    return total
