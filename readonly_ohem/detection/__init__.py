"""Detection: ``im_detect`` and ``test_net`` (the original ``fast_rcnn/test.py``), drawing."""
