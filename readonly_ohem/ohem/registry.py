"""The mining-policy registry: how OHEMDataLayer picks its hard RoIs, chosen by name.

Every member honours one contract, and the layer calls each the same way:

    policy(loss, labels, context) -> MiningResult

- ``loss``: (R,) float64 per-RoI loss (classification + bbox regression); ``labels``: (R,) long in
  [0, context.num_labels). The layer passes these and ``context.rois`` as host (CPU) tensors.
- ``context``: a ``MiningContext``: ``rois`` (R, 5) [batch_idx, x1, y1, x2, y2] with its views
  ``image_ids`` (R,) and ``boxes`` (R, 4); ``num_labels`` (C of cls_prob); ``cfg``, the config,
  read through ``batch_size``, ``use_nms``, ``nms_thresh`` (``ohem_batch_size(cfg)``:
  TRAIN.OHEM_BATCH_SIZE, else TRAIN.BATCH_SIZE; TRAIN.OHEM_USE_NMS, TRAIN.OHEM_NMS_THRESH);
  ``options``, the policy's declared param_str options (the layer's values over the declared
  defaults); ``full``, True when a recorder logs this call and wants NMS decided
  for every RoI.
- The result: ``keep`` (K,) long RoI indices, hardest first (the order of the hard tops), with
  K <= the policy's ``max_kept(R, cfg)``; ``weight`` and ``normalizer`` (the policy's loss, for
  callers that reduce); ``survived`` (R,) bool, each RoI's NMS outcome (all True when NMS is
  off), or None when the policy did not decide it for every RoI (the built-in ones always do
  when ``context.full``). The layer turns it into ``SelectionRecord.suppressed``.

A new policy is one function and its registration, nothing else:
``@register_policy("name", options={"opt": default}, max_kept=lambda r, cfg: bound)``; then
``param_str: "'num_classes': 21, 'policy': 'name', 'opt': value"`` selects it. ``options`` lists
the param_str keys the policy accepts (any other key is refused when the layer is built);
``max_kept`` bounds the kept rows for the layer's ``top_shapes`` (default: every RoI).

Registered here: ``topk``, the original OHEMDataLayer (``selection.select_hard_rois``), and
``ratio``, ``neg_pos``, ``topk_threshold``: NMS among all RoIs when TRAIN.OHEM_USE_NMS, then the
ranking of that name (``policies``) on the survivors (``mine_after_nms``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch

from readonly_ohem.errors import ConfigError
from readonly_ohem.ohem.policies import MiningResult, neg_pos, ratio, topk_threshold
from readonly_ohem.ohem.selection import group_ids, nms_survivors, select_hard_rois


def ohem_batch_size(cfg) -> int:
    """The hard RoIs kept per pass: ``TRAIN.OHEM_BATCH_SIZE`` when > 0, else ``TRAIN.BATCH_SIZE``
    (Fast R-CNN OHEM, where the data layer hands over every RoI whatever BATCH_SIZE says).
    End-to-end OHEM sets BATCH_SIZE -1 (the ProposalTargetLayer passes every RoI) and needs
    OHEM_BATCH_SIZE; a count below 1 is a ``ConfigError`` naming both keys."""
    t = cfg.TRAIN
    n = int(t.OHEM_BATCH_SIZE) or int(t.BATCH_SIZE)
    if n < 1:
        raise ConfigError(f"TRAIN.OHEM_BATCH_SIZE {t.OHEM_BATCH_SIZE} with TRAIN.BATCH_SIZE "
                          f"{t.BATCH_SIZE}: the hard RoIs OHEM keeps per pass must be >= 1 (with "
                          "BATCH_SIZE -1, every RoI, set TRAIN.OHEM_BATCH_SIZE; "
                          "prototxt/cfgs/faster_rcnn_end2end_ohem.yml: 128)")
    return n


@dataclass(frozen=True)
class MiningContext:
    """What a policy may need besides the losses, so the layer special-cases none (shapes above)."""

    rois: torch.Tensor
    num_labels: int
    cfg: Any
    options: Mapping[str, Any] = field(default_factory=dict)
    full: bool = False

    @property
    def image_ids(self) -> torch.Tensor:
        """(R,) batch index of each RoI (rois[:, 0])."""
        return self.rois[:, 0]

    @property
    def boxes(self) -> torch.Tensor:
        """(R, 4) [x1, y1, x2, y2] in the scaled image (rois[:, 1:5])."""
        return self.rois[:, 1:5]

    @property
    def batch_size(self) -> int:
        return ohem_batch_size(self.cfg)

    @property
    def use_nms(self) -> bool:
        return bool(self.cfg.TRAIN.OHEM_USE_NMS)

    @property
    def nms_thresh(self) -> float:
        return float(self.cfg.TRAIN.OHEM_NMS_THRESH)


def every_roi(num_rois: int, cfg) -> int:
    """The default ``max_kept``: a policy may keep all R RoIs."""
    return num_rois


@dataclass(frozen=True)
class MiningPolicy:
    """A registered policy: ``fn`` (the contract's call), its param_str ``options`` with their
    defaults, and ``max_kept(R, cfg)``, an upper bound on the kept rows."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, MiningContext], MiningResult]
    options: Mapping[str, Any]
    max_kept: Callable[[int, Any], int]

    def __call__(self, loss: torch.Tensor, labels: torch.Tensor,
                 context: MiningContext) -> MiningResult:
        return self.fn(loss, labels, context)


MINING_POLICIES: dict[str, MiningPolicy] = {}


def register_policy(name: str, *, options: Mapping[str, Any] | None = None,
                    max_kept: Callable[[int, Any], int] = every_roi):
    """Decorator: register ``fn(loss, labels, context) -> MiningResult`` as policy ``name``."""
    def register(fn):
        if name in MINING_POLICIES:
            raise ValueError(f"mining policy {name!r} is already registered")
        MINING_POLICIES[name] = MiningPolicy(name, fn, dict(options or {}), max_kept)
        return fn
    return register


def mine_after_nms(loss: torch.Tensor, labels: torch.Tensor, context: MiningContext,
                   rank: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], MiningResult]
                   ) -> MiningResult:
    """NMS among all RoIs (when TRAIN.OHEM_USE_NMS: per image and label, the float32 loss as
    score, as the original's), then ``rank(loss[s], labels[s], s)`` on the S survivors ``s``
    (S,) long, ascending; its keep is mapped back to RoI indices. NMS is decided for every RoI."""
    r = loss.shape[0]
    survived = torch.ones(r, dtype=torch.bool, device=loss.device)
    cand = torch.arange(r, device=loss.device)
    if context.use_nms and r:
        groups = group_ids(context.image_ids, labels, context.num_labels)
        surv = nms_survivors(loss, context.boxes, groups, context.nms_thresh)
        survived[:] = False
        survived[surv] = True
        cand = torch.nonzero(survived).squeeze(1)
    result = rank(loss[cand], labels[cand], cand)
    return replace(result, keep=cand[result.keep], survived=survived)


