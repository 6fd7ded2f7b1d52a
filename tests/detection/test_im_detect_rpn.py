"""Test-time detection with an RPN (``TEST.HAS_RPN``, the original ``test.py``'s Faster R-CNN
path): what the net is fed, and the boxes scored (its own rois / scale) against plain loops;
test_net needs no proposals; the small end-to-end test net runs through it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from readonly_ohem import python_layers  # noqa: F401  (registers the RPN layers)
from readonly_ohem.caffe.net import Net
from readonly_ohem.config import load_config
from readonly_ohem.detection import test as T
from readonly_ohem.errors import ConfigError

from box_reference import ref_transform_clip

REPO = Path(__file__).resolve().parents[2]
C = 3


class StandInRPNNet:
    """``forward({data, im_info})``: rois that depend on im_info, class scores and deltas that
    are fixed functions of each roi (as a Faster R-CNN test net's blobs)."""

    def __init__(self):
        self.feeds = []
        self.device = torch.device("cpu")

    def forward(self, feed):
        self.feeds.append({k: v.clone() for k, v in feed.items()})
        h, w, s = feed["im_info"][0].tolist()
        k = np.arange(7, dtype=np.float64)[:, None]
        boxes = np.hstack([3 + 5 * k, 2 + 4 * k, w - 20 + k, h - 30 + 2 * k]) * (s / 1.5)
        rois = np.hstack([np.zeros((7, 1)), boxes]).astype(np.float32)
        r = rois.astype(np.float64)
        logits = np.sin(0.01 * r[:, 1:2] * (np.arange(C) + 1) - 0.02 * r[:, 4:5])
        deltas = 0.3 * np.cos(0.013 * r[:, 2:3] * (np.arange(4 * C) + 1))
        return {"rois": torch.from_numpy(rois),
                "cls_prob": torch.softmax(torch.from_numpy(logits), 1).float(),
                "bbox_pred": torch.from_numpy(deltas).float()}


def rpn_cfg():
    cfg = load_config([REPO / "prototxt" / "cfgs" / "faster_rcnn_end2end.yml"])
    cfg.TEST.SCALES, cfg.TEST.MAX_SIZE = (150,), 400
    return cfg


def image(h=100, w=130, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_feeds_data_and_im_info_and_scores_the_nets_rois():
    cfg, im, net = rpn_cfg(), image(), StandInRPNNet()
    scores, pred = T.im_detect(net, im, None, cfg)
    feed = net.feeds[0]
    assert set(feed) == {"data", "im_info"}  # no rois fed: the net makes them
    blob, scales = T.image_blob(im, cfg)
    assert torch.equal(feed["data"], blob) and scales[0] == 1.5
    np.testing.assert_array_equal(feed["im_info"].numpy(),
                                  np.array([[150, 195, 1.5]], np.float32))
    out = net.forward(feed)
    np.testing.assert_array_equal(scores, out["cls_prob"].numpy())
    rois, deltas = out["rois"].numpy().astype(np.float64), out["bbox_pred"].numpy().astype(np.float64)
    for i in range(rois.shape[0]):
        box = rois[i, 1:] / 1.5  # back to the image, as the original
        for j in range(C):
            want = ref_transform_clip(box, deltas[i, 4 * j:4 * j + 4], 100, 130)
            np.testing.assert_allclose(pred[i, 4 * j:4 * j + 4], want, rtol=0, atol=2e-4)
    cfg.TEST.BBOX_REG = False  # the rois themselves, tiled per class
    _, pred = T.im_detect(net, im, None, cfg)
    np.testing.assert_array_equal(pred, np.tile(rois[:, 1:] / 1.5, (1, C)))


def test_has_rpn_errors():
    cfg, net = rpn_cfg(), StandInRPNNet()
    with pytest.raises(ConfigError, match="HAS_RPN: the net scores its own RoIs"):
        T.im_detect(net, image(), np.zeros((2, 4)), cfg)
    cfg.TEST.SCALES = (150, 200)
    with pytest.raises(ConfigError, match="one image scale; TEST.SCALES has 2"):
        T.im_detect(net, image(), None, cfg)


class NoProposals:
    """An imdb whose proposals must not be read (TEST.HAS_RPN)."""

    name, classes = "stand_in", ("__background__", "a", "b")
    num_images = 2
    image_index = ["x", "y"]

    def __init__(self, tmp_path):
        self.paths = []
        for i in range(2):
            p = tmp_path / f"{i}.png"
            Image.fromarray(image(seed=i)).save(p)
            self.paths.append(str(p))

    def image_path_at(self, i):
        return self.paths[i]

    def proposal_boxes(self, i):
        raise AssertionError("proposals read with TEST.HAS_RPN")

    def evaluate_detections(self, all_boxes, output_dir):
        self.all_boxes = all_boxes
        return {"eval": None, "result_files": {}, "results_at": str(output_dir), "report": ""}


def test_test_net_reads_no_proposals(tmp_path):
    cfg, net = rpn_cfg(), StandInRPNNet()
    imdb = NoProposals(tmp_path)
    r = T.test_net(net, imdb, cfg, thresh=0.0, output_dir=tmp_path / "out")
    assert len(net.feeds) == 2 and all(len(r["all_boxes"][j][i]) for j in (1, 2) for i in (0, 1))


def test_small_end2end_test_net_detects():
    """The generated small test net (ProposalLayer with the TEST keys) through im_detect."""
    cfg = load_config([REPO / "prototxt" / "cfgs" / n for n in ("small.yml", "faster_rcnn_end2end.yml")])
    cfg.TEST.SCALES, cfg.TEST.MAX_SIZE = (120,), 200
    net = Net.from_file(REPO / "prototxt" / "small" / "faster_rcnn_end2end" / "test.prototxt",
                        phase="TEST", cfg=cfg)
    im = image(100, 130)
    scores, pred = T.im_detect(net, im, None, cfg)
    r = scores.shape[0]
    assert 0 < r <= cfg.TEST.RPN_POST_NMS_TOP_N and scores.shape == (r, 21) and pred.shape == (r, 84)
    np.testing.assert_allclose(scores.sum(1), 1, rtol=1e-5)
    assert (pred[:, 0::2] >= 0).all() and (pred[:, 0::2] <= 129).all()  # clipped to the image
    assert (pred[:, 1::2] >= 0).all() and (pred[:, 1::2] <= 99).all()
