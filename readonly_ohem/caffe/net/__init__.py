"""``Net``: a Caffe network as a PyTorch module (see ``net.net`` for the semantics)."""

from readonly_ohem.caffe.net.net import LayerRecord, LearnableParam, Net  # noqa: F401
