"""``readonly-ohem demo``: the FRCN-vs-OHEM experiment on the built-in mini-VOC, in minutes on a CPU.

Steps (each prints its progress): write the mini-VOC (``data.minivoc``); train the small net
(``prototxt/small``) with plain Fast R-CNN and with OHEM; test both with the SAME detection
settings (``--max-per-image 100 --thresh 0.05``, the original ``test_net.py`` defaults) and, as a
second row, with the settings the original OHEM script used (2000 per image at 1e-5); print a
table (mAP, seconds per iteration, foreground fraction among the RoIs the trained heads saw); draw
the RoIs OHEM kept on one image with the selection statistics (``readonly_ohem.inspect``).

What is held equal between the two runs (so the comparison means something):

- the images: both runs use ``prototxt/cfgs/small.yml``, which gives plain Fast R-CNN the OHEM
  recipe's data shape: 1 image per forward pass (``TRAIN.IMS_PER_BATCH 1``, 64 RoIs, 16 of them
  fg at most) and ``iter_size: 2`` in both solvers, so an SGD step is 2 images in 2 passes for
  both (per image the FRCN sample is the same as the original's 2 images × 128 RoIs; the
  gradient equals it up to the zero padding of two images in one blob). Aspect grouping is off for
  both (the OHEM config turns it off). The image ORDER comes from a random stream of its own
  (``SharedOrderPlanner``): the original draws the order and the FRCN fg/bg samples from one
  stream, so after the first pass the two methods would see different images;
- the initial weights: FRCN's freshly filled net is saved (``init.caffemodel``) and both start
  from it (the OHEM net's readonly and trainable heads share those params);
- the seed (``RNG_SEED`` = ``--seed``), iterations, learning rate schedule, image scale.

What differs is the method: FRCN samples 64 RoIs per image (fg ≥ 0.5 up to 25 %, bg in
[0.1, 0.5)); OHEM scores every RoI (bg in [0, 0.5)) with the readonly head and trains on the 64
hardest after NMS 0.7 (``prototxt/cfgs/fast_rcnn_ohem.yml``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from readonly_ohem.data.layer import MinibatchPlanner

ROOT = Path(__file__).resolve().parents[1]
PROTOTXT = ROOT / "prototxt"
SMALL = PROTOTXT / "small"
SMALL_CFG = PROTOTXT / "cfgs" / "small.yml"
OHEM_CFG = PROTOTXT / "cfgs" / "fast_rcnn_ohem.yml"
METHODS = {  # name -> (solver, extra cfg files after small.yml)
    "FRCN": (SMALL / "fast_rcnn" / "solver.prototxt", []),
    "OHEM": (SMALL / "fast_rcnn_ohem" / "solver.prototxt", [OHEM_CFG]),
}
TEST_DEF = SMALL / "fast_rcnn" / "test.prototxt"
DEFAULT_IMAGES = 100  # the mini-VOC's default: 60 trainval (120 with flips), 40 test
# (max_per_image, thresh): the equal settings every comparison uses, then the original OHEM script's
TEST_SETTINGS = ((100, 0.05), (2000, 1e-5))


def say(text: str = "", stream=None) -> None:
    print(text, file=stream if stream is not None else sys.stdout, flush=True)


class SharedOrderPlanner(MinibatchPlanner):
    """The data layer's planner with the image order drawn from its own ``RandomState(order_seed)``.

    The original draws the permutation, the scale index and the FRCN fg/bg samples from one stream,
    so FRCN and OHEM diverge in image order after the first pass; here the order depends on the
    seed and the roidb size only (the sampling still uses the planner's stream, as the original).
    """

    def __init__(self, roidb, cfg, order_seed: int):
        self.order_rng = np.random.RandomState(order_seed)
        super().__init__(roidb, cfg)

    def shuffle(self) -> None:
        self.perm = self.order_rng.permutation(np.arange(len(self.roidb)))
        self.cur = 0


class RoICounter:
    """Counts the labels reaching ``loss_cls`` (the RoIs the trainable head learns from)."""

    def __init__(self, net, layer: str = "loss_cls"):
        self.fg = self.total = 0
        self.handle = net.layer(layer).register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        labels = args[0][1].detach().reshape(-1)
        self.fg += int((labels > 0).sum())
        self.total += int(labels.numel())

    @property
    def fg_fraction(self) -> float:
        return self.fg / self.total if self.total else float("nan")


def method_config(method: str, seed: int):
    from readonly_ohem.config import load_config

    _, extra = METHODS[method]
    return load_config([str(SMALL_CFG)] + [str(p) for p in extra], [["RNG_SEED", str(seed)]])


def train_method(method: str, data_dir: Path, out_dir: Path, iters: int, seed: int,
                 init_weights: Path | None, stream=None, log_kept_rois: Path | None = None) -> dict:
    """Train one arm; returns ``{"model", "sec_per_iter", "fg_fraction", "rois", "init"}``."""
    from readonly_ohem.data.pascal_voc import get_imdb
    from readonly_ohem.data.roidb import training_roidb
    from readonly_ohem.train import attach_kept_roi_log, build_trainer, find_data_layers

    solver_path, _ = METHODS[method]
    cfg = method_config(method, seed)
    np.random.seed(cfg.RNG_SEED)
    torch.manual_seed(cfg.RNG_SEED)
    imdb = get_imdb("voc_2007_trainval", data_dir, None, cfg, cache_dir=False)
    roidb, means, stds = training_roidb(imdb, cfg, verbose=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(solver_path, cfg, roidb, means, stds,
                            weights=str(init_weights) if init_weights else None,
                            output=out_dir, stream=stream if stream is not None else sys.stdout)
    if init_weights is None:  # the first arm: its fresh fill is both arms' start
        init_weights = out_dir.parent / "init.caffemodel"
        trainer.net.save_caffemodel(str(init_weights))
    for layer in find_data_layers(trainer.net):
        layer.planner = SharedOrderPlanner(roidb, cfg, order_seed=seed)
    if log_kept_rois is not None:
        attach_kept_roi_log(trainer.net, str(log_kept_rois), 1, lambda: trainer.solver.iter)
    counter = RoICounter(trainer.net)
    t0 = time.perf_counter()
    models = trainer.train(iters)
    seconds = time.perf_counter() - t0
    return {"model": models[-1], "sec_per_iter": seconds / max(iters, 1),
            "fg_fraction": counter.fg_fraction, "rois_per_iter": counter.total / max(iters, 1),
            "init": init_weights, "train_seconds": seconds}


def test_model(model: Path, data_dir: Path, out_dir: Path, seed: int, settings=TEST_SETTINGS,
               stream=None) -> dict:
    """mAP of one model at each (max_per_image, thresh) in ``settings``; images/s of the first."""
    import contextlib

    from readonly_ohem.data.pascal_voc import get_imdb
    from readonly_ohem.net import Net
    from readonly_ohem.test import test_net

    cfg = method_config("FRCN", seed)
    net = Net.from_file(str(TEST_DEF), phase="TEST", cfg=cfg)
    net.load_caffemodel(str(model))
    imdb = get_imdb("voc_2007_test", data_dir, None, cfg, cache_dir=False)
    out = {}
    for max_per_image, thresh in settings:
        sub = out_dir / f"dets_{max_per_image}_{thresh:g}"
        with contextlib.redirect_stdout(stream if stream is not None else sys.stdout):
            r = test_net(net, imdb, cfg, max_per_image=max_per_image, thresh=thresh, output_dir=sub)
        out[(max_per_image, thresh)] = {"mAP": r["eval"]["mAP"], "per_class": r["eval"]["per_class"],
                                        "images_per_second": r["images_per_second"],
                                        "result_dir": str(sub)}
    return out
