"""+M at test time: the image pyramid, the RoI levels and im_detect with several TEST.SCALES,
against the transcription of the original ``fast_rcnn/test.py`` (tests/original_code.py)."""

import numpy as np
import pytest
import torch

from readonly_ohem.config import default_config
from readonly_ohem.detection import test as T
from readonly_ohem.ops.boxes import bbox_transform_inv, clip_boxes
from readonly_ohem.roi_data.blob import blob_scale, resize_like_cv2

from original_code import dedup_rois_test, get_image_blob_test, get_rois_blob_test

PAPER_TEST_SCALES = (480, 576, 688, 864, 1000)


def _resize(im: np.ndarray, s: float) -> np.ndarray:
    """``cv2.resize(fx=s, fy=s, INTER_LINEAR)`` as the project does it (HWC in, HWC out)."""
    return resize_like_cv2(torch.from_numpy(np.ascontiguousarray(im)), s).permute(1, 2, 0).numpy()


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _boxes(n, h, w, seed=0):
    """Proposals of every size, some tiny, some the whole image, float coordinates too."""
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(0, w - 2, n)
    y1 = rng.uniform(0, h - 2, n)
    x2 = np.minimum(x1 + rng.exponential(w / 4, n), w - 1)
    y2 = np.minimum(y1 + rng.exponential(h / 4, n), h - 1)
    b = np.stack([x1, y1, x2, y2], 1)
    b[: n // 2] = np.floor(b[: n // 2])  # selective search boxes are integers
    b[0] = [0, 0, w - 1, h - 1]
    return b


def _cfg(scales, max_size):
    cfg = default_config()
    cfg.set_key("TEST.SCALES", tuple(scales))
    cfg.set_key("TEST.MAX_SIZE", max_size)
    return cfg


@pytest.mark.parametrize("hw,scales,max_size", [
    ((75, 100), PAPER_TEST_SCALES, 1000),  # VOC's 375x500 at 1/5: the two largest scales capped alike
    ((120, 40), (96, 115, 138, 173, 200), 200),  # portrait, the paper's scales at 1/5
    ((60, 61), (50, 70), 1000),  # nearly square, no cap
    ((40, 90), (30,), 60),  # one scale, capped
])
def test_image_blob_is_the_originals_pyramid(hw, scales, max_size):
    im = _image(*hw, seed=sum(hw))
    cfg = _cfg(scales, max_size)
    blob, im_scales = T.image_blob(im, cfg)
    ref_blob, ref_scales = get_image_blob_test(im, scales, max_size, cfg.PIXEL_MEANS, _resize)
    np.testing.assert_array_equal(im_scales, ref_scales)
    assert im_scales.dtype == ref_scales.dtype == np.float64
    assert blob.dtype == torch.float32 and blob.shape == ref_blob.shape
    np.testing.assert_array_equal(blob.numpy(), ref_blob)


def test_paper_scales_on_a_voc_sized_image_by_hand():
    """A 375x500 VOC image: 480/375 = 1.28, 576/375 = 1.536, 688/375; 864/375 = 2.304 would make
    the long side 1152 > 1000, so it and 1000 are both capped at 1000/500 = 2.0."""
    s = np.array([blob_scale(375, 500, t, 1000) for t in PAPER_TEST_SCALES])
    np.testing.assert_array_equal(s, [1.28, 1.536, 688 / 375, 2.0, 2.0])
    # widths/heights +1: areas 10^4, 150^2, 200^2; scaled areas nearest 224^2 = 50176:
    # 100x100 -> 40000 at s = 2.0 (levels 3 and 4 tie: the first, 3), 150x150 -> 53084 at 1.536
    # (level 1), 200x200 -> 65536 at 1.28 (level 0)
    boxes = np.array([[0, 0, 99, 99], [10, 10, 159, 159], [5, 0, 204, 199]], np.float64)
    rois = T.project_im_rois(boxes, s)
    np.testing.assert_array_equal(rois[:, 0], [3, 1, 0])
    np.testing.assert_array_equal(rois[:, 1:], (boxes * s[[3, 1, 0]][:, None]).astype(np.float32))


@pytest.mark.parametrize("scales", [
    np.array([1.28, 1.536, 688 / 375, 2.0, 2.0]),  # the paper's test scales on a 375x500 image
    np.array([0.5, 0.75, 1.0, 1.5, 2.0]),
    np.array([1.0, 1.0]),  # equal factors: every RoI at the first
    np.array([0.8]),  # one scale: level 0, no area rule
])
def test_rois_blob_levels_match_the_original(scales):
    boxes = _boxes(3000, 375, 500, seed=len(scales))
    ours = T.project_im_rois(boxes, scales)
    ref = get_rois_blob_test(boxes, scales)
    assert ours.dtype == ref.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)
    used = set(ours[:, 0].astype(int).tolist())
    repeated = {i for i in range(len(scales)) if scales[i] in scales[:i]}
    assert not used & repeated  # a factor equal to an earlier one: its level is never used
    assert len(used) == len(set(scales.tolist()))  # every distinct factor gets RoIs here


