"""Faster R-CNN's RPN layers, py-faster-rcnn's ``lib/rpn``, vectorized on the inputs' device.

- ``anchors``                the original ``generate_anchors`` and the anchors shifted over a map
- ``anchor_target_layer``    ``AnchorTargetLayer``: RPN labels, box targets and weights
- ``proposal_layer``         ``ProposalLayer``: decode, clip, min-size, top-N, NMS, top-N
- ``proposal_target_layer``  ``ProposalTargetLayer``: sampled RoIs and Fast R-CNN targets
- ``sampling``               the original's ``npr.choice`` on each layer's seeded generator
- ``checks``                 the layers' input checks

Each layer registers under the original module and class names (``rpn.anchor_target_layer``
/ ``AnchorTargetLayer`` and so on) when its module is imported; ``readonly_ohem.python_layers``
imports them all. Importing this package alone registers nothing.
"""
