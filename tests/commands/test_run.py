"""``readonly-ohem run``: feeds by blob name, batch keys for solver passes, config handed to
Python layers (``--set``), data layers skipped when their tops are given, output keys."""

import shutil
from pathlib import Path

import numpy as np

from readonly_ohem.cli import main
from readonly_ohem.commands.run import split_batches

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "caffe_goldens"


def test_split_batches_adds_plain_keys_to_every_batch():
    a, b, c = np.zeros(1), np.ones(1), np.full(1, 2.0)
    feeds = split_batches({"batch1/x": b, "batch0/x": a, "labels": c}, "in.npz")
    assert [f["x"][0] for f in feeds] == [0, 1] and all(f["labels"] is c for f in feeds)
    assert split_batches({"x": a}, "in.npz") == [{"x": a}]


def _forward_loss(case, inputs, tmp_path):
    np.savez(tmp_path / "one.npz", **inputs)
    assert main(["run", str(case / "net.prototxt"), "--inputs", str(tmp_path / "one.npz"),
                 "--out", str(tmp_path / "one_out.npz"),
                 "--weights", str(case / "weights.caffemodel")]) == 0
    return float(np.load(tmp_path / "one_out.npz")["loss"])


def test_solver_passes_take_batch_f_mod_k(tmp_path):
    """lr 0 keeps the weights, so iteration t's loss is the mean over its iter_size passes of
    the forward losses of batches (2t, 2t+1) mod 3."""
    case = FIXTURES / "solver_step_small"
    shutil.copy(case / "net.prototxt", tmp_path / "net.prototxt")
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt"\nbase_lr: 0\nlr_policy: "fixed"\nmomentum: 0.9\n'
        'weight_decay: 0\niter_size: 2\nmax_iter: 3\n')
    base = dict(np.load(case / "inputs.npz"))
    rng = np.random.default_rng(0)
    batches = [{"data": (base["data"] * s).astype(np.float32), "labels": base["labels"]}
               for s in (1.0, -0.5, 2.0)]
    batches[2]["labels"] = rng.integers(0, 3, size=base["labels"].shape).astype(np.float32)
    losses = [_forward_loss(case, b, tmp_path) for b in batches]
    packed = {f"batch{k}/{n}": v for k, b in enumerate(batches) for n, v in b.items()}
    np.savez(tmp_path / "in.npz", **packed)
    out = tmp_path / "out.npz"
    assert main(["run", str(tmp_path / "net.prototxt"), "--inputs", str(tmp_path / "in.npz"),
                 "--out", str(out), "--weights", str(case / "weights.caffemodel"),
                 "--solver", str(tmp_path / "solver.prototxt"), "--iters", "3"]) == 0
    got = np.load(out)
    want = [(losses[0] + losses[1]) / 2, (losses[2] + losses[0]) / 2, (losses[1] + losses[2]) / 2]
    np.testing.assert_allclose(got["loss_per_iter"], want, rtol=1e-5)
    np.testing.assert_array_equal(got["lr_per_iter"], [0, 0, 0])
    init = np.load(case / "expected.npz")
    np.testing.assert_array_equal(got["final_param/fc/0"], init["initial_param/fc/0"])


OHEM_NET = """
name: "ohem_only"
input: "cls_prob" input_shape { dim: 6 dim: 3 }
input: "bbox_pred" input_shape { dim: 6 dim: 12 }
input: "rois" input_shape { dim: 6 dim: 5 }
input: "labels" input_shape { dim: 6 }
input: "bbox_targets" input_shape { dim: 6 dim: 12 }
input: "bbox_inside_weights" input_shape { dim: 6 dim: 12 }
input: "bbox_outside_weights" input_shape { dim: 6 dim: 12 }
layer {
  name: "hard_roi_mining" type: "Python"
  bottom: "cls_prob" bottom: "bbox_pred" bottom: "rois" bottom: "labels"
  bottom: "bbox_targets" bottom: "bbox_inside_weights" bottom: "bbox_outside_weights"
  top: "rois_hard" top: "labels_hard" top: "bbox_targets_hard"
  top: "bbox_inside_weights_hard" top: "bbox_outside_weights_hard"
  propagate_down: false propagate_down: false propagate_down: false propagate_down: false
  propagate_down: false propagate_down: false propagate_down: false
  python_param { module: "roi_data_layer.layer" layer: "OHEMDataLayer"
                 param_str: "'num_classes': 3" }
}
"""


