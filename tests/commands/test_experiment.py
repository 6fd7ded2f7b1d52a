"""``readonly-ohem experiment``: the outputs' schema on a --quick run, the paired design (same
initial weights, same images in the same order per seed), every method's net, the statistics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from readonly_ohem.caffe.net import Net
from readonly_ohem.caffe.spec import read_solver
from readonly_ohem.caffe.weights import read_caffemodel
from readonly_ohem.cli import build_parser
from readonly_ohem.commands import experiment
from readonly_ohem.commands.experiment_report import pairing, summarize, t_interval
from readonly_ohem.errors import ConfigError
from readonly_ohem.ohem.focal_layer import FocalLossLayer
from readonly_ohem.train import find_ohem_layers

QUICK_METHODS = ["frcn", "frcn-n1", "ohem", "focal"]
SEEDS = [1, 2]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``--quick`` with 4 methods (the plain net, its 1-image form, the OHEM net, the focal loss)
    x 2 seeds, the 8 runs on 2 worker processes (``--jobs 2``: one torch thread each), then the
    summary in this process from their runs. One torch thread here too: on a busy 2-core machine
    two threads spin against each other (measured here: 8x slower per step at load 10)."""
    out = tmp_path_factory.mktemp("experiment")
    log = out / "stdout.txt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with open(log, "w") as stream:
            results = experiment.run_experiment(QUICK_METHODS, SEEDS, out, quick=True, jobs=2,
                                                stream=stream)
    finally:
        torch.set_num_threads(threads)
    return out, results, log.read_text()


