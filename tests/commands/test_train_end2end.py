"""Faster R-CNN end-to-end on the mini-VOC with the small net (RPN layers, HAS_RPN data layer):
the loss is finite and falls; OHEM end-to-end resumes exactly and logs its kept RoIs (proposals);
the RPN-mining and focal-loss variants train; ``test`` detects with the net's own RPN and reads
no proposals file."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from readonly_ohem.commands.test import test_command
from readonly_ohem.commands.train import train_command
from readonly_ohem.config import load_config
from readonly_ohem.datasets import get_imdb
from readonly_ohem.datasets.minivoc import make_minivoc
from readonly_ohem.inspect import read_log
from readonly_ohem.train import run_training, setup_training
from readonly_ohem.train_state import read_state

REPO = Path(__file__).resolve().parents[2]
CFGS = [str(REPO / "prototxt" / "cfgs" / n) for n in ("small.yml", "faster_rcnn_end2end.yml")]
OHEM_CFG = str(REPO / "prototxt" / "cfgs" / "faster_rcnn_end2end_ohem.yml")
SMALLER = [["TRAIN.SCALES", "(128,)"], ["TRAIN.MAX_SIZE", "200"], ["TEST.SCALES", "(128,)"],
           ["TEST.MAX_SIZE", "200"]]


def solver(method):
    return REPO / "prototxt" / "small" / method / "solver.prototxt"


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e") / "voc"
    make_minivoc(d, seed=0, num_images=6, verbose=False)
    return d


def test_end2end_small_net_loss_is_finite_and_falls(voc, tmp_path):
    cfg = load_config(CFGS, SMALLER)
    imdb = get_imdb("voc_2007_trainval", voc, None, cfg, cache_dir=False)
    trainer = setup_training(solver("faster_rcnn_end2end"), cfg, imdb, output=tmp_path,
                             verbose=False, stream=io.StringIO())
    losses, blobs = [], []
    for _ in range(10):
        out = trainer.solver.step(None)
        losses.append(out["loss"])
        blobs.append(out["losses"])
    assert set(blobs[0]) == {"rpn_cls_loss", "rpn_loss_bbox", "loss_cls", "loss_bbox"}
    assert np.isfinite(losses).all() and all(np.isfinite(list(b.values())).all() for b in blobs)
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    # the RPN learns too: its classification loss starts at log 2 (untrained objectness)
    assert blobs[0]["rpn_cls_loss"] == pytest.approx(np.log(2), abs=0.05)
    assert np.mean([b["rpn_cls_loss"] for b in blobs[-4:]]) < blobs[0]["rpn_cls_loss"]


def test_end2end_ohem_resumes_exactly_logs_proposals_and_tests_without_proposals(voc, tmp_path):
    common = dict(solver=str(solver("faster_rcnn_end2end_ohem")), imdb="voc_2007_trainval",
                  data=str(voc), cfg=CFGS + [OHEM_CFG],
                  set_pairs=SMALLER + [["TRAIN.OHEM_BATCH_SIZE", "16"], ["TRAIN.SNAPSHOT_ITERS", "1"]],
                  stream=io.StringIO())
    log = tmp_path / "kept.jsonl"
    assert train_command(iters=2, output=str(tmp_path / "a"), log_kept_rois=str(log), **common) == 0
    state = tmp_path / "a" / "small_faster_rcnn_ohem_iter_1.state.safetensors"
    assert train_command(iters=2, output=str(tmp_path / "b"), resume=str(state), **common) == 0
    a = read_state(tmp_path / "a" / "small_faster_rcnn_ohem_iter_2.state.safetensors")
    b = read_state(tmp_path / "b" / "small_faster_rcnn_ohem_iter_2.state.safetensors")
    assert a["data"] == b["data"] and a["data"]
    # the RPN layers' subsampling generators are part of the state
    assert set(a["layer_rng"]) == {"rpn-data", "roi-data"} and a["layer_rng"] == b["layer_rng"]
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    # kept RoIs: 16 hard ones per pass among every proposal (+ gt) the RPN made
    kept = read_log(log)
    assert kept.iterations == [0, 1]
    rec = kept[0]
    assert rec.num_kept == 16 and rec.num_rois > 16
    assert (rec.arrays["roidb_rows"] == -1).all()  # proposals: no roidb rows behind them
    # test: the net's own RPN; no proposals file is read (the one named does not exist)
    out = tmp_path / "test"
    model = tmp_path / "a" / "small_faster_rcnn_ohem_iter_2.caffemodel"
    assert test_command(str(REPO / "prototxt" / "small" / "faster_rcnn_end2end" / "test.prototxt"),
                        str(model), "voc_2007_test", data=str(voc), cfg=CFGS, set_pairs=SMALLER,
                        proposals=str(tmp_path / "missing.mat"), output=str(out)) == 0
    assert len(list(out.glob("comp4_det_test_*.txt"))) == 20


@pytest.mark.parametrize("method, mining", [("faster_rcnn_end2end_focal", "random"),
                                            ("faster_rcnn_end2end", "topk_threshold"),
                                            ("faster_rcnn_end2end", "neg_pos")])
def test_end2end_mining_variants_train(voc, tmp_path, method, mining):
    cfg = load_config(CFGS, SMALLER + [["TRAIN.RPN_MINING", mining]])
    imdb = get_imdb("voc_2007_trainval", voc, None, cfg, cache_dir=False)
    trainer = setup_training(solver(method), cfg, imdb, output=tmp_path, verbose=False,
                             stream=io.StringIO())
    models = run_training(trainer, 1)
    assert models and np.isfinite(trainer.solver.smoothed_loss())
