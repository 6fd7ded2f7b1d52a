"""Fast R-CNN data: VOC imdb, proposals, roidb, minibatches, RoIDataLayer, mini-VOC.

Importing this package registers the ``roi_data_layer.layer`` / ``RoIDataLayer`` Python layer.
"""

from readonly_ohem.roi_data import layer as _layer  # noqa: F401  (registers RoIDataLayer)
