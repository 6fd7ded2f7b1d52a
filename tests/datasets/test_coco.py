"""COCO-format imdbs (``datasets/coco.py``): categories, crowd-aware roidb against the original
COCO imdb (transcribed in ``tests/original_code.py``), proposals, flipping, cache, results json."""

import copy
import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from readonly_ohem.config import default_config
from readonly_ohem.datasets import cache, get_imdb
from readonly_ohem.datasets.coco import COCODataset
from readonly_ohem.datasets.proposals import save_proposals_mat
from readonly_ohem.errors import DataError
from readonly_ohem.ops.boxes import crowd_overlaps
from readonly_ohem.roi_data.minibatch import fg_bg_candidates
from readonly_ohem.roi_data.roidb import get_training_roidb

import original_code as orig

# images in a non-sorted id order; categories with non-contiguous json ids, not sorted either
IMAGES = [{"id": 42, "file_name": "a.jpg", "width": 60, "height": 40},
          {"id": 7, "file_name": "b.jpg", "width": 50, "height": 50},
          {"id": 100, "file_name": "c.jpg", "width": 30, "height": 30}]
CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}, {"id": 1, "name": "person"}]
ANNOTATIONS = [
    {"id": 1, "image_id": 42, "category_id": 18, "bbox": [10.6, 5.2, 20.3, 15.9], "area": 300, "iscrowd": 0},
    {"id": 2, "image_id": 42, "category_id": 1, "bbox": [30, 0, 30, 40], "area": 1200, "iscrowd": 1},
    {"id": 3, "image_id": 42, "category_id": 3, "bbox": [50, 30, 20, 20], "area": 400, "iscrowd": 0},
    {"id": 4, "image_id": 42, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 0, "iscrowd": 0},
    {"id": 5, "image_id": 42, "category_id": 18, "bbox": [-5, -3, 10, 8], "area": 80, "iscrowd": 0},
    {"id": 6, "image_id": 100, "category_id": 1, "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 0},
]
# 0-based [x1 y1 x2 y2] proposals by image id (the duplicate in "42" goes)
PROPOSALS = {
    "42": [[10, 5, 29, 20], [32, 2, 50, 30], [16, 0, 59, 39], [0, 0, 3, 3], [10, 5, 29, 20]],
    "7": [[1, 1, 20, 20], [5, 5, 40, 40]],
    "100": [[0, 0, 29, 29], [0, 0, 14, 29]],
}


def write_coco(root, annotations=ANNOTATIONS, images=IMAGES, categories=CATEGORIES):
    """The json in ``root/ann/instances.json``, the images in ``root/img``; returns the json."""
    (root / "ann").mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    for im in images:
        Image.fromarray(np.full((im["height"], im["width"], 3), 120, np.uint8)).save(root / "img" / im["file_name"])
    data = {"images": images, "categories": categories}
    if annotations is not None:
        data["annotations"] = annotations
    path = root / "ann" / "instances.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def coco_set(tmp_path):
    ann = write_coco(tmp_path)
    props = tmp_path / "props.npz"
    np.savez(props, **{k: np.array(v, float) for k, v in PROPOSALS.items()})
    return ann, props


def _imdb(coco_set, **kw):
    ann, props = coco_set
    return get_imdb(f"coco:{ann}", ann.parent.parent / "img", props, cache_dir=kw.pop("cache_dir", False))


def test_categories_images_and_ground_truth_by_hand(coco_set):
    imdb = _imdb(coco_set)
    assert imdb.name == "coco_instances" and imdb.classes == ("__background__", "dog", "car", "person")
    assert imdb.category_ids == [18, 3, 1] and imdb.image_ids == [42, 7, 100]
    assert imdb.image_index == ["42", "7", "100"] and imdb.has_gt()
    np.testing.assert_array_equal(imdb.image_sizes, [[60, 40], [50, 50], [30, 30]])
    assert imdb.image_path_at(2).endswith("img/c.jpg")
    gt = imdb.gt_roidb()
    # x1 = max(0, x), x2 = min(W - 1, x1 + max(0, w - 1)), floored; area 0 dropped; the box at
    # (-5, -3) keeps its width from the clamped corner (the original's rule)
    np.testing.assert_array_equal(gt[0]["boxes"], [[10, 5, 29, 20], [30, 0, 59, 39], [50, 30, 59, 39], [0, 0, 9, 7]])
    assert gt[0]["gt_classes"].tolist() == [1, 3, 2, 1] and gt[0]["is_crowd"].tolist() == [False, True, False, False]
    np.testing.assert_array_equal(gt[0]["gt_overlaps"].toarray(),
                                  [[0, 1, 0, 0], [-1, -1, -1, -1], [0, 0, 1, 0], [0, 1, 0, 0]])
    assert gt[1]["boxes"].shape == (0, 4) and gt[1]["gt_overlaps"].shape == (0, 4)
    np.testing.assert_array_equal(gt[2]["boxes"], [[0, 0, 29, 29]])


def test_roidb_equals_the_original_coco_imdb(coco_set):
    """Ours against the original's ``_load_coco_annotation`` + ``create_roidb_from_box_list`` +
    ``merge_roidbs`` + ``_filter_crowd_proposals`` (pycocotools' crowd IoU) on the same boxes."""
    pytest.importorskip("pycocotools", reason="the original's crowd filter calls pycocotools.mask.iou")
    imdb = _imdb(coco_set)
    cat_to_ind = {18: 1, 3: 2, 1: 3}
    by_image = {im["id"]: [copy.deepcopy(a) for a in ANNOTATIONS if a["image_id"] == im["id"]] for im in IMAGES}
    gt = [orig.load_coco_annotation(im, by_image[im["id"]], 4, cat_to_ind) for im in IMAGES]
    box_list = [imdb.proposal_boxes(i).astype(np.uint16) for i in range(3)]
    theirs = orig.filter_crowd_proposals(
        orig.merge_roidbs(gt, orig.create_roidb_from_box_list(box_list, gt, 4)), 0.7)
    for ours, ref in zip(imdb.roidb, theirs):
        np.testing.assert_array_equal(ours["boxes"], ref["boxes"].astype(np.float64))
        np.testing.assert_array_equal(ours["gt_classes"], ref["gt_classes"])
        np.testing.assert_array_equal(ours["gt_overlaps"].toarray(), ref["gt_overlaps"].toarray())
    ov = imdb.roidb[0]["gt_overlaps"].toarray()
    # rows: 4 gt, then the proposals: the dog itself, one inside the crowd (excluded), one
    # around it (IoU 1200/1760 with the crowd: its class, the original's rule), a corner box
    np.testing.assert_array_equal(ov[4], [0, 1, 0, 0])
    np.testing.assert_array_equal(ov[5], [-1, -1, -1, -1])
    np.testing.assert_allclose(ov[6], [0, 0, 0, np.float32(1200 / 1760)], rtol=0)
    np.testing.assert_allclose(ov[7], [0, np.float32(16 / 80), 0, 0], rtol=0)
    assert imdb.roidb[2]["gt_overlaps"].toarray()[2, 3] == np.float32(0.5)


def test_crowd_overlaps_equals_pycocotools_iscrowd_iou():
    mask = pytest.importorskip("pycocotools.mask")
    rng = np.random.RandomState(0)
    xy = rng.randint(0, 50, (40, 2))
    boxes = np.hstack([xy, xy + rng.randint(0, 30, (40, 2))]).astype(np.float64)
    crowd = boxes[:7]
    ours = crowd_overlaps(boxes, crowd)
    theirs = mask.iou(orig.xyxy_to_xywh(boxes), orig.xyxy_to_xywh(crowd), [1] * 7)
    np.testing.assert_array_equal(ours, theirs)
    assert ours[0, 0] == 1.0 and crowd_overlaps(np.zeros((0, 4)), crowd).shape == (0, 7)
    # by hand: a 4x4 box half inside a 10x10 crowd region -> 0.5 (the union would say 8/108)
    np.testing.assert_array_equal(crowd_overlaps(np.array([[8.0, 0, 11, 3]]), np.array([[0.0, 0, 9, 9]])), [[0.5]])


def test_flipping_and_sampling_leave_crowds_out(coco_set):
    imdb = _imdb(coco_set)
    cfg = default_config()
    cfg.TRAIN.BG_THRESH_LO = 0.0  # the OHEM config: every non-fg RoI would be a candidate
    roidb = get_training_roidb(imdb, cfg)
    assert len(roidb) == 6 and [e["flipped"] for e in roidb] == [False] * 3 + [True] * 3
    flipped = roidb[3]
    np.testing.assert_array_equal(flipped["boxes"][1], [60 - 59 - 1, 0, 60 - 30 - 1, 39])  # the crowd
    np.testing.assert_array_equal(flipped["gt_overlaps"].toarray(), roidb[0]["gt_overlaps"].toarray())
    for e in (roidb[0], flipped):
        assert e["max_overlaps"].tolist()[1] == -1 and e["max_overlaps"].tolist()[5] == -1
        fg, bg = fg_bg_candidates(e, cfg)
        assert fg.tolist() == [0, 2, 3, 4, 6] and bg.tolist() == [7]  # rows 1 and 5: neither


def test_proposals_mat_npz_json_and_top_k(coco_set, tmp_path):
    ann, npz = coco_set
    ref = [_imdb(coco_set).proposal_boxes(i) for i in range(3)]
    assert [r.shape[0] for r in ref] == [4, 2, 2]
    mat = tmp_path / "p.mat"
    save_proposals_mat(mat, [np.array(PROPOSALS[k], float) for k in ("42", "7", "100")])  # image order
    js = tmp_path / "p.json"
    js.write_text(json.dumps(PROPOSALS))
    for path in (mat, js):
        imdb = get_imdb(f"coco:{ann}", tmp_path / "img", path, cache_dir=False)
        for i in range(3):
            np.testing.assert_array_equal(imdb.proposal_boxes(i), ref[i])
    top = COCODataset(ann, tmp_path / "img", "coco_top", proposals=npz, cache_dir=False, top_k=3)
    np.testing.assert_array_equal(top.proposal_boxes(0), ref[0][:3])


def test_named_layout_views_and_default_proposals(tmp_path):
    root = tmp_path / "data" / "coco"
    ann = write_coco(tmp_path / "src")
    (root / "annotations").mkdir(parents=True)
    shutil.copy(ann, root / "annotations" / "instances_minival2014.json")
    shutil.copytree(tmp_path / "src" / "img", root / "images" / "val2014")  # minival reads val2014
    save_proposals_mat(tmp_path / "data" / "selective_search_data" / "coco_2014_minival.mat",
                       [np.array(PROPOSALS[k], float) for k in ("42", "7", "100")])
    imdb = get_imdb("coco_2014_minival", tmp_path / "data", cache_dir=False)
    assert imdb.name == "coco_2014_minival" and imdb.results_tag == "minival2014"
    assert imdb.image_path_at(0) == str(root / "images" / "val2014" / "a.jpg")
    assert imdb.proposal_boxes(0).shape == (4, 4)
    # a test split reads image_info_<split><year>.json: no annotations, proposals-only roidb
    write_coco(tmp_path / "t", annotations=None)
    (tmp_path / "t" / "annotations").mkdir()
    shutil.move(tmp_path / "t" / "ann" / "instances.json", tmp_path / "t" / "annotations" / "image_info_test-dev2015.json")
    shutil.move(tmp_path / "t" / "img", tmp_path / "t" / "test2015")
    test = get_imdb("coco_2015_test-dev", tmp_path / "t", tmp_path / "data" / "selective_search_data" /
                    "coco_2014_minival.mat", cache_dir=False)
    assert not test.has_gt() and test.roidb[0]["gt_classes"].tolist() == [0] * 4
    assert test.roidb[0]["gt_overlaps"].nnz == 0


def test_roidb_cache_round_trip_and_keys(coco_set, tmp_path):
    ann, props = coco_set
    cdir = tmp_path / "cache"
    a = _imdb(coco_set, cache_dir=cdir).roidb
    (npz,) = cdir.glob("coco_instances_*_roidb.npz")
    b = cache.load(_imdb(coco_set, cache_dir=cdir))
    assert b is not None
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["gt_overlaps"].toarray(), y["gt_overlaps"].toarray())
        np.testing.assert_array_equal(x["boxes"], y["boxes"])
        assert (x["width"], x["height"], x["image_id"]) == (y["width"], y["height"], y["image_id"])
    assert (b[0]["gt_overlaps"].toarray() == -1).all(axis=1).tolist() == [False, True, False, False, False, True, False, False]
    st = ann.stat()  # the json changes: stale
    os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.load(_imdb(coco_set, cache_dir=cdir)) is None
    _ = _imdb(coco_set, cache_dir=cdir).roidb
    other = COCODataset(ann, ann.parent.parent / "img", "coco_instances", proposals=props,
                        cache_dir=cdir, crowd_thresh=0.9)  # another crowd threshold: another file
    assert cache.load(other) is None
    assert (other.roidb[0]["gt_overlaps"].toarray()[5] == -1).all()  # 1.0 > 0.9 still
    assert len(list(cdir.glob("coco_instances_*_roidb.npz"))) == 2


