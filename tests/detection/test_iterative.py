"""+B: the R2 pass and weighted box voting on hand-worked cases, against plain loops, and
through test_net."""

import numpy as np
import pytest
import torch

from readonly_ohem.config import default_config
from readonly_ohem.detection import iterative as B
from readonly_ohem.detection import test as T
from readonly_ohem.errors import ConfigError

from original_code import py_cpu_nms


def det(x1, y1, x2, y2, s):
    return np.array([x1, y1, x2, y2, s], np.float32)


# -- box voting by hand ----------------------------------------------------------------------------

def test_voting_of_two_boxes():
    """Kept [0,0,9,9] (0.8) and a neighbour [2,0,11,9] (0.2): intersection 8x10 = 80, union
    100 + 100 - 80 = 120, IoU 2/3 >= 0.5, so the box becomes (0.8 b + 0.2 b') / 1.0 =
    [0.4, 0, 9.4, 9]; its score stays 0.8. A far box (IoU 0) does not vote."""
    kept = det(0, 0, 9, 9, 0.8)[None]
    pool = np.stack([det(0, 0, 9, 9, 0.8), det(2, 0, 11, 9, 0.2), det(30, 30, 39, 39, 0.9)])
    out = B.box_voting(kept, pool, 0.5)
    np.testing.assert_allclose(out, [[0.4, 0, 9.4, 9, 0.8]], rtol=0, atol=1e-6)
    assert out.dtype == np.float32


def test_voting_at_exactly_the_threshold_counts():
    """[0,0,9,9] and [0,0,19,9]: intersection 100, union 200, IoU exactly 0.5 -> votes (>=);
    x2 = (0.6 * 9 + 0.4 * 19) / 1.0 = 13. At a threshold just above 0.5 it does not."""
    kept = det(0, 0, 9, 9, 0.6)[None]
    pool = np.stack([det(0, 0, 9, 9, 0.6), det(0, 0, 19, 9, 0.4)])
    np.testing.assert_allclose(B.box_voting(kept, pool, 0.5), [[0, 0, 13, 9, 0.6]], atol=1e-6)
    np.testing.assert_array_equal(B.box_voting(kept, pool, 0.5000001), kept)


def test_a_box_with_no_neighbours_keeps_its_coordinates():
    kept = np.stack([det(0, 0, 9, 9, 0.7), det(50, 50, 70, 60, 0.3)])
    pool = np.vstack([kept, det(100, 100, 120, 120, 0.9)[None]])
    np.testing.assert_array_equal(B.box_voting(kept, pool, 0.5), kept)  # each votes for itself only
    # voters that all weigh 0 (a non-positive score, e.g. SVM scores): unchanged, no 0/0
    zero = np.stack([det(0, 0, 9, 9, 0.0), det(1, 0, 10, 9, -0.5)])
    np.testing.assert_array_equal(B.box_voting(zero[:1], zero, 0.5), zero[:1])
    assert B.box_voting(np.zeros((0, 5), np.float32), pool, 0.5).shape == (0, 5)


def _ref_voting(kept, pool, t):
    """Plain loop, float64: MR-CNN's ``apply_bbox_voting`` with weights max(score, 0)."""
    out = kept.astype(np.float64).copy()
    for k in range(len(kept)):
        num, den = np.zeros(4), 0.0
        for n in range(len(pool)):
            a, b = kept[k].astype(np.float64), pool[n].astype(np.float64)
            iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
            ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
            if iw <= 0 or ih <= 0:
                continue
            inter = iw * ih
            union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
            iou = inter / union
            if iou >= t:
                w = max(b[4], 0.0)
                num += w * b[:4]
                den += w
        if den > 0:
            out[k, :4] = num / den
    return out


def test_voting_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 60, size=(80, 2))
    pool = np.hstack([xy, xy + rng.uniform(5, 30, size=(80, 2)), rng.uniform(-0.1, 1, (80, 1))])
    pool = pool.astype(np.float32)
    kept = pool[py_cpu_nms(pool, 0.3)]
    for t in (0.3, 0.5, 0.8):
        np.testing.assert_allclose(B.box_voting(kept, pool, t), _ref_voting(kept, pool, t),
                                   rtol=1e-6, atol=1e-4)


# -- the R2 pass ------------------------------------------------------------------------------------

def test_second_pass_rois_are_the_regressed_boxes_of_high_scores():
    # 2 proposals, 3 classes: (r0, c1) 0.6 and (r1, c1) 0.7, (r1, c2) 0.2; thresh 0.5 (strict)
    scores = np.array([[0.4, 0.6, 0.0], [0.1, 0.7, 0.2]], np.float32)
    pred = np.arange(24, dtype=np.float32).reshape(2, 12)
    cls, rois = B.second_pass_rois(scores, pred, 0.5)
    np.testing.assert_array_equal(cls, [1, 1])
    np.testing.assert_array_equal(rois, [pred[0, 4:8], pred[1, 4:8]])
    cls, rois = B.second_pass_rois(scores, pred, 0.1)  # background (class 0) never goes
    np.testing.assert_array_equal(cls, [1, 1, 2])
    np.testing.assert_array_equal(rois, [pred[0, 4:8], pred[1, 4:8], pred[1, 8:12]])
    cls, rois = B.second_pass_rois(scores, pred, 0.6)  # exactly at the threshold: not re-scored
    np.testing.assert_array_equal(cls, [1])


