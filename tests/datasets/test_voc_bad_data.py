"""Bad data gives a DataError naming the file; proposals clean-up rules by hand."""

import json
import shutil
import warnings

import numpy as np
import pytest
import scipy.io

from readonly_ohem.config import default_config
from readonly_ohem.datasets import get_imdb
from readonly_ohem.datasets.voc_eval import parse_voc_xml
from readonly_ohem.datasets.proposals import clean_proposals, load_proposals, save_proposals_mat
from readonly_ohem.errors import ConfigError, DataError


@pytest.fixture
def voc(fixtures_dir, tmp_path):
    """A writable copy of the original-pipeline fixture dataset, proposals in the original layout."""
    src = fixtures_dir / "original_pipeline" / "train"
    shutil.copytree(src / "VOCdevkit", tmp_path / "VOCdevkit")
    (tmp_path / "selective_search_data").mkdir()
    shutil.copy(src / "voc_2007_trainval.mat", tmp_path / "selective_search_data" / "voc_2007_trainval.mat")
    return tmp_path


def ann(root, i):
    return root / "VOCdevkit" / "VOC2007" / "Annotations" / f"{i}.xml"


def test_default_locations(voc):
    for d in (voc, voc / "VOCdevkit", voc / "VOCdevkit" / "VOC2007"):
        imdb = get_imdb("voc_2007_trainval", d, cache_dir=False)
        assert imdb.num_images == 6 and imdb.classes[0] == "__background__" and imdb.num_classes == 21
        assert imdb.proposal_boxes(0).shape[1] == 4


def test_missing_annotation(voc):
    ann(voc, "000102").unlink()
    with pytest.raises(DataError, match="000102.xml"):
        get_imdb("voc_2007_trainval", voc, cache_dir=False).gt_roidb()


def test_malformed_xml(voc):
    ann(voc, "000103").write_text("<annotation><object><name>cat</name>")
    with pytest.raises(DataError, match="000103.xml.*malformed"):
        parse_voc_xml(ann(voc, "000103"))


def test_bad_number_in_xml(voc):
    p = ann(voc, "000101")
    p.write_text(p.read_text().replace("<xmin>", "<xmin>abc", 1))
    with pytest.raises(DataError, match="000101.xml.*xmin"):
        parse_voc_xml(p)


def test_unknown_class(voc):
    p = ann(voc, "000105")
    objs = parse_voc_xml(p)
    p.write_text(p.read_text().replace(f"<name>{objs[0]['name']}</name>", "<name>unicorn</name>", 1))
    with pytest.raises(DataError, match="000105.xml.*unicorn"):
        get_imdb("voc_2007_trainval", voc, cache_dir=False).gt_roidb()


def test_missing_image(voc):
    (voc / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000106.jpg").unlink()
    with pytest.raises(DataError, match="000106.jpg"):
        _ = get_imdb("voc_2007_trainval", voc, cache_dir=False).roidb


def test_missing_devkit_and_image_set(tmp_path, voc):
    with pytest.raises(DataError, match="VOC2007"):
        get_imdb("voc_2007_trainval", tmp_path / "nowhere")
    with pytest.raises(DataError, match="test.txt"):
        get_imdb("voc_2007_test", voc)
    with pytest.raises(DataError, match="unknown imdb"):
        get_imdb("kitti_2012_train", voc)
    with pytest.raises(DataError, match="no COCO annotations for coco_2014_train"):
        get_imdb("coco_2014_train", voc)


def test_proposals_wrong_number_of_images(voc, tmp_path):
    bad = tmp_path / "five.mat"
    save_proposals_mat(bad, [np.array([[0, 0, 10, 10]])] * 5)
    with pytest.raises(DataError, match="five.mat.*5 images.*6"):
        _ = get_imdb("voc_2007_trainval", voc, proposals=bad, cache_dir=False).roidb


def test_nan_and_inverted_boxes_dropped_with_count(tmp_path):
    boxes = np.array([[0, 0, 10, 10], [np.nan, 0, 5, 5], [10, 0, 5, 5], [0, 0, 20, 20], [1, 1, 9, 9]], float)
    f = tmp_path / "p.npz"
    np.savez(f, a=boxes, b=boxes[[0, 2]])
    with pytest.warns(UserWarning, match=r"p.npz: dropped 3 proposal\(s\).*in 2 image"):
        out = load_proposals(f, ["a", "b"])
    np.testing.assert_array_equal(out[0], boxes[[0, 3, 4]])
    np.testing.assert_array_equal(out[1], boxes[[0]])


def test_image_without_proposals(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"a": [[0, 0, 10, 10]], "b": [[0, 0, 1, 1]]}))
    with pytest.raises(DataError, match="p.json.*'b' has no proposals"):
        load_proposals(f, ["a", "b"])
    with pytest.raises(DataError, match="p.json.*no proposals for 1 image"):
        load_proposals(f, ["a", "c"])


def test_mat_layout_and_clean_up_rules(tmp_path):
    """[y1 x1 y2 x2] 1-based -> [x1 y1 x2 y2] 0-based; duplicates (first kept); w >= 2, h > 2."""
    rows = np.array([[11, 21, 31, 41],    # -> x1=20 y1=10 x2=40 y2=30
                     [1, 1, 4, 3],        # w=2, h=3... -> x 0..2 (w=2), y 0..3 (h=3): kept
                     [1, 1, 3, 3],        # w=2, h=2: dropped (h must be > 2)
                     [1, 1, 4, 2],        # w=1: dropped
                     [11, 21, 31, 41]], float)  # duplicate
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = rows
    scipy.io.savemat(tmp_path / "p.mat", {"boxes": cell})
    out = load_proposals(tmp_path / "p.mat", ["x"])[0]
    np.testing.assert_array_equal(out, [[20, 10, 40, 30], [0, 0, 2, 3]])
    kept, bad = clean_proposals(np.array([[5, 5, 9, 9], [0, 0, 9, 9], [5, 5, 9, 9]]))
    np.testing.assert_array_equal(kept, [[5, 5, 9, 9], [0, 0, 9, 9]]) and bad == 0


