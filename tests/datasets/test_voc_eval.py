"""VOC AP: hand-worked cases for both metrics, a transcription of the original devkit code as the
reference, and the original pipeline's APs on its own result files (fixture)."""

import json
from pathlib import Path

import numpy as np
import pytest

from readonly_ohem.errors import DataError
from readonly_ohem.datasets.voc_eval import (VOC_CLASSES, evaluate_classes, read_results_dir,
                                    read_results_file, voc_ap, voc_eval, write_voc_results)

from original_code import parse_rec, voc_eval as _orig_voc_eval, voc_ap as _orig_voc_ap

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "original_test"
VOC = FIX / "VOCdevkit" / "VOC2007"


def _fixture_annotations():
    ids = (VOC / "ImageSets" / "Main" / "test.txt").read_text().split()
    return {i: parse_rec(VOC / "Annotations" / f"{i}.xml") for i in ids}


# -- voc_ap ----------------------------------------------------------------------------------

def test_voc_ap_hand_worked_both_metrics():
    rec, prec = np.array([0.5, 1.0]), np.array([1.0, 0.5])
    # 11-point: t = 0 .. 0.5 (6 points) reach precision 1, t = 0.6 .. 1 (5 points) only 0.5
    assert voc_ap(rec, prec, True) == pytest.approx((6 * 1.0 + 5 * 0.5) / 11, abs=1e-15)
    # area: 0.5 of recall at precision 1, then 0.5 at precision 0.5
    assert voc_ap(rec, prec, False) == pytest.approx(0.75, abs=1e-15)


def test_voc_ap_07_uses_the_originals_arange_thresholds():
    # np.arange(0, 1.1, 0.1)[3] is 0.30000000000000004 > 0.3: a recall of exactly 3/10 reaches
    # only t = 0, 0.1, 0.2.
    assert voc_ap(np.array([3 / 10]), np.array([1.0]), True) == pytest.approx(3 / 11, abs=1e-15)
    assert voc_ap(np.array([0.4]), np.array([1.0]), True) == pytest.approx(5 / 11, abs=1e-15)


def test_voc_ap_area_takes_the_envelope():
    # precision rises after a dip: the envelope lifts the dip to the later maximum
    rec, prec = np.array([0.25, 0.25, 0.5, 0.75]), np.array([1.0, 0.5, 2 / 3, 0.75])
    assert voc_ap(rec, prec, False) == pytest.approx(0.25 * 1 + 0.25 * 0.75 + 0.25 * 0.75, abs=1e-15)


def test_voc_ap_matches_original_on_random_curves():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(1, 30))
        tp = rng.random(n) < 0.5
        npos = int(rng.integers(max(1, tp.sum()), tp.sum() + 5))
        ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
        rec, prec = ctp / npos, ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        for m in (True, False):
            assert voc_ap(rec, prec, m) == _orig_voc_ap(rec, prec.copy(), m)


# -- voc_eval --------------------------------------------------------------------------------

ANNOS = {
    "A": [dict(name="cat", bbox=[1, 1, 10, 10], difficult=0),
          dict(name="cat", bbox=[21, 21, 30, 30], difficult=1),
          dict(name="dog", bbox=[41, 41, 50, 50], difficult=0)],
    "B": [dict(name="cat", bbox=[1, 1, 10, 10], difficult=0)],
    "C": [],
}


