"""Minibatches and image blobs against the original pipeline's vectors, plus a float64 resize reference."""

import json

import numpy as np
import pytest
import torch

from readonly_ohem.config import default_config
from readonly_ohem.datasets.image import load_image_bgr
from readonly_ohem.roi_data.blob import blob_scale, prep_im_for_blob, resize_like_cv2
from readonly_ohem.roi_data.minibatch import (bbox_regression_labels, get_allrois_minibatch, plan_minibatch,
                                          sample_rois)
from readonly_ohem.datasets import get_imdb
from readonly_ohem.roi_data.roidb import training_roidb


def cfg_from_meta(fixtures_dir, which):
    cfg = default_config()
    meta = json.loads((fixtures_dir / "original_pipeline" / "meta.json").read_text())
    for k, v in meta["train"][which]["TRAIN"].items():
        cfg.TRAIN[k] = tuple(v) if isinstance(v, list) else v
    return cfg


def roidb_for(fixtures_dir, cfg):
    d = fixtures_dir / "original_pipeline" / "train"
    imdb = get_imdb("voc_2007_trainval", d, proposals=d / "voc_2007_trainval.mat", cfg=cfg, cache_dir=False)
    return training_roidb(imdb, cfg, verbose=False)


def test_allrois_minibatch_matches_original(fixtures_dir):
    cfg = cfg_from_meta(fixtures_dir, "ohem")
    assert cfg.TRAIN.SCALES == (300,) and cfg.TRAIN.MAX_SIZE == 500 and cfg.TRAIN.BG_THRESH_LO == 0.0
    roidb, _, _ = roidb_for(fixtures_dir, cfg)
    ref = np.load(fixtures_dir / "original_pipeline" / "train" / "minibatches.npz")
    for i in (0, 6):
        b = get_allrois_minibatch([roidb[i]], 21, cfg)
        assert b["data"].dtype == torch.float32 and b["rois"].dtype == torch.float32
        np.testing.assert_allclose(b["rois"].numpy(), ref[f"{i}/rois"], atol=1e-4, rtol=0)
        for k in ("labels", "bbox_targets", "bbox_inside_weights", "bbox_outside_weights"):
            np.testing.assert_array_equal(b[k].numpy(), ref[f"{i}/{k}"], err_msg=f"{i}/{k}")
        assert b["data"].shape == ref[f"{i}/data"].shape
        assert np.abs(b["data"].numpy() - ref[f"{i}/data"]).max() < 1e-2  # OpenCV resize: ~2e-3 here


def test_plain_sampler_counts(fixtures_dir):
    cfg = cfg_from_meta(fixtures_dir, "frcn")
    roidb, means, stds = roidb_for(fixtures_dir, cfg)
    ref = np.load(fixtures_dir / "original_pipeline" / "train" / "frcn_sampling.npz")
    meta = json.loads((fixtures_dir / "original_pipeline" / "meta.json").read_text())["train"]["frcn"]
    assert len(roidb) == 10
    np.testing.assert_allclose(means, ref["means"].ravel(), atol=1e-5)
    rng = np.random.RandomState(3)
    for i, (e, m) in enumerate(zip(roidb, meta["roidb_entries"])):
        assert (e["image_id"], e["flipped"]) == (m["image_id"], m["flipped"])
        keep, nf = sample_rois(e, 16, 64, cfg, rng)
        fg, bg = keep[:nf], keep[nf:]
        assert nf == m["num_fg_sampled"] and bg.size == m["num_bg_sampled"]
        assert set(fg) <= set(ref[f"{i}/fg_candidates"]) and set(bg) <= set(ref[f"{i}/bg_candidates"])
        assert len(set(keep)) == keep.size
    # labels: max_classes for fg, 0 for bg; two images -> batch indices 0 and 1
    from readonly_ohem.roi_data.minibatch import build_minibatch

    plan = plan_minibatch(roidb[:2], cfg, np.random.RandomState(0), ohem=False)
    b = build_minibatch(roidb[:2], plan, 21, cfg)
    n0 = plan["keep"][0].size
    lab0 = roidb[0]["max_classes"][plan["keep"][0]].astype(np.float32)
    lab0[plan["num_fg"][0]:] = 0
    np.testing.assert_array_equal(b["labels"][:n0].numpy(), lab0)
    assert (b["rois"][:n0, 0] == 0).all() and (b["rois"][n0:, 0] == 1).all()
    assert b["data"].shape[0] == 2


