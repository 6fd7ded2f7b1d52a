"""The mini-VOC generator: deterministic, readable by our reader, a selective-search-like IoU profile."""

import hashlib

import numpy as np

from readonly_ohem.config import default_config
from readonly_ohem.datasets.minivoc import make_minivoc
from readonly_ohem.datasets import get_imdb
from readonly_ohem.datasets.voc_eval import parse_voc_xml
from readonly_ohem.datasets.proposals import read_mat_boxes
from readonly_ohem.roi_data.roidb import training_roidb


def digest(root):
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix != ".mat":  # .mat headers hold a creation time
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    for p in sorted(root.rglob("*.mat")):
        for b in read_mat_boxes(p):
            h.update(b.tobytes())
    return h.hexdigest()


def test_minivoc_deterministic_and_readable(tmp_path, capsys):
    a = make_minivoc(tmp_path / "a", seed=1, num_images=10)
    b = make_minivoc(tmp_path / "b", seed=1, num_images=10)
    c = make_minivoc(tmp_path / "c", seed=2, num_images=10, verbose=False)
    assert "10/10" in capsys.readouterr().out
    assert digest(a) == digest(b) != digest(c)

    cfg = default_config()
    tv = get_imdb("voc_2007_trainval", a, cfg=cfg, cache_dir=False)
    te = get_imdb("voc_2007_test", a / "VOCdevkit", cfg=cfg, cache_dir=False)
    assert (tv.num_images, te.num_images) == (6, 4)
    assert not set(tv.image_index) & set(te.image_index)
    objs = [o for imdb in (tv, te) for i in range(imdb.num_images) for o in imdb.annotations_at(i)]
    assert {o["name"] for o in objs} <= set(tv.classes[1:])
    for i in range(tv.num_images):
        w, h = tv.image_sizes[i]
        assert 200 <= w <= 320 and 200 <= h <= 320
        for o in tv.annotations_at(i):  # 1-based boxes inside the image
            x1, y1, x2, y2 = o["bbox"]
            assert 1 <= x1 <= x2 <= w and 1 <= y1 <= y2 <= h
        assert 250 <= tv.proposal_boxes(i).shape[0] <= 500
    roidb, means, stds = training_roidb(tv, cfg, verbose=False)
    assert len(roidb) == 12 and means.shape == (84,)


def test_minivoc_has_hard_cases_and_ss_like_ious(tmp_path):
    root = make_minivoc(tmp_path, seed=0, num_images=30, verbose=False)
    imdb = get_imdb("voc_2007_trainval", root, cache_dir=False)
    objs = [parse_voc_xml(imdb.annotation_path_at(i)) for i in range(imdb.num_images)]
    flat = [o for os_ in objs for o in os_]
    assert any(o["difficult"] for o in flat) and any(o["truncated"] for o in flat)
    assert len({o["name"] for o in flat}) >= 5
    ov = np.concatenate([e["gt_overlaps"].toarray().max(1)[e["gt_classes"] == 0] for e in imdb.roidb])
    fg, mid, bg = (ov >= 0.5).mean(), ((ov >= 0.1) & (ov < 0.5)).mean(), (ov < 0.1).mean()
    assert 0.02 < fg < 0.2 and 0.1 < mid < 0.45 and bg > 0.45, (fg, mid, bg)
