"""readonly-ohem: Caffe-exact Fast R-CNN + Online Hard Example Mining in PyTorch.

The map of the package (spec → graph → layers → OHEM → data → solver → test/eval → inspect → cli):

- ``config``   the original config keys and defaults, yml merge, ``--set`` parsing
- ``proto``    our ``caffe.proto`` and its generated module
- ``spec``     prototxt / binary parsing, V1 upgrade, phase filtering
- ``net``      the Caffe net as a graph of PyTorch modules
- ``weights``  ``.caffemodel`` I/O and fillers
- ``layers``   one module per Caffe layer family, in a registry keyed by type name
- ``ops``      boxes, NMS, RoI pooling kernels
- ``ohem``     OHEMDataLayer, mining policies, selection records
- ``data``     VOC, proposals, roidb, minibatches, RoIDataLayer, mini-VOC
- ``solver``   Caffe's SGD, lr policies, snapshots; ``train`` the training loop
- ``test``     im_detect / test_net; ``voc_eval`` the VOC AP
- ``inspect``  kept-RoI logs, pictures, statistics
- ``cli``      argument parsing only
"""

__version__ = "0.1.0"
