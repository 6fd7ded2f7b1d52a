"""+M for Faster R-CNN (``TEST.MULTISCALE_RPN``, ``im_detect_rpn_multiscale``): the net run at
each ``TEST.SCALES`` entry with that scale's blob and im_info, each scale's own rois scored and
mapped back by its own scale, the rows concatenated in scale order (against plain loops); one
scale is exactly ``im_detect_rpn``; the small end-to-end net with two scales gives the two
single-scale runs stacked, and ``test_net`` detects on a mini-VOC from the stacked rows."""

from pathlib import Path

import numpy as np
import pytest
import torch

from readonly_ohem import python_layers  # noqa: F401  (registers the RPN layers)
from readonly_ohem.caffe.net import Net
from readonly_ohem.config import load_config
from readonly_ohem.datasets import get_imdb
from readonly_ohem.datasets.image import load_image_bgr
from readonly_ohem.datasets.minivoc import make_minivoc
from readonly_ohem.detection import test as T
from readonly_ohem.errors import ConfigError
from readonly_ohem.roi_data.blob import prep_im_for_blob

from box_reference import ref_transform_clip

REPO = Path(__file__).resolve().parents[2]
CFGS = REPO / "prototxt" / "cfgs"
SMALL_TEST_NET = REPO / "prototxt" / "small" / "faster_rcnn_end2end" / "test.prototxt"
C = 3


class StandInRPNNet:
    """``forward({data, im_info})``: 5 rois that depend on the blob size and scale (so two scales
    give different boxes), class scores and deltas that are fixed functions of each roi."""

    def __init__(self):
        self.feeds = []
        self.device = torch.device("cpu")

    def forward(self, feed):
        self.feeds.append({k: v.clone() for k, v in feed.items()})
        h, w, s = feed["im_info"][0].tolist()
        k = np.arange(5, dtype=np.float64)[:, None]
        boxes = np.hstack([2 + 7 * k * s, 1 + 3 * k, w - 15 - k * s, h - 9 - 4 * k])
        rois = np.hstack([np.zeros((5, 1)), boxes]).astype(np.float32)
        r = rois.astype(np.float64)
        logits = np.sin(0.02 * r[:, 1:2] * (np.arange(C) + 1) - 0.01 * r[:, 3:4])
        deltas = 0.2 * np.cos(0.017 * r[:, 2:3] * (np.arange(4 * C) + 1) + r[:, 4:5])
        return {"rois": torch.from_numpy(rois),
                "cls_prob": torch.softmax(torch.from_numpy(logits), 1).float(),
                "bbox_pred": torch.from_numpy(deltas).float()}


