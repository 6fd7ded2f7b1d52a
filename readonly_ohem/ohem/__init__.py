"""Online hard example mining: OHEMDataLayer, mining policies, selection records.

- ``layer``     OHEMDataLayer: per-RoI loss, then the policy named by param_str, then row gathers
- ``loss``      the original's per-RoI loss (float64 (R,))
- ``registry``  the mining-policy registry; every member honours
                ``policy(loss, labels, context: MiningContext) -> MiningResult``; a new policy is
                one ``@register_policy(name, options=..., max_kept=...)`` function
- ``selection`` the original's rule (NMS per image and label, then the hardest BATCH_SIZE)
- ``policies``  pure rankings of per-sample losses (topk, ratio, neg_pos, topk_threshold, ``mine``)
                and focal_loss
- ``family``    the reference write-ups' losses, exact (mtcnn_cls_ohem, rpn_topk_class_loss,
                topk_cross_entropy, batch_weighted_focal_loss, ssd_loss_torchcv, ssd_losses_tf)
- ``record``    SelectionRecord, what one forward decided (for logs and pictures)
- ``readonly``  the readonly branch of an OHEM net (from the graph) and its precision
                (``TRAIN.OHEM_READONLY_DTYPE``)
- ``focal_layer`` FocalLossLayer, the focal loss as a Python loss layer (the RoI head's other
                choice; registered when ``readonly_ohem.python_layers`` is imported)

Importing this package registers ``OHEMDataLayer`` as the Python layer
``("roi_data_layer.layer", "OHEMDataLayer")``.
"""

from readonly_ohem.ohem.layer import OHEMDataLayer  # noqa: F401  (registers the Python layer)
from readonly_ohem.ohem.policies import (  # noqa: F401
    RANKINGS,
    MiningResult,
    focal_loss,
    mine,
)
from readonly_ohem.ohem.record import SelectionRecord  # noqa: F401
from readonly_ohem.ohem.registry import (  # noqa: F401
    MINING_POLICIES,
    MiningContext,
    MiningPolicy,
    mine_after_nms,
    register_policy,
)
from readonly_ohem.ohem.selection import Selection, select_hard_rois  # noqa: F401