def test_results_json_converts_boxes_and_ids_as_the_original(coco_set, tmp_path):
    imdb = _imdb(coco_set)
    rng = np.random.RandomState(1)
    all_boxes = [[np.zeros((0, 5), np.float32) for _ in range(3)] for _ in range(4)]
    all_boxes[1][0] = np.array([[10, 20, 30, 60, 0.9]], np.float32)
    all_boxes[3][2] = np.hstack([rng.uniform(0, 20, (3, 2)), rng.uniform(20, 29, (3, 2)),
                                 rng.uniform(0, 1, (3, 1))]).astype(np.float32)
    results = imdb.coco_results(all_boxes)
    assert results[0] == {"image_id": 42, "category_id": 18, "bbox": [10.0, 20.0, 21.0, 41.0],
                          "score": float(np.float32(0.9))}
    theirs = [r for j, cat in enumerate(imdb.category_ids, 1)
              for r in orig.coco_results_one_category(all_boxes[j], cat, imdb.image_ids)]
    assert json.loads(json.dumps(results)) == json.loads(json.dumps(theirs, default=float))
    r = imdb.evaluate_detections(all_boxes, tmp_path / "out")
    path = tmp_path / "out" / "detections_instances_results.json"
    assert r["results_at"] == str(path) and json.loads(path.read_text()) == json.loads(json.dumps(results))
    assert set(r["result_files"]) == {"dog", "car", "person"}


