"""OHEMDataLayer: keeps the hard RoIs of a pass (the original ``roi_data_layer.layer.OHEMDataLayer``).

Prototxt: ``type: "Python"``, ``python_param { module: "roi_data_layer.layer"
layer: "OHEMDataLayer" param_str: "'num_classes': 21" }``. Optional ``param_str`` keys of ours:
``policy``, the name of a registered mining policy (``ohem.registry``; ``topk``, the default, is
the original; also ``ratio``, ``neg_pos``, ``topk_threshold``), and the options that policy
declares (``keep_ratio`` for ``ratio``, ``neg_pos_ratio`` for ``neg_pos``); any other key is an
error. Settings from the config (``ctx.cfg``, defaults when None), read at every forward:
TRAIN.BBOX_REG, and for the policy the hard-RoI count (TRAIN.OHEM_BATCH_SIZE, else TRAIN.BATCH_SIZE:
``registry.ohem_batch_size``), TRAIN.OHEM_USE_NMS, TRAIN.OHEM_NMS_THRESH.

Bottoms: cls_prob_readonly (R, C), bbox_pred_readonly (R, 4C), rois (R, 5)
[batch_idx, x1, y1, x2, y2], labels (R,), and with TRAIN.BBOX_REG bbox_targets,
bbox_inside_weights, bbox_outside_weights (R, 4C). Without BBOX_REG the original reads only the
first four bottoms (more are ignored) and has two tops.
Tops: rois_hard (B, 5), labels_hard (B,) and with BBOX_REG bbox_targets_hard,
bbox_inside_weights_hard, bbox_outside_weights_hard (B, 4C): row gathers of the bottoms, hardest
first, B <= the policy's ``max_kept(R, cfg)`` (min(R, ohem_batch_size) for ``topk``). No
gradient goes back (the original's backward is empty).

Every forward is the same for every policy: the per-RoI loss (``ohem.loss``, float64 (R,)), then
``policy(loss, labels, MiningContext(rois, C, cfg, options, full))`` (the registry's contract),
then the row gathers of its ``keep``.

Where it runs: like the original's Python layer, the bookkeeping is on the host. The bottoms'
device gathers what the loss reads (p[label], the foreground label blocks) and the tops; the
labels, RoIs, losses and the policy (its NMS and ranking) are host CPU tensors and numpy arrays,
which for a few thousand RoIs cost a fraction of the device launches they would take (on a
GPU: a few hundred KB copied, instead of ~100 kernel launches and ~20 synchronizations).

``layer.recorder`` (None by default; or ``ctx.extras["recorder"]``): a callable that receives a
``SelectionRecord`` after each forward. With a recorder attached NMS is decided for every RoI
(``context.full``, so ``suppressed`` is exact); the kept rows are the same either way. A recorder
whose ``active`` attribute is False (it will not log this call) gets a record with
``suppressed=None`` from ``topk`` and costs no extra NMS work.
"""

from __future__ import annotations

import numpy as np
import torch

from readonly_ohem.config import default_config
from readonly_ohem.errors import DataError
from readonly_ohem.caffe.layers.base import Layer, register_python
from readonly_ohem.caffe.layers.python import parse_param_str
from readonly_ohem.ohem.loss import bbox_loss, cls_loss
from readonly_ohem.ohem.record import SelectionRecord
from readonly_ohem.ohem.registry import MINING_POLICIES, MiningContext

BOTTOMS = ("cls_prob_readonly", "bbox_pred_readonly", "rois", "labels", "bbox_targets",
           "bbox_inside_weights", "bbox_outside_weights")
TOPS = ("rois_hard", "labels_hard", "bbox_targets_hard", "bbox_inside_weights_hard",
        "bbox_outside_weights_hard")


