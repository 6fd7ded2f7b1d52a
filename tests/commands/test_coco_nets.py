"""The shipped COCO nets (``prototxt/coco``): ``readonly-ohem net`` builds them with 81 / 324
outputs; a net whose class count is not the dataset's stops ``train`` (before the roidb) and
``test`` with one line naming the net and the dataset; the small net made for COCO's class count
by ``scripts/make_prototxt.py`` trains (Fast R-CNN and OHEM) and tests on an 80-category
COCO-format mini-VOC."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from readonly_ohem.cli import main

REPO = Path(__file__).resolve().parents[2]
COCO = REPO / "prototxt" / "coco"
CFGS = REPO / "prototxt" / "cfgs"
SMALL = ["--set", "TRAIN.SCALES", "(96,)", "--set", "TRAIN.MAX_SIZE", "160",
         "--set", "TEST.SCALES", "(96,)", "--set", "TEST.MAX_SIZE", "160"]


def shapes(k):
    return ["--shape", "data=1,3,600,1000", "--shape", "rois=128,5", "--shape", "labels=128",
            *[a for b in ("bbox_targets", "bbox_inside_weights", "bbox_outside_weights")
              for a in ("--shape", f"{b}=128,{4 * k}")]]


def summarize(path, tmp_path, args):
    out = tmp_path / "s.json"
    assert main(["net", str(path), "--json", str(out), *args]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("model", ["VGG16", "VGG_CNN_M_1024"])
def test_coco_nets_build_with_81_classes(model, tmp_path, capsys):
    test = summarize(COCO / model / "fast_rcnn" / "test.prototxt", tmp_path, ["--shape", "rois=300,5"])
    assert test["blobs"]["cls_prob"] == [300, 81] and test["blobs"]["bbox_pred"] == [300, 324]
    train = summarize(COCO / model / "fast_rcnn" / "train.prototxt", tmp_path, shapes(81))
    assert train["blobs"]["cls_score"] == [128, 81] and train["blobs"]["bbox_pred"] == [128, 324]
    ohem = summarize(COCO / model / "fast_rcnn_ohem" / "train.prototxt", tmp_path, shapes(81))
    b = ohem["blobs"]
    assert b["cls_prob_readonly"] == [128, 81] and b["bbox_pred_readonly"] == [128, 324]
    assert b["cls_score"] == [128, 81] and b["bbox_targets_hard"] == [128, 324]
    for s in (test, train, ohem):  # py-faster-rcnn's COCO nets have no Dropout
        assert "Dropout" not in {layer["type"] for layer in s["layers"]}
    fc7 = 4096 if model == "VGG16" else 1024
    params = {layer["name"]: layer["params"] for layer in ohem["layers"]}
    assert [p["shape"] for p in params["cls_score_readonly"]] == [[81, fc7], [81]]
    assert [p["name"] for p in params["bbox_pred"]] == ["bbox_pred_w", "bbox_pred_b"]
    assert params["bbox_pred"][0]["shape"] == [324, fc7]
    capsys.readouterr()


def one_line_error(capsys, argv, command="train") -> str:
    """The error of ``argv``: exit status 2, one line, the last on stderr (``test`` prints the
    weights report and its progress line before)."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines) and sum("error" in line for line in lines) == 1, lines
    assert lines[-1].startswith(f"readonly-ohem {command}: error: ")
    assert len(lines) == 1 or command == "test", lines
    return lines[-1]


