"""im_detect / test_net: a stand-in net checked against plain-loop references, vis and progress,
and the original pipeline's result files reproduced with the tiny Caffe test net (fixture)."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from readonly_ohem.caffe import net as caffe_net
from readonly_ohem.detection import test as T
from readonly_ohem.config import default_config
from readonly_ohem.datasets import voc_eval
from readonly_ohem.progress import Progress
from readonly_ohem.detection.vis import draw_detections

from original_code import np_bbox_transform_inv, np_clip_boxes, py_cpu_nms
from box_reference import ref_transform_clip

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "original_test"
CLASSES = ("__background__", "cat", "dog", "person")


# -- a stand-in net: scores and deltas are fixed functions of each RoI --------------------------

def _logits(rois: np.ndarray, C: int) -> np.ndarray:
    r = rois.astype(np.float64)
    c = np.arange(C)
    return np.sin(0.013 * r[:, 1:2] * (c + 1) + 0.007 * r[:, 4:5] - 0.011 * r[:, 3:4] * c) * 3.0


def _deltas(rois: np.ndarray, C: int) -> np.ndarray:
    r = rois.astype(np.float64)
    k = np.arange(4 * C)
    return 0.2 * np.cos(0.017 * r[:, 2:3] * (k + 1) + 0.005 * r[:, 1:2])


class StandInNet:
    """Anything with ``forward(feed)`` returning 'cls_prob' and 'bbox_pred' will do."""

    def __init__(self, C=len(CLASSES)):
        self.C, self.feeds = C, []
        self.device = torch.device("cpu")

    def forward(self, feed):
        self.feeds.append({k: v.clone() for k, v in feed.items()})
        rois = feed["rois"].numpy()
        prob = torch.softmax(torch.from_numpy(_logits(rois, self.C)), 1).float()
        return {"cls_prob": prob, "bbox_pred": torch.from_numpy(_deltas(rois, self.C)).float()}


def test_detect_classes_equal_scores_follow_numpys_argsort():
    """Equal scores: the original visits ``scores.argsort()[::-1]`` (numpy's own default sort,
    not a stable one), which decides which of two overlapping equal-score boxes survives and the
    line order of the result files."""
    rng = np.random.default_rng(11)
    for trial in range(30):
        R, C = int(rng.integers(3, 60)), 2
        xy = rng.uniform(0, 40, size=(R, 2))
        boxes = np.hstack([xy, xy + rng.uniform(10, 30, size=(R, 2))]).astype(np.float32)
        scores = np.zeros((R, C), np.float32)
        scores[:, 1] = rng.choice([0.25, 0.5, 0.75], size=R)  # many ties
        got = T.detect_classes(scores, np.tile(boxes, (1, C)), C, 0.05, 0.3, 0)[1]
        dets = np.hstack((boxes, scores[:, 1:2])).astype(np.float32)
        ref = dets[py_cpu_nms(dets, 0.3)]
        np.testing.assert_array_equal(got, ref, err_msg=str(trial))


def _image(H, W, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


# -- dedup ---------------------------------------------------------------------------------------

def test_dedup_matches_plain_loop_in_hash_order():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 400, size=(30, 4))
    boxes = np.vstack([base, base[:10] + rng.uniform(-3, 3, size=(10, 4)), base[5:8]])
    rois = T.project_im_rois(boxes, np.array([1.5]))
    index, inv = T.dedup_rois(rois, 1 / 16)
    # reference: group rows by their rounded key, first row of each group, groups by hash value
    first = {}
    for r, row in enumerate(rois):
        key = tuple(np.round(row.astype(np.float32) * np.float32(1 / 16)).tolist())
        first.setdefault(key, r)
    keys = sorted(first, key=lambda k: k[0] + 1e3 * k[1] + 1e6 * k[2] + 1e9 * k[3] + 1e12 * k[4])
    assert index.tolist() == [first[k] for k in keys]
    for r, row in enumerate(rois):
        key = tuple(np.round(row * np.float32(1 / 16)).tolist())
        assert inv[r] == keys.index(key)
    assert len(index) < len(rois)  # the exact copies at least were merged


def test_project_im_rois_levels_for_several_scales():
    boxes = np.array([[0, 0, 9, 9], [0, 0, 299, 299]], np.float64)  # areas 100 and 90000
    rois = T.project_im_rois(boxes, np.array([2.0, 0.5]))
    # |100·4 - 224²| < |100/4 - 224²| -> level 0; |90000/4 - 224²| < |90000·4 - 224²| -> level 1
    np.testing.assert_array_equal(rois, np.array([[0, 0, 0, 18, 18], [1, 0, 0, 149.5, 149.5]], np.float32))


# -- im_detect ---------------------------------------------------------------------------------

def test_im_detect_dedup_transform_clip_against_plain_loops():
    cfg = default_config()
    H, W = 50, 100  # s = 600/50 = 12 -> 1200 > 1000 -> s = 1000/100 = 10
    im = _image(H, W)
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 80, size=(25, 2))
    boxes = np.hstack([xy, xy + rng.uniform(2, 40, size=(25, 2))])
    boxes = np.vstack([boxes, boxes[:6] + 0.3, boxes[2:4]])  # near (dedup at 1/16 of 10x) and exact copies
    boxes[0] = [-5, -5, 120, 60]  # predictions beyond the image get clipped
    net = StandInNet()
    scores, pred = T.im_detect(net, im, boxes, cfg)

    feed = net.feeds[0]
    assert tuple(feed["data"].shape) == (1, 3, 500, 1000)
    C = len(CLASSES)
    assert scores.shape == (len(boxes), C) and pred.shape == (len(boxes), 4 * C)
    rois = (boxes * 10.0).astype(np.float32)
    key = [tuple(np.round(r * np.float32(1 / 16)).tolist()) for r in rois]
    fed = feed["rois"].numpy()
    assert fed.dtype == np.float32 and len(fed) == len(set(key)) < len(boxes)  # copies scored once
    for r in range(len(boxes)):
        rep = key.index(key[r])  # the first proposal of the group speaks for all of it
        roi = np.hstack([[0.0], boxes[rep] * 10.0]).astype(np.float32)[None]
        logit = _logits(roi, C)[0]
        prob = np.exp(logit - logit.max()) / np.exp(logit - logit.max()).sum()
        np.testing.assert_allclose(scores[r], prob, rtol=1e-5, atol=1e-7)
        d32 = _deltas(roi, C).astype(np.float32)
        d = d32[0].astype(np.float64)
        for j in range(C):
            np.testing.assert_allclose(pred[r, 4 * j:4 * j + 4],
                                       ref_transform_clip(boxes[rep], d[4 * j:4 * j + 4], H, W),
                                       rtol=1e-5, atol=1e-4)
        # the original computes in float32 (boxes cast to the deltas' dtype): equal up to the
        # last bit of exp (numpy's and torch's float32 exp may differ by an ulp)
        orig = np_clip_boxes(np_bbox_transform_inv(boxes[rep][None], d32), (H, W, 3))
        assert orig.dtype == np.float32
        np.testing.assert_allclose(pred[r], orig[0], rtol=3e-7, atol=1e-5)  # 1 ulp at 100
    assert pred.dtype == np.float32
    assert pred[0, 0::4].min() == 0 and pred[0, 2::4].max() <= W - 1
    np.testing.assert_array_equal(pred[:, 1::2] <= H - 1, True)


def test_im_detect_scale_one_blob_is_image_minus_means_and_no_dedup_and_no_reg():
    cfg = default_config()
    cfg.set_key("TEST.SCALES", (60,))
    cfg.set_key("DEDUP_BOXES", 0.0)
    cfg.set_key("TEST.BBOX_REG", False)
    im = _image(60, 80, seed=1)
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 30, 40]], np.float64)
    net = StandInNet()
    scores, pred = T.im_detect(net, im, boxes, cfg)
    ref = im.astype(np.float32) - cfg.PIXEL_MEANS.reshape(1, 1, 3).astype(np.float32)
    np.testing.assert_allclose(net.feeds[0]["data"][0].permute(1, 2, 0).numpy(), ref, atol=1e-4)
    assert len(net.feeds[0]["rois"]) == 3  # no dedup
    np.testing.assert_array_equal(pred, np.tile(boxes, (1, len(CLASSES))))


def test_im_detect_no_proposals():
    scores, pred = T.im_detect(StandInNet(), _image(20, 20), np.zeros((0, 4)), default_config())
    assert scores.shape[0] == 0 and pred.shape[0] == 0


# -- per-class thresholding, NMS and the per-image cap ---------------------------------------------

def _ref_nms(dets, thresh):
    """Plain greedy NMS: descending score (ties: higher index first), +1 areas, drop IoU > thresh."""
    order = sorted(range(len(dets)), key=lambda i: (dets[i][4], i), reverse=True)
    keep = []
    for i in order:
        ok = True
        for k in keep:
            a, b = dets[i], dets[k]
            iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
            ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
            if iw > 0 and ih > 0:
                inter = np.float32(iw) * np.float32(ih)
                ua = ((a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
                      - inter)
                if inter / ua > np.float32(thresh):
                    ok = False
                    break
        if ok:
            keep.append(i)
    return keep


def _ref_detect(scores, boxes, C, thresh, nms_thresh, max_per_image):
    out = [np.zeros((0, 5), np.float32)] + [None] * (C - 1)
    for j in range(1, C):
        rows = [np.array([*boxes[r, 4 * j:4 * j + 4], scores[r, j]], np.float32)
                for r in range(len(scores)) if scores[r, j] > thresh]
        keep = _ref_nms(rows, nms_thresh)
        out[j] = np.array([rows[k] for k in keep], np.float32).reshape(-1, 5)
    all_scores = sorted(float(s) for j in range(1, C) for s in out[j][:, 4])
    if max_per_image > 0 and len(all_scores) > max_per_image:
        cut = all_scores[-max_per_image]
        out = [out[0]] + [o[o[:, 4] >= cut] for o in out[1:]]
    return out


@pytest.mark.parametrize("max_per_image", [0, 5, 12, 100])
def test_detect_classes_matches_plain_loop(max_per_image):
    rng = np.random.default_rng(max_per_image)
    R, C = 60, 5
    xy = rng.uniform(0, 50, size=(R, 2)).astype(np.float32)
    base = np.hstack([xy, xy + rng.uniform(5, 30, size=(R, 2)).astype(np.float32)])
    boxes = np.hstack([base + rng.normal(0, 2, size=(R, 4)).astype(np.float32) for _ in range(C)])
    scores = rng.dirichlet(np.ones(C) * 0.5, size=R).astype(np.float32)
    scores[3, 1] = scores[4, 1] = 0.05  # exactly at the threshold: not kept (strict)
    got = T.detect_classes(scores, boxes.astype(np.float64), C, 0.05, 0.3, max_per_image)
    ref = _ref_detect(scores, boxes, C, 0.05, 0.3, max_per_image)
    assert got[0].shape == (0, 5)
    total = 0
    for j in range(1, C):
        np.testing.assert_array_equal(got[j], ref[j])
        total += len(got[j])
        assert (got[j][:, 4] > np.float32(0.05)).all()
    if max_per_image:
        # ties at the cut may keep a few more, never fewer than available
        assert total >= min(max_per_image, sum(len(r) for r in _ref_detect(scores, boxes, C, 0.05, 0.3, 0)))


def test_detect_classes_cap_keeps_ties_at_the_cut():
    C = 3
    scores = np.array([[0, 0.9, 0.1], [0, 0.5, 0.5], [0, 0.2, 0.5]], np.float32)
    boxes = np.tile(np.array([[0, 0, 5, 5], [50, 50, 60, 60], [100, 100, 110, 110]], np.float64), (1, C))
    got = T.detect_classes(scores, boxes, C, 0.05, 0.3, 2)
    # scores 0.9, 0.5, 0.5, 0.5, 0.2, 0.1: the 2nd best is 0.5 -> every 0.5 stays
    assert sorted(got[1][:, 4].tolist()) == pytest.approx([0.5, 0.9])
    assert sorted(got[2][:, 4].tolist()) == pytest.approx([0.5, 0.5])


# -- test_net end to end with the stand-in net -----------------------------------------------------

class TinyImdb:
    name, year, image_set = "voc_2007_test", "2007", "test"
    classes = CLASSES

    def __init__(self, root: Path, n=3):
        self.image_index = [f"{i:06d}" for i in range(1, n + 1)]
        self.paths, self.boxes = [], []
        rng = np.random.default_rng(5)
        for i, idx in enumerate(self.image_index):
            p = root / f"{idx}.jpg"
            Image.fromarray(_image(90 + 10 * i, 120, seed=i)).save(p, quality=95)
            self.paths.append(str(p))
            xy = rng.uniform(0, 70, size=(40, 2))
            self.boxes.append(np.floor(np.hstack([xy, xy + rng.uniform(8, 40, size=(40, 2))])))

    @property
    def num_images(self):
        return len(self.image_index)

    def image_path_at(self, i):
        return self.paths[i]

    def proposal_boxes(self, i):
        return self.boxes[i]

    def annotations_at(self, i):
        b = self.boxes[i][0] + 1
        return [dict(name="cat", bbox=tuple(b), difficult=False, truncated=False),
                dict(name="person", bbox=(1, 1, 30, 30), difficult=True, truncated=False)]

    def evaluate_detections(self, all_boxes, output_dir):  # the imdb protocol's, as PascalVOC's
        return voc_eval.evaluate_detections(self, all_boxes, output_dir)


def test_test_net_writes_devkit_files_pngs_and_evaluates(tmp_path, capsys):
    imdb = TinyImdb(tmp_path)
    cfg = default_config()
    cfg.set_key("TEST.SCALES", (100,))
    out = tmp_path / "out"
    res = T.test_net(StandInNet(), imdb, cfg, max_per_image=10, thresh=0.05, output_dir=out, vis=2)
    assert sorted(p.name for p in out.glob("comp4_det_test_*.txt")) == \
        [f"comp4_det_test_{c}.txt" for c in ("cat", "dog", "person")]
    assert sorted(p.name for p in out.glob("*.png")) == ["000001_dets.png", "000002_dets.png"]
    # the files hold exactly all_boxes, 1-based, and at most 10 per image (no ties here)
    for j, c in enumerate(CLASSES[1:], 1):
        lines = (out / f"comp4_det_test_{c}.txt").read_text().splitlines()
        want = [f"{idx} {d[4]:.3f} {d[0] + 1:.1f} {d[1] + 1:.1f} {d[2] + 1:.1f} {d[3] + 1:.1f}"
                for i, idx in enumerate(imdb.image_index) for d in res["all_boxes"][j][i]]
        assert lines == want
    for i in range(imdb.num_images):
        assert sum(len(res["all_boxes"][j][i]) for j in range(1, 4)) <= 10
    # evaluation: the same as evaluating the files afterwards
    from readonly_ohem.datasets.voc_eval import evaluate_classes, read_results_dir
    annos = {imdb.image_index[i]: imdb.annotations_at(i) for i in range(imdb.num_images)}
    again = evaluate_classes(read_results_dir(out, "test"), annos, CLASSES[1:])
    assert res["eval"]["per_class"] == again["per_class"] and res["eval"]["metric"] == "voc07"
    text = capsys.readouterr()
    assert "images/s" in text.out and "mAP" in text.out
    assert "3/3" in text.err and "im/s" in text.err  # the progress line


# -- vis and progress ---------------------------------------------------------------------------

def test_draw_detections_png(tmp_path):
    im = np.full((120, 160, 3), 90, np.uint8)
    dets = {"cat": np.array([[10, 20, 80, 100, 0.93], [5, 5, 9, 9, 0.1]], np.float32),
            "dog": np.array([[60, 0, 150, 60, 0.55]], np.float32)}
    png = tmp_path / "vis" / "a.png"
    drawn = draw_detections(im, dets, png, classes=CLASSES)
    with Image.open(png) as saved:
        assert saved.format == "PNG" and saved.size == (160, 120)
        arr = np.asarray(saved.convert("RGB"))
    np.testing.assert_array_equal(arr, np.asarray(drawn))
    changed = (arr != 90).any(-1)
    assert 0.05 < changed.mean() < 0.6  # boxes and tags drawn, the image still visible
    assert not changed[5:10, 5:10].any()  # the 0.1 box is below the 0.3 threshold
    cat, dog = arr[60, 10], arr[30, 150]  # left edge of the cat box, right edge of the dog box
    assert tuple(cat) != tuple(dog) and tuple(cat) != (90, 90, 90) and tuple(dog) != (90, 90, 90)


def test_progress_lines_for_logs():
    buf = io.StringIO()
    with Progress(3, desc="test", stream=buf, log_interval=0.0) as bar:
        for _ in range(3):
            bar.update()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("test  1/3") and "im/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("test  3/3") and "done in" in lines[-1]
    assert len(lines) == 3  # 1/3, 2/3 while running, 3/3 once at the end


# -- the original pipeline's result files (fixture, part B) -----------------------------------------

def _read_lines(path):
    rows = {}
    for line in path.read_text().splitlines():
        p = line.split()
        rows.setdefault(p[0], []).append([float(x) for x in p[1:]])
    return rows


def test_fixture_result_files_match_the_original(tmp_path):
    net_mod = caffe_net
    from readonly_ohem.datasets import get_imdb

    cfg = default_config()
    net = net_mod.Net.from_file(str(FIX / "test.prototxt"), phase="TEST", cfg=cfg)
    net.load_caffemodel(str(FIX / "model.caffemodel"))
    imdb = get_imdb("voc_2007_test", FIX, FIX / "voc_2007_test.mat", cfg, cache_dir=False)
    res = T.test_net(net, imdb, cfg, max_per_image=100, thresh=0.05, output_dir=tmp_path)
    for path in sorted((FIX / "expected_results").glob("comp4_det_test_*.txt")):
        want, got = _read_lines(path), _read_lines(tmp_path / path.name)
        assert sorted(got) == sorted(want), path.name
        for image_id in want:
            w = np.array(sorted(want[image_id]))
            g = np.array(sorted(got[image_id]))
            assert w.shape == g.shape, (path.name, image_id)
            np.testing.assert_allclose(g[:, 0], w[:, 0], atol=0.001 + 1e-9, err_msg=path.name)
            np.testing.assert_allclose(g[:, 1:], w[:, 1:], atol=0.1 + 1e-9, err_msg=path.name)
    assert res["eval"]["mAP"] == pytest.approx(0.3070261437908497, abs=1e-6)