def test_levels_ties_and_near_ties_go_to_the_first_scale():
    """Boxes whose scaled areas straddle 224² between two levels: numpy's argmin, the first of
    equal distances; and a box exactly between two scales in float64 goes to the lower index."""
    scales = np.array([1.0, 2.0])
    # |A - 50176| = |4A - 50176| at A = 20070.4: around it, level 1 below, level 0 above
    w = 100.0
    hs = 20070.4 / w + np.linspace(-1e-9, 1e-9, 41)
    boxes = np.stack([np.zeros_like(hs), np.zeros_like(hs), np.full_like(hs, w - 1), hs - 1], 1)
    ours = T.project_im_rois(boxes, scales)
    np.testing.assert_array_equal(ours, get_rois_blob_test(boxes, scales))
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    d = np.abs(area[:, None] * scales[None] ** 2 - 224 * 224)
    np.testing.assert_array_equal(ours[:, 0], np.where(d[:, 1] < d[:, 0], 1, 0))
    assert (ours[:, 0] == 0).any() and (ours[:, 0] == 1).any()


class LevelNet:
    """A stand-in net that records its feeds; scores and deltas depend on each RoI row (level
    included), so a RoI sent to the wrong level gets different numbers."""

    def __init__(self, C=4):
        self.C, self.feeds = C, []
        self.device = torch.device("cpu")

    def forward(self, feed):
        self.feeds.append({k: v.clone() for k, v in feed.items()})
        r = feed["rois"].numpy().astype(np.float64)
        c = np.arange(self.C)
        logits = np.sin(0.013 * r[:, 1:2] * (c + 1) + 0.3 * r[:, 0:1] - 0.011 * r[:, 3:4] * c) * 3.0
        k = np.arange(4 * self.C)
        deltas = 0.2 * np.cos(0.017 * r[:, 2:3] * (k + 1) + 0.005 * r[:, 4:5] + 0.5 * r[:, 0:1])
        return {"cls_prob": torch.softmax(torch.from_numpy(logits), 1).float(),
                "bbox_pred": torch.from_numpy(deltas).float()}


def _original_im_detect(net, im, boxes, cfg):
    """The original ``im_detect`` from the transcribed pieces (the net's forward aside)."""
    data, scales = get_image_blob_test(im, cfg.TEST.SCALES, cfg.TEST.MAX_SIZE, cfg.PIXEL_MEANS, _resize)
    rois = get_rois_blob_test(boxes, scales)
    rois, index, inv_index = dedup_rois_test(rois, cfg.DEDUP_BOXES)
    boxes = boxes[index, :]
    out = net.forward({"data": torch.from_numpy(np.ascontiguousarray(data)), "rois": torch.from_numpy(rois)})
    scores = out["cls_prob"].numpy()
    deltas = out["bbox_pred"].numpy()
    pred = clip_boxes(bbox_transform_inv(boxes.astype(deltas.dtype), deltas), im.shape)
    return scores[inv_index, :], pred[inv_index, :], data, rois


def test_im_detect_with_the_papers_test_scales_equals_the_original():
    im = _image(150, 200, seed=4)  # factors 3.2, 3.84, 4.59, then 864 and 1000 both capped at 5.0
    cfg = _cfg(PAPER_TEST_SCALES, 1000)
    boxes = _boxes(400, 150, 200, seed=9)
    boxes = np.vstack([boxes, boxes[:30] + 0.2])  # near copies: dedup at 1/16 per level
    ours_net, ref_net = LevelNet(), LevelNet()
    scores, pred = T.im_detect(ours_net, im, boxes, cfg)
    ref_scores, ref_pred, ref_data, ref_rois = _original_im_detect(ref_net, im, boxes, cfg)
    feed = ours_net.feeds[0]
    assert tuple(feed["data"].shape) == ref_data.shape == (5, 3, 750, 1000)
    np.testing.assert_array_equal(feed["data"].numpy(), ref_data)
    np.testing.assert_array_equal(feed["rois"].numpy(), ref_rois)
    assert len(ref_rois) < len(boxes)  # dedup merged some
    assert set(np.unique(ref_rois[:, 0]).astype(int).tolist()) == {0, 1, 2, 3}  # 4: tied with 3
    np.testing.assert_array_equal(scores, ref_scores)
    np.testing.assert_array_equal(pred, ref_pred)