def test_npz_and_json_equal_mat(voc, tmp_path):
    imdb = get_imdb("voc_2007_trainval", voc, cache_dir=False)
    props = [imdb.proposal_boxes(i) for i in range(imdb.num_images)]
    np.savez(tmp_path / "p.npz", **dict(zip(imdb.image_index, props)))
    (tmp_path / "p.json").write_text(json.dumps({k: v.tolist() for k, v in zip(imdb.image_index, props)}))
    for f in ("p.npz", "p.json"):
        other = get_imdb("voc_2007_trainval", voc, proposals=tmp_path / f, cache_dir=False)
        for i in range(6):
            np.testing.assert_array_equal(other.proposal_boxes(i), props[i])


# -- gt boxes outside their image (issue 16): TRAIN.GT_OUTSIDE_IMAGE -------------------------------

def push_outside(voc):
    """000101 (420x315): the dog's xmax 183 -> 5000, the person's ymax 277 -> 400."""
    p = ann(voc, "000101")
    text = p.read_text().replace("<xmax>183</xmax>", "<xmax>5000</xmax>")
    p.write_text(text.replace("<ymax>277</ymax>", "<ymax>400</ymax>"))
    return p


def imdb_with(voc, policy):
    cfg = default_config()
    cfg.set_key("TRAIN.GT_OUTSIDE_IMAGE", policy)
    return get_imdb("voc_2007_trainval", voc, cfg=cfg, cache_dir=False)


def test_gt_outside_image_clipped_with_a_warning(voc):
    xml = push_outside(voc)
    imdb = get_imdb("voc_2007_trainval", voc, cache_dir=False)  # the default: clip
    assert tuple(imdb.image_sizes[0]) == (420, 315)
    with pytest.warns(UserWarning) as record:
        gt = imdb.gt_roidb()
    assert [str(r.message) for r in record] == [
        f"{xml}: box(es) reaching outside the 420x315 image clipped to it (1-based, as the XML): "
        "object 'dog' (44, 81, 5000, 235) -> (44, 81, 420, 235); "
        "object 'person' (122, 140, 266, 400) -> (122, 140, 266, 315)"]
    # 0-based: x2 <= W - 1 = 419, y2 <= H - 1 = 314; the untouched corners are the XML's - 1
    np.testing.assert_array_equal(gt[0]["boxes"], [[43, 80, 419, 234], [121, 139, 265, 314]])
    flipped_x1 = 420 - gt[0]["boxes"][:, 2] - 1  # the flipped copy stays inside too
    assert (flipped_x1 >= 0).all()


def test_gt_outside_image_kept_as_the_original(voc):
    push_outside(voc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gt = imdb_with(voc, "keep").gt_roidb()
    np.testing.assert_array_equal(gt[0]["boxes"], [[43, 80, 4999, 234], [121, 139, 265, 399]])


def test_gt_outside_image_refused(voc):
    xml = push_outside(voc)
    with pytest.raises(DataError) as e:
        imdb_with(voc, "error").gt_roidb()
    assert str(e.value) == (f"{xml}: object 'dog' (44, 81, 5000, 235) reaches outside its 420x315 "
                            "image (TRAIN.GT_OUTSIDE_IMAGE 'error'; 'clip' clips it to the image)")


def test_gt_entirely_outside_cannot_be_clipped(voc):
    p = ann(voc, "000101")
    p.write_text(p.read_text().replace("<xmin>44</xmin>", "<xmin>421</xmin>")
                 .replace("<xmax>183</xmax>", "<xmax>500</xmax>"))
    with pytest.raises(DataError, match=r"000101.xml: object 'dog' \(421, 81, 500, 235\) lies "
                                        r"entirely outside its 420x315 image"):
        get_imdb("voc_2007_trainval", voc, cache_dir=False).gt_roidb()
    gt = imdb_with(voc, "keep").gt_roidb()
    np.testing.assert_array_equal(gt[0]["boxes"][0], [420, 80, 499, 234])


def test_gt_inside_the_image_untouched_and_policy_checked(voc):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clipped = get_imdb("voc_2007_trainval", voc, cache_dir=False).gt_roidb()
    kept = imdb_with(voc, "keep").gt_roidb()
    for a, b in zip(clipped, kept):
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
    with pytest.raises(ConfigError, match="TRAIN.GT_OUTSIDE_IMAGE must be one of clip, error, "
                                          "keep, got 'clamp'"):
        imdb_with(voc, "clamp").gt_roidb()
    # the roidb cache is keyed by the policy: a cached roidb of one is never read by another
    assert imdb_with(voc, "keep").cache_inputs()[0] != imdb_with(voc, "clip").cache_inputs()[0]


def test_non_finite_coordinate_in_xml(voc):
    p = ann(voc, "000102")
    text = p.read_text()
    p.write_text(text[:text.index("<xmax>") + 6] + "nan" + text[text.index("</xmax>"):])
    with pytest.raises(DataError, match=r"000102.xml: object 1 \(\w+\) has a non-finite coordinate"):
        parse_voc_xml(p)
