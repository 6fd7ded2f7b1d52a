"""TensorBoard events (``readonly_ohem.tensorboard``), read back with TensorBoard's own reader.

A short OHEM training run with ``--tensorboard``: its loss, lr and OHEM scalars, histograms and
pictures are at the right steps with the values the solver and the OHEM layer produced; the
kept-RoI log of the same run converts to the same OHEM events. The hand-built log converts to
hand-worked numbers; the test command writes its AP; a missing tensorboard names the extra.
"""

import importlib
import io
import shutil
import sys
from inspect import signature
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorboard", reason="pip install '.[tensorboard]' (the event reader)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

import readonly_ohem.inspect as inspect_pkg  # noqa: E402
from readonly_ohem import cli, tensorboard  # noqa: E402
from readonly_ohem.caffe.net import Net  # noqa: E402
from readonly_ohem.caffe.solver import Solver  # noqa: E402
from readonly_ohem.commands import test as test_cmd  # noqa: E402
from readonly_ohem.commands.inspect import inspect_command  # noqa: E402
from readonly_ohem.commands.train import train_command  # noqa: E402
from readonly_ohem.datasets.minivoc import make_minivoc  # noqa: E402
from readonly_ohem.errors import ConfigError  # noqa: E402
from readonly_ohem.inspect import figure_size, read_log, render_selection  # noqa: E402
from readonly_ohem.inspect.log import make_recorder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "prototxt" / "small"
OHEM_CFG = REPO / "prototxt" / "cfgs" / "fast_rcnn_ohem.yml"
TINY = [["TRAIN.SCALES", "(128,)"], ["TRAIN.MAX_SIZE", "200"], ["TRAIN.SNAPSHOT_ITERS", "1000"],
        ["TEST.SCALES", "(128,)"], ["TEST.MAX_SIZE", "200"]]


def events(path) -> EventAccumulator:
    ea = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "images": 0,
                                                    "tensors": 0})
    ea.Reload()
    return ea


def scalars(ea, tag) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def f32(x) -> float:
    """What a TensorBoard scalar holds (float32)."""
    return float(np.float32(x))


def decoded(ea, tag) -> list[tuple[int, np.ndarray]]:
    return [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")))
            for e in ea.Images(tag)]


@pytest.fixture(scope="module")
def minivoc(tmp_path_factory):
    return make_minivoc(tmp_path_factory.mktemp("voc"), seed=1, num_images=5, verbose=False)


# -- a kept-RoI log: hand-worked numbers ----------------------------------------------------------
def test_hand_built_log_converts_to_hand_worked_events(hand_log, tmp_path):
    out = io.StringIO()
    assert inspect_command(str(hand_log), tensorboard=str(tmp_path / "tb"), stream=out) == 0
    assert "wrote 2 logged iteration(s)" in out.getvalue()
    ea = events(tmp_path / "tb")
    # iteration 0: losses 4, 3, 2, 1, 0.5 (labels 1, 0, 0, 2, 0), kept RoIs 0 and 2, RoI 1
    # suppressed though harder than the easiest kept. iteration 1: losses 1, 2, 0.25, 0.125
    # (labels 0, 3, 0, 0), kept 1, 0, 2; RoI 3 suppressed, and the batch of 4 was left short.
    want = {"ohem/rois_scored": [5, 4], "ohem/rois_kept": [2, 3], "ohem/fg_share_kept": [0.5, 1 / 3],
            "ohem/fg_share_all": [0.4, 0.25], "ohem/nms_suppressed": [1, 1],
            "ohem/harder_than_kept": [1, 1], "ohem/kept_loss_min": [2.0, 0.25],
            "ohem/kept_loss_max": [4.0, 2.0], "ohem/loss_mean_kept": [3.0, 3.25 / 3],
            "ohem/loss_mean_all": [2.1, 3.375 / 4]}
    assert set(want) == set(tensorboard.OHEM_SCALARS)
    for tag, values in want.items():
        assert scalars(ea, tag) == [(0, f32(values[0])), (1, f32(values[1]))], tag
    hist = {(tag, e.step): e.histogram_value for tag in ea.Tags()["histograms"]
            for e in ea.Histograms(tag)}
    # (num, sum, min, max) of the losses of all scored / kept RoIs, total, cls and bbox parts
    hand = {("ohem_loss/all", 0): (5, 10.5, 0.5, 4), ("ohem_loss/kept", 0): (2, 6, 2, 4),
            ("ohem_loss/cls_kept", 0): (2, 5.5, 2, 3.5), ("ohem_loss/bbox_all", 0): (5, 0.75, 0, 0.5),
            ("ohem_loss/bbox_kept", 0): (2, 0.5, 0, 0.5), ("ohem_loss/all", 1): (4, 3.375, 0.125, 2),
            ("ohem_loss/kept", 1): (3, 3.25, 0.25, 2), ("ohem_loss/cls_all", 1): (4, 2.875, 0.125, 1.5),
            ("ohem_loss/bbox_kept", 1): (3, 0.5, 0, 0.5)}
    for key, (num, total, lo, hi) in hand.items():
        h = hist[key]
        assert (h.num, h.min, h.max) == (num, lo, hi), key
        assert h.sum == pytest.approx(total), key
        assert sum(h.bucket) == num, key
    assert len(hist) == 12  # 6 tags x 2 iterations
    # the picture of each iteration is inspect's picture of its first image
    log = read_log(hand_log)
    pictures = decoded(ea, tensorboard.PICTURE_TAG)
    assert [s for s, _ in pictures] == [0, 1]
    for event, rec in zip(ea.Images(tensorboard.PICTURE_TAG), log):
        want = render_selection(rec.meta, rec.arrays, log.classes)
        assert (event.width, event.height) == want.size == figure_size(120, 90)
        assert event.encoded_image_string == tensorboard.encode_picture(want)
        got = Image.open(io.BytesIO(event.encoded_image_string))
        assert got.format == "JPEG" and got.size == want.size
        assert np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16)).mean() < 4  # lossy
    layout = ea.Tensors("custom_scalars__config__")
    assert len(layout) == 1 and b"ohem/fg_share_" in layout[0].tensor_proto.string_val[0]


