"""Detection: ``im_detect`` and ``test_net`` (the original ``fast_rcnn/test.py``), the paper's +B
(``iterative``: iterative box regression, weighted voting), drawing."""
