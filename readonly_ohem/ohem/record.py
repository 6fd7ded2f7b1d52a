"""What one OHEM forward decided, for "which RoIs were kept" logs, pictures and statistics.

The layer builds a ``SelectionRecord`` only when a recorder is attached, and hands it over with
the tensors where it computed them, on the host (CPU tensors; see ``ohem.layer``): the recorder
decides when (and whether) to keep them, e.g. every K-th iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class SelectionRecord:
    """One OHEM selection. R = RoIs scored by the readonly head, B = RoIs kept.

    keep: (B,) long, kept RoI indices, hardest first (the order of the hard tops).
    loss_cls, loss_bbox, loss: (R,) float64 per-RoI losses (loss = loss_cls + loss_bbox).
    labels: (R,) long class labels. image: (R,) long batch index (rois[:, 0]).
    boxes: (R, 4) RoIs [x1, y1, x2, y2] in the scaled image (rois[:, 1:5]).
    suppressed: (R,) bool, removed by the OHEM NMS (None when the recorder said it would not log
    this call, see OHEMDataLayer). kept: (R,) bool, among the hard RoIs.
    policy, batch_size, use_nms, nms_thresh: the settings of this selection.
    """

    keep: Any
    loss_cls: Any
    loss_bbox: Any
    loss: Any
    labels: Any
    image: Any
    boxes: Any
    suppressed: Any
    kept: Any
    policy: str = "topk"
    batch_size: int = 0
    use_nms: bool = True
    nms_thresh: float = 0.7

    @property
    def num_rois(self) -> int:
        return int(self.loss.shape[0])

    def to_numpy(self) -> dict:
        """A dict of numpy arrays (and the scalar settings), e.g. for ``np.savez``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
        return out


class Recorders:
    """Several recorders on one OHEM layer (e.g. the kept-RoI log and TensorBoard): each gets every
    record and decides for itself whether to use it; ``active`` when any of them is (then NMS is
    decided for every RoI, see ``OHEMDataLayer``)."""

    def __init__(self, *recorders):
        self.recorders = [r for rec in recorders
                          for r in (rec.recorders if isinstance(rec, Recorders) else [rec])]

    @property
    def active(self) -> bool:
        return any(bool(getattr(r, "active", True)) for r in self.recorders)

    def __call__(self, record: SelectionRecord) -> None:
        for r in self.recorders:
            r(record)


def add_recorder(layer, recorder) -> None:
    """Attach ``recorder`` to an OHEM layer beside the one it has, if any."""
    layer.recorder = recorder if layer.recorder is None else Recorders(layer.recorder, recorder)
