"""roidb against the original pipeline's vectors (tests/fixtures/original_pipeline, OHEM cfg)."""

import json

import numpy as np
import pytest

from readonly_ohem.config import default_config
from readonly_ohem.datasets import get_imdb
from readonly_ohem.datasets.voc_eval import parse_voc_xml
from readonly_ohem.datasets.proposals import load_proposals, read_mat_boxes
from readonly_ohem.roi_data.roidb import filter_roidb, get_training_roidb, training_roidb


def ohem_cfg(fixtures_dir):
    cfg = default_config()
    meta = json.loads((fixtures_dir / "original_pipeline" / "meta.json").read_text())
    for k, v in meta["train"]["ohem"]["TRAIN"].items():
        cfg.TRAIN[k] = tuple(v) if isinstance(v, list) else v
    return cfg


def fixture_imdb(fixtures_dir, cfg):
    d = fixtures_dir / "original_pipeline" / "train"
    return get_imdb("voc_2007_trainval", d, proposals=d / "voc_2007_trainval.mat", cfg=cfg, cache_dir=False)


@pytest.fixture
def ref(fixtures_dir):
    return np.load(fixtures_dir / "original_pipeline" / "train" / "roidb.npz")


def test_parse_voc_xml_keeps_difficult_and_1_based(fixtures_dir):
    objs = parse_voc_xml(fixtures_dir / "original_pipeline/train/VOCdevkit/VOC2007/Annotations/000104.xml")
    assert len(objs) == 1 and objs[0]["name"] == "bird" and objs[0]["difficult"] is True
    assert all(isinstance(v, (int, float)) for v in objs[0]["bbox"])


def test_proposals_equal_roidb_proposal_rows(fixtures_dir, ref):
    cfg = ohem_cfg(fixtures_dir)
    imdb = fixture_imdb(fixtures_dir, cfg)
    meta = json.loads((fixtures_dir / "original_pipeline" / "meta.json").read_text())
    props = load_proposals(fixtures_dir / "original_pipeline/train/voc_2007_trainval.mat", imdb.image_index)
    for i in range(6):
        ng = meta["train"]["ohem"]["roidb_entries"][i]["num_gt"]
        np.testing.assert_array_equal(props[i], ref[f"{i}/boxes"][ng:])
        np.testing.assert_array_equal(imdb.proposal_boxes(i), props[i])
    assert len(read_mat_boxes(fixtures_dir / "original_pipeline/train/voc_2007_trainval.mat")[2]) == 121
    assert props[2].shape[0] == 106


