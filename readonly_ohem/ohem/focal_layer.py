"""SoftmaxFocalLoss: the focal loss (``policies.focal_loss``) as a loss layer of a train net.

The rival of mining that re-weights instead of selecting (Lin et al. 2017): every RoI reaches
the trainable head (``TRAIN.USE_OHEM`` hands over all of them, bg in [0, 0.5)) and the loss
down-weights the easy ones by (1 - p_t)^gamma. The ``focal`` arm of ``readonly-ohem experiment``
puts it in place of ``SoftmaxWithLoss``:

    layer { name: "loss_cls" type: "Python" bottom: "cls_score" bottom: "labels"
            top: "loss_cls" loss_weight: 1
            python_param { module: "readonly_ohem.ohem.focal_layer" layer: "SoftmaxFocalLoss"
                           param_str: "{'alpha': 0.25, 'gamma': 2.0, 'reduction': 'pos'}" } }

Bottoms: scores (R, C) logits, labels (R,) class indices in [0, C) (0 = background; negative
values are ignored, loss 0). Top: the scalar loss. param_str (all optional): ``alpha`` (0.25,
the foreground weight; background gets 1 - alpha), ``gamma`` (2.0), ``reduction`` (``pos``:
sum / max(1, #foreground), RetinaNet's; ``mean``: over the non-ignored RoIs; ``sum``). As for
any Caffe Python layer, the loss counts only with an explicit ``loss_weight``.
"""

from __future__ import annotations

import torch

from readonly_ohem.caffe.layers.base import Layer, register_python
from readonly_ohem.caffe.layers.python import parse_param_str
from readonly_ohem.errors import DataError
from readonly_ohem.ohem.policies import focal_loss

OPTIONS = {"alpha": 0.25, "gamma": 2.0, "reduction": "pos"}
REDUCTIONS = ("pos", "mean", "sum")


@register_python("readonly_ohem.ohem.focal_layer", "SoftmaxFocalLoss")
class SoftmaxFocalLoss(Layer):
    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        opts = dict(parse_param_str(param))
        unknown = set(opts) - set(OPTIONS)
        if unknown:
            raise self.error(f"param_str has unknown key(s) {sorted(unknown)} "
                             f"(it takes {sorted(OPTIONS)})")
        opts = {**OPTIONS, **opts}
        try:
            self.alpha, self.gamma = float(opts["alpha"]), float(opts["gamma"])
        except (TypeError, ValueError):
            raise self.error(f"param_str alpha and gamma must be numbers, got {opts['alpha']!r}, "
                             f"{opts['gamma']!r}") from None
        self.reduction = opts["reduction"]
        if self.reduction not in REDUCTIONS:
            raise self.error(f"param_str reduction must be one of {list(REDUCTIONS)}, "
                             f"got {self.reduction!r}")

    def forward(self, bottoms, params):
        scores, labels = bottoms
        if scores.dim() != 2:
            raise self.error(f"bottom {self.param.bottom[0]} must be (R, C) scores, "
                             f"got {tuple(scores.shape)}")
        labels = labels.detach().reshape(-1)
        if labels.shape[0] != scores.shape[0]:
            raise self.error(f"bottom {self.param.bottom[1]} must hold {scores.shape[0]} labels, "
                             f"got {labels.shape[0]}")
        lab = labels.long()
        if lab.numel() and (int(lab.max()) >= scores.shape[1]
                            or not torch.equal(lab.to(labels.dtype), labels)):
            raise DataError(f"layer {self.name!r} (SoftmaxFocalLoss): bottom "
                            f"{self.param.bottom[1]} must hold integer labels below "
                            f"{scores.shape[1]}, got values up to {float(labels.max()):g}")
        return [focal_loss(scores, lab, self.alpha, self.gamma, self.reduction)]

    def top_shapes(self, bottom_shapes):
        return [()]
