"""Caffe layers as PyTorch modules, one file per family, registered by Caffe type name.

Importing this package fills ``LAYERS``: every family registers its classes on import. See
``base`` for the contract every layer honours.

- ``common``       Input, Silence, Split, Concat, Slice, Flatten, Reshape, InnerProduct,
                   Softmax, Eltwise, Scale, Bias, BatchNorm
- ``neuron``       ReLU, PReLU, Sigmoid, TanH, Power, Dropout (element-wise)
- ``vision``       Convolution, Pooling, LRN
- ``losses``       SoftmaxWithLoss, SmoothL1Loss, Accuracy
- ``roi_pooling``  the Fast R-CNN fork's ROIPooling
- ``python``       ``type: "Python"``: the registry (``PYTHON_LAYERS``) the application fills
- ``util``         helpers several families share (Caffe's axis rules, default fillers)
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
from readonly_ohem.caffe.layers import (  # noqa: F401,E402  (each family registers on import)
    common,
    losses,
    neuron,
    python,
    roi_pooling,
    vision,
)
