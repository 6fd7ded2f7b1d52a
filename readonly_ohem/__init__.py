"""readonly-ohem: Caffe-exact Fast R-CNN + Online Hard Example Mining in PyTorch.

Two floors. The Caffe engine, which knows nothing of detection:

- ``caffe``        spec parsing (``spec``), the net (``net``), layers in registries keyed by
  Caffe's type (``layers``; ``layers.python``: the Python-layer registry), ``.caffemodel`` I/O
  (``weights``), SGD (``solver``), the layer table (``summary``), TF32 off for
  Caffe's float32 (``precision.use_caffe_float32``, called by the entry points, never on import)
- ``ops``          boxes, NMS (``nms_window``: its pass for many boxes), RoI pooling: leaves every
  floor uses

The detection application on top, in pipeline order:

- ``config``       the original config tree and defaults, yml merge, ``--set``
- ``datasets``     imdbs (``pascal_voc``, ``coco``, the built-in ``minivoc``), proposals, VOC AP
                   (``voc_eval``), COCO AP via pycocotools (``coco_eval``), ``voc2coco``
- ``roi_data``     the training roidb, minibatches, image blobs, ``RoIDataLayer``
- ``ohem``         ``OHEMDataLayer``, per-RoI loss, selection, mining policies, selection records,
                   the reference family
- ``rpn``          Faster R-CNN's RPN layers (``AnchorTargetLayer``, ``ProposalLayer``,
  ``ProposalTargetLayer``) and ``generate_anchors``
- ``python_layers`` importing it registers the application's Python layers with the engine
- ``train``        the training sequence and loop (snapshots, resume, DDP via ``distributed``)
- ``detection``    ``im_detect`` / ``test_net`` (the original ``fast_rcnn/test.py``; several
  ``TEST.SCALES``: the +M pyramid), +B (``iterative``), drawing
- ``inspect``      kept-RoI logs, pictures, statistics
- ``tensorboard``  TensorBoard events: training scalars, OHEM selections, test AP (optional extra)
- ``commands``     one module per ``readonly-ohem`` sub-command; ``cli`` parses arguments only
"""

__version__ = "0.1.0"
