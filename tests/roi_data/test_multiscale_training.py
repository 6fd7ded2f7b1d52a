"""+M in training: one TRAIN.SCALES entry drawn per image, with the original's random calls in the
original's order (``npr.randint`` for the scales of the minibatch, then per image the fg/bg
``npr.choice``), checked against the transcription in tests/original_code.py."""

import numpy as np
import pytest

from readonly_ohem.config import default_config
from readonly_ohem.datasets import get_imdb
from readonly_ohem.roi_data.blob import blob_scale
from readonly_ohem.roi_data.layer import MinibatchPlanner
from readonly_ohem.roi_data.minibatch import build_minibatch
from readonly_ohem.roi_data.roidb import training_roidb

from original_code import minibatch_random_calls

SCALES = (96, 115, 138, 173, 180)  # the paper's training scales / 5 (the fixture images are small)


@pytest.fixture(scope="module")
def roidb(request):
    fixtures = request.config.rootpath / "tests" / "fixtures"
    cfg = default_config()
    d = fixtures / "original_pipeline" / "train"
    imdb = get_imdb("voc_2007_trainval", d, proposals=d / "voc_2007_trainval.mat", cfg=cfg, cache_dir=False)
    return training_roidb(imdb, cfg, verbose=False)[0]


def _cfg(ohem: bool):
    cfg = default_config()
    cfg.set_key("TRAIN.SCALES", SCALES)
    cfg.set_key("TRAIN.MAX_SIZE", 200)
    cfg.set_key("TRAIN.ASPECT_GROUPING", False)
    if ohem:  # the OHEM experiment file's data keys
        cfg.set_list([("TRAIN.USE_OHEM", True), ("TRAIN.IMS_PER_BATCH", 1), ("TRAIN.BATCH_SIZE", 64),
                      ("TRAIN.BG_THRESH_LO", 0.0)])
    return cfg


def _original_plans(roidb, cfg, n):
    """The original RoIDataLayer (ASPECT_GROUPING off) and get_minibatch on one global stream."""
    npr = np.random.RandomState(cfg.RNG_SEED)
    t = cfg.TRAIN
    perm, cur, out = npr.permutation(np.arange(len(roidb))), 0, []
    for _ in range(n):
        if cur + t.IMS_PER_BATCH >= len(roidb):  # _get_next_minibatch_inds
            perm, cur = npr.permutation(np.arange(len(roidb))), 0
        db_inds = perm[cur:cur + t.IMS_PER_BATCH]
        cur += t.IMS_PER_BATCH
        calls = minibatch_random_calls([roidb[i] for i in db_inds], len(t.SCALES), t.BATCH_SIZE,
                                       t.FG_FRACTION, t.FG_THRESH, t.BG_THRESH_HI, t.BG_THRESH_LO,
                                       t.USE_OHEM, npr)
        out.append((db_inds, *calls))
    return out


@pytest.mark.parametrize("ohem", [False, True])
def test_scale_per_image_drawn_as_the_original(roidb, ohem):
    cfg = _cfg(ohem)
    planner = MinibatchPlanner(roidb, cfg)
    ref = _original_plans(roidb, cfg, 25)
    drawn = []
    for db_inds, scale_inds, keeps, num_fgs in ref:
        plan = planner.next_plan()
        np.testing.assert_array_equal(plan["db_inds"], db_inds)
        np.testing.assert_array_equal(plan["scale_inds"], scale_inds)
        assert plan["scale_inds"].shape == (cfg.TRAIN.IMS_PER_BATCH,)
        for k, rk in zip(plan["keep"], keeps):
            np.testing.assert_array_equal(k, rk)
        assert plan["num_fg"] == num_fgs
        drawn.append(plan["scale_inds"])
    drawn = np.concatenate(drawn)
    assert set(drawn.tolist()) == set(range(len(SCALES)))  # every scale is used
    if not ohem:  # two images of one minibatch may get different scales
        assert any(len(set(d.tolist())) == 2 for d in np.split(drawn, len(drawn) // 2))


def test_two_images_at_different_scales_in_one_blob(roidb):
    cfg = _cfg(False)
    e = [roidb[0], roidb[3]]
    plan = {"scale_inds": np.array([0, 4]), "keep": [np.arange(5), np.arange(7)], "num_fg": [2, 3]}
    blobs = build_minibatch(e, plan, 21, cfg)
    s = [blob_scale(x["height"], x["width"], SCALES[k], 200) for x, k in zip(e, plan["scale_inds"])]
    hw = [(round(x["height"] * si), round(x["width"] * si)) for x, si in zip(e, s)]
    assert tuple(blobs["data"].shape) == (2, 3, max(h for h, _ in hw), max(w for _, w in hw))
    # each image's RoIs at its own scale, batch index first
    np.testing.assert_array_equal(blobs["rois"][:5].numpy(),
                                  np.hstack([np.zeros((5, 1)), e[0]["boxes"][:5] * s[0]]).astype(np.float32))
    np.testing.assert_array_equal(blobs["rois"][5:].numpy(),
                                  np.hstack([np.ones((7, 1)), e[1]["boxes"][:7] * s[1]]).astype(np.float32))
    # the smaller image is zero-padded at the bottom/right
    small = int(np.argmin([h * w for h, w in hw]))
    h, w = hw[small]
    assert not blobs["data"][small, :, h:, :].any() and not blobs["data"][small, :, :, w:].any()
