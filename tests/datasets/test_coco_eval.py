"""COCO evaluation (``datasets/coco_eval.py``, ``readonly-ohem eval --coco``): pycocotools' own
numbers, crowd regions and images without detections included; a hand-worked AP; errors."""

import contextlib
import copy
import io
import json
import sys

import numpy as np
import pytest

from readonly_ohem.cli import main
from readonly_ohem.datasets.coco_eval import STAT_NAMES, evaluate_coco

pycocotools = pytest.importorskip("pycocotools", reason="COCO evaluation: pip install '.[coco]'")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

CATS = [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 9, "name": "zebra"}]  # zebra: no gt


def _gt_and_dets(seed=0):
    """Five images: gt boxes of two classes, a crowd region on image 1 (with detections inside),
    image 4 with gt but no detections, image 5 with neither; detections jittered around the gt,
    false positives, and boxes of all sizes (small/medium/large areas)."""
    rng = np.random.RandomState(seed)
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in range(1, 6)]
    anns, dets = [], []
    for im in (1, 2, 3, 4):
        for _ in range(rng.randint(2, 6)):
            cat = (5, 2)[rng.randint(2)]
            w, h = rng.uniform(8, 300, 2)
            x, y = rng.uniform(0, 300), rng.uniform(0, 150)
            anns.append({"id": len(anns) + 1, "image_id": im, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            if im == 4:
                continue
            for _ in range(rng.randint(0, 3)):
                j = rng.normal(0, 0.08, 4) * [w, h, w, h]
                dets.append({"image_id": im, "category_id": cat, "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]],
                             "score": float(rng.uniform(0.2, 1))})
    anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 5, "bbox": [400, 200, 200, 250],
                 "area": 50000.0, "iscrowd": 1})
    for k in range(4):  # inside the crowd: ignored by pycocotools, not false positives
        dets.append({"image_id": 1, "category_id": 5, "bbox": [410 + 30 * k, 210, 60, 80], "score": 0.5 + 0.1 * k})
    for _ in range(6):  # false positives
        dets.append({"image_id": int(rng.randint(1, 4)), "category_id": (5, 2, 9)[rng.randint(3)],
                     "bbox": list(rng.uniform(0, 200, 4) + [0, 0, 5, 5]), "score": float(rng.uniform(0, 1))})
    return {"images": images, "categories": CATS, "annotations": anns}, dets


def pycocotools_direct(ann_file, res_file):
    """pycocotools as its README runs it: (stats, the printed summary)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        gt = COCO(str(ann_file))
        dt = gt.loadRes(str(res_file))
        e = COCOeval(gt, dt, "bbox")
        e.evaluate()
        e.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        e.summarize()
    return e.stats, summary.getvalue().rstrip("\n")


@pytest.fixture
def files(tmp_path):
    gt, dets = _gt_and_dets()
    ann, res = tmp_path / "instances.json", tmp_path / "results.json"
    ann.write_text(json.dumps(gt))
    res.write_text(json.dumps(dets))
    return ann, res


def test_equals_pycocotools_with_crowds_and_images_without_detections(files):
    ann, res = files
    stats, summary = pycocotools_direct(ann, res)
    r = evaluate_coco(ann, res)
    assert r["stats"] == stats.tolist() and r["summary"] == summary
    assert (r["mAP"], r["AP50"], r["AP75"]) == tuple(stats[:3]) and len(STAT_NAMES) == 12
    assert r["per_class"]["zebra"] is None and 0 < r["per_class"]["cat"] < 1
    # the crowd matters: as ordinary gt the four detections inside it would be false positives
    gt = json.loads(ann.read_text())
    gt["annotations"][-1]["iscrowd"] = 0
    ann.write_text(json.dumps(gt))
    assert evaluate_coco(ann, res)["per_class"]["cat"] != r["per_class"]["cat"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_equals_pycocotools_on_other_draws(tmp_path, seed):
    gt, dets = _gt_and_dets(seed)
    ann, res = tmp_path / "a.json", tmp_path / "r.json"
    ann.write_text(json.dumps(gt))
    res.write_text(json.dumps(dets))
    stats, summary = pycocotools_direct(ann, res)
    r = evaluate_coco(ann, res)
    assert r["stats"] == stats.tolist() and r["summary"] == summary


def test_hand_worked_ap_101_point(tmp_path):
    """One class, two gt boxes; d1 (0.9) has IoU 0.82 with gt1, d2 (0.8) hits nothing, d3 (0.7)
    IoU 0.62 with gt2. At IoU .50-.60: tp 1,0,1 -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1:
    the 51 recall points <= 0.5 have precision 1, the 50 above 2/3. At .65-.80 only d1 counts
    (51/101), at .85-.95 nothing. Areas: 100 each (small), so APs equals AP."""
    gt = {"images": [{"id": 1, "file_name": "1.jpg", "width": 100, "height": 100}],
          "categories": [{"id": 1, "name": "box"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "area": 100, "iscrowd": 0}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 8.2], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.8},
            {"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 6.2], "score": 0.7}]
    ann, res = tmp_path / "a.json", tmp_path / "r.json"
    ann.write_text(json.dumps(gt))
    res.write_text(json.dumps(dets))
    r = evaluate_coco(ann, res)
    ap50 = (51 + 50 * 2 / 3) / 101
    ap75 = 51 / 101
    assert r["AP50"] == pytest.approx(ap50, abs=1e-12) and r["per_class_ap50"]["box"] == pytest.approx(ap50, abs=1e-12)
    assert r["AP75"] == pytest.approx(ap75, abs=1e-12) and r["per_class_ap75"]["box"] == pytest.approx(ap75, abs=1e-12)
    assert r["mAP"] == pytest.approx((3 * ap50 + 4 * ap75) / 10, abs=1e-12)
    assert r["stats"][3] == pytest.approx(r["mAP"], abs=1e-12) and r["stats"][4] == -1 == r["stats"][5]
    assert r["stats"][8] == pytest.approx((3 * 1 + 4 * 0.5) / 10, abs=1e-12)  # AR100: recall per IoU


def test_no_detections_at_all_is_ap_zero(tmp_path, files):
    """pycocotools' loadRes crashes on []; we give what a detector that found nothing scores."""
    ann, res = files
    res.write_text("[]")
    r = evaluate_coco(ann, res)
    assert r["stats"][:3] == [0.0, 0.0, 0.0] and r["per_class"] == {"cat": 0.0, "dog": 0.0, "zebra": None}
    with pytest.raises(IndexError):  # the behaviour we differ from
        with contextlib.redirect_stdout(io.StringIO()):
            COCO(str(ann)).loadRes(str(res))


