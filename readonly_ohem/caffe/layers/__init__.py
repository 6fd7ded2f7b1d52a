"""Caffe layers as PyTorch modules, one file per family, registered by Caffe type name.

Importing this package fills ``LAYERS`` (and, through ``python``, knows where our Python layers
live). See ``base`` for the contract every layer honours.
"""

from readonly_ohem.caffe.layers.base import (  # noqa: F401
    LAYERS,
    PYTHON_LAYERS,
    Layer,
    LayerContext,
    ParamBlob,
    register,
    register_python,
)
from readonly_ohem.caffe.layers import common, losses, python, roi_pooling, vision  # noqa: F401,E402