def test_missing_tensorboard_names_the_extra(hand_log, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith(("tensorboard.",
                                                                                 "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    with pytest.raises(ConfigError, match=r"tensorboard package is not installed \(pip install "
                                          r"'readonly-ohem\[tensorboard\]'\)"):
        tensorboard.summary_writer(tmp_path / "tb")
    assert cli.main(["inspect", str(hand_log), "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"readonly-ohem inspect: error: --tensorboard {tmp_path / 'tb'}: the tensorboard "
                   "package is not installed (pip install 'readonly-ohem[tensorboard]')"]
    assert not (tmp_path / "tb").exists()


def test_bad_tensorboard_arguments(hand_log, tmp_path):
    with pytest.raises(ConfigError, match="--tensorboard converts a log FILE"):
        inspect_command(def_path="t.prototxt", net_path="m.caffemodel", image="i.jpg",
                        tensorboard=str(tmp_path))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"--tensorboard .*file/tb: cannot write \(Not a directory\)"):
        inspect_command(str(hand_log), tensorboard=str(tmp_path / "file" / "tb"))


# -- training ------------------------------------------------------------------------------------
def test_training_events_equal_what_the_solver_and_the_ohem_layer_did(minivoc, tmp_path, monkeypatch):
    seen = []  # each OHEM forward's selection, as the layer handed it over

    def tee(path, every=1, iteration=None, data_layer=None, **kw):
        logger = make_recorder(path, every=every, iteration=iteration, data_layer=data_layer, **kw)

        def recorder(rec):
            seen.append((iteration(), rec.to_numpy()))
            logger(rec)
        return recorder

    steps = []  # (iteration, lr, smoothed total, smoothed per loss top) after each SGD step
    step = Solver.step

    def recording_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        steps.append((self.iter - 1, out["lr"], self.smoothed_loss(), self.smoothed_losses()))
        return out

    monkeypatch.setattr(inspect_pkg, "make_recorder", tee)
    monkeypatch.setattr(Solver, "step", recording_step)
    solver = tmp_path / "solver.prototxt"  # the small OHEM solver, displaying every iteration
    text = (SMALL / "fast_rcnn_ohem" / "solver.prototxt").read_text()
    solver.write_text(text.replace("display: 20", "display: 1").replace(
        'train_net: "train.prototxt"', f'train_net: "{SMALL / "fast_rcnn_ohem" / "train.prototxt"}"'))
    tb, log = tmp_path / "tb", tmp_path / "kept.jsonl"
    assert train_command(solver=str(solver), data=str(minivoc), cfg=[str(OHEM_CFG)], set_pairs=TINY,
                         iters=3, output=str(tmp_path / "out"), log_kept_rois=str(log), log_every=2,
                         tensorboard=str(tb), stream=io.StringIO()) == 0
    ea = events(tb)

    # every iteration (display 1): the smoothed losses, lr and speed of the display line
    assert [s[0] for s in steps] == [0, 1, 2]
    assert scalars(ea, "train/loss") == [(it, f32(total)) for it, _, total, _ in steps]
    for top in ("loss_cls", "loss_bbox"):
        assert scalars(ea, f"train/{top}") == [(it, f32(parts[top])) for it, _, _, parts in steps]
    assert scalars(ea, "train/lr") == [(it, f32(lr)) for it, lr, _, _ in steps]
    spi = scalars(ea, "train/sec_per_iter")
    assert [s for s, _ in spi] == [0, 1, 2] and all(v > 0 for _, v in spi)
    ips = scalars(ea, "train/images_per_sec")  # iter_size 2 x 1 image per pass
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in ips] == [(s, 2 / v) for s, v in spi]

    # OHEM, iterations 0 and 2 (--log-every 2), two passes each: what the layer selected
    assert [it for it, _ in seen] == [0, 0, 1, 1, 2, 2]
    for tag in tensorboard.OHEM_SCALARS:
        assert [s for s, _ in scalars(ea, tag)] == [0, 2], tag
    for it in (0, 2):
        sel = [r for i, r in seen if i == it]
        keep = [r["keep"] for r in sel]
        loss = [r["loss"] for r in sel]
        kept_loss = np.concatenate([lo[k] for lo, k in zip(loss, keep)])
        n_kept = sum(k.size for k in keep)
        assert n_kept == 128 and all(k.size == 64 for k in keep)  # BATCH_SIZE per pass
        got = {tag: dict(scalars(ea, tag))[it] for tag in tensorboard.OHEM_SCALARS}
        assert got["ohem/rois_kept"] == n_kept
        assert got["ohem/rois_scored"] == sum(lo.size for lo in loss)
        assert got["ohem/nms_suppressed"] == sum(int(r["suppressed"].sum()) for r in sel)
        assert got["ohem/fg_share_kept"] == f32(sum(int((r["labels"][k] > 0).sum())
                                                    for r, k in zip(sel, keep)) / n_kept)
        assert got["ohem/fg_share_all"] == f32(sum(int((r["labels"] > 0).sum()) for r in sel)
                                               / sum(lo.size for lo in loss))
        assert got["ohem/kept_loss_min"] == f32(kept_loss.min())
        assert got["ohem/kept_loss_max"] == f32(kept_loss.max())
        h = next(e.histogram_value for e in ea.Histograms("ohem_loss/kept") if e.step == it)
        assert h.num == n_kept and h.sum == pytest.approx(kept_loss.sum(), rel=1e-6)
        h = next(e.histogram_value for e in ea.Histograms("ohem_loss/cls_all") if e.step == it)
        assert h.num == sum(lo.size for lo in loss)
        assert h.sum == pytest.approx(sum(r["loss_cls"].sum() for r in sel), rel=1e-6)
    pictures = decoded(ea, tensorboard.PICTURE_TAG)
    assert [s for s, _ in pictures] == [0, 2]
    first = read_log(log).at(2)[0].meta
    assert pictures[1][1].shape == figure_size(first["width"], first["height"])[::-1] + (3,)

    # the kept-RoI log of the same run, converted: the same OHEM events
    assert inspect_command(str(log), tensorboard=str(tmp_path / "converted"), stream=io.StringIO()) == 0
    conv = events(tmp_path / "converted")
    assert sorted(conv.Tags()["scalars"]) == sorted(tensorboard.OHEM_SCALARS)
    for tag in tensorboard.OHEM_SCALARS:
        assert scalars(conv, tag) == scalars(ea, tag), tag
    assert sorted(conv.Tags()["histograms"]) == sorted(ea.Tags()["histograms"])
    for tag in ea.Tags()["histograms"]:
        assert [(e.step, e.histogram_value) for e in conv.Histograms(tag)] == \
               [(e.step, e.histogram_value) for e in ea.Histograms(tag)], tag
    for (s1, p1), (s2, p2) in zip(decoded(conv, tensorboard.PICTURE_TAG), pictures, strict=True):
        assert s1 == s2
        np.testing.assert_array_equal(p1, p2)


def test_a_plain_fast_rcnn_run_writes_training_scalars_only(minivoc, tmp_path):
    tb = tmp_path / "tb"
    assert train_command(solver=str(SMALL / "fast_rcnn" / "solver.prototxt"), data=str(minivoc),
                         set_pairs=TINY, iters=1, output=str(tmp_path / "out"), tensorboard=str(tb),
                         stream=io.StringIO()) == 0
    ea = events(tb)
    assert sorted(ea.Tags()["scalars"]) == ["train/images_per_sec", "train/loss", "train/loss_bbox",
                                            "train/loss_cls", "train/lr", "train/sec_per_iter"]
    assert not ea.Tags()["histograms"] and not ea.Tags()["images"]
    assert [s for s, _ in scalars(ea, "train/loss")] == [0]


def test_a_rerun_into_the_same_folder_hides_the_earlier_events(tmp_path):
    """``attach_tensorboard`` purges from the trainer's iteration: all of a fresh run's folder."""
    for loss in (5.0, 3.0):
        w = tensorboard.summary_writer(tmp_path, purge_step=0)
        for it in range(3):
            w.add_scalar("train/loss", loss + it, it)
        w.close()
    w = tensorboard.summary_writer(tmp_path, purge_step=2)  # --resume at iteration 2
    w.add_scalar("train/loss", 9.0, 2)
    w.close()
    assert scalars(events(tmp_path), "train/loss") == [(0, 3.0), (1, 4.0), (2, 9.0)]


# -- test ----------------------------------------------------------------------------------------
def test_test_command_writes_map_and_per_class_ap_at_the_snapshot_iteration(minivoc, tmp_path,
                                                                           monkeypatch):
    """The command's wiring: the evaluation ``test_net`` returned, at the iteration in the model's
    name (``test_net``'s own numbers are tested in tests/detection; a stand-in gives known ones)."""
    monkeypatch.setenv("READONLY_OHEM_CACHE", str(tmp_path / "cache"))
    evals = [{"mAP": 0.3125, "per_class": {"cat": 0.5, "dog": 0.125}, "metric": "voc07"},
             {"mAP": 0.75, "per_class": {"cat": 1.0, "dog": 0.5}, "metric": "voc07"}, None]
    calls = []

    def stand_in_test_net(net, imdb, cfg, **kwargs):
        calls.append((imdb.name, kwargs["max_per_image"], kwargs["thresh"]))
        return {"all_boxes": [], "result_files": {}, "images_per_second": 1.0,
                "eval": evals[len(calls) - 1]}

    monkeypatch.setattr(test_cmd, "test_net", stand_in_test_net)
    model = tmp_path / "small_fast_rcnn_iter_7.caffemodel"
    Net.from_file(str(SMALL / "fast_rcnn" / "test.prototxt"), phase="TEST").save_caffemodel(str(model))
    tb = tmp_path / "tb"
    for m in (model, shutil.copy(model, tmp_path / "plain.caffemodel"), model):
        assert test_cmd.test_command(str(SMALL / "fast_rcnn" / "test.prototxt"), str(m), "voc_2007_test",
                                     data=str(minivoc), set_pairs=TINY, output=str(tmp_path / "out"),
                                     max_per_image=50, tensorboard=str(tb)) == 0
    assert calls == [("voc_2007_test", 50, 0.05)] * 3
    ea = events(tb)
    assert sorted(ea.Tags()["scalars"]) == ["test/AP/cat", "test/AP/dog", "test/mAP"]
    assert sorted(scalars(ea, "test/mAP")) == [(0, 0.75), (7, 0.3125)]  # nothing from eval None
    assert sorted(scalars(ea, "test/AP/cat")) == [(0, 1.0), (7, 0.5)]
    assert sorted(scalars(ea, "test/AP/dog")) == [(0, 0.5), (7, 0.125)]


@pytest.mark.parametrize("argv", [["train", "--solver", "s.prototxt"], ["test", "--def", "d", "--net", "n"],
                                  ["inspect", "kept.jsonl"], ["demo"]])
def test_the_commands_take_tensorboard(argv):
    args = cli.build_parser().parse_args(argv + ["--tensorboard", "runs/x"])
    module, func = cli.COMMANDS[args.command].split(":")
    params = signature(getattr(importlib.import_module(module), func)).parameters
    assert args.tensorboard == "runs/x" and set(vars(args)) - {"command"} <= set(params)


def test_evaluation_scalars_and_snapshot_iterations():
    ev = {"mAP": 0.5, "metric": "voc07", "per_class": {"cat": 0.25, "dog": 0.75}, "AP50": 0.6,
          "flag": True}
    assert tensorboard.evaluation_scalars(ev, "t") == {"t/mAP": 0.5, "t/AP/cat": 0.25,
                                                       "t/AP/dog": 0.75, "t/AP50": 0.6}
    assert tensorboard.model_iteration("out/vgg16_fast_rcnn_ohem_iter_40000.caffemodel") == 40000
    assert tensorboard.model_iteration("model.caffemodel") == 0
    assert tensorboard.run_dir("runs", "OHEM", 3) == Path("runs") / "ohem_seed3"
