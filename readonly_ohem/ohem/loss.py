"""The per-RoI loss OHEM ranks by: the original OHEMDataLayer's, in float64, on the host.

loss = -log(max(p[label], eps)) + [label > 0] * sum_j out_w[j] * smoothL1(in_w[j] * (pred[j] - t[j]))
over the columns j with in_w[j] != 0, smoothL1 with sigma = 1 (0.5 d^2 if |d| < 1 else |d| - 0.5),
unnormalized; eps = 2.22e-16 (numpy's float eps, as the original's ``flt_min``). The float32 blobs
are read into float64 first (SPEC §5); each RoI's bbox terms are summed left to right in column
order, as the original's Python ``sum``.

Like the original's Python layer, the arithmetic runs on the host in numpy (the original's own
log and rounding; a few dozen small numpy ops cost a fraction of the torch launches for them):
the blobs' device does the gathers (p[label], the label blocks below, one count) and only those
few hundred KB reach the host. The losses come back as float64 CPU tensors.

The usual layout (the original minibatch's) puts a foreground row's non-zero inside weights in its
label's 4 columns only: then the bbox term reads just those (F, 4) blocks. One exact count over
the inside weights tells whether that holds; otherwise every non-zero weight of a foreground row
is visited, O(R + #entries), in torch on the blobs' device.
"""

from __future__ import annotations

import numpy as np
import torch

FLT_MIN = float(np.finfo(float).eps)  # the original's "flt_min" (really the float64 epsilon)

_FORCE_DEVICE_PATH = False  # tests set True to run the other devices' gathers and counts on CPU


def cls_loss(cls_prob: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log(max(p[label], eps)) in float64: cls_prob (R, C) on any device, labels (R,) long
    (host or that device) -> (R,) float64 on the host."""
    lab = labels.cpu().numpy()
    r, c = cls_prob.shape
    p = host_take(cls_prob.reshape(-1), lab + np.arange(0, r * c, c)).astype(np.float64)
    return torch.from_numpy(-np.log(np.maximum(p, FLT_MIN)))


def bbox_loss(labels: torch.Tensor, bbox_pred: torch.Tensor, bbox_targets: torch.Tensor,
              inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """Unnormalized smooth-L1 (sigma 1) per foreground RoI, float64 on the host: labels (R,)
    long (host or the blobs' device), blobs (R, 4C) x 4 on any device -> (R,).

    Background rows (label <= 0) get 0; columns whose inside weight is 0 are skipped.
    """
    lab = labels.cpu().numpy()
    fg = np.flatnonzero(lab > 0)  # (F,)
    if inside.shape[1] % 4 == 0:
        out = _label_block_loss(lab, fg, bbox_pred, bbox_targets, inside, outside)
        if out is not None:
            return torch.from_numpy(out)
    device = inside.device
    out = torch.zeros(lab.shape[0], dtype=torch.float64, device=device)
    if lab.shape[0]:
        fg = torch.from_numpy(fg).to(device)
        _general_loss(out, fg, bbox_pred, bbox_targets, inside, outside)
    return out.cpu()


def _label_block_loss(lab, fg, bbox_pred, bbox_targets, inside, outside) -> np.ndarray | None:
    """(R,) float64 from the foreground rows' label blocks (F, 4), or None when some other entry
    of ``inside`` is non-zero. lab (R,) and fg (F,) int64 host arrays."""
    r, c = lab.shape[0], inside.shape[1] // 4
    # each foreground RoI's label block: row fg * C + label of the (R * C, 4) view of a blob
    rows = lab.take(fg) + fg * c
    blobs = (bbox_pred, bbox_targets, inside, outside)
    if all(t.dtype == torch.float32 and t.is_contiguous() and t.storage_offset() % 4 == 0
           for t in blobs):
        # a float32 block is 16 bytes, one complex128: gathering those is several times faster
        # than gathering rows of 4 floats; the weights are counted 8 bytes (2 floats) at a time
        # (faster; a -0.0 weight then counts as non-zero on both sides alike)
        blocks = np.concatenate([host_take(t, rows, np.complex128) for t in blobs])
        blocks = blocks.view(np.float32).reshape(4, -1, 4)  # (4, F, 4)
        all_counted = count_nonzero(inside, np.int64) == np.count_nonzero(blocks[2].view(np.int64))
    else:
        blocks = np.stack([host_take(t.reshape(-1, 4), rows) for t in blobs])  # (4, F, 4)
        all_counted = count_nonzero(inside) == np.count_nonzero(blocks[2])
    if not all_counted:
        return None  # a weight outside the label blocks: the general path visits it
    out = np.zeros(r)
    if fg.size == 0:
        return out
    # pred, target, inside, outside: (4, F) float64 each, a row per column of the block
    pred, target, w, w_out = blocks.transpose(0, 2, 1).astype(np.float64)
    with np.errstate(all="ignore"):  # inf and NaN give what the original's arithmetic gives
        d = (pred - target) * w
        ad = np.abs(d)
        terms = np.where(ad < 1, 0.5 * d * d, ad - 0.5) * w_out  # the original's, bit for bit
    skip = w == 0
    if skip.any():  # the original skips zero weights (their term is not 0 for inf or NaN)
        terms[skip] = 0.0
    out[fg] = ((terms[0] + terms[1]) + terms[2]) + terms[3]  # Python's left-to-right ``sum``
    return out


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


def host_take(blob: torch.Tensor, index: np.ndarray, dtype=None) -> np.ndarray:
    """``blob[index]`` along dim 0 as a host numpy array: blob (N, ...) on any device, index (M,)
    int64 host array -> (M, ...). ``dtype``: read the blob as that numpy dtype first (a view, e.g.
    complex128 for blocks of 4 float32; torch's equivalent view on other devices). A CPU blob is
    read in place by numpy (no torch dispatch per call); elsewhere the blob's device gathers and
    only the M rows are copied."""
    if blob.is_cpu and blob.dtype != torch.bfloat16 and not _FORCE_DEVICE_PATH:
        a = blob.numpy(force=True)
        return (a if dtype is None else a.view(dtype).reshape(-1)).take(index, axis=0)
    if dtype is not None:
        blob = blob.view(_TORCH_VIEW[dtype]).view(-1)
    rows = blob.index_select(0, torch.from_numpy(index).to(blob.device))
    return rows.float().numpy(force=True) if rows.dtype == torch.bfloat16 else rows.numpy(force=True)


def count_nonzero(blob: torch.Tensor, dtype=None) -> int:
    """Non-zero entries of ``blob`` (read as numpy ``dtype`` when given), counted where it lives
    (numpy's count reads a CPU blob in place, ~1.5x faster than torch's)."""
    if blob.is_cpu and blob.dtype != torch.bfloat16 and not _FORCE_DEVICE_PATH:
        a = blob.numpy(force=True)
        return int(np.count_nonzero(a if dtype is None else a.view(dtype)))
    return int(torch.count_nonzero(blob if dtype is None else blob.view(_TORCH_VIEW[dtype])))


_TORCH_VIEW = {np.complex128: torch.complex128, np.int64: torch.int64}