# -- the registered policies ------------------------------------------------------------------
@register_policy("topk", max_kept=lambda r, cfg: min(r, ohem_batch_size(cfg)))
def original_ohem(loss, labels, context):
    """The original OHEMDataLayer: NMS per (image, label), then the hardest BATCH_SIZE survivors
    (``ohem_batch_size``),
    averaged (``selection.select_hard_rois``, with its fast path when no record is wanted)."""
    sel = select_hard_rois(loss, context.rois, labels, context.batch_size, context.use_nms,
                           context.nms_thresh, num_labels=context.num_labels, full=context.full)
    return MiningResult.uniform(sel.keep, loss, sel.keep.shape[0], sel.survived)


@register_policy("ratio", options={"keep_ratio": 0.7})
def ratio_after_nms(loss, labels, context):
    """MTCNN's hardest ``keep_ratio`` of the NMS survivors (``policies.ratio``)."""
    return mine_after_nms(loss, labels, context,
                          lambda l, y, s: ratio(l, y, **context.options))


@register_policy("neg_pos", options={"neg_pos_ratio": 3.0})
def neg_pos_after_nms(loss, labels, context):
    """SSD's positives plus per-image hardest negatives among the NMS survivors (``policies.neg_pos``)."""
    return mine_after_nms(loss, labels, context,
                          lambda l, y, s: neg_pos(l, y, image_ids=context.image_ids[s],
                                                  **context.options))


@register_policy("topk_threshold")
def topk_threshold_after_nms(loss, labels, context):
    """Every NMS survivor with loss >= the ``ohem_batch_size``-th largest (``policies.topk_threshold``)."""
    return mine_after_nms(loss, labels, context,
                          lambda l, y, s: topk_threshold(l, y, k=context.batch_size))
