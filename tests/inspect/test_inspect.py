"""The kept-RoI log on hand-built selections: format, crash tolerance, statistics, pictures."""

import io
import json
import zlib

import numpy as np
import pytest
from PIL import Image

from readonly_ohem.errors import ConfigError, DataError
from readonly_ohem.commands.inspect import inspect_command
from readonly_ohem.inspect import (
    KeptRoiLogger,
    figure_size,
    format_stats,
    iteration_stats,
    read_log,
    render_selection,
    selection_stats,
    summarize_selection,
)
from readonly_ohem.inspect.draw import loss_colors
from readonly_ohem.inspect.log import blobs_path, split_record

from kept_roi_samples import META, REC0, REC1, record


def test_index_lines_are_plain_json_and_blobs_plain_npz(hand_log):
    lines = [json.loads(line) for line in hand_log.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["header", "record", "record"]
    assert lines[0]["classes"][3] == "bird" and lines[0]["blobs"] == "kept.jsonl.blobs"
    r = lines[1]
    assert (r["iter"], r["pass"], r["image_id"], r["num_rois"], r["num_kept"], r["num_kept_fg"]) == \
        (0, 0, "000007", 5, 2, 1)
    assert r["pass_min_kept_loss"] == 2.0 and r["num_harder_than_kept"] == 1
    data = blobs_path(hand_log).read_bytes()[r["offset"]: r["offset"] + r["length"]]
    assert zlib.crc32(data) == r["crc32"]
    z = np.load(io.BytesIO(data))  # numpy alone reads it
    np.testing.assert_array_equal(z["keep_rank"], [0, -1, 1, -1, -1])
    np.testing.assert_array_equal(z["harder_than_kept"], [False, True, False, False, False])
    # boxes back in the original image: scaled boxes / scale 2
    np.testing.assert_allclose(z["boxes"][1], [5, 2.5, 25, 17.5])


def test_round_trip_keeps_the_selection(hand_log):
    log = read_log(hand_log)
    assert len(log) == 2 and log.skipped == 0 and log.iterations == [0, 1]
    a = log[1].arrays
    np.testing.assert_array_equal(a["rows"][a["keep_rank"] >= 0][np.argsort(a["keep_rank"][a["keep_rank"] >= 0])],
                                  REC1["keep"])
    np.testing.assert_array_equal(a["labels"], REC1["labels"])
    np.testing.assert_array_equal(a["loss_cls"], np.float32(REC1["loss_cls"]))
    np.testing.assert_array_equal(a["harder_than_kept"], [False, False, False, True])


def test_flip_and_scale_are_undone():
    meta = dict(META, flipped=True)
    (m, a), = split_record(record(**REC0, boxes=[[0, 0, 20, 10]] * 5), [meta])
    # scaled [0, 0, 20, 10] / 2 = [0, 0, 10, 5]; unflipped in width 120: x1 = 120 - 10 - 1
    np.testing.assert_allclose(a["boxes"][0], [109, 0, 119, 5])
    assert m["flipped"] is True


def test_two_images_in_one_pass_share_the_pass_minimum():
    rec = record(loss_cls=[5, 1, 4, 3], loss_bbox=[0] * 4, labels=[0] * 4, image=[0, 0, 1, 1],
                 suppressed=[False, False, False, True], keep=[0, 2], batch_size=2)
    (m0, a0), (m1, a1) = split_record(rec, [dict(META, image_id="a"), dict(META, image_id="b")])
    assert m0["pass_min_kept_loss"] == m1["pass_min_kept_loss"] == 4.0
    np.testing.assert_array_equal(a0["keep_rank"], [0, -1])
    np.testing.assert_array_equal(a1["keep_rank"], [1, -1])
    np.testing.assert_array_equal(a1["rows"], [2, 3])
    assert not a1["harder_than_kept"].any()  # loss 3 < the pass's easiest kept, 4


def test_log_every_skips_without_touching_the_record(tmp_path):
    class Exploding:
        def to_numpy(self):
            raise AssertionError("an off-iteration copied the record")

    it = [0]
    logger = KeptRoiLogger(tmp_path / "l", log_every=3, iteration=lambda: it[0])
    for i in range(7):
        it[0] = i
        if i % 3:
            logger(Exploding())
        else:
            logger(record(**REC0))
            logger(record(**REC0))  # the second pass of the same iteration
    log = read_log(tmp_path / "l")
    assert [(r.meta["iter"], r.meta["pass"]) for r in log] == [(0, 0), (0, 1), (3, 0), (3, 1), (6, 0), (6, 1)]


def test_torn_last_index_line_is_skipped_and_appending_continues(hand_log):
    raw = hand_log.read_bytes()
    hand_log.write_bytes(raw[:-40])  # crash in the middle of the last index line
    log = read_log(hand_log)
    assert len(log) == 1 and log.skipped == 1 and log[0].meta["iter"] == 0
    np.testing.assert_array_equal(log[0].arrays["labels"], REC0["labels"])
    # a resumed run appends: the torn line stays bad, the new records are read
    logger = KeptRoiLogger(hand_log)
    logger(record(**REC1), iteration=1, metas=[META])
    log = read_log(hand_log)
    assert [r.meta["iter"] for r in log] == [0, 1] and log.skipped == 1
    assert len(log.headers) == 2


def test_blob_cut_short_is_skipped_and_damage_is_detected(hand_log):
    blobs = blobs_path(hand_log)
    raw = blobs.read_bytes()
    blobs.write_bytes(raw[:-10])  # the last blob lost its tail (index line claims more)
    log = read_log(hand_log)
    assert len(log) == 1 and log.skipped == 1
    bad = bytearray(raw)
    bad[5] ^= 0xFF
    blobs.write_bytes(bytes(bad))
    with pytest.raises(DataError, match="damaged"):
        read_log(hand_log)[0].read_arrays()


def test_rerun_iteration_keeps_the_last_copy(hand_log):
    KeptRoiLogger(hand_log)(record(**REC1), iteration=0, metas=[dict(META, image_id="again")])
    log = read_log(hand_log)
    assert [r.meta["image_id"] for r in log] == ["again", "000007"]


def test_not_a_log(tmp_path):
    (tmp_path / "x").write_text('{"a": 1}\n')
    with pytest.raises(DataError, match="not a kept-RoI log"):
        read_log(tmp_path / "x")
    with pytest.raises(DataError, match="not found"):
        read_log(tmp_path / "missing")


# -- statistics -------------------------------------------------------------------------------------
def test_stats_on_the_hand_built_log(hand_log):
    s = selection_stats(read_log(hand_log))
    i0, i1 = s["iterations"]
    assert (i0["kept"], i0["kept_fg"], i0["suppressed"], i0["harder_than_kept"]) == (2, 1, 1, 1)
    assert i0["fg_fraction"] == 0.5
    assert i0["kept_mean_loss"] == pytest.approx(3.0) and i0["all_mean_loss"] == pytest.approx(2.1)
    assert (i1["kept"], i1["kept_fg"], i1["harder_than_kept"]) == (3, 1, 1)
    assert i1["kept_mean_loss"] == pytest.approx(3.25 / 3) and i1["all_mean_loss"] == pytest.approx(3.375 / 4)
    t = s["totals"]
    assert (t["kept"], t["kept_fg"], t["rois"], t["passes"], t["passes_with_harder"]) == (5, 2, 9, 2, 2)
    assert t["fg_fraction"] == pytest.approx(0.4)
    assert t["kept_mean_loss"] == pytest.approx(1.85)
    assert t["discarded_mean_loss"] == pytest.approx(4.625 / 4)
    assert t["all_mean_loss"] == pytest.approx(13.875 / 9)
    assert s["by_class"]["__background__"] == dict(index=0, kept=3, rois=6)
    assert s["by_class"]["aeroplane"]["kept"] == 1 and s["by_class"]["bicycle"] == dict(index=2, kept=0, rois=1)
    assert s["by_class"]["bird"]["kept"] == 1
    h = s["histogram"]
    assert sum(h["kept"]) == 5 and sum(h["discarded"]) == 4
    table = format_stats(s)
    assert "NMS removed a RoI harder than the easiest kept one in 2 of 2 passes" in table
    assert "40.0" in table  # fg% of all kept


def test_iteration_stats_of_two_passes_hand_worked(hand_log):
    """Both hand-built selections as the two passes of one iteration: sums over passes, shares of
    the sums, kept-loss range of both (losses 4 3 2 1 .5 / labels 1 0 0 2 0, kept 4 and 2;
    losses 1 2 .25 .125 / labels 0 3 0 0, kept 2, 1 and .25)."""
    log = read_log(hand_log)
    images = [(dict(r.meta, **{"pass": k}), r.arrays) for k, r in enumerate(log)]
    s = iteration_stats(5, images)
    assert s == dict(iter=5, images=2, passes=2, rois=9, kept=5, kept_fg=2, fg_fraction=0.4,
                     kept_mean_loss=pytest.approx(9.25 / 5), all_mean_loss=pytest.approx(13.875 / 9),
                     suppressed=2, harder_than_kept=2, passes_with_harder=2, fg=3,
                     all_fg_fraction=pytest.approx(3 / 9), kept_loss_min=0.25, kept_loss_max=4.0)
    one = iteration_stats(0, images[:1])
    assert (one["passes"], one["fg"], one["all_fg_fraction"], one["kept_loss_min"],
            one["kept_loss_max"]) == (1, 2, 0.4, 2.0, 4.0)
    assert selection_stats(log)["iterations"][1] == iteration_stats(1, images[1:])
    empty = iteration_stats(3, [])
    assert (empty["rois"], empty["fg_fraction"], empty["kept_loss_min"]) == (0, None, None)


def test_summarize_selection_prints_and_draws(hand_log, tmp_path):
    out = io.StringIO()
    s = summarize_selection(hand_log, stream=out, picture=tmp_path / "p.png")
    assert "loss kept" in out.getvalue() and (tmp_path / "p.png").is_file()
    assert s["totals"]["kept"] == 5


def test_stats_plot(hand_log, tmp_path):
    pytest.importorskip("matplotlib")
    assert inspect_command(str(hand_log), stats=True, out=str(tmp_path / "s.png"), stream=io.StringIO()) == 0
    im = Image.open(tmp_path / "s.png")
    assert im.size[0] > 800 and np.asarray(im.convert("L")).std() > 10


# -- pictures ----------------------------------------------------------------------------------------
def test_picture_size_content_and_loss_colours(tmp_path):
    rng = np.random.RandomState(0)
    photo = tmp_path / "img.jpg"
    Image.fromarray(rng.randint(60, 200, (90, 120, 3)).astype(np.uint8)).save(photo)
    logger = KeptRoiLogger(tmp_path / "l.jsonl")
    boxes = [[20, 20, 120, 100], [40, 30, 150, 120], [0, 0, 60, 60], [100, 80, 220, 170], [10, 90, 90, 170]]
    logger(record(**REC0, boxes=boxes), iteration=5, metas=[dict(META, image_path=str(photo))])
    rec = read_log(tmp_path / "l.jsonl")[0]
    out = tmp_path / "pic.png"
    assert inspect_command(str(tmp_path / "l.jsonl"), iteration=5, image="000007", out=str(out),
                           stream=io.StringIO()) == 0
    im = Image.open(out).convert("RGB")
    assert im.size == figure_size(120, 90)
    px = np.asarray(im)
    assert px.std() > 20 and len(np.unique(px.reshape(-1, 3), axis=0)) > 200
    # the hardest kept RoI (loss 4, box [10, 10, 60, 50] in the original) has the top colour
    s = 3.0  # small images are enlarged 3x
    x = round(35 * s)  # middle of its top edge (3 px wide), below the 64 px title bar
    y = 64 + round(10 * s)
    top = tuple(loss_colors([4.0], 2.0, 4.0)[0])
    assert top in {tuple(px[y + dy, x]) for dy in (1, 2)}
    assert rec.meta["num_kept"] == 2


def test_picture_without_the_image_file(hand_log, tmp_path):
    rec = read_log(hand_log)[0]
    im = render_selection(rec.meta, rec.arrays, None, tmp_path / "x.png")
    assert im.size == figure_size(120, 90)


def test_stats_plot_without_matplotlib_says_what_to_install(hand_log, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    out = io.StringIO()
    with pytest.raises(ConfigError, match=r"readonly-ohem\[plot\]"):
        inspect_command(str(hand_log), stats=True, out=str(tmp_path / "s.png"), stream=out)
    assert "loss kept" in out.getvalue()  # the table was printed first