def test_without_pycocotools_the_results_are_written_and_the_extra_named(coco_set, tmp_path, monkeypatch):
    for module in ("pycocotools", "pycocotools.coco", "pycocotools.cocoeval"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    imdb = _imdb(coco_set)
    all_boxes = [[np.zeros((0, 5), np.float32) for _ in range(3)] for _ in range(4)]
    r = imdb.evaluate_detections(all_boxes, tmp_path / "out")
    assert r["eval"] is None and "pip install 'readonly-ohem[coco]'" in r["report"]
    assert json.loads((tmp_path / "out" / "detections_instances_results.json").read_text()) == []


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][0].update(category_id=99), r"annotation 1 \(image 42\): category_id 99 is not among"),
    (lambda d: d["annotations"][0].update(image_id=5), r"annotation 1: image_id 5 is not among the images"),
    (lambda d: d["annotations"][2].pop("area"), r"annotations\[2\] lacks 'area'"),
    (lambda d: d["images"][1].pop("width"), r"images\[1\] lacks 'width'"),
    (lambda d: d["categories"].append({"id": 5, "name": "dog"}), "two categories share a name or an id"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2]), r"annotation 1 \(image 42\): bbox \[1, 2\] is not"),
    (lambda d: d["annotations"][1].update(area="big"), r"annotation 2 \(image 42\): area 'big' is not a number"),
    (lambda d: d.pop("categories"), "not a COCO json"),
])
def test_bad_json_names_file_and_item(tmp_path, edit, message):
    data = {"images": copy.deepcopy(IMAGES), "categories": copy.deepcopy(CATEGORIES),
            "annotations": copy.deepcopy(ANNOTATIONS)}
    edit(data)
    write_coco(tmp_path)
    ann = tmp_path / "ann" / "instances.json"
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"{ann}: .*{message}" if "json" in message else message) as e:
        get_imdb(f"coco:{ann}", tmp_path / "img", cache_dir=False).gt_roidb()
    assert str(ann) in str(e.value)


