"""The training loop: snapshots (names, bbox un-normalization, atomic writes), resume equality,
NaN stop, SIGINT snapshot, logging. The command's real runs: ``tests/commands/test_train_command.py``."""

import contextlib
import os
import signal
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from readonly_ohem.config import default_config
from readonly_ohem.errors import ConfigError
from readonly_ohem.caffe.solver import NonFiniteLossError
from malicious import assert_live, pickle_bytes, torch_save_file
from readonly_ohem.train import (
    attach_kept_roi_log,
    build_trainer,
    check_num_classes,
    find_bbox_pred,
    normalize_bbox_pred,
    resolve_resume,
    unnormalize_bbox_pred,
    unnormalized_bbox_pred,
)
from readonly_ohem.caffe.weights import blob_to_array, read_caffemodel
from readonly_ohem import train_state
from readonly_ohem.train_state import read_state, save_state

REPO = Path(__file__).resolve().parents[1]

NET = """
name: "tiny_frcn_head"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 6 } } }
layer { name: "labels" type: "Input" top: "labels" input_param { shape { dim: 4 } } }
layer { name: "bbox_targets" type: "Input" top: "bbox_targets" input_param { shape { dim: 4 dim: 8 } } }
layer { name: "fc1" type: "InnerProduct" bottom: "data" top: "fc1"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu1" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "drop1" type: "Dropout" bottom: "fc1" top: "fc1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "cls_score" type: "InnerProduct" bottom: "fc1" top: "cls_score"
        param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bbox_pred" type: "InnerProduct" bottom: "fc1" top: "bbox_pred"
        param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.3 }
                              bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss_cls" type: "SoftmaxWithLoss" bottom: "cls_score" bottom: "labels" top: "loss_cls" }
layer { name: "loss_bbox" type: "SmoothL1Loss" bottom: "bbox_pred" bottom: "bbox_targets"
        top: "loss_bbox" loss_weight: 1 }
"""
SOLVER = """train_net: "net.prototxt"
base_lr: 0.05
lr_policy: "step"
gamma: 0.5
stepsize: 3
momentum: 0.9
weight_decay: 0.001
iter_size: 2
display: 2
average_loss: 3
max_iter: 6
snapshot_prefix: "tiny"
"""
MEANS = np.array([0, 0, 0, 0, 0.1, -0.2, 0.3, 0.05])
STDS = np.array([0, 0, 0, 0, 0.1, 0.1, 0.2, 0.2])


def feed(it, p, nan_at=None):
    g = torch.Generator().manual_seed(100 * it + p)
    f = {"data": torch.randn(4, 6, generator=g),
         "labels": torch.randint(0, 2, (4,), generator=g).float(),
         "bbox_targets": torch.randn(4, 8, generator=g)}
    if nan_at is not None and it == nan_at:
        f["bbox_targets"][0, 0] = float("nan")
    return f