def test_iterative_bbox_reg_feeds_the_r1_boxes_and_takes_each_its_class():
    scores = np.array([[0.1, 0.8, 0.1], [0.2, 0.1, 0.7], [0.9, 0.05, 0.05]], np.float32)
    pred = np.array([[0, 0, 9, 9, 1, 1, 10, 10, 2, 2, 11, 11],
                     [5, 5, 20, 20, 6, 6, 21, 21, 7, 7, 22, 22],
                     [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1]], np.float32)
    seen = []

    def detect(boxes):  # re-scoring: class scores from the box, deltas moving it by +100 per class
        seen.append(boxes.copy())
        s = np.tile(np.array([[0.3, 0.5, 0.2]], np.float32), (len(boxes), 1)) + boxes[:, :1] / 1000
        b = np.hstack([boxes + 100 * c for c in range(3)]).astype(np.float32)
        return s.astype(np.float32), b

    r2 = B.iterative_bbox_reg(detect, scores, pred, 0.5)
    # the RoIs of the second pass are the R1 boxes regressed for their class: (r0, c1), (r1, c2)
    np.testing.assert_array_equal(seen[0], [[1, 1, 10, 10], [7, 7, 22, 22]])
    assert seen[0].dtype == np.float64
    np.testing.assert_array_equal(r2.cls, [1, 2])
    np.testing.assert_allclose(r2.scores, [0.5 + 0.001, 0.2 + 0.007], rtol=1e-6)
    np.testing.assert_array_equal(r2.boxes, [[101, 101, 110, 110], [207, 207, 222, 222]])
    # nothing above the threshold: no forward at all
    empty = B.iterative_bbox_reg(detect, scores, pred, 0.95)
    assert len(seen) == 1 and empty.cls.shape == (0,) and empty.boxes.shape == (0, 4)


def test_config_checks():
    cfg = default_config()
    B.check_config(cfg)  # off by default
    cfg.set_key("TEST.ITER_BBOX_REG", True)
    cfg.set_key("TEST.BBOX_REG", False)
    with pytest.raises(ConfigError, match="TEST.ITER_BBOX_REG needs TEST.BBOX_REG"):
        B.check_config(cfg)
    cfg = default_config()
    cfg.set_key("TEST.BBOX_VOTE", True)
    cfg.set_key("TEST.BBOX_VOTE_THRESH", 0.0)
    with pytest.raises(ConfigError, match="TEST.BBOX_VOTE_THRESH"):
        B.check_config(cfg)


# -- detect_classes with R2 and voting, against a plain loop -----------------------------------------

def _ref_detect_b(scores, pred, second, C, thresh, nms, max_per_image, vote):
    out = [np.zeros((0, 5), np.float32)]
    for j in range(1, C):
        rows = [det(*pred[r, 4 * j:4 * j + 4], scores[r, j])
                for r in range(len(scores)) if scores[r, j] > thresh]
        rows += [det(*second.boxes[m], second.scores[m]) for m in range(len(second.cls))
                 if second.cls[m] == j and second.scores[m] > thresh]
        cand = np.array(rows, np.float32).reshape(-1, 5)
        kept = cand[py_cpu_nms(cand, nms)] if len(cand) else cand
        out.append(_ref_voting(kept, cand, vote).astype(np.float32) if vote else kept)
    s = np.sort(np.hstack([o[:, 4] for o in out[1:]]))
    if max_per_image and len(s) > max_per_image:
        out = [out[0]] + [o[o[:, 4] >= s[-max_per_image]] for o in out[1:]]
    return out


@pytest.mark.parametrize("vote", [None, 0.5])
def test_detect_classes_with_r2_and_voting_matches_a_plain_loop(vote):
    rng = np.random.default_rng(7)
    R, C, M = 50, 4, 30
    xy = rng.uniform(0, 50, size=(R, 2))
    base = np.hstack([xy, xy + rng.uniform(5, 30, size=(R, 2))])
    pred = np.hstack([base + rng.normal(0, 2, size=(R, 4)) for _ in range(C)]).astype(np.float32)
    scores = rng.dirichlet(np.ones(C) * 0.5, size=R).astype(np.float32)
    cls = rng.integers(1, C, M)
    second = B.SecondPass(cls, rng.uniform(0, 1, M).astype(np.float32),
                          (base[rng.integers(0, R, M)] + rng.normal(0, 2, (M, 4))).astype(np.float32))
    for max_per_image in (0, 8):
        got = T.detect_classes(scores, pred, C, 0.05, 0.3, max_per_image, second, vote)
        ref = _ref_detect_b(scores, pred, second, C, 0.05, 0.3, max_per_image, vote)
        for j in range(C):
            np.testing.assert_allclose(got[j], ref[j], rtol=1e-6, atol=1e-4, err_msg=f"class {j}")
    # without R2 and voting the original path: unchanged; an empty R2 changes nothing
    plain = T.detect_classes(scores, pred, C, 0.05, 0.3, 0)
    empty = B.SecondPass(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, 4), np.float32))
    for a, b in zip(plain, T.detect_classes(scores, pred, C, 0.05, 0.3, 0, empty)):
        np.testing.assert_array_equal(a, b)
    for j in range(1, C):
        cand = np.hstack([pred[:, 4 * j:4 * j + 4], scores[:, j:j + 1]])[scores[:, j] > 0.05]
        np.testing.assert_array_equal(plain[j], cand[py_cpu_nms(cand, 0.3)])