def test_config_reaches_the_ohem_layer(tmp_path):
    """--set TRAIN.OHEM_USE_NMS False / TRAIN.BATCH_SIZE 3: the 3 highest-loss RoIs, in order
    (classification loss only here: all RoIs are background)."""
    (tmp_path / "ohem.prototxt").write_text(OHEM_NET)
    p_bg = np.array([0.9, 0.2, 0.5, 0.05, 0.7, 0.3], np.float32)
    cls_prob = np.stack([p_bg, (1 - p_bg) / 2, (1 - p_bg) / 2], 1).astype(np.float32)
    rois = np.array([[0, 10 * i, 10 * i, 10 * i + 50, 10 * i + 50] for i in range(6)], np.float32)
    z = np.zeros((6, 12), np.float32)
    np.savez(tmp_path / "in.npz", cls_prob=cls_prob, bbox_pred=z, rois=rois,
             labels=np.zeros(6, np.float32), bbox_targets=z, bbox_inside_weights=z,
             bbox_outside_weights=z)
    out = tmp_path / "out.npz"
    assert main(["run", str(tmp_path / "ohem.prototxt"), "--inputs", str(tmp_path / "in.npz"),
                 "--out", str(out), "--set", "TRAIN.OHEM_USE_NMS", "False",
                 "--set", "TRAIN.BATCH_SIZE", "3"]) == 0
    got = np.load(out)
    hardest = np.argsort(p_bg, kind="stable")[:3]  # lowest p[label] = highest -log p
    np.testing.assert_array_equal(got["rois_hard"], rois[hardest])
    assert got["labels_hard"].shape == (3,)


def test_reference_ohem_net_with_data_tops_given(shared_dir, tmp_path):
    """The VGG_CNN_M OHEM train net on a small image with its data-layer tops given: the data
    layer is not built, the readonly head keeps no graph, and the shared fc weights get the
    trainable path's diff under both sharers."""
    net = shared_dir / "reference_prototxt/pascal_voc/VGG_CNN_M_1024/fast_rcnn_ohem/train.prototxt"
    rng = np.random.default_rng(1)
    r = 12
    x1 = rng.uniform(0, 60, r)
    y1 = rng.uniform(0, 60, r)
    rois = np.stack([np.zeros(r), x1, y1, x1 + rng.uniform(20, 60, r),
                     y1 + rng.uniform(20, 60, r)], 1).astype(np.float32)
    labels = rng.integers(0, 21, r).astype(np.float32)
    targets = np.zeros((r, 84), np.float32)
    inside = np.zeros((r, 84), np.float32)
    for i, c in enumerate(labels.astype(int)):
        if c > 0:
            targets[i, 4 * c:4 * c + 4] = rng.normal(size=4)
            inside[i, 4 * c:4 * c + 4] = 1
    np.savez(tmp_path / "in.npz", data=rng.normal(0, 50, (1, 3, 128, 128)).astype(np.float32),
             rois=rois, labels=labels, bbox_targets=targets, bbox_inside_weights=inside,
             bbox_outside_weights=(inside > 0).astype(np.float32))
    out = tmp_path / "out.npz"
    assert main(["run", str(net), "--inputs", str(tmp_path / "in.npz"), "--out", str(out),
                 "--backward", "--set", "TRAIN.BATCH_SIZE", "4"]) == 0
    got = np.load(out)
    assert got["rois_hard"].shape == (4, 5) and got["loss_cls"].shape == ()
    assert not got["diff/fc6_readonly"].any() and not got["diff/cls_prob_readonly"].any()
    # fc6/fc7 have no fillers (zeros until a caffemodel is loaded), so the gradient stops at
    # fc7's ReLU; cls_score (its bias, and the blob) gets the trainable path's gradient
    assert got["diff/cls_score"].any() and not got["diff/cls_score_readonly"].any()
    for i in (0, 1):
        np.testing.assert_array_equal(got[f"param_diff/cls_score_readonly/{i}"],
                                      got[f"param_diff/cls_score/{i}"])
        np.testing.assert_array_equal(got[f"param_diff/fc6_readonly/{i}"],
                                      got[f"param_diff/fc6/{i}"])
    assert got["param_diff/cls_score/1"].any() and got["param_diff/bbox_pred/1"].any()
    assert not got["param_diff/conv1/0"].any()  # lr_mult 0


def test_plain_forward_writes_every_blob_and_no_diffs(tmp_path, capsys):
    case = FIXTURES / "fast_rcnn_mini_forward"
    out = tmp_path / "o.npz"
    assert main(["run", str(case / "net.prototxt"), "--inputs", str(case / "inputs.npz"),
                 "--out", str(out), "--phase", "TEST"]) == 0
    got = np.load(out)
    assert set(got.files) == set(np.load(case / "expected.npz").files)
    assert f"wrote {out}" in capsys.readouterr().out


def test_unfed_input_is_zeros_with_a_note(tmp_path, capsys):
    case = FIXTURES / "softmax_with_loss_valid"
    inputs = dict(np.load(case / "inputs.npz"))
    np.savez(tmp_path / "in.npz", scores=inputs["scores"])
    assert main(["run", str(case / "net.prototxt"), "--inputs", str(tmp_path / "in.npz"),
                 "--out", str(tmp_path / "o.npz")]) == 0
    assert "net input 'labels' is not in" in capsys.readouterr().err
    assert not np.load(tmp_path / "o.npz")["labels"].any()