@pytest.fixture
def exp_dir(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(SOLVER)
    return tmp_path


def make(exp_dir, out="out", snapshot_iters=2, feed_fn=feed, stream=None, **cfg_keys):
    cfg = default_config()
    cfg.TRAIN.SNAPSHOT_ITERS = snapshot_iters
    for k, v in cfg_keys.items():
        cfg.TRAIN[k] = v
    torch.manual_seed(cfg.RNG_SEED)
    np.random.seed(cfg.RNG_SEED)
    return build_trainer(exp_dir / "solver.prototxt", cfg, bbox_means=MEANS, bbox_stds=STDS,
                         output=exp_dir / out, feed_fn=feed_fn, stream=stream)


def weights(trainer):
    return {q.key: q.tensor.detach().clone() for q in trainer.net.learnable_params()}


def test_snapshots_names_and_bbox_unnormalization(exp_dir):
    t = make(exp_dir, SNAPSHOT_INFIX="x")
    models = t.train(3)
    out = exp_dir / "out"
    assert [m.name for m in models] == ["tiny_x_iter_2.caffemodel", "tiny_x_iter_3.caffemodel"]
    for n in (2, 3):
        assert (out / f"tiny_x_iter_{n}.state.safetensors").is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    w, b = (x.detach().numpy() for x in t.net.layer_params("bbox_pred"))
    saved = {name: [blob_to_array(bl) for bl in blobs]
             for name, _, blobs in read_caffemodel(out / "tiny_x_iter_3.caffemodel")}
    np.testing.assert_allclose(saved["bbox_pred"][0], w * STDS[:, None], rtol=1e-6)
    np.testing.assert_allclose(saved["bbox_pred"][1], b * STDS + MEANS, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(saved["cls_score"][0], t.net.layer_params("cls_score")[0].detach())
    # the net keeps its normalized weights (restored after saving)
    state = read_state(out / "tiny_x_iter_3.state.safetensors")
    np.testing.assert_array_equal(state["weights"]["bbox_pred/0"].numpy(), w)


def test_snapshots_get_the_mode_a_plain_open_would(exp_dir):
    old = os.umask(0o027)
    try:
        make(exp_dir).train(2)
    finally:
        os.umask(old)
    for name in ("tiny_iter_2.caffemodel", "tiny_iter_2.state.safetensors"):
        assert stat.S_IMODE((exp_dir / "out" / name).stat().st_mode) == 0o640, name


def test_no_unnormalization_when_targets_not_normalized(exp_dir):
    t = make(exp_dir, BBOX_NORMALIZE_TARGETS=False)
    t.train(2)
    saved = {name: [blob_to_array(bl) for bl in blobs]
             for name, _, blobs in read_caffemodel(exp_dir / "out" / "tiny_iter_2.caffemodel")}
    np.testing.assert_array_equal(saved["bbox_pred"][1], t.net.layer_params("bbox_pred")[1].detach())


def test_bbox_pred_normalize_undoes_unnormalize_and_the_context_restores_exactly(exp_dir):
    t = make(exp_dir)
    before = [x.detach().clone() for x in t.net.layer_params("bbox_pred")]
    with unnormalized_bbox_pred(t.net, MEANS, STDS):
        w, b = (x.detach().clone() for x in t.net.layer_params("bbox_pred"))
        np.testing.assert_allclose(w.numpy(), before[0].numpy() * STDS[:, None], rtol=1e-6)
        np.testing.assert_allclose(b.numpy(), before[1].numpy() * STDS + MEANS, rtol=1e-6, atol=1e-7)
    for x, y in zip(t.net.layer_params("bbox_pred"), before):
        assert torch.equal(x.detach(), y)  # copied back, bit-exact
    keep = STDS > 0  # class 0 (background) has std 0: nothing to normalize back
    stds = np.where(keep, STDS, 1.0)
    unnormalize_bbox_pred(t.net, MEANS, stds)
    normalize_bbox_pred(t.net, MEANS, stds)
    for x, y in zip(t.net.layer_params("bbox_pred"), before):
        np.testing.assert_allclose(x.detach().numpy(), y.numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="bbox_pred has 8 outputs, the target stds 4"):
        normalize_bbox_pred(t.net, MEANS[:4], STDS[:4])
    assert find_bbox_pred(t.net) == "bbox_pred"
    assert find_bbox_pred(t.net, ("bbox_pred_readonly", "cls_score")) == "cls_score"
    assert find_bbox_pred(t.net, ("relu1",)) is None  # no weight and bias


def test_resume_equals_uninterrupted_run(exp_dir):
    straight = make(exp_dir, out="a")
    straight.train(6)
    first = make(exp_dir, out="b")
    first.train(3)  # snapshots at 2 and 3
    resumed = make(exp_dir, out="b")
    resumed.load_state(exp_dir / "b" / "tiny_iter_3.state.safetensors")
    assert resumed.solver.iter == 3
    resumed.train(6)
    wa, wb = weights(straight), weights(resumed)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for k, h in straight.solver.history.items():
        assert torch.equal(h, resumed.solver.history[k]), k
    assert straight.solver.smoothed_loss() == resumed.solver.smoothed_loss()


def test_atomic_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "s.state.safetensors"
    save_state(path, {"a": 1})
    real = train_state.atomic_write

    @contextlib.contextmanager
    def killed_mid_write(p):
        with real(p) as f:
            class Dying:
                def write(self, data):
                    f.write(data[: len(data) // 2])
                    raise KeyboardInterrupt  # the process dies mid-write
            yield Dying()

    monkeypatch.setattr(train_state, "atomic_write", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_state(path, {"a": 2})
    monkeypatch.undo()
    assert read_state(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["s.state.safetensors"]


def test_nan_loss_stops_naming_iteration_blob_layer_and_keeps_last_snapshot(exp_dir):
    t = make(exp_dir, feed_fn=lambda it, p: feed(it, p, nan_at=3))
    with pytest.raises(NonFiniteLossError) as e:
        t.train(6)
    msg = str(e.value)
    assert "iteration 3" in msg and "'loss_bbox'" in msg and "tiny_iter_2.caffemodel" in msg
    assert t.solver.iter == 3
    files = sorted(p.name for p in (exp_dir / "out").iterdir())
    assert files == ["tiny_iter_2.caffemodel", "tiny_iter_2.state.safetensors"]
    # the weights are those after iteration 3 (the failed one did not update)
    ref = make(exp_dir, out="ref")
    ref.train(3)
    for k, v in weights(ref).items():
        assert torch.equal(v, weights(t)[k]), k


def test_sigint_writes_a_snapshot_and_stops(exp_dir):
    def feed_and_interrupt(it, p):
        if it == 1 and p == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return feed(it, p)

    t = make(exp_dir, snapshot_iters=100, feed_fn=feed_and_interrupt)
    models = t.train(6)
    assert t.interrupted == signal.SIGINT
    assert t.solver.iter == 2 and [m.name for m in models] == ["tiny_iter_2.caffemodel"]
    assert (exp_dir / "out" / "tiny_iter_2.state.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_display_lines_use_smoothed_losses(exp_dir, capsys):
    import io

    buf = io.StringIO()
    t = make(exp_dir, stream=buf)
    t.train(4)
    text = buf.getvalue()
    lines = [ln for ln in text.splitlines() if ln.startswith("Iteration")]
    assert [ln.split(",")[0] for ln in lines] == ["Iteration 0", "Iteration 2"]
    assert "loss_cls = " in lines[1] and "loss_bbox = " in lines[1] and "lr = 0.05" in lines[1]
    assert "s/iter" in text and "iter 4/4" in text
    # the window of 3 iterations: the mean of the last three reported losses
    assert t.solver.smoothed_loss() == pytest.approx(np.mean(list(t.solver._losses)))


def test_resume_rejects_a_foreign_file(exp_dir):
    t = make(exp_dir)
    bad = exp_dir / "bad.pt"
    torch.save({"x": 1}, bad)
    with pytest.raises(ConfigError, match="not a readonly-ohem training state"):
        t.load_state(bad)


def test_log_kept_rois_needs_an_ohem_layer(exp_dir):
    t = make(exp_dir)
    with pytest.raises(ConfigError, match="no OHEM layer"):
        attach_kept_roi_log(t.net, str(exp_dir / "log"), 1, lambda: 0)


# -- the state file: nothing in it runs, every flaw named ------------------------------------------
def test_resume_refuses_an_old_pickle_state_and_runs_none_of_it(exp_dir):
    marker = exp_dir / "MARKER"
    t = make(exp_dir)
    old = torch_save_file(exp_dir / "tiny_iter_3.state.pt", marker)
    raw = exp_dir / "tiny_iter_4.state.safetensors"  # a bare pickle under the new name
    raw.write_bytes(pickle_bytes(marker))
    for path in (old, raw):
        with pytest.raises(ConfigError) as e:
            t.load_state(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: not a readonly-ohem training state but a pickle")
        assert "refused" in msg and "can run any code" in msg and "\n" not in msg
        assert not marker.exists()
    assert t.solver.iter == 0  # nothing of it was taken either
    assert_live(lambda p: torch.load(p, weights_only=False), old, marker)  # the payload is real


def _broken_copy(src, dst, edit):
    state = read_state(src)
    edit(state)
    save_state(dst, state)
    return dst


def test_a_state_missing_a_key_or_with_a_misfit_tensor_names_the_file_and_key(exp_dir):
    make(exp_dir).train(2)
    good = exp_dir / "out" / "tiny_iter_2.state.safetensors"
    cases = [
        (lambda s: s["solver"].pop("current_step"), "the training state has no key 'solver.current_step'"),
        (lambda s: s.pop("rng"), "the training state has no key 'rng'"),
        (lambda s: s["rng"].pop("numpy"), "the training state has no key 'rng.numpy'"),
        (lambda s: s["solver"].update(iter="2"), "key 'solver.iter' of the training state should be an integer"),
        (lambda s: s["weights"].update({"fc1/0": torch.zeros(3, 3)}),
         r"key 'weights.fc1/0' has shape \(3, 3\) in the state, param 'fc1/0' has \(5, 6\)"),
        (lambda s: s["solver"]["history"].update({"fc1/0": torch.zeros(2)}),
         r"solver state: history 'fc1/0' has shape \(2,\), the param \(5, 6\)"),
        (lambda s: s["rng"].update(torch=torch.zeros(7, dtype=torch.uint8)),
         "key 'rng.torch' is not a torch generator state"),
        (lambda s: s["rng"]["numpy"].update(keys=[1, 2]), "key 'rng.numpy' is not a numpy generator state"),
    ]
    for i, (edit, expect) in enumerate(cases):
        bad = _broken_copy(good, exp_dir / f"bad{i}.state.safetensors", edit)
        with pytest.raises(ConfigError, match=expect) as e:
            make(exp_dir).load_state(bad)
        assert str(e.value).startswith(f"{bad}: ") and "\n" not in str(e.value), expect


def test_a_truncated_state_names_the_newest_one_that_loads(exp_dir):
    make(exp_dir).train(3)  # snapshots at 2 and 3
    out = exp_dir / "out"
    newest = out / "tiny_iter_3.state.safetensors"
    data = newest.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 10, 0):
        newest.write_bytes(data[:cut])
        with pytest.raises(ConfigError) as e:
            make(exp_dir).load_state(newest)
        msg = str(e.value)
        assert msg.startswith(f"{newest}: not a readonly-ohem training state, or a truncated one")
        assert msg.endswith(f"the newest loadable state beside it is {out / 'tiny_iter_2.state.safetensors'} "
                            "(or use --resume auto)")


def test_resume_auto_skips_a_truncated_newest_state_with_a_warning_and_equals_a_straight_run(exp_dir):
    straight = make(exp_dir, out="a")
    straight.train(6)
    make(exp_dir, out="b").train(4)  # snapshots at 2 and 4; the one at 4 is cut short
    out = exp_dir / "b"
    (out / "tiny_iter_4.state.safetensors").write_bytes(
        (out / "tiny_iter_4.state.safetensors").read_bytes()[:-100])
    stem = out / "tiny"
    with pytest.warns(UserWarning) as w:
        path = resolve_resume("auto", stem)
    assert path == out / "tiny_iter_2.state.safetensors"
    assert [str(x.message) for x in w] == [
        f"--resume auto: skipped {out / 'tiny_iter_4.state.safetensors'} (not a readonly-ohem "
        "training state, or a truncated one (safetensors: Error while deserializing header: "
        f"incomplete metadata, file not fully covered)); resuming from {path}"]
    resumed = make(exp_dir, out="b")
    resumed.load_state(path)
    resumed.train(6)
    for k, v in weights(straight).items():
        assert torch.equal(v, weights(resumed)[k]), k
    assert straight.solver.smoothed_loss() == resumed.solver.smoothed_loss()


def test_resume_auto_without_a_usable_state(exp_dir):
    out = exp_dir / "out"
    out.mkdir()
    assert resolve_resume("auto", out / "tiny") is None  # nothing there: a fresh start
    assert resolve_resume(None, out / "tiny") is None
    with pytest.raises(ConfigError, match="^x.state.safetensors: training state not found$"):
        resolve_resume("x.state.safetensors", out / "tiny")  # a path is checked at once
    (out / "tiny_iter_2.state.pt").write_bytes(b"\x80\x04old pickle")
    with pytest.raises(ConfigError, match="holds only pickle states of an earlier version "
                                          r"\(e.g. tiny_iter_2.state.pt\), refused"):
        resolve_resume("auto", out / "tiny")
    (out / "tiny_iter_2.state.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (out / "tiny_iter_10.state.safetensors").write_bytes(b"")
    (out / "other_iter_20.state.safetensors").write_bytes(b"")  # another solver's: not looked at
    with pytest.warns(UserWarning) as w:
        with pytest.raises(ConfigError, match=r"--resume auto: no training state under "
                                              rf"{out / 'tiny'}_iter_\* loads \(the newest, "
                                              rf"{out / 'tiny_iter_10.state.safetensors'}: "):
            resolve_resume("auto", out / "tiny")
    assert [str(x.message).split(" (")[0] for x in w] == [
        f"--resume auto: skipped {out / 'tiny_iter_10.state.safetensors'}",
        f"--resume auto: skipped {out / 'tiny_iter_2.state.safetensors'}"]


def test_resuming_under_another_config_warns_naming_the_keys(exp_dir):
    make(exp_dir).train(2)
    t = make(exp_dir, FG_FRACTION=0.5)
    with pytest.warns(UserWarning, match=r"differs from the run's in TRAIN.FG_FRACTION$"):
        t.load_state(exp_dir / "out" / "tiny_iter_2.state.safetensors")
    assert t.solver.iter == 2


def test_check_num_classes_reads_every_python_layer_of_the_train_net(tmp_path):
    """Inline train_net_param: RoIDataLayer and a second layer giving num_classes are compared
    with the dataset's count; a foreign layer whose param_str is no YAML mapping is left to its
    own parsing, a layer of another phase is not read."""
    def layer(name, module, cls, param_str, extra=""):
        return (f'layer {{ name: "{name}" type: "Python" top: "{name}" {extra} '
                f'python_param {{ module: "{module}" layer: "{cls}" param_str: "{param_str}" }} }}')

    layers = [layer("data", "roi_data_layer.layer", "RoIDataLayer", "'num_classes': 3"),
              layer("foreign", "my.module", "Thing", "not yaml: [unclosed"),
              layer("test_only", "my.module", "Other", "'num_classes': 7", "include { phase: TEST }"),
              layer("mining", "roi_data_layer.layer", "OHEMDataLayer", "{'num_classes': NUM}")]
    solver = tmp_path / "solver.prototxt"

    def write(num):
        net = "\n".join(layers).replace("NUM", str(num))
        solver.write_text(f"train_net_param {{ name: 'n' {net} }}\nbase_lr: 0.1\nlr_policy: 'fixed'\n")

    write(3)
    check_num_classes(solver, SimpleNamespace(num_classes=3, name="toy"))
    with pytest.raises(ConfigError) as e:
        check_num_classes(solver, SimpleNamespace(num_classes=4, name="toy"))
    assert str(e.value).startswith(f"{solver}:train_net_param: layer 'data' (RoIDataLayer) is made "
                                   "for 3 classes (param_str num_classes), the dataset toy has 4 "
                                   "(3 categories + __background__)")
    write(5)
    with pytest.raises(ConfigError, match="layer 'mining' \\(OHEMDataLayer\\) is made for 5 classes"):
        check_num_classes(solver, SimpleNamespace(num_classes=3, name="toy"))