def test_quick_run_writes_the_results_schema(quick):
    out, results, text = quick
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    runs = saved["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [(m, s) for s in SEEDS for m in QUICK_METHODS]
    for r in runs:
        assert 0.0 <= r["mAP"] <= 1.0 and r["ap"]
        assert r["mAP"] == pytest.approx(np.mean(list(r["ap"].values())))
        assert r["train_seconds"] > 0 and 0.0 <= r["fg_fraction"] <= 1.0
        assert r["iters"] == experiment.QUICK["iters"]
    by = {(r["method"], r["seed"]): r for r in runs}
    # FRCN samples at most round(0.25 * 64) fg of 64 per image; frcn-n1 1 image of 128 per step
    assert by[("frcn", 1)]["fg_fraction"] <= 0.25 + 1e-9 and by[("frcn", 1)]["rois_per_iter"] == 128
    assert by[("frcn-n1", 1)]["rois_per_iter"] <= 128 and by[("frcn-n1", 1)]["image_passes"] == 4
    assert by[("frcn", 1)]["image_passes"] == 8  # 2 passes of 1 image per step
    assert "hard_negatives" in by[("frcn", 1)] and "hard_negatives" not in by[("ohem", 1)]

    s = saved["summary"]
    assert set(s["methods"]) == set(QUICK_METHODS) and set(s["paired"]) == set(QUICK_METHODS) - {"frcn"}
    for m in QUICK_METHODS:
        per = s["methods"][m]["per_seed"]
        assert s["methods"][m]["mAP"]["mean"] == pytest.approx(np.mean(list(per.values())))
    p = s["paired"]["ohem"]
    assert p["diffs"] == {str(x): pytest.approx(by[("ohem", x)]["mAP"] - by[("frcn", x)]["mAP"])
                          for x in SEEDS}
    assert p["mean"] == pytest.approx(np.mean(list(p["diffs"].values())))
    assert s["design"]["seeds"] == SEEDS and s["design"]["iters"] == experiment.QUICK["iters"]
    assert "ohem - frcn" in s["verdict"] or "OHEM" in s["verdict"]
    h = s["hard_negatives"]
    assert h["runs"] == 2 and 0 <= h["hard_share_in_frcn_pool"] <= 1
    assert h["counts"]["hard"] <= h["counts"]["bg"] and h["counts"]["hard_in_pool"] <= h["counts"]["pool"]

    md = (out / "results.md").read_text()
    assert "| method | mAP | 95% interval | paired diff vs frcn |" in md
    for m in QUICK_METHODS:
        assert f"| {m} |" in md
    picture = Image.open(out / "results.png")
    assert picture.size[0] > 300 and picture.size[1] > 200
    for k in range(1, len(runs) + 1):  # progress: every run announced and reported
        assert f"[run {k}/{len(runs)}]" in text
    assert "8 runs on 2 worker processes" in text and "[workers] 8/8 runs done" in text
    for m in QUICK_METHODS:  # every run trained and tested in a worker, its output relayed
        for seed in SEEDS:
            assert f"[{m} seed {seed}] iter 4/4" in text
            assert f"[{m} seed {seed}]   max_per_image 100, thresh 0.05: mAP" in text
    assert text.count("reusing the finished run") == len(runs)  # the summary pass trains nothing


def test_paired_runs_share_initial_weights_and_image_order(quick):
    out, results, _ = quick
    runs = results["runs"]
    images = {(r["method"], r["seed"]): json.loads(
        (out / "runs" / r["method"] / f"seed_{r['seed']}" / "images.json").read_text()) for r in runs}
    iters = experiment.QUICK["iters"]
    for seed in SEEDS:
        rs = [r for r in runs if r["seed"] == seed]
        assert {r["init"] for r in rs} == {str(out / "init" / f"seed_{seed}.caffemodel")}
        frcn = images[("frcn", seed)]
        assert len(frcn) == 2 * iters
        assert images[("ohem", seed)] == frcn and images[("focal", seed)] == frcn
        assert images[("frcn-n1", seed)] == frcn[:iters]  # 1 image per step: the first half
    assert images[("frcn", 1)] != images[("frcn", 2)]  # the seed draws the order
    init = [read_caffemodel(out / "init" / f"seed_{s}.caffemodel") for s in SEEDS]
    w = [dict((name, blobs) for name, _, blobs in layers)["fc6"][0].data for layers in init]
    assert list(w[0]) != list(w[1])  # the seed draws the initial weights
    # every learnable param of every method's net is in its seed's init file (none left at a filler)
    for m in QUICK_METHODS:
        solver = out / "nets" / m / "solver.prototxt"
        net = Net.from_file(read_solver(solver).train_net, cfg=experiment.method_config(m, 1))
        report = net.load_caffemodel(out / "init" / "seed_1.caffemodel")
        assert not report.missing and not report.unknown, (m, report)
    assert results["summary"]["pairing"] == {
        "same_init": True, "same_images": True,
        "per_seed": {str(s): {"same_init": True, "same_images": True} for s in SEEDS}}


def test_a_rerun_reuses_the_finished_runs(quick, tmp_path):
    out, results, _ = quick
    with open(tmp_path / "log.txt", "w") as stream:
        again = experiment.run_experiment(["ohem", "frcn"], [2], out, quick=True, stream=stream)
    assert "reusing the finished run" in (tmp_path / "log.txt").read_text()
    old = {(r["method"], r["seed"]): r for r in results["runs"]}
    assert len(again["runs"]) == 2
    assert all(r == old[(r["method"], r["seed"])] for r in again["runs"])
    assert json.loads((out / "results.json").read_text())["runs"] == again["runs"]


def test_every_method_builds_its_own_net(tmp_path):
    nets = {}
    for m in experiment.METHODS:
        solver = experiment.write_nets(m, tmp_path / m)
        sp = read_solver(solver)
        net = Net.from_file(sp.train_net, cfg=experiment.method_config(m, 7))
        nets[m] = (sp, net, experiment.method_config(m, 7))
    policy = {m: find_ohem_layers(n)[0] for m, (_, n, _) in nets.items() if find_ohem_layers(n)}
    assert set(policy) == {"ohem", "ohem-nonms", "ratio", "neg-pos", "topk-threshold"}
    assert {m: layer.policy for m, layer in policy.items()} == {
        "ohem": "topk", "ohem-nonms": "topk", "ratio": "ratio", "neg-pos": "neg_pos",
        "topk-threshold": "topk_threshold"}
    assert policy["ratio"].policy_options == {"keep_ratio": 0.7}
    assert policy["neg-pos"].policy_options == {"neg_pos_ratio": 3.0}
    cfg = {m: c for m, (_, _, c) in nets.items()}
    assert [cfg[m].TRAIN.OHEM_USE_NMS for m in policy] == [True, False, False, False, False]
    assert cfg["frcn"].TRAIN.BG_THRESH_LO == 0.1 and cfg["frcn-bg0"].TRAIN.BG_THRESH_LO == 0.0
    assert not cfg["frcn"].TRAIN.USE_OHEM and cfg["focal"].TRAIN.USE_OHEM  # focal: every RoI
    assert all(c.RNG_SEED == 7 for c in cfg.values())
    assert isinstance(nets["focal"][1].layer("loss_cls"), FocalLossLayer)
    assert nets["focal"][1].loss_weights["loss_cls"] == 1.0
    # frcn-n1: 1 image of 128 RoIs per SGD step; every other: 2 passes of 1 image
    assert {m: (sp.iter_size, cfg[m].TRAIN.IMS_PER_BATCH, cfg[m].TRAIN.BATCH_SIZE)
            for m, (sp, _, _) in nets.items() if m.startswith("frcn")} == {
        "frcn": (2, 1, 64), "frcn-bg0": (2, 1, 64), "frcn-n1": (1, 1, 128)}
    assert all(sp.iter_size == 2 and sp.base_lr == pytest.approx(0.01)
               for m, (sp, _, _) in nets.items() if m != "frcn-n1")


def test_t_interval_and_paired_differences_by_hand():
    t = t_interval([0.5, 0.6, 0.7])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert t["mean"] == pytest.approx(0.6) and t["sd"] == pytest.approx(0.1)
    assert t["half_width"] == pytest.approx(half) and t["ci95"] == pytest.approx([0.6 - half, 0.6 + half])
    assert t_interval([0.4])["ci95"] is None

    def run(m, seed, mAP, init="a", order="x"):
        return {"method": m, "seed": seed, "mAP": mAP, "fg_fraction": 0.25, "sec_per_iter": 0.1,
                "train_seconds": 10.0, "init_sha256": init, "image_passes": 8,
                "image_order_sha256": order, "image_order_first_sha256": order}

    runs = [run("frcn", 1, 0.50), run("ohem", 1, 0.53), run("frcn", 2, 0.60), run("ohem", 2, 0.62),
            run("frcn", 3, 0.40), run("ohem", 3, 0.44)]
    s = summarize(runs, ["frcn", "ohem"], [1, 2, 3])
    p = s["paired"]["ohem"]
    assert p["diffs"] == pytest.approx({"1": 0.03, "2": 0.02, "3": 0.04})
    assert p["mean"] == pytest.approx(0.03) and p["sd"] == pytest.approx(0.01)
    assert p["half_width"] == pytest.approx(4.302652729911275 * 0.01 / math.sqrt(3))
    assert p["call"] == "better"  # [0.0052, 0.0548] lies above 0
    assert s["verdict"].startswith("OHEM beats frcn: mean paired difference +3.00 mAP points")
    assert "NOT within" in s["verdict"]  # half-width 2.48 points > 1.5
    assert s["pairing"]["same_init"] and s["pairing"]["same_images"]
    runs[3] = run("ohem", 2, 0.62, init="b")
    runs[5] = run("ohem", 3, 0.44, order="y")
    bad = pairing(runs, [1, 2, 3])
    assert bad["per_seed"] == {"1": {"same_init": True, "same_images": True},
                               "2": {"same_init": False, "same_images": True},
                               "3": {"same_init": True, "same_images": False}}


def test_bad_arguments_and_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['ohm'\]"):
        experiment.run_experiment(["frcn", "ohm"], [1], tmp_path)
    with pytest.raises(ConfigError, match="--seeds must name distinct seeds"):
        experiment.run_experiment(["frcn"], [1, 1], tmp_path)
    with pytest.raises(ConfigError, match="--iters must be >= 1"):
        experiment.run_experiment(["frcn"], [1], tmp_path, iters=0)
    with pytest.raises(ConfigError, match="--jobs must be >= 1"):
        experiment.run_experiment(["frcn"], [1], tmp_path, jobs=0)
    args = build_parser().parse_args(["experiment", "--methods", "frcn", "ohem", "--seeds", "3", "4",
                                      "--output", "d", "--quick", "--jobs", "2"])
    assert (args.methods, args.seeds, args.output, args.quick, args.iters, args.jobs) == (
        ["frcn", "ohem"], [3, 4], "d", True, None, 2)
    assert build_parser().parse_args(["experiment"]).jobs is None  # the command picks (2 CPUs: 2)
    assert list(experiment.METHODS)[:5] == ["frcn", "frcn-bg0", "frcn-n1", "ohem", "ohem-nonms"]