def test_eval_command_prints_pycocotools_summary_and_writes_json(files, tmp_path, capsys):
    ann, res = files
    stats, summary = pycocotools_direct(ann, res)
    out = tmp_path / "ap.json"
    assert main(["eval", "--coco", str(ann), "--dets", str(res), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert summary in text
    assert text.splitlines()[0] == "COCO box AP (pycocotools):"
    table = text.split(summary)[1].strip().splitlines()
    assert table[0].split() == ["class", "AP", "AP50", "AP75"] and table[-1].split()[0] == "all"
    assert table[3].split() == ["zebra", "-", "-", "-"]
    assert [float(v) for v in table[-1].split()[1:]] == [round(s, 4) for s in stats[:3]]
    saved = json.loads(out.read_text())
    assert saved["stats"] == stats.tolist() and saved["metric"] == "coco"


def test_eval_command_errors_are_one_line(files, tmp_path, capsys):
    ann, res = files
    dets = json.loads(res.read_text())
    bad = copy.deepcopy(dets)
    bad[0]["image_id"] = 77
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    cases = [
        (["eval", "--coco", str(ann), "--dets", str(tmp_path / "bad.json")],
         "bad.json: detections for 1 image id(s) not in"),
        (["eval", "--coco", str(ann), "--dets", str(tmp_path / "none.json")], "none.json: results file not found"),
        (["eval", "--coco", str(tmp_path / "no.json"), "--dets", str(res)], "no.json: annotation file not found"),
        (["eval", str(tmp_path), "--coco", str(ann), "--dets", str(res)], "give either VOC_YEAR_DIR"),
        (["eval", "--dets", str(res)], "give a VOC year directory (VOC_YEAR_DIR) or --coco"),
    ]
    del dets[0]["score"]
    (tmp_path / "noscore.json").write_text(json.dumps(dets))
    cases.append((["eval", "--coco", str(ann), "--dets", str(tmp_path / "noscore.json")],
                  "noscore.json: result 0 lacks 'score'"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_eval_command_names_the_extra_without_pycocotools(files, capsys, monkeypatch):
    for module in ("pycocotools", "pycocotools.coco", "pycocotools.cocoeval"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    ann, res = files
    assert main(["eval", "--coco", str(ann), "--dets", str(res)]) == 2
    assert "pip install 'readonly-ohem[coco]'" in capsys.readouterr().err


def test_same_devkit_detections_through_both_evaluators(fixtures_dir, tmp_path):
    """The original test fixture's devkit result files, converted with ``voc_results_to_coco``
    against ``voc_to_coco``'s json: every class has one or two objects, so interpolation cannot
    tell the evaluators apart, and each class's COCO AP50 equals the devkit's area AP (the box
    conversions keep every IoU the devkit computes)."""
    from readonly_ohem.datasets.voc2coco import voc_results_to_coco, voc_to_coco, write_coco_json
    from readonly_ohem.datasets.voc_eval import load_voc_annotations, read_results_dir, voc_eval

    voc = fixtures_dir / "original_test" / "VOCdevkit" / "VOC2007"
    dets = read_results_dir(fixtures_dir / "original_test" / "expected_results", "test")
    coco = voc_to_coco(voc, "test")
    ann = write_coco_json(coco, tmp_path / "gt.json")
    res = tmp_path / "res.json"
    res.write_text(json.dumps(voc_results_to_coco(dets, coco)))
    r = evaluate_coco(ann, res)
    annotations = load_voc_annotations(voc, "test")
    compared = 0
    for cls, ap50 in r["per_class_ap50"].items():
        if ap50 is None:
            continue
        area = voc_eval(dets.get(cls, []), annotations, cls, 0.5, False)[2]
        assert ap50 == pytest.approx(area, abs=1e-12), cls
        compared += 1
    assert compared == 12 and 0 < r["AP50"] < 1
    # the conversions keep the devkit's IoU (+1 widths) as COCO's (continuous): every pair
    from pycocotools import mask

    from readonly_ohem.datasets.voc_eval import _overlaps

    results = voc_results_to_coco(dets, coco)
    rows = [row for rows in dets.values() for row in rows]  # the same order as results
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    voc_ids = {im["id"]: im["file_name"][:-4] for im in coco["images"]}
    for res_row, row in zip(results, rows):
        assert voc_ids[res_row["image_id"]] == row[0]
        gt_xywh = np.array(by_image[res_row["image_id"]], float)
        gt_voc = np.hstack([gt_xywh[:, :2] + 1, gt_xywh[:, :2] + gt_xywh[:, 2:]])  # back to 1-based
        theirs = mask.iou(np.array([res_row["bbox"]], float), gt_xywh, [0] * len(gt_xywh))
        np.testing.assert_allclose(theirs, _overlaps(np.array([row[2:]], float), gt_voc), rtol=0, atol=1e-12)
