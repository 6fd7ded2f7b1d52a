"""Online hard example mining: OHEMDataLayer, mining policies, selection records.

Importing this package registers ``OHEMDataLayer`` as the Python layer
``("roi_data_layer.layer", "OHEMDataLayer")``.
"""

from readonly_ohem.ohem.layer import OHEMDataLayer  # noqa: F401  (registers the Python layer)
from readonly_ohem.ohem.policies import (  # noqa: F401
    POLICIES,
    MiningResult,
    focal_loss,
    mine,
)
from readonly_ohem.ohem.record import SelectionRecord  # noqa: F401
from readonly_ohem.ohem.selection import Selection, select_hard_rois  # noqa: F401
