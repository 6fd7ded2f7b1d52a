"""The demo's pipeline on a very short setting, and the pieces that make its comparison fair."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from readonly_ohem.commands import demo
from readonly_ohem.datasets.minivoc import CLASSES
from readonly_ohem.errors import ConfigError
from readonly_ohem.inspect import read_log, selection_stats

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """8 images (5 trainval, 3 test), 3 iterations per method, every iteration logged (and
    written for TensorBoard when it is installed)."""
    out = tmp_path_factory.mktemp("demo")
    log = out / "stdout.txt"
    with open(log, "w") as stream:
        run = demo.run_demo(out, iters=3, seed=1, num_images=8, log_every=1, stream=stream,
                            tensorboard=out / "tb" if HAS_TENSORBOARD else None)
    return out, run, log.read_text()


def test_short_demo_writes_table_results_and_picture(short_run):
    out, run, text = short_run
    assert set(run["results"]) == {"FRCN", "OHEM"}
    header = text.splitlines()[text.splitlines().index(run["table"].splitlines()[0])]
    assert "mAP (100/0.05)" in header and "mAP (2000/1e-05)" in header and "s/iter" in header
    assert "fg of trained RoIs" in header
    for method in ("FRCN", "OHEM"):
        r = run["results"][method]
        assert r["iters"] == 3 and r["model"].is_file() and r["model"].suffix == ".caffemodel"
        assert r["sec_per_iter"] > 0 and 0 <= r["fg_fraction"] <= 1
        for (mp, th), t in r["test"].items():
            res = out / method.lower() / f"dets_{mp}_{th:g}"
            assert t["result_dir"] == str(res)
            for c in CLASSES:  # devkit result files, one per class (1-based boxes, 3-decimal score)
                assert (res / f"comp4_det_test_{c}.txt").is_file()
            assert 0.0 <= t["mAP"] <= 1.0
            present = t["classes"]
            assert t["mAP"] == pytest.approx(np.mean([t["per_class"][c] for c in present]))
            assert t["mAP_voc20"] == pytest.approx(np.mean(list(t["per_class"].values())))
    # the progress output names every step
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "iter 3/3"):
        assert step in text
    saved = json.loads((out / "results.json").read_text())
    assert saved["same_images_per_step"] is True
    assert set(saved["methods"]) == {"FRCN", "OHEM"}
    assert (out / "results.txt").read_text().startswith(run["table"].splitlines()[0])
    picture = Image.open(out / "kept_rois.png")
    assert picture.size[0] > 100 and picture.size[1] > 100
    assert "kept-RoI log" in text and "mean loss: kept" in text


def test_short_demo_holds_the_comparison_equal(short_run):
    out, run, _ = short_run
    frcn, ohem = run["results"]["FRCN"], run["results"]["OHEM"]
    # same images, pass by pass (2 passes of 1 image per SGD step for both)
    assert frcn["images"] == ohem["images"] and len(frcn["images"]) == 3 * 2
    assert run["same_images_per_step"]
    # same start: the OHEM arm loaded FRCN's initial fill
    assert frcn["init"] == ohem["init"] == out / "init.caffemodel"
    # FRCN trains on 64 sampled RoIs per image (at most 16 fg); OHEM on <= 64 hard RoIs per pass
    assert 0 < frcn["rois_per_iter"] <= 128
    fg_per_pass = frcn["fg_fraction"] * frcn["rois_per_iter"] / 2
    assert fg_per_pass <= 16 + 1e-9  # round(0.25 * 64) fg at most per image
    assert 0 < ohem["rois_per_iter"] <= 128
    # the OHEM arm's counted fg fraction equals the kept-RoI log's (every iteration logged)
    assert run["stats"]["totals"]["fg_fraction"] == pytest.approx(ohem["fg_fraction"])


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="pip install '.[tensorboard]'")
def test_short_demo_writes_one_tensorboard_run_per_method(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, run, _ = short_run
    assert sorted(p.name for p in (out / "tb").iterdir()) == ["frcn_seed1", "ohem_seed1"]
    kept = {r["iter"]: r["kept"] for r in selection_stats(read_log(out / "kept_rois.jsonl"))["iterations"]}
    for method in ("FRCN", "OHEM"):
        ea = EventAccumulator(str(out / "tb" / f"{method.lower()}_seed1"), size_guidance={"scalars": 0})
        ea.Reload()

        def values(tag):
            return [(e.step, e.value) for e in ea.Scalars(tag)]

        tests = run["results"][method]["test"]
        for prefix, setting in (("test", (100, 0.05)), ("test_2000_1e-05", (2000, 1e-5))):
            t = tests[setting]
            assert values(f"{prefix}/mAP") == [(3, float(np.float32(t["mAP"])))]
            for c in t["classes"]:  # the classes present in the mini-VOC only
                assert values(f"{prefix}/AP/{c}") == [(3, float(np.float32(t["per_class"][c])))]
            assert len([g for g in ea.Tags()["scalars"] if g.startswith(f"{prefix}/AP/")]) == len(t["classes"])
        assert [s for s, _ in values("train/loss")] == [0]  # the small solvers display every 20
        ohem_tags = [g for g in ea.Tags()["scalars"] if g.startswith("ohem/")]
        if method == "FRCN":
            assert not ohem_tags
        else:  # every iteration logged (log_every=1): the kept counts of the kept-RoI log
            assert values("ohem/rois_kept") == sorted(kept.items()) and len(kept) == 3


def _roidb(n):
    return [{"width": 100 + i, "height": 80, "max_overlaps": np.array([0.7, 0.3, 0.05]),
             "max_classes": np.array([3, 3, 0])} for i in range(n)]


def test_shared_order_planner_gives_both_methods_the_same_order():
    """FRCN's fg/bg draws use the planner's stream; the order must not depend on them."""
    roidb = _roidb(7)
    plans = {}
    for method in ("FRCN", "OHEM"):
        planner = demo.SharedOrderPlanner(roidb, demo.method_config(method, 5), order_seed=5)
        plans[method] = [planner.next_plan()["db_inds"].tolist() for _ in range(20)]
    assert plans["FRCN"] == plans["OHEM"]
    flat = [i for p in plans["FRCN"] for i in p]
    assert all(len(p) == 1 for p in plans["FRCN"])  # IMS_PER_BATCH 1 for both (small.yml)
    # a pass visits len - 1 images (the original reshuffles when cur + 1 >= len), each once
    first, second = flat[:6], flat[6:12]
    assert len(set(first)) == 6 and len(set(second)) == 6
    assert first == np.random.RandomState(5).permutation(7)[:6].tolist()


def test_format_table_hand_made():
    tests = {(100, 0.05): {"mAP": 0.5, "images_per_second": 20.0},
             (2000, 1e-5): {"mAP": 0.52, "images_per_second": 10.0}}
    results = {"FRCN": {"test": tests, "sec_per_iter": 0.25, "fg_fraction": 0.25, "rois_per_iter": 128}}
    lines = demo.format_table(results).splitlines()
    assert lines[0].split() == ["method", "mAP", "(100/0.05)", "mAP", "(2000/1e-05)", "s/iter", "fg",
                                "of", "trained", "RoIs", "RoIs/iter", "test", "im/s"]
    assert lines[2].split() == ["FRCN", "0.5000", "0.5200", "0.250", "25.0%", "128", "20.0"]


def test_demo_command_rejects_bad_iters(tmp_path):
    with pytest.raises(ConfigError, match="--iters"):
        demo.demo_command(output=str(tmp_path), iters=0)


def test_demo_names_missing_shipped_files(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "SMALL_CFG", tmp_path / "nowhere" / "small.yml")
    with pytest.raises(ConfigError, match="small.yml"):
        demo.run_demo(tmp_path / "out", iters=1, num_images=2)


def test_short_faster_rcnn_demo(tmp_path):
    """``--detector faster-rcnn``: the same table for Faster R-CNN end-to-end and + OHEM, with
    the comparison held equal (images per step, initial weights, RoIs per image)."""
    log = tmp_path / "stdout.txt"
    with open(log, "w") as stream:
        run = demo.run_demo(tmp_path / "out", iters=1, seed=1, num_images=8, log_every=1,
                            stream=stream, detector="faster-rcnn")
    text = log.read_text()
    plain, ohem = run["results"]["Faster"], run["results"]["Faster+OHEM"]
    assert list(run["results"]) == ["Faster", "Faster+OHEM"]
    assert run["table"].splitlines()[0].split()[:3] == ["method", "mAP", "(100/0.05)"]
    assert "[4/5] Faster vs Faster+OHEM" in text and "kept-RoI log" in text
    assert plain["images"] == ohem["images"] and len(plain["images"]) == 1 * 2  # iter_size 2
    assert plain["init"] == ohem["init"] == tmp_path / "out" / "init.caffemodel"
    # both heads learn from 64 RoIs per image: sampled proposals, or the 64 hardest of them all
    assert plain["rois_per_iter"] == ohem["rois_per_iter"] == 128
    for method, r in run["results"].items():
        assert r["model"].parent == tmp_path / "out" / demo.method_dir(method)
        assert all(0.0 <= t["mAP"] <= 1.0 for t in r["test"].values())
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["detector"] == "faster-rcnn" and saved["same_images_per_step"] is True
    with pytest.raises(ConfigError, match="--detector 'yolo'"):
        demo.run_demo(tmp_path / "x", iters=1, detector="yolo")
