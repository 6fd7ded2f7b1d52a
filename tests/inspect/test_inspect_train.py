"""The kept-RoI log written by a real short OHEM training run on the mini-VOC (train --log-kept-rois),
read back and compared with what the OHEM layer selected; and the one-image inspection of a model."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import readonly_ohem.inspect as inspect_pkg
from readonly_ohem.commands.inspect import inspect_command
from readonly_ohem.commands.train import train_command
from readonly_ohem.config import load_config
from readonly_ohem.datasets.minivoc import make_minivoc
from readonly_ohem.datasets.voc_eval import parse_voc_xml
from readonly_ohem.errors import ConfigError
from readonly_ohem.inspect import figure_size, read_log, selection_stats
from readonly_ohem.inspect.log import make_recorder

REPO = Path(__file__).resolve().parents[2]
SOLVER = REPO / "prototxt" / "small" / "fast_rcnn_ohem" / "solver.prototxt"
TRAIN_NET = REPO / "prototxt" / "small" / "fast_rcnn_ohem" / "train.prototxt"
SMALL = [["TRAIN.SCALES", "(128,)"], ["TRAIN.MAX_SIZE", "200"], ["TRAIN.SNAPSHOT_ITERS", "1000"]]


@pytest.fixture(scope="module")
def minivoc(tmp_path_factory):
    return make_minivoc(tmp_path_factory.mktemp("voc"), seed=1, num_images=5, verbose=False)


def test_log_written_by_training_equals_the_layer_selection(minivoc, tmp_path, monkeypatch):
    seen = []  # what each OHEM forward selected, as the layer handed it over

    def tee(path, every=1, iteration=None, data_layer=None, **kw):
        logger = make_recorder(path, every=every, iteration=iteration, data_layer=data_layer, **kw)

        def recorder(rec):
            seen.append((iteration(), rec.to_numpy(), dict(data_layer.last_plan)))
            logger(rec)
        return recorder

    monkeypatch.setattr(inspect_pkg, "make_recorder", tee)
    log_path = tmp_path / "kept.jsonl"
    rc = train_command(solver=str(SOLVER), imdb="voc_2007_trainval", data=str(minivoc),
                       cfg=[str(REPO / "prototxt" / "cfgs" / "fast_rcnn_ohem.yml")], set_pairs=SMALL,
                       iters=3, output=str(tmp_path / "out"), log_kept_rois=str(log_path), log_every=2,
                       stream=io.StringIO())
    assert rc == 0
    log = read_log(log_path)
    assert log.skipped == 0
    logged = [s for s in seen if s[0] % 2 == 0]
    assert [s[0] for s in seen] == [0, 0, 1, 1, 2, 2]  # iter_size 2: two passes per iteration
    assert [(r.meta["iter"], r.meta["pass"]) for r in log] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    for rec, (it, sel, plan) in zip(log, logged):
        a = rec.arrays
        kept = a["keep_rank"] >= 0
        order = a["rows"][kept][np.argsort(a["keep_rank"][kept])]
        np.testing.assert_array_equal(order, sel["keep"])  # same RoIs, same hardest-first order
        assert rec.meta["num_kept"] == sel["keep"].size == min(64, sel["loss"].size)
        assert rec.meta["num_rois"] == sel["loss"].size
        np.testing.assert_array_equal(a["labels"], sel["labels"])
        np.testing.assert_array_equal(a["suppressed"], sel["suppressed"])
        np.testing.assert_array_equal(a["loss_cls"], sel["loss_cls"].astype(np.float32))
        np.testing.assert_array_equal(a["roidb_rows"], plan["keep"][0])
        # boxes in the original image: flip and scale them as the data layer did -> the layer's RoIs
        m = rec.meta
        b = a["boxes"].astype(np.float64)
        if m["flipped"]:
            b[:, [0, 2]] = m["width"] - b[:, [2, 0]] - 1
        np.testing.assert_allclose(b * m["scale"], sel["boxes"], rtol=1e-6, atol=1e-4)
        assert Path(m["image_path"]).stem == m["image_id"]
        # the ground-truth rows come first in a roidb entry: they are the XML's boxes (0-based)
        xml = minivoc / "VOCdevkit" / "VOC2007" / "Annotations" / f"{m['image_id']}.xml"
        gt = np.array([o["bbox"] for o in parse_voc_xml(xml) if not o["difficult"]], np.float64) - 1
        gt_rows = a["roidb_rows"] < len(gt)
        got = a["boxes"][gt_rows][np.argsort(a["roidb_rows"][gt_rows])]
        np.testing.assert_allclose(got, np.floor(np.maximum(gt, 0)), atol=1e-4)
    s = selection_stats(log)
    assert s["totals"]["kept"] == sum(r.meta["num_kept"] for r in log)
    out = tmp_path / "pic.png"
    assert inspect_command(str(log_path), iteration=2, out=str(out), stream=io.StringIO()) == 0
    m = log.at(2)[0].meta
    assert Image.open(out).size == figure_size(m["width"], m["height"])


def _random_model(tmp_path, net_path=TRAIN_NET, cfg=None):
    from readonly_ohem.caffe.net import Net

    net = Net.from_file(str(net_path), phase="TRAIN", cfg=cfg)
    path = tmp_path / "random.caffemodel"
    net.save_caffemodel(str(path))
    return path


def test_inspect_a_model_on_one_annotated_image(minivoc, tmp_path):
    from readonly_ohem.inspect.live import inspect_image

    model = _random_model(tmp_path)
    image = minivoc / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000001.jpg"
    out = tmp_path / "live.png"
    res = inspect_image(TRAIN_NET, model, image, set_pairs=SMALL, out=out)
    m, a = res["meta"], res["arrays"]
    assert m["num_kept"] == min(64, m["num_rois"]) and m["num_fg"] > 0  # the XML was found
    assert (a["labels"][a["roidb_rows"] < 1] > 0).all()  # the first gt row is foreground
    w, h = Image.open(image).size
    assert Image.open(out).size == figure_size(w, h)
    assert "sliding-window" in res["summary"]


def test_inspect_a_model_on_a_demo_image(shared_dir, tmp_path):
    model = _random_model(tmp_path)
    image = sorted((shared_dir / "voc_demo_images").glob("*.jpg"))[0]
    proposals = tmp_path / "p.npz"
    np.savez(proposals, **{image.stem: np.array([[10, 10, 200, 150], [50, 40, 300, 250], [0, 0, 99, 99]])})
    out = tmp_path / "demo.png"
    stream = io.StringIO()
    assert inspect_command(def_path=str(TRAIN_NET), net_path=str(model), image=str(image),
                           proposals=str(proposals), out=str(out), set_pairs=SMALL, stream=stream) == 0
    assert "every RoI labelled background" in stream.getvalue()
    assert "kept 3 of 3 RoIs (0 fg" in stream.getvalue()
    px = np.asarray(Image.open(out).convert("RGB"))
    assert px.std() > 20


def test_inspect_an_end2end_ohem_model_on_one_image(minivoc, tmp_path):
    """Faster R-CNN end-to-end + OHEM: the RoIs are the net's RPN proposals (+ gt), labelled by
    its proposal target layer; boxes back in the image by the scale (no roidb rows)."""
    from readonly_ohem.inspect.live import inspect_image

    e2e_net = REPO / "prototxt" / "small" / "faster_rcnn_end2end_ohem" / "train.prototxt"
    cfgs = [REPO / "prototxt" / "cfgs" / n for n in ("faster_rcnn_end2end.yml", "faster_rcnn_end2end_ohem.yml")]
    sets = SMALL + [["TRAIN.OHEM_BATCH_SIZE", "16"]]
    model = _random_model(tmp_path, e2e_net, load_config(cfgs, sets))
    image = minivoc / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000001.jpg"
    res = inspect_image(e2e_net, model, image, cfg_files=cfgs, set_pairs=sets, out=tmp_path / "e2e.png")
    m, a = res["meta"], res["arrays"]
    assert m["num_kept"] == min(16, m["num_rois"]) and m["num_fg"] > 0
    assert (a["roidb_rows"] == -1).all() and "RPN proposals" in res["summary"]
    gt = [o for o in parse_voc_xml(image.parent.parent / "Annotations" / "000001.xml")
          if not o["difficult"]]
    # the gt boxes are appended to the proposals: each is a RoI, back at its (0-based) place
    for o in gt:
        box = np.array([o["bbox"][0] - 1, o["bbox"][1] - 1, o["bbox"][2] - 1, o["bbox"][3] - 1])
        assert np.abs(a["boxes"] - box).max(1).min() < 1e-3
    with pytest.raises(ConfigError, match="HAS_RPN the net's own RPN makes the RoIs"):
        inspect_image(e2e_net, model, image, proposals=tmp_path / "p.npz", cfg_files=cfgs,
                      set_pairs=sets)