def image(h=100, w=130, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def rpn_cfg(scales, max_size=400, multiscale=True):
    cfg = load_config([CFGS / "faster_rcnn_end2end.yml"])
    cfg.TEST.SCALES, cfg.TEST.MAX_SIZE, cfg.TEST.MULTISCALE_RPN = tuple(scales), max_size, multiscale
    return cfg


def test_two_scales_each_scale_fed_and_its_rows_stacked_in_order():
    # 100 x 130 image; scales 150 and 90 (max side 400 not reached): factors 1.5 and 0.9
    cfg, im, net = rpn_cfg((150, 90)), image(), StandInRPNNet()
    scores, pred = T.im_detect(net, im, None, cfg)
    assert len(net.feeds) == 2 and all(set(f) == {"data", "im_info"} for f in net.feeds)
    assert scores.shape == (10, C) and pred.shape == (10, 4 * C) and scores.dtype == np.float32
    for f, (target, hw_info) in zip(net.feeds, [(150, [150, 195, 1.5]), (90, [90, 117, 0.9])]):
        np.testing.assert_array_equal(f["im_info"].numpy(), np.array([hw_info], np.float32))
        want, s = prep_im_for_blob(im, cfg.PIXEL_MEANS, target, cfg.TEST.MAX_SIZE)
        assert s == hw_info[2] and torch.equal(f["data"], want[None])  # one image per forward
    # plain loops: scale k's rows are k's rois / its own factor, scored and regressed
    row = 0
    for f, s in zip(net.feeds, (1.5, 0.9)):
        out = net.forward(f)
        rois = out["rois"].numpy().astype(np.float64)
        deltas = out["bbox_pred"].numpy().astype(np.float64)
        for i in range(rois.shape[0]):
            np.testing.assert_array_equal(scores[row], out["cls_prob"].numpy()[i])
            for j in range(C):
                want = ref_transform_clip(rois[i, 1:] / s, deltas[i, 4 * j:4 * j + 4], 100, 130)
                np.testing.assert_allclose(pred[row, 4 * j:4 * j + 4], want, rtol=0, atol=2e-4)
            row += 1
    assert not np.allclose(pred[:5], pred[5:])  # the two scales proposed different boxes


def test_one_scale_is_exactly_im_detect_rpn():
    im = image(90, 120, seed=3)
    for bbox_reg in (True, False):
        on, off = rpn_cfg((150,)), rpn_cfg((150,), multiscale=False)
        on.TEST.BBOX_REG = off.TEST.BBOX_REG = bbox_reg
        s1, b1 = T.im_detect(StandInRPNNet(), im, None, on)
        s2, b2 = T.im_detect_rpn(StandInRPNNet(), im, off)
        assert s1.dtype == s2.dtype and b1.dtype == b2.dtype
        np.testing.assert_array_equal(s1, s2)
        np.testing.assert_array_equal(b1, b2)


def test_several_scales_without_the_key_name_it():
    with pytest.raises(ConfigError, match="TEST.SCALES has 2 .*TEST.MULTISCALE_RPN True"):
        T.im_detect(StandInRPNNet(), image(), None, rpn_cfg((150, 90), multiscale=False))


def test_shipped_config():
    cfg = load_config([CFGS / "faster_rcnn_end2end.yml", CFGS / "faster_rcnn_end2end_multiscale.yml"])
    assert cfg.TEST.HAS_RPN and cfg.TEST.MULTISCALE_RPN and cfg.TRAIN.HAS_RPN
    assert cfg.TEST.SCALES == (480, 576, 688, 864, 1000) and cfg.TEST.MAX_SIZE == 1000
    assert cfg.TRAIN.SCALES == (480, 576, 688, 864, 900) and cfg.TRAIN.MAX_SIZE == 1000
    assert not load_config([]).TEST.MULTISCALE_RPN  # off by default: the original's one scale


def small_cfg(scales):
    cfg = load_config([CFGS / "small.yml", CFGS / "faster_rcnn_end2end.yml"])
    cfg.TEST.SCALES, cfg.TEST.MAX_SIZE, cfg.TEST.MULTISCALE_RPN = tuple(scales), 200, True
    return cfg


@pytest.fixture(scope="module")
def small_net():
    # filler weights (no caffemodel): deterministic once built
    return Net.from_file(SMALL_TEST_NET, phase="TEST", cfg=small_cfg((120,)))


def test_small_end2end_net_two_scales_are_the_single_scale_runs_stacked(small_net, one_thread):
    im = image(100, 130, seed=1)
    scores, pred = T.im_detect(small_net, im, None, small_cfg((120, 160)))
    parts = [T.im_detect_rpn(small_net, im, small_cfg((s,))) for s in (120, 160)]
    n0, n1 = parts[0][0].shape[0], parts[1][0].shape[0]
    assert n0 > 0 and n1 > 0 and scores.shape == (n0 + n1, 21) and pred.shape == (n0 + n1, 84)
    np.testing.assert_array_equal(scores, np.vstack([p[0] for p in parts]))
    np.testing.assert_array_equal(pred, np.vstack([p[1] for p in parts]))
    assert not np.array_equal(parts[0][1][: min(n0, n1)], parts[1][1][: min(n0, n1)])


def test_test_net_on_a_mini_voc_with_two_scales(small_net, one_thread, tmp_path):
    voc = make_minivoc(tmp_path / "voc", seed=0, num_images=4, verbose=False)
    cfg = small_cfg((96, 128))
    imdb = get_imdb("voc_2007_test", voc, tmp_path / "missing.mat", cfg, cache_dir=False)
    r = T.test_net(small_net, imdb, cfg, max_per_image=50, thresh=0.0, output_dir=tmp_path / "out")
    assert r["eval"] is not None and np.isfinite(r["eval"]["mAP"])
    for i in range(imdb.num_images):
        # what test_net kept: the usual thresh / NMS / max_per_image on both scales' rows stacked
        im = load_image_bgr(imdb.image_path_at(i))
        parts = [T.im_detect_rpn(small_net, im, small_cfg((s,))) for s in (96, 128)]
        want = T.detect_classes(np.vstack([p[0] for p in parts]), np.vstack([p[1] for p in parts]),
                                21, 0.0, cfg.TEST.NMS, 50)
        got = [r["all_boxes"][j][i] for j in range(21)]
        assert sum(len(d) for d in got) == 50  # filled to max_per_image (random weights, thresh 0)
        for j in range(21):
            np.testing.assert_array_equal(got[j], want[j])
