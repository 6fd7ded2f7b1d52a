"""The mini-VOC in COCO format through the same commands as VOC: ``make-minivoc --format coco``,
``train`` (small OHEM net, a few iterations), ``test`` (results json, pycocotools' summary, the
AP/AP50/AP75 table) and ``eval --coco`` on what ``test`` wrote; ``voc2coco`` by hand."""

import json
from pathlib import Path

import numpy as np
import pytest

from readonly_ohem.cli import main
from readonly_ohem.datasets import get_imdb

pytest.importorskip("pycocotools", reason="COCO evaluation: pip install '.[coco]'")

REPO = Path(__file__).resolve().parents[2]
SOLVER = REPO / "prototxt" / "small" / "fast_rcnn_ohem" / "solver.prototxt"
TEST_DEF = REPO / "prototxt" / "small" / "fast_rcnn" / "test.prototxt"
CFGS = ["--cfg", str(REPO / "prototxt" / "cfgs" / "small.yml"),
        "--cfg", str(REPO / "prototxt" / "cfgs" / "fast_rcnn_ohem.yml")]
SMALL = ["--set", "TRAIN.SCALES", "(96,)", "--set", "TRAIN.MAX_SIZE", "160",
         "--set", "TEST.SCALES", "(96,)", "--set", "TEST.MAX_SIZE", "160"]


def test_ohem_on_the_minivoc_in_coco_format_through_the_voc_commands(tmp_path, capsys):
    data = tmp_path / "minivoc"
    assert main(["make-minivoc", str(data), "--images", "7", "--format", "coco"]) == 0
    ann = data / "coco" / "annotations" / "instances_test2007.json"
    assert ann.is_file() and (data / "coco" / "images" / "test2007").is_dir()
    out = tmp_path / "train"
    assert main(["train", "--solver", str(SOLVER), "--imdb", "coco_2007_trainval", "--data", str(data),
                 "--iters", "2", "--output", str(out), *CFGS, *SMALL]) == 0
    model = out / "small_fast_rcnn_ohem_iter_2.caffemodel"
    assert model.is_file() and "Loaded dataset `coco_2007_trainval` for training" in capsys.readouterr().out

    common = ["--def", str(TEST_DEF), "--net", str(model), "--thresh", "0.01", *CFGS, *SMALL]
    assert main(["test", "--imdb", "coco_2007_test", "--data", str(data), "--output", str(tmp_path / "t"),
                 *common]) == 0
    text = capsys.readouterr().out
    res = tmp_path / "t" / "detections_test2007_results.json"
    dets = json.loads(res.read_text())
    ids = {im["id"] for im in json.loads(ann.read_text())["images"]}
    assert dets and {d["image_id"] for d in dets} <= ids and {d["category_id"] for d in dets} <= set(range(1, 21))
    assert all(len(d["bbox"]) == 4 and d["bbox"][2] >= 1 and d["bbox"][3] >= 1 for d in dets)
    assert f"result files: {res}" in text
    summary = text.split("COCO box AP (pycocotools):\n")[1].splitlines()
    assert summary[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]")
    assert summary[12].split() == ["class", "AP", "AP50", "AP75"]

    # eval --coco on the written file prints the same summary and table
    assert main(["eval", "--coco", str(ann), "--dets", str(res)]) == 0
    again = capsys.readouterr().out.split("COCO box AP (pycocotools):\n")[1].splitlines()
    assert again == summary[:len(again)]

    # the same set as coco:FILE with --images and --proposals: the same detections
    assert main(["test", "--imdb", f"coco:{ann}", "--images", str(data / "coco" / "images" / "test2007"),
                 "--proposals", str(data / "selective_search_data" / "coco_2007_test.mat"),
                 "--output", str(tmp_path / "f"), *common]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "f" / "detections_instances_test2007_results.json").read_text()) == dets


def test_voc2coco_command_and_the_voc_reader_agree(tmp_path, capsys):
    """The converted json read back by coco.py: the VOC reader's training gt (difficult objects
    as crowds), the same proposals rows; one object by hand."""
    assert main(["make-minivoc", str(tmp_path / "m"), "--images", "12", "--seed", "4"]) == 0
    voc = tmp_path / "m" / "VOCdevkit" / "VOC2007"
    out = tmp_path / "test.json"
    assert main(["voc2coco", str(voc), "--split", "test", "--out", str(out)]) == 0
    assert f"--imdb coco:{out} --images {voc / 'JPEGImages'}" in capsys.readouterr().out
    coco = json.loads(out.read_text())
    assert [c["name"] for c in coco["categories"]][:3] == ["aeroplane", "bicycle", "bird"]
    assert [c["id"] for c in coco["categories"]] == list(range(1, 21))
    vimdb = get_imdb("voc_2007_test", tmp_path / "m", cache_dir=False)
    assert [im["id"] for im in coco["images"]] == [int(i) for i in vimdb.image_index]
    first = next(a for a in coco["annotations"] if a["image_id"] == coco["images"][0]["id"])
    obj = vimdb.annotations_at(0)[0]
    x1, y1, x2, y2 = obj["bbox"]
    assert first["bbox"] == [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1] and first["area"] == (x2 - x1 + 1) * (y2 - y1 + 1)
    assert first["iscrowd"] == int(obj["difficult"])

    cimdb = get_imdb(f"coco:{out}", voc / "JPEGImages", tmp_path / "m" / "selective_search_data" / "voc_2007_test.mat",
                     cache_dir=False)
    vgt, cgt = vimdb.gt_roidb(), cimdb.gt_roidb()
    n_crowd = 0
    for i, (v, c) in enumerate(zip(vgt, cgt)):
        np.testing.assert_array_equal(c["boxes"][~c["is_crowd"]], v["boxes"])
        np.testing.assert_array_equal(c["gt_classes"][~c["is_crowd"]], v["gt_classes"])
        difficult = [o for o in vimdb.annotations_at(i) if o["difficult"]]
        assert c["is_crowd"].sum() == len(difficult)
        n_crowd += len(difficult)
        np.testing.assert_array_equal(cimdb.proposal_boxes(i), vimdb.proposal_boxes(i))
    assert n_crowd > 0  # the draw has difficult objects, so the crowd path ran
