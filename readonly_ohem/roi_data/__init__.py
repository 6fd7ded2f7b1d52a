"""Fast R-CNN training data from an imdb: the training roidb, image blobs, minibatches, RoIDataLayer
(the original ``roi_data_layer``).

Importing this package registers the ``roi_data_layer.layer`` / ``RoIDataLayer`` Python layer.
"""

from readonly_ohem.roi_data import layer as _layer  # noqa: F401  (registers RoIDataLayer)