@pytest.fixture
def minivoc(tmp_path, monkeypatch):
    """The mini-VOC in COCO form (20 categories) and the same sets with 60 more, empty,
    categories (ids 100..159): the 80 of COCO."""
    monkeypatch.setenv("READONLY_OHEM_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "m"
    assert main(["make-minivoc", str(data), "--images", "7", "--format", "coco"]) == 0
    sets = {}
    for split in ("trainval", "test"):
        coco = json.loads((data / "coco" / "annotations" / f"instances_{split}2007.json").read_text())
        assert len(coco["categories"]) == 20
        coco["categories"] += [{"id": 100 + i, "name": f"unused{i}", "supercategory": "none"}
                               for i in range(60)]
        path = tmp_path / f"coco80_{split}.json"
        path.write_text(json.dumps(coco))
        sets[split] = ["--imdb", f"coco:{path}",
                       "--images", str(data / "coco" / "images" / f"{split}2007"),
                       "--proposals", str(data / "selective_search_data" / f"coco_2007_{split}.mat")]
    return data, sets


def test_class_count_mismatch_stops_training_before_the_roidb(minivoc, tmp_path, capsys):
    data, sets = minivoc
    out = tmp_path / "never"
    vgg16_ohem = COCO / "VGG16" / "fast_rcnn_ohem"
    err = one_line_error(capsys, ["train", "--solver", str(vgg16_ohem / "solver.prototxt"),
                                  "--imdb", "coco_2007_trainval", "--data", str(data), "--output", str(out)])
    assert str(vgg16_ohem / "train.prototxt") in err
    assert "layer 'data' (RoIDataLayer) is made for 81 classes" in err
    assert "the dataset coco_2007_trainval has 21 (20 categories + __background__)" in err
    assert "--num-classes 21" in err
    # the other way: the 21-class small net on the 80-category set
    small_frcn = REPO / "prototxt" / "small" / "fast_rcnn"
    err = one_line_error(capsys, ["train", "--solver", str(small_frcn / "solver.prototxt"),
                                  *sets["trainval"], "--output", str(out)])
    assert str(small_frcn / "train.prototxt") in err
    assert "made for 21 classes" in err and "the dataset coco_coco80_trainval has 81" in err
    assert not out.exists() and not (tmp_path / "cache").exists()  # no roidb, no output yet


def test_small_net_for_coco_trains_and_tests_on_80_categories(minivoc, tmp_path, capsys):
    pytest.importorskip("pycocotools", reason="COCO evaluation: pip install '.[coco]'")
    data, sets = minivoc
    nets = tmp_path / "nets"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_prototxt.py"), "--model", "small",
                    "--dataset", "coco", "--out", str(nets)], check=True, capture_output=True)
    small = ["--cfg", str(CFGS / "small.yml"), *SMALL]
    ohem = [*small, "--cfg", str(CFGS / "fast_rcnn_ohem.yml")]
    for method, cfg in (("fast_rcnn", small), ("fast_rcnn_ohem", ohem)):
        assert main(["train", "--solver", str(nets / method / "solver.prototxt"), *sets["trainval"],
                     "--iters", "2", "--output", str(tmp_path / method), *cfg]) == 0
        out = capsys.readouterr().out
        assert "Loaded dataset `coco_coco80_trainval` for training" in out
        # cls_score starts near 0 (gaussian std 0.01): about a uniform softmax over 81 classes
        # (ln 81 = 4.39; a 21-class net would start near ln 21 = 3.04)
        loss_cls = float(re.search(r"Iteration 0, .*loss_cls = ([0-9.]+)", out).group(1))
        assert loss_cls == pytest.approx(math.log(81), abs=0.1), method
    model = tmp_path / "fast_rcnn_ohem" / "small_fast_rcnn_ohem_iter_2.caffemodel"
    assert (tmp_path / "fast_rcnn" / "small_fast_rcnn_iter_2.caffemodel").is_file() and model.is_file()

    test = ["test", "--def", str(nets / "fast_rcnn" / "test.prototxt"), "--net", str(model),
            "--thresh", "0.001", *ohem]
    assert main([*test, *sets["test"], "--output", str(tmp_path / "t")]) == 0
    assert "COCO box AP (pycocotools):" in capsys.readouterr().out
    dets = json.loads((tmp_path / "t" / "detections_coco80_test_results.json").read_text())
    ids = set(range(1, 21)) | set(range(100, 160))
    assert dets and {d["category_id"] for d in dets} <= ids
    assert {d["category_id"] for d in dets} - set(range(1, 21))  # the 81 outputs all score

    err = one_line_error(capsys, [*test, "--imdb", "coco_2007_test", "--data", str(data),
                                  "--output", str(tmp_path / "t2")], command="test")
    assert err.endswith(f"{nets / 'fast_rcnn' / 'test.prototxt'}: scores 81 classes, the dataset "
                        "coco_2007_test has 21")