def test_bbox_regression_labels_by_hand():
    data = np.array([[0, 9, 9, 9, 9], [2, 1, 2, 3, 4], [20, -1, -2, -3, -4]], np.float32)
    t, w = bbox_regression_labels(data, 21, (1, 1, 1, 1))
    assert t.shape == (3, 84) and not t[0].any() and not w[0].any()
    np.testing.assert_array_equal(t[1, 8:12], [1, 2, 3, 4])
    np.testing.assert_array_equal(t[2, 80:84], [-1, -2, -3, -4])
    assert t[1].sum() == 10 and w[1].sum() == 4 and (w[2, 80:] == 1).all()


def reference_resize(im, s):
    """Plain-loop float64 bilinear with OpenCV's coordinate rule (d + 0.5) / s - 0.5, clamped."""
    h, w, c = im.shape
    oh, ow = int(round(h * s)), int(round(w * s))
    out = np.zeros((c, oh, ow))

    def tap(d, n):
        f = (d + 0.5) / s - 0.5
        i = int(np.floor(f))
        f -= i
        if i < 0:
            return 0, 0, 0.0
        if i >= n - 1:
            return n - 1, n - 1, 0.0
        return i, i + 1, f

    for y in range(oh):
        y0, y1, fy = tap(y, h)
        for x in range(ow):
            x0, x1, fx = tap(x, w)
            top = im[y0, x0] * (1 - fx) + im[y0, x1] * fx
            bot = im[y1, x0] * (1 - fx) + im[y1, x1] * fx
            out[:, y, x] = top * (1 - fy) + bot * fy
    return out


@pytest.mark.parametrize("s", [1.6, 0.6, 0.5, 2.0])
def test_resize_matches_float64_reference(s):
    rng = np.random.RandomState(0)
    im = rng.uniform(-130, 130, (15, 11, 3)).astype(np.float32)
    got = resize_like_cv2(torch.from_numpy(im), s).numpy()
    ref = reference_resize(im.astype(np.float64), s)
    assert got.shape == ref.shape  # sizes round like OpenCV: 15 * 0.5 = 7.5 -> 8
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)


def test_resize_same_for_any_thread_count():
    im = torch.from_numpy(np.random.RandomState(1).uniform(-130, 130, (120, 170, 3)).astype(np.float32))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = resize_like_cv2(im, 1.37)
        torch.set_num_threads(2)
        b = resize_like_cv2(im, 1.37)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)


def test_scale_rule():
    assert blob_scale(375, 500, 600, 1000) == 600 / 375
    assert blob_scale(300, 1600, 600, 1000) == 1000 / 1600  # round(2 * 1600) > 1000
    assert blob_scale(315, 420, 300, 500) == 300 / 315


def test_voc_demo_photos_through_image_preparation(shared_dir):
    cfg = default_config()
    photos = sorted((shared_dir / "voc_demo_images").glob("*.jpg"))
    assert photos
    for p in photos:
        bgr = load_image_bgr(p)
        h, w = bgr.shape[:2]
        im, s = prep_im_for_blob(bgr, cfg.PIXEL_MEANS, 600, 1000)
        assert im.shape == (3, round(h * s), round(w * s)) and min(im.shape[1:]) == 600 or max(im.shape[1:]) == 1000
        # the mean of a photo minus the BGR means is small; channel order: BGR
        means = cfg.PIXEL_MEANS.reshape(3)
        np.testing.assert_allclose(im.mean(dim=(1, 2)).numpy() + means, bgr.reshape(-1, 3).mean(0), atol=2.0)
        flipped, _ = prep_im_for_blob(bgr, cfg.PIXEL_MEANS, 600, 1000, flipped=True)
        assert torch.allclose(flipped, im.flip(2), atol=1e-3)
