"""The Caffe engine: a ``.prototxt`` becomes a graph of PyTorch modules with Caffe's semantics.

It knows nothing of detection, VOC or OHEM: the application registers its Python layers into
``caffe.layers.python``'s registry. It imports nothing outside ``caffe/``, ``ops/`` and the leaf
modules ``errors`` and ``atomic`` (a test in the suite holds this).

- ``proto``     our ``caffe.proto`` (Caffe's field numbers) and its generated module
- ``spec``      prototxt / binary parsing, V1 upgrade, NetState filtering, file:line:col errors
- ``net``       the net: build (blobs, in-place, sharing), Caffe's backward plan, forward/backward
- ``weights``   ``.caffemodel`` read/write, fillers
- ``layers``    one module per Caffe layer family, in a registry keyed by type name
- ``solver``    Caffe's SGD, lr policies
- ``summary``   the layer table Caffe prints at start-up
- ``precision`` ``use_caffe_float32()``: TF32 off, called by the entry points that run nets
"""

from readonly_ohem.caffe.precision import use_caffe_float32  # noqa: F401
