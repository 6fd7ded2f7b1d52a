"""``readonly-ohem train``: a short real run on the mini-VOC (small OHEM net, RoIDataLayer):
resume equals an uninterrupted run; user errors before any iteration."""

from pathlib import Path

import numpy as np
import pytest
import torch

from malicious import torch_save_file
from readonly_ohem.caffe.weights import blob_to_array, read_caffemodel
from readonly_ohem.cli import main
from readonly_ohem.commands.train import train_command
from readonly_ohem.errors import ConfigError
from readonly_ohem.inspect import read_log
from readonly_ohem.train_state import read_state

REPO = Path(__file__).resolve().parents[2]


def _small_solver(kind):
    return REPO / "prototxt" / "small" / kind / "solver.prototxt"


@pytest.fixture
def voc_data(tmp_path, request):
    """(data dir, proposals file or None): a 6-image mini-VOC, else the shared original-pipeline set."""
    try:
        from readonly_ohem.datasets.minivoc import make_minivoc
    except ImportError:
        shared = request.getfixturevalue("shared_dir") / "original_pipeline" / "train"
        return shared, shared / "voc_2007_trainval.mat"
    make_minivoc(tmp_path / "voc", seed=0, num_images=6)
    return tmp_path / "voc", None


def test_train_command_ohem_resume_equals_uninterrupted(tmp_path, voc_data):
    solver = _small_solver("fast_rcnn_ohem")
    if not solver.is_file():
        pytest.skip("prototxt/small/fast_rcnn_ohem/solver.prototxt not there yet")
    data, proposals = voc_data
    common = dict(solver=str(solver), imdb="voc_2007_trainval", data=str(data),
                  proposals=None if proposals is None else str(proposals),
                  cfg=[str(REPO / "prototxt" / "cfgs" / "fast_rcnn_ohem.yml")],
                  set_pairs=[["TRAIN.SCALES", "(96,)"], ["TRAIN.MAX_SIZE", "160"],
                             ["TRAIN.SNAPSHOT_ITERS", "1"]], stream=__import__("io").StringIO())
    log = tmp_path / "kept.log"
    assert train_command(iters=2, output=str(tmp_path / "a"), log_kept_rois=str(log), log_every=1,
                         **common) == 0
    assert read_log(log).iterations == [0, 1]  # the hook is attached: both iterations logged
    # the straight run's own snapshot at 1 stands for an interrupted run
    state = tmp_path / "a" / "small_fast_rcnn_ohem_iter_1.state.safetensors"
    assert train_command(iters=2, output=str(tmp_path / "b"), resume=str(state), **common) == 0
    a = read_state(tmp_path / "a" / "small_fast_rcnn_ohem_iter_2.state.safetensors")
    b = read_state(tmp_path / "b" / "small_fast_rcnn_ohem_iter_2.state.safetensors")
    assert a["data"] == b["data"] and a["data"]  # the data layer's order and cursor
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    # the snapshot un-normalizes bbox_pred (shared by bbox_pred and bbox_pred_readonly)
    saved = {name: [blob_to_array(bl) for bl in blobs] for name, _, blobs in
             read_caffemodel(tmp_path / "a" / "small_fast_rcnn_ohem_iter_2.caffemodel")}
    np.testing.assert_array_equal(saved["bbox_pred"][1], saved["bbox_pred_readonly"][1])
    assert not np.array_equal(saved["bbox_pred"][1], a["weights"]["bbox_pred_b"].numpy())
    # resuming at iteration 1 with --iters 1: nothing to do is an error, not a silent re-snapshot
    with pytest.raises(ConfigError, match="at iteration 1, already at or past the 1 asked for"):
        train_command(iters=1, output=str(tmp_path / "c"), resume=str(state), **common)
    assert not list((tmp_path / "c").glob("*.caffemodel"))


def test_train_command_user_errors_before_training(tmp_path, voc_data):
    """--iters < 1, an output dir or a kept-RoI log that cannot be created: ConfigError naming
    the option and path (the CLI prints it as one line), before any iteration runs."""
    data, proposals = voc_data
    common = dict(solver=str(_small_solver("fast_rcnn_ohem")), data=str(data),
                  proposals=None if proposals is None else str(proposals),
                  cfg=[str(REPO / "prototxt" / "cfgs" / "fast_rcnn_ohem.yml")],
                  set_pairs=[["TRAIN.SCALES", "(96,)"], ["TRAIN.MAX_SIZE", "160"]],
                  stream=__import__("io").StringIO())
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="--iters must be >= 1, got -3"):
        train_command(iters=-3, output=str(tmp_path / "o"), **common)
    with pytest.raises(ConfigError, match=f"--output {blocker / 'out'}: cannot create"):
        train_command(iters=1, output=str(blocker / "out"), **common)
    with pytest.raises(ConfigError, match=f"--log-kept-rois {blocker / 'k.jsonl'}: cannot write"):
        train_command(iters=1, output=str(tmp_path / "o"), log_kept_rois=str(blocker / "k.jsonl"),
                      **common)
    assert not list((tmp_path / "o").glob("*"))


def test_train_cli_refuses_a_crafted_state_and_resume_auto_skips_a_truncated_one(tmp_path, voc_data,
                                                                                 capsys):
    """``readonly-ohem train --resume``: an old pickle state is one line, exit 2, none of its code
    run; ``--resume auto`` passes over a cut-short newest state (warning) to the one before."""
    data, proposals = voc_data
    out = tmp_path / "out"
    argv = ["train", "--solver", str(_small_solver("fast_rcnn_ohem")), "--data", str(data),
            "--cfg", str(REPO / "prototxt" / "cfgs" / "fast_rcnn_ohem.yml"),
            "--set", "TRAIN.SCALES", "(96,)", "--set", "TRAIN.MAX_SIZE", "160",
            "--set", "TRAIN.SNAPSHOT_ITERS", "1", "--output", str(out)]
    if proposals is not None:
        argv += ["--proposals", str(proposals)]
    assert main(argv + ["--iters", "2"]) == 0
    stem = "small_fast_rcnn_ohem_iter_"
    marker = tmp_path / "MARKER"
    evil = torch_save_file(tmp_path / f"{stem}2.state.pt", marker)
    capsys.readouterr()
    assert main(argv + ["--iters", "3", "--resume", str(evil)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"readonly-ohem train: error: {evil}: not a readonly-ohem training state "
                          "but a pickle") and "refused" in err and "\n" not in err
    assert not marker.exists()
    newest = out / f"{stem}2.state.safetensors"
    whole = newest.read_bytes()
    (tmp_path / "whole.state.safetensors").write_bytes(whole)
    newest.write_bytes(whole[:-1])
    with pytest.warns(UserWarning, match=f"--resume auto: skipped {newest} .*; resuming from "
                                         f"{out / (stem + '1.state.safetensors')}"):
        assert main(argv + ["--iters", "2", "--resume", "auto"]) == 0
    text = capsys.readouterr().out
    assert f"Resumed from {out / (stem + '1.state.safetensors')} at iteration 1" in text
    # iteration 1 again from the state before it: the same state as the straight run's, to the bit
    a, b = read_state(tmp_path / "whole.state.safetensors"), read_state(newest)
    assert a["iter"] == b["iter"] == 2 and a["data"] == b["data"] and a["rng"]["numpy"] == b["rng"]["numpy"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
        assert torch.equal(a["solver"]["history"][k], b["solver"]["history"][k]), k