# -- through test_net: the second forward's RoIs are the regressed R1 boxes ---------------------------

class RecordingNet:
    """Scores and deltas as fixed functions of each RoI; records the feeds."""

    def __init__(self, C=3):
        self.C, self.feeds = C, []
        self.device = torch.device("cpu")

    def forward(self, feed):
        self.feeds.append({k: v.clone() for k, v in feed.items()})
        r = feed["rois"].numpy().astype(np.float64)
        c = np.arange(self.C)
        logits = np.sin(0.05 * r[:, 1:2] * (c + 1) - 0.03 * r[:, 4:5] * c) * 3.0
        deltas = 0.1 * np.cos(0.02 * r[:, 2:3] * (np.arange(4 * self.C) + 1))
        return {"cls_prob": torch.softmax(torch.from_numpy(logits), 1).float(),
                "bbox_pred": torch.from_numpy(deltas).float()}


class OneImageImdb:
    name, classes = "one", ("__background__", "a", "b")

    def __init__(self, path, boxes):
        self.path, self.boxes, self.image_index = path, boxes, ["000001"]

    num_images = 1

    def image_path_at(self, i):
        return self.path

    def proposal_boxes(self, i):
        return self.boxes

    def evaluate_detections(self, all_boxes, output_dir):
        return {"results_at": str(output_dir), "report": "", "result_files": {}, "eval": None}


def test_test_net_with_b_runs_r2_on_the_regressed_boxes_and_votes(tmp_path):
    from PIL import Image

    im = np.random.default_rng(1).integers(0, 256, size=(80, 100, 3), dtype=np.uint8)
    Image.fromarray(im[:, :, ::-1]).save(tmp_path / "a.png")  # stored RGB, read back as BGR
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 60, size=(60, 2))
    boxes = np.floor(np.hstack([xy, xy + rng.uniform(8, 35, size=(60, 2))]))
    imdb = OneImageImdb(str(tmp_path / "a.png"), boxes)
    cfg = default_config()
    cfg.set_key("TEST.SCALES", (100,))
    cfg.set_key("DEDUP_BOXES", 0.0)
    plain_net = RecordingNet()
    plain = T.test_net(plain_net, imdb, cfg, max_per_image=0, thresh=0.05, output_dir=tmp_path / "p")
    assert len(plain_net.feeds) == 1

    cfg.set_key("TEST.ITER_BBOX_REG", True)
    cfg.set_key("TEST.ITER_BBOX_REG_THRESH", 0.3)
    cfg.set_key("TEST.BBOX_VOTE", True)
    net = RecordingNet()
    res = T.test_net(net, imdb, cfg, max_per_image=0, thresh=0.05, output_dir=tmp_path / "b")
    assert len(net.feeds) == 2  # R1, then one R2 forward for every class
    bgr = im  # PNG is lossless
    scores, pred = T.im_detect(RecordingNet(), bgr, boxes, cfg)
    cls, r1_boxes = B.second_pass_rois(scores, pred, 0.3)
    assert len(cls) > 0
    s = cfg.TEST.SCALES[0] / 80
    np.testing.assert_array_equal(net.feeds[1]["rois"].numpy(), T.project_im_rois(r1_boxes, np.array([s])))
    second = B.iterative_bbox_reg(lambda b: T.im_detect(RecordingNet(), bgr, b, cfg), scores, pred, 0.3)
    want = T.detect_classes(scores, pred, 3, 0.05, 0.3, 0, second, 0.5)
    for j in (1, 2):
        np.testing.assert_array_equal(res["all_boxes"][j][0], want[j])
    # +B changed the detections (more candidates, voted boxes)
    assert any(not np.array_equal(res["all_boxes"][j][0], plain["all_boxes"][j][0]) for j in (1, 2))


def test_test_net_rejects_r2_without_bbox_reg(tmp_path):
    cfg = default_config()
    cfg.set_key("TEST.ITER_BBOX_REG", True)
    cfg.set_key("TEST.BBOX_REG", False)
    with pytest.raises(ConfigError, match="ITER_BBOX_REG"):
        T.test_net(RecordingNet(), OneImageImdb("x", np.zeros((0, 4))), cfg, output_dir=tmp_path)
