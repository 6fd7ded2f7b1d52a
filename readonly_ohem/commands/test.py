"""``readonly-ohem test``: the original ``tools/test_net.py``.

Config, the TEST-phase net with its trained weights, the imdb by name, then
``readonly_ohem.detection.test.test_net`` (detections, devkit result files, the VOC AP table).
"""

from __future__ import annotations

import sys

import torch

from readonly_ohem import python_layers  # noqa: F401  (registers RoIDataLayer, OHEMDataLayer)
from readonly_ohem.caffe import use_caffe_float32
from readonly_ohem.caffe.net import Net
from readonly_ohem.config import load_config
from readonly_ohem.datasets import get_imdb
from readonly_ohem.detection.test import test_net
from readonly_ohem.tensorboard import model_iteration, write_test_results


def test_command(def_path, net_path, imdb, data=None, proposals=None, cfg=(), set_pairs=(),
                 output="output", thresh=0.05, max_per_image=100, vis=0, device="cpu",
                 tensorboard=None):
    """``readonly-ohem test``: the original ``tools/test_net.py``."""
    use_caffe_float32()  # Caffe computes in true float32: no TF32 on GPUs
    config = load_config(cfg, set_pairs)
    net = Net.from_file(def_path, phase="TEST", cfg=config)
    report = net.load_caffemodel(net_path)
    print(report, file=sys.stderr)  # loaded layers; names missing on either side
    net.to(torch.device(device))
    dataset = get_imdb(imdb, data, proposals, config)
    result = test_net(net, dataset, config, max_per_image=max_per_image, thresh=thresh,
                      output_dir=output, vis=vis)
    if tensorboard and result["eval"] is not None:  # mAP and per-class AP at the snapshot's iteration
        write_test_results(tensorboard, result["eval"], step=model_iteration(net_path))
    return 0


# a ``test_*`` name: keep pytest from collecting it when a test module imports it.
test_command.__test__ = False