def test_missing_files_are_one_line_errors(coco_set, tmp_path):
    ann, _ = coco_set
    with pytest.raises(DataError, match=r"a.jpg: image file not found .*give their folder with --images DIR"):
        get_imdb(f"coco:{ann}", cache_dir=False)  # images default to the json's folder
    with pytest.raises(DataError, match="nothing.json: annotation file not found"):
        get_imdb(f"coco:{tmp_path / 'nothing.json'}", tmp_path / "img")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(DataError, match="bad.json: cannot read COCO json"):
        get_imdb(f"coco:{bad}", tmp_path / "img")
    with pytest.raises(DataError, match=r"no proposals for coco_instances: .*pass the file with --proposals"):
        _ = get_imdb(f"coco:{ann}", tmp_path / "img", cache_dir=False).roidb


def test_combined_coco_sets_train_together_and_are_evaluated_one_at_a_time(coco_set, tmp_path):
    ann, props = coco_set
    other = tmp_path / "ann" / "other.json"
    shutil.copy(ann, other)
    (tmp_path / "props").mkdir()  # one proposals file cannot serve two sets: a directory, by name
    shutil.copy(props, tmp_path / "props" / "coco_instances.npz")
    shutil.copy(props, tmp_path / "props" / "coco_other.npz")
    both = get_imdb(f"coco:{ann}+coco:{other}", tmp_path / "img", tmp_path / "props", cache_dir=False)
    assert [p.name for p in both.parts] == ["coco_instances", "coco_other"] and len(both.roidb) == 6
    all_boxes = [[np.zeros((0, 5), np.float32) for _ in range(6)] for _ in range(4)]
    with pytest.raises(DataError, match="COCO sets are evaluated one at a time"):
        both.evaluate_detections(all_boxes, tmp_path / "out")
