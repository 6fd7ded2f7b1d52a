"""Helpers the RPN layer tests share: build a layer from its prototxt words, configs, and
random inputs laid out as the end-to-end nets feed them."""

import numpy as np
import torch
from google.protobuf import text_format

from readonly_ohem import python_layers  # noqa: F401  (registers the RPN layers)
from readonly_ohem.caffe.layers import LAYERS, LayerContext
from readonly_ohem.caffe.proto import caffe_pb2
from readonly_ohem.config import default_config

MODULES = {"AnchorTargetLayer": "rpn.anchor_target_layer", "ProposalLayer": "rpn.proposal_layer",
           "ProposalTargetLayer": "rpn.proposal_target_layer"}
BLOBS = {
    "AnchorTargetLayer": (["rpn_cls_score", "gt_boxes", "im_info", "data"],
                          ["rpn_labels", "rpn_bbox_targets", "rpn_bbox_inside_weights",
                           "rpn_bbox_outside_weights"]),
    "ProposalLayer": (["rpn_cls_prob_reshape", "rpn_bbox_pred", "im_info"], ["rpn_rois"]),
    "ProposalTargetLayer": (["rpn_rois", "gt_boxes"],
                            ["rois", "labels", "bbox_targets", "bbox_inside_weights",
                             "bbox_outside_weights"]),
}


def config(**keys):
    """Defaults with ``TRAIN__RPN_BATCHSIZE=...`` style overrides (``__`` for the dot)."""
    cfg = default_config()
    for k, v in keys.items():
        cfg.set_key(k.replace("__", "."), v)
    return cfg


def make_layer(kind: str, param_str: str, cfg=None, phase: str = "TRAIN", name: str = "layer",
               bottoms=None, tops=None):
    """The registered layer ``kind`` with the end-to-end nets' blob names."""
    b, t = BLOBS[kind]
    b, t = bottoms or b, tops or t
    text = (f'name: "{name}" type: "Python" ' + " ".join(f'bottom: "{x}"' for x in b) + " "
            + " ".join(f'top: "{x}"' for x in t)
            + f' python_param {{ module: "{MODULES[kind]}" layer: "{kind}" '
            f"param_str: \"{param_str}\" }}")
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    return LAYERS["Python"](lp, LayerContext(phase=phase, cfg=cfg if cfg is not None else config()))


def random_gt(rng: np.random.Generator, n: int, im_h: int, im_w: int, num_classes: int = 21):
    """(n, 5) float32 gt boxes inside the image, 8..half-image sized, classes 1..C-1."""
    w = rng.uniform(8, im_w / 2, n)
    h = rng.uniform(8, im_h / 2, n)
    x1 = rng.uniform(0, im_w - w)
    y1 = rng.uniform(0, im_h - h)
    cls = rng.integers(1, num_classes, n)
    return np.stack([x1, y1, x1 + w, y1 + h, cls], 1).round().astype(np.float32)


def t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def n(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()