def test_roidb_matches_original(fixtures_dir, ref):
    cfg = ohem_cfg(fixtures_dir)
    roidb, means, stds = training_roidb(fixture_imdb(fixtures_dir, cfg), cfg, verbose=False)
    meta = json.loads((fixtures_dir / "original_pipeline" / "meta.json").read_text())["train"]["ohem"]
    assert [(e["image_id"], e["flipped"]) for e in roidb] == \
        [(m["image_id"], m["flipped"]) for m in meta["roidb_entries"]]
    for i, e in enumerate(roidb):
        for k in ("boxes", "gt_classes", "max_classes"):
            assert e[k].shape == ref[f"{i}/{k}"].shape
            np.testing.assert_array_equal(e[k], ref[f"{i}/{k}"], err_msg=f"{i}/{k}")
        np.testing.assert_allclose(e["gt_overlaps"].toarray(), ref[f"{i}/gt_overlaps"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(e["max_overlaps"], ref[f"{i}/max_overlaps"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(e["bbox_targets"], ref[f"{i}/bbox_targets"], atol=1e-5, rtol=0)
        assert (e["width"], e["height"]) == (meta["roidb_entries"][i]["width"], meta["roidb_entries"][i]["height"])
    assert means.shape == stds.shape == (84,)
    np.testing.assert_allclose(means, ref["means"].ravel(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(stds, ref["stds"].ravel(), atol=1e-5, rtol=0)
    # 000104 (only a difficult bird): kept under the OHEM cfg, all background, zero targets
    e = roidb[3]
    assert e["image_id"] == "000104" and (e["max_overlaps"] == 0).all() and not e["bbox_targets"].any()


def test_flip_rule(fixtures_dir):
    cfg = ohem_cfg(fixtures_dir)
    roidb = get_training_roidb(fixture_imdb(fixtures_dir, cfg), cfg)
    for i in range(6):
        a, b = roidb[i], roidb[i + 6]
        assert b["flipped"] and not a["flipped"]
        w = a["width"]
        np.testing.assert_array_equal(b["boxes"][:, 0], w - a["boxes"][:, 2] - 1)
        np.testing.assert_array_equal(b["boxes"][:, 2], w - a["boxes"][:, 0] - 1)
        np.testing.assert_array_equal(b["boxes"][:, 1::2], a["boxes"][:, 1::2])
        np.testing.assert_array_equal(b["max_overlaps"], a["max_overlaps"])


def test_filter_default_cfg_drops_000104_and_its_flip(fixtures_dir):
    cfg = default_config()
    roidb = get_training_roidb(fixture_imdb(fixtures_dir, cfg), cfg)
    kept = filter_roidb(roidb, cfg, verbose=False)
    dropped = [(e["image_id"], e["flipped"]) for e in roidb if not any(e is k for k in kept)]
    assert dropped == [("000104", False), ("000104", True)] and len(kept) == 10


def test_precomputed_normalization(fixtures_dir):
    cfg = ohem_cfg(fixtures_dir)
    cfg.TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED = True
    roidb, means, stds = training_roidb(fixture_imdb(fixtures_dir, cfg), cfg, verbose=False)
    np.testing.assert_array_equal(stds.reshape(21, 4), np.tile([0.1, 0.1, 0.2, 0.2], (21, 1)))
    assert means.shape == (84,) and not means.any()
    cfg2 = ohem_cfg(fixtures_dir)
    cfg2.TRAIN.BBOX_NORMALIZE_TARGETS = False
    raw, _, _ = training_roidb(fixture_imdb(fixtures_dir, cfg2), cfg2, verbose=False)
    for a, b in zip(roidb, raw):  # precomputed: t_norm = t / std (means 0)
        rows = b["bbox_targets"][:, 0] > 0
        np.testing.assert_allclose(a["bbox_targets"][rows, 1:], b["bbox_targets"][rows, 1:] / [0.1, 0.1, 0.2, 0.2],
                                   rtol=1e-6, atol=1e-6)


def test_targets_hand_computed():
    """One gt (0,0,9,9) and a proposal (0,0,19,9): tx = (10.5-5.5)/... with +1 widths."""
    from readonly_ohem.roi_data.roidb import compute_targets

    rois = np.array([[0, 0, 9, 9], [0, 0, 19, 9], [50, 50, 60, 60]], dtype=np.float64)
    ov = np.array([1.0, 0.5, 0.0], np.float32)
    t = compute_targets(rois, ov, np.array([7, 7, 0]), 0.5)
    # ex w=20 cx=10, gt w=10 cx=5: tx=(5-10)/20, ty=0, tw=log(10/20), th=0
    np.testing.assert_allclose(t[1], [7, -0.25, 0, np.log(0.5), 0], rtol=1e-6)
    np.testing.assert_array_equal(t[0], [7, 0, 0, 0, 0])
    np.testing.assert_array_equal(t[2], 0)


def test_roidb_cache_round_trip(fixtures_dir, tmp_path):
    cfg = ohem_cfg(fixtures_dir)
    d = fixtures_dir / "original_pipeline" / "train"
    a = get_imdb("voc_2007_trainval", d, proposals=d / "voc_2007_trainval.mat", cfg=cfg, cache_dir=tmp_path).roidb
    assert list(tmp_path.glob("*.npz")) and list(tmp_path.glob("*.json"))
    from readonly_ohem.datasets import cache

    imdb_b = get_imdb("voc_2007_trainval", d, proposals=d / "voc_2007_trainval.mat", cfg=cfg, cache_dir=tmp_path)
    b = cache.load(imdb_b)
    assert b is not None  # the key matches: read from disk
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["boxes"], y["boxes"])
        np.testing.assert_array_equal(x["gt_classes"], y["gt_classes"])
        np.testing.assert_array_equal(x["gt_overlaps"].toarray(), y["gt_overlaps"].toarray())
        assert (x["width"], x["height"], x["image"]) == (y["width"], y["height"], y["image"])


def test_roidb_cache_invalidated_when_an_input_changes(fixtures_dir, tmp_path):
    import os
    import shutil

    from readonly_ohem.datasets import cache

    src = fixtures_dir / "original_pipeline" / "train"
    shutil.copytree(src / "VOCdevkit", tmp_path / "VOCdevkit")
    mat = shutil.copy(src / "voc_2007_trainval.mat", tmp_path / "p.mat")
    get_imdb("voc_2007_trainval", tmp_path, proposals=mat, cache_dir=tmp_path / "c").roidb
    assert cache.load(get_imdb("voc_2007_trainval", tmp_path, proposals=mat, cache_dir=tmp_path / "c"))
    xml = tmp_path / "VOCdevkit/VOC2007/Annotations/000101.xml"
    st = xml.stat()
    os.utime(xml, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.load(get_imdb("voc_2007_trainval", tmp_path, proposals=mat, cache_dir=tmp_path / "c")) is None