def test_data_layer_with_some_tops_missing_names_them(tmp_path, capsys):
    """A RoIDataLayer needs a roidb that `run` cannot give: feeding only some of its tops is an
    error naming the layer and the missing tops (not a crash inside the layer)."""
    net = Path(__file__).resolve().parents[2] / "prototxt/small/fast_rcnn/train.prototxt"
    np.savez(tmp_path / "in.npz", data=np.zeros((1, 3, 32, 32), np.float32),
             rois=np.zeros((2, 5), np.float32))
    assert main(["run", str(net), "--inputs", str(tmp_path / "in.npz"),
                 "--out", str(tmp_path / "o.npz")]) == 2
    err = capsys.readouterr().err
    assert "layer 'data' (Python)" in err and "missing: labels, bbox_targets" in err
    assert len(err.strip().splitlines()) == 1


TWO_LOSSES = """
name: "two_losses"
input: "score" input_shape { dim: 1 dim: 2 }
input: "label" input_shape { dim: 1 }
input: "pred" input_shape { dim: 1 dim: 4 }
input: "target" input_shape { dim: 1 dim: 4 }
layer { name: "loss_cls" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss_cls" }
layer { name: "loss_bbox" type: "SmoothL1Loss" bottom: "pred" bottom: "target" top: "loss_bbox"
        loss_weight: 2 }
"""


def test_solver_writes_each_loss_tops_trajectory(tmp_path):
    """Three batches, iter_size 2: iteration 0 averages batches 0 and 1, iteration 1 batches 2
    and 0. Hand-worked per batch: cls -log p[label] with p from the scores, smooth-L1 of d:
      batch 0: scores (0, 0), label 0 -> ln 2;         d = (0.5, 0, 0, 0) -> 0.125
      batch 1: scores (0, ln 3), label 0 -> ln 4;      d = (2, 0, 0, 0)   -> 1.5
      batch 2: scores (0, ln 3), label 1 -> ln(4/3);   d = (0, 0, 0, -1)  -> 0.5
    loss_per_iter is the weighted total (loss_bbox has loss_weight 2); the tops' own are not."""
    (tmp_path / "net.prototxt").write_text(TWO_LOSSES)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\niter_size: 2\nmax_iter: 2\n')
    ln3 = np.log(3.0)
    batches = [((0, 0), 0, (0.5, 0, 0, 0)), ((0, ln3), 0, (2, 0, 0, 0)),
               ((0, ln3), 1, (0, 0, 0, -1))]
    arrays = {}
    for k, (score, label, d) in enumerate(batches):
        arrays[f"batch{k}/score"] = np.array([score], np.float32)
        arrays[f"batch{k}/label"] = np.array([label], np.float32)
        arrays[f"batch{k}/pred"] = np.array([d], np.float32)
    arrays["target"] = np.zeros((1, 4), np.float32)
    np.savez(tmp_path / "in.npz", **arrays)
    out = tmp_path / "out.npz"
    assert main(["run", str(tmp_path / "net.prototxt"), "--inputs", str(tmp_path / "in.npz"),
                 "--out", str(out), "--solver", str(tmp_path / "solver.prototxt"),
                 "--iters", "2"]) == 0
    got = np.load(out)
    ln2 = np.log(2.0)
    cls = [(ln2 + 2 * ln2) / 2, (np.log(4 / 3) + ln2) / 2]
    bbox = [(0.125 + 1.5) / 2, (0.5 + 0.125) / 2]
    np.testing.assert_allclose(got["loss_cls_per_iter"], cls, rtol=1e-6)
    np.testing.assert_array_equal(got["loss_bbox_per_iter"], bbox)
    np.testing.assert_allclose(got["loss_per_iter"], [cls[0] + 2 * bbox[0], cls[1] + 2 * bbox[1]],
                               rtol=1e-6)
    assert got["loss_per_iter"].shape == got["loss_cls_per_iter"].shape == (2,)


def test_a_loss_top_named_loss_does_not_overwrite_the_total(tmp_path):
    case = FIXTURES / "solver_step_small"  # its SoftmaxWithLoss top is named "loss"
    shutil.copy(case / "net.prototxt", tmp_path / "net.prototxt")
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt"\nbase_lr: 0\nlr_policy: "fixed"\nmomentum: 0.9\n')
    out = tmp_path / "out.npz"
    assert main(["run", str(tmp_path / "net.prototxt"), "--inputs", str(case / "inputs.npz"),
                 "--out", str(out), "--weights", str(case / "weights.caffemodel"),
                 "--solver", str(tmp_path / "solver.prototxt"), "--iters", "2"]) == 0
    got = np.load(out)
    assert "loss_per_iter" in got.files and "top/loss_per_iter" in got.files
    np.testing.assert_allclose(got["top/loss_per_iter"], got["loss_per_iter"], rtol=1e-6)
