"""FocalLossLayer: the focal loss (Lin et al. 2017) as a Caffe Python loss layer, for the RoI head.

The other hard-example choice of the RCNN head (write-up 003: OHEM in the RPN, focal loss on the
RCNN classification): instead of keeping the hardest RoIs, every sampled RoI is weighted by
``(1 - p_t)^gamma``, so easy ones count little. ``scripts/make_prototxt.py`` puts it in place of
the head's ``SoftmaxWithLoss`` in ``<model>/faster_rcnn_end2end_focal/train.prototxt``, and
``readonly-ohem experiment``'s ``focal`` arm does in its Fast R-CNN net, both with
``focal_in_place_of`` (the one rewrite).

Prototxt: ``type: "Python"``, ``python_param { module: "ohem.focal_loss_layer"
layer: "FocalLossLayer" param_str: "{'alpha': 0.25, 'gamma': 2.0}" }``, ``loss_weight: 1``.
``param_str`` keys (all optional): ``alpha`` (weight of foreground RoIs, background gets
1 - alpha; default 0.25), ``gamma`` (default 2.0), ``normalization``: ``"valid"`` (the default:
mean over the RoIs with label >= 0, as the SoftmaxWithLoss it replaces with ``normalize: true``),
``"pos"`` (sum over the foreground count, RetinaNet's) or ``"none"`` (the sum).

Bottoms: cls_score (R, C) logits (not probabilities: ``log_softmax`` keeps it finite), labels (R,)
in [0, C), -1 ignored. Top: the loss, a scalar. The gradient reaches cls_score (autograd through
``ohem.policies.focal_loss``, the project's one focal loss); none reaches the labels.
"""

from __future__ import annotations

from readonly_ohem.caffe.layers.base import Layer, register_python
from readonly_ohem.caffe.layers.python import parse_param_str
from readonly_ohem.caffe.proto import caffe_pb2
from readonly_ohem.errors import DataError
from readonly_ohem.ohem.policies import focal_loss

NORMALIZATIONS = {"valid": "mean", "pos": "pos", "none": "sum"}  # param_str -> focal_loss reduction


def focal_in_place_of(softmax_loss, param_str: str):
    """The ``FocalLossLayer`` spec (``caffe_pb2.LayerParameter``) that replaces the
    ``SoftmaxWithLoss`` spec ``softmax_loss``: same name, bottoms, top and loss weight (1 where
    unset), no gradient to the labels (``propagate_down: true, false``); ``param_str`` its keys."""
    if softmax_loss.type != "SoftmaxWithLoss":
        raise ValueError(f"layer {softmax_loss.name!r}: a focal loss replaces a SoftmaxWithLoss, "
                         f"not a {softmax_loss.type}")
    focal = caffe_pb2.LayerParameter(name=softmax_loss.name, type="Python",
                                     bottom=softmax_loss.bottom, top=softmax_loss.top,
                                     propagate_down=[True, False],
                                     loss_weight=list(softmax_loss.loss_weight) or [1.0])
    focal.python_param.module = "ohem.focal_loss_layer"
    focal.python_param.layer = "FocalLossLayer"
    focal.python_param.param_str = param_str
    return focal


@register_python("ohem.focal_loss_layer", "FocalLossLayer")
class FocalLossLayer(Layer):
    loss_by_default = True
    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        opts = dict(parse_param_str(param))
        self.alpha = self._number(opts.pop("alpha", 0.25), "alpha")
        self.gamma = self._number(opts.pop("gamma", 2.0), "gamma")
        if not 0 <= self.alpha <= 1 or self.gamma < 0:
            raise self.error(f"param_str needs alpha in [0, 1] and gamma >= 0, got alpha "
                             f"{self.alpha} gamma {self.gamma}")
        norm = opts.pop("normalization", "valid")
        if norm not in NORMALIZATIONS:
            raise self.error(f"param_str normalization {norm!r} is not one of "
                             f"{sorted(NORMALIZATIONS)}")
        self.reduction = NORMALIZATIONS[norm]
        if opts:
            raise self.error(f"param_str has unknown key(s) {sorted(opts)} (it takes alpha, "
                             f"gamma, normalization)")

    def _number(self, value, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(f"param_str {key} must be a number, got {value!r}")
        return float(value)

    def top_shapes(self, bottom_shapes):
        return [()]

    def forward(self, bottoms, params):
        scores, labels = bottoms
        if scores.dim() != 2:
            raise self.error(f"bottom {self.param.bottom[0]!r} must be (R, C) scores, got "
                             f"{tuple(scores.shape)}")
        labels = labels.detach().reshape(-1)
        if labels.shape[0] != scores.shape[0]:
            raise self.error(f"bottom {self.param.bottom[1]!r} must hold {scores.shape[0]} labels, "
                             f"got {labels.shape[0]}")
        c = scores.shape[1]
        bad = labels[(labels >= c) | (labels < -1) | (labels != labels.trunc())]
        if bad.numel():
            raise DataError(f"layer {self.name!r} (FocalLossLayer): bottom "
                            f"{self.param.bottom[1]!r} has label {float(bad[0]):g}; the labels "
                            f"must be integers in [0, {c}) or -1 (ignored)")
        loss = focal_loss(scores, labels.long(), alpha=self.alpha, gamma=self.gamma,
                          reduction=self.reduction)
        return [loss.to(scores.dtype)]
