"""``Net``: a Caffe network as a PyTorch module, by stage.

- ``build``     the graph from the parsed spec: blobs, in-place tops, shapes, params and sharing
- ``backward``  Caffe's need-backward analysis (``Net::Init`` with ``InsertSplits``)
- ``net``       ``Net``: parse → build → plan backward; forward, backward, diffs, .caffemodel io
"""

from readonly_ohem.caffe.net.build import LayerRecord, LearnableParam  # noqa: F401
from readonly_ohem.caffe.net.net import Net  # noqa: F401