@register_python("roi_data_layer.layer", "OHEMDataLayer")
class OHEMDataLayer(Layer):
    backprop_to_bottoms = False
    min_bottoms, max_bottoms = 4, 7
    min_tops, max_tops = 2, 5

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        self.cfg = ctx.cfg if ctx.cfg is not None else default_config()
        opts = dict(parse_param_str(param))
        if "num_classes" not in opts:
            raise self.error(f"python_param.param_str must give num_classes (e.g. "
                             f"\"'num_classes': 21\"), got {param.python_param.param_str!r}")
        self.num_classes = int(opts.pop("num_classes"))
        self.policy = str(opts.pop("policy", "topk"))
        if self.policy not in MINING_POLICIES:
            raise self.error(f"param_str policy {self.policy!r} is not one of "
                             f"{sorted(MINING_POLICIES)}")
        self.mining = MINING_POLICIES[self.policy]
        unknown = set(opts) - set(self.mining.options)
        if unknown:
            raise self.error(f"param_str has unknown key(s) {sorted(unknown)} (policy "
                             f"{self.policy!r} takes {sorted(self.mining.options)})")
        self.policy_options = {**self.mining.options, **opts}
        self.recorder = ctx.extras.get("recorder") if ctx.extras else None
        self._check_blob_counts()

    # -- shapes -------------------------------------------------------------------------------
    @property
    def bbox_reg(self) -> bool:
        return bool(self.cfg.TRAIN.BBOX_REG)

    def _check_blob_counts(self) -> None:
        nb, nt = len(self.param.bottom), len(self.param.top)
        if self.bbox_reg and (nb != 7 or nt != 5):
            raise self.error(f"with TRAIN.BBOX_REG it takes 7 bottoms ({', '.join(BOTTOMS)}) and "
                             f"5 tops ({', '.join(TOPS)}), got {nb} and {nt}")
        if not self.bbox_reg and nt != 2:
            raise self.error(f"with TRAIN.BBOX_REG off it has 2 tops ({', '.join(TOPS[:2])}), "
                             f"got {nt}")

    def top_shapes(self, bottom_shapes):
        r = bottom_shapes[0][0]
        b = self.mining.max_kept(r, self.cfg)
        shapes = [(b, 5), (b,)]
        if self.bbox_reg:
            shapes += [(b,) + tuple(bottom_shapes[4][1:])] * 3
        return shapes

    # -- forward ------------------------------------------------------------------------------
    def forward(self, bottoms, params):
        self._check_blob_counts()
        with torch.no_grad():
            return self._forward(bottoms)

    def _forward(self, bottoms):
        cls_prob, bbox_pred, rois, labels_blob = bottoms[:4]
        labels_blob = labels_blob.reshape(-1)
        regs = list(bottoms[4:7]) if self.bbox_reg else []
        labels = torch.from_numpy(self._check_inputs(cls_prob, bbox_pred, rois, labels_blob, regs))

        loss_cls = cls_loss(cls_prob, labels)  # (R,) float64, on the host as all that follows
        loss_bbox = bbox_loss(labels, bbox_pred, *regs) if regs else torch.zeros_like(loss_cls)
        loss = loss_cls + loss_bbox

        recorder = self.recorder
        # a recorder may say it will skip this call (``active``): then no full NMS is needed
        full = recorder is not None and bool(getattr(recorder, "active", True))
        rois_host = rois.detach().cpu()
        context = MiningContext(rois_host, cls_prob.shape[1], self.cfg, self.policy_options, full)
        result = self.mining(loss, labels, context)
        keep = result.keep

        keep_dev = keep.to(rois.device)
        tops = [t.index_select(0, keep_dev) for t in [rois, labels_blob] + regs]
        if recorder is not None:
            kept = torch.zeros(loss.shape[0], dtype=torch.bool)
            kept[keep] = True
            recorder(SelectionRecord(
                keep=keep, loss_cls=loss_cls, loss_bbox=loss_bbox, loss=loss, labels=labels,
                image=rois_host[:, 0].long(), boxes=rois_host[:, 1:5],
                suppressed=None if result.survived is None else ~result.survived, kept=kept,
                policy=self.policy, batch_size=context.batch_size, use_nms=context.use_nms,
                nms_thresh=context.nms_thresh))
        return tops

    def _check_inputs(self, cls_prob, bbox_pred, rois, labels_blob, regs) -> np.ndarray:
        """Shapes and labels; returns the labels as a host (R,) int64 array. Errors name the
        layer and the blob."""
        r = cls_prob.shape[0]
        if cls_prob.dim() != 2:
            raise self.error(f"bottom {BOTTOMS[0]} must be (R, C), got {tuple(cls_prob.shape)}")
        c = cls_prob.shape[1]
        if rois.dim() != 2 or rois.shape[1] != 5 or rois.shape[0] != r:
            raise self.error(f"bottom {BOTTOMS[2]} must be ({r}, 5), got {tuple(rois.shape)}")
        if labels_blob.shape[0] != r:
            raise self.error(f"bottom {BOTTOMS[3]} must hold {r} labels, got {labels_blob.shape[0]}")
        for name, t in zip(BOTTOMS[4:], regs):
            if tuple(t.shape) != (r, 4 * c):
                raise self.error(f"bottom {name} must be ({r}, {4 * c}), got {tuple(t.shape)}")
        if regs and tuple(bbox_pred.shape) != (r, 4 * c):
            raise self.error(f"bottom {BOTTOMS[1]} must be ({r}, {4 * c}), got {tuple(bbox_pred.shape)}")
        blob = labels_blob.detach().cpu()
        blob = (blob.float() if blob.dtype == torch.bfloat16 else blob).numpy()  # numpy has no bf16
        if not r:
            return blob.astype(np.int64)
        lo, hi = float(blob.min()), float(blob.max())  # NaN fails both tests below
        labels = blob.astype(np.int64) if lo >= 0 and hi < c else None  # in range: a safe cast
        if labels is None or not (blob.dtype == labels.dtype or (labels == blob).all()):
            with np.errstate(invalid="ignore"):
                integral = blob.dtype.kind != "f" or bool((np.trunc(blob) == blob).all())
            raise DataError(f"layer {self.name!r} (OHEMDataLayer): bottom {BOTTOMS[3]} must hold "
                            f"integer class labels in [0, {c}), got values {lo:g}..{hi:g}"
                            + ("" if integral else " (not all integers)"))
        return labels