def test_voc_eval_hand_worked_difficult_duplicate_and_strict_iou():
    dets = [
        ("B", 0.5, 1, 1, 10, 10),    # 5th: TP (B's cat)
        ("A", 0.9, 1, 1, 10, 10),    # 1st: TP
        ("A", 0.8, 1, 1, 10, 10),    # 2nd: second hit on the matched box -> FP
        ("A", 0.7, 21, 21, 30, 30),  # 3rd: difficult -> neither TP nor FP
        ("B", 0.6, 1, 1, 10, 5),     # 4th: IoU exactly 50/100 = 0.5, not > 0.5 -> FP
        ("C", 0.4, 1, 1, 10, 10),    # 6th: image without gt -> FP
    ]
    rec, prec, ap = voc_eval(dets, ANNOS, "cat", use_07_metric=True)
    # npos = 2 (the difficult cat is not counted)
    np.testing.assert_allclose(rec, [0.5, 0.5, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(prec, [1.0, 0.5, 0.5, 1 / 3, 0.5, 2 / 5])
    assert ap == pytest.approx((6 * 1.0 + 5 * 0.5) / 11, abs=1e-15)
    _, _, ap_area = voc_eval(dets, ANNOS, "cat", use_07_metric=False)
    assert ap_area == pytest.approx(0.5 * 1.0 + 0.5 * 0.5, abs=1e-15)


def test_voc_eval_first_hit_on_difficult_gives_precision_zero_not_nan():
    rec, prec, ap = voc_eval([("A", 0.9, 21, 21, 30, 30), ("A", 0.8, 1, 1, 10, 10)], ANNOS, "cat")
    np.testing.assert_array_equal(prec, [0.0, 1.0])
    np.testing.assert_array_equal(rec, [0.0, 0.5])
    assert ap == pytest.approx(6 / 11)


def test_voc_eval_other_classes_gt_is_ignored():
    # the dog box is not a cat: a perfect box on it is a false positive for "cat"
    rec, prec, ap = voc_eval([("A", 0.9, 41, 41, 50, 50)], ANNOS, "cat")
    assert rec.tolist() == [0.0] and prec.tolist() == [0.0] and ap == 0.0
    _, _, ap_dog = voc_eval([("A", 0.9, 41, 41, 50, 50)], ANNOS, "dog")
    assert ap_dog == pytest.approx(1.0)


@pytest.mark.parametrize("use_07", [True, False])
def test_voc_eval_no_detections_or_no_gt_is_ap_zero(use_07):
    # the original crashes on the first and gives NaN (area metric) on the second
    rec, prec, ap = voc_eval([], ANNOS, "cat", use_07_metric=use_07)
    assert ap == 0.0 and rec.size == 0 and prec.size == 0
    assert voc_eval([("A", 0.9, 1, 1, 10, 10)], ANNOS, "horse", use_07_metric=use_07)[2] == 0.0


def test_voc_eval_detection_on_unknown_image_is_an_error():
    with pytest.raises(DataError, match="not in the image set: Z"):
        voc_eval([("Z", 0.9, 1, 1, 10, 10)], ANNOS, "cat")


def test_voc_eval_matches_original_on_random_sets_with_ties():
    rng = np.random.default_rng(7)
    for trial in range(40):
        annos = {}
        for k in range(int(rng.integers(1, 5))):
            objs = []
            for _ in range(int(rng.integers(0, 4))):
                x, y = rng.integers(1, 60, size=2)
                w, h = rng.integers(5, 40, size=2)
                objs.append(dict(name=str(rng.choice(["cat", "dog"])),
                                 bbox=[int(x), int(y), int(x + w), int(y + h)],
                                 difficult=int(rng.random() < 0.2)))
            annos[f"{k:06d}"] = objs
        if sum(o["name"] == "cat" and not o["difficult"] for v in annos.values() for o in v) == 0:
            continue
        lines, dets = [], []
        for _ in range(int(rng.integers(1, 40))):
            img = str(rng.choice(list(annos)))
            x, y = rng.uniform(1, 60, size=2)
            w, h = rng.uniform(5, 40, size=2)
            score = round(float(rng.random()), 1)  # coarse scores: many ties
            row = (img, score, round(x, 1), round(y, 1), round(x + w, 1), round(y + h, 1))
            dets.append(row)
            lines.append("{:s} {:.3f} {:.1f} {:.1f} {:.1f} {:.1f}\n".format(*row))
        for m in (True, False):
            rec, prec, ap = voc_eval(dets, annos, "cat", use_07_metric=m)
            rrec, rprec, rap = _orig_voc_eval(lines, annos, "cat", 0.5, m)
            np.testing.assert_array_equal(rec, rrec)
            np.testing.assert_array_equal(prec, rprec)
            assert ap == rap, (trial, m)


# -- result files ----------------------------------------------------------------------------

def test_write_voc_results_lines_are_one_based_devkit_format(tmp_path):
    classes = ("__background__", "cat", "dog")
    dets = np.array([[0.0, 9.5, 99.04, 20.0, 0.98765], [1.25, 2.0, 3.0, 4.0, 0.05]], np.float32)
    all_dets = [[None, None], [dets, np.zeros((0, 5), np.float32)], [[], dets[1:]]]
    paths = write_voc_results(all_dets, ["000001", "000002"], classes, tmp_path)
    assert sorted(p.name for p in paths.values()) == ["comp4_det_test_cat.txt", "comp4_det_test_dog.txt"]
    assert paths["cat"].read_text() == ("000001 0.988 1.0 10.5 100.0 21.0\n"
                                        "000001 0.050 2.2 3.0 4.0 5.0\n")
    assert paths["dog"].read_text() == "000002 0.050 2.2 3.0 4.0 5.0\n"
    assert read_results_file(paths["cat"])[0] == ("000001", 0.988, 1.0, 10.5, 100.0, 21.0)


def test_read_results_dir_any_prefix_and_errors(tmp_path):
    (tmp_path / "comp4_det_val_cat.txt").write_text("a 0.5 1 1 5 5\n\n")
    (tmp_path / "det_val_dog.txt").write_text("")
    (tmp_path / "comp4_det_test_cat.txt").write_text("ignored: other image set\n")
    (tmp_path / "notes.txt").write_text("x")
    got = read_results_dir(tmp_path, "val")
    assert got == {"cat": [("a", 0.5, 1.0, 1.0, 5.0, 5.0)], "dog": []}
    (tmp_path / "mine_det_val_cat.txt").write_text("")
    with pytest.raises(DataError, match="two result files for class 'cat'"):
        read_results_dir(tmp_path, "val")
    (tmp_path / "bad_det_x_cow.txt").write_text("a 0.5 1 1 5\n")
    with pytest.raises(DataError, match=r"bad_det_x_cow.txt:1: expected"):
        read_results_dir(tmp_path, "x")
    with pytest.raises(DataError, match="no result files"):
        read_results_dir(tmp_path, "train")


# -- the original pipeline's own result files ---------------------------------------------------

def test_fixture_expected_ap_reproduced_within_1e6():
    expected = json.loads((FIX / "expected_ap.json").read_text())
    dets = read_results_dir(FIX / "expected_results", "test")
    result = evaluate_classes(dets, _fixture_annotations(), VOC_CLASSES, use_07_metric=True)
    assert list(result["per_class"]) == list(expected["per_class"])
    for cls, ap in expected["per_class"].items():
        assert abs(result["per_class"][cls] - ap) <= 1e-6, cls
    assert abs(result["mAP"] - expected["mAP"]) <= 1e-6


def test_fixture_matches_transcribed_original_bit_for_bit():
    annos = _fixture_annotations()
    for cls in VOC_CLASSES:
        path = FIX / "expected_results" / f"comp4_det_test_{cls}.txt"
        lines = path.read_text().splitlines(keepends=True)
        _, _, ap = voc_eval(read_results_file(path), annos, cls, use_07_metric=True)
        rap = _orig_voc_eval(lines, annos, cls, 0.5, True)[2]
        assert ap == (0.0 if np.isnan(rap) else rap), cls


def test_voc_eval_image_set_repeats_count_npos_per_line():
    # The original loops over the image-set lines: npos += sum(~difficult) once per line, so an id
    # listed twice counts its cat twice (npos = 1 (A) + 1 (B) + 1 (B again) = 3).
    dets = [("B", 0.9, 1, 1, 10, 10)]
    rec, prec, ap = voc_eval(dets, ANNOS, "cat", use_07_metric=True, image_set=["A", "B", "B", "C"])
    np.testing.assert_array_equal(rec, [1 / 3])
    np.testing.assert_array_equal(prec, [1.0])
    # recall 1/3 reaches t = 0, 0.1, 0.2, 0.30000000000000004 (4 of the 11 points)
    assert ap == pytest.approx(4 / 11, abs=1e-15)
    assert voc_eval(dets, ANNOS, "cat", image_set=["A", "B", "C"])[2] == pytest.approx(6 / 11)
    with pytest.raises(DataError, match="no annotations for image-set ids Q"):
        voc_eval(dets, ANNOS, "cat", image_set=["A", "Q"])


