"""The application's Python layers: importing this module registers every one of them.

``roi_data_layer.layer.RoIDataLayer`` (``roi_data.layer``) and ``roi_data_layer.layer.OHEMDataLayer``
(``ohem.layer``), under the original code's module and class names so the original prototxts load
unmodified; and ``readonly_ohem.ohem.focal_layer.SoftmaxFocalLoss`` (ours: the focal-loss rival
of mining, used by ``readonly-ohem experiment``). The Caffe engine names no application module;
entry points that build nets from specs (the commands, ``train``) import this module, and so does
a script that builds such a net. A package adding Python layers imports its module here and
declares it in ``pyproject.toml``'s ``readonly_ohem.caffe.python_layers`` entry points (which the
engine's error message reads).
"""

from readonly_ohem.ohem import focal_layer  # noqa: F401  (registers SoftmaxFocalLoss)
from readonly_ohem.ohem import layer as ohem_layer  # noqa: F401  (registers OHEMDataLayer)
from readonly_ohem.roi_data import layer as roi_data_layer  # noqa: F401  (registers RoIDataLayer)
