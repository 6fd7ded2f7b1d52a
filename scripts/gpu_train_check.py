"""VGG16 OHEM training on synthetic full-size images: the training step of scripts/gpu_check.sh.

    python scripts/gpu_train_check.py [--iters 200] [--device cuda] [--images 40] [--out DIR]

Data: the mini-VOC (``make_minivoc``) at VOC's size: images and boxes scaled x2 (400-640 px, VOC's
are ~500 x 375; the data layer scales them to 600 px as for VOC) and ~2000 proposals per image,
as selective search gives (the mini-VOC's own plus jittered copies). Weights: the original VGG16
prototxt has no fillers for its conv layers (they come from ImageNet); here they get Caffe's
``msra`` filler (std sqrt(2 / fan_in), bias 0), written as the initial .caffemodel. Then the real
training sequence (``train.setup_training`` / ``run_training``, the OHEM experiment config) for
``--iters`` iterations.

Printed: seconds per iteration (median of the timed steps after the first 10), the mean loss of
the first and last 20 iterations, peak GPU memory, and a last line
``train_check iters N s_per_iter X loss_first A loss_last B peak_mib M``. Exits non-zero when a
loss is not finite (training stops, as ``readonly-ohem train`` does).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from readonly_ohem import python_layers  # noqa: F401  (registers RoIDataLayer, OHEMDataLayer)
from readonly_ohem.caffe.solver import build_net
from readonly_ohem.caffe.spec import read_solver
from readonly_ohem.config import load_config
from readonly_ohem.datasets import get_imdb
from readonly_ohem.datasets.minivoc import make_minivoc
from readonly_ohem.datasets.proposals import load_proposals, save_proposals_mat
from readonly_ohem.train import run_training, setup_training

REPO = Path(__file__).resolve().parents[1]
SOLVER = REPO / "prototxt/VGG16/fast_rcnn_ohem/solver.prototxt"
OHEM_CFG = REPO / "prototxt/cfgs/fast_rcnn_ohem.yml"


def make_fullsize_voc(root: Path, num_images: int, scale: int = 2, per_image: int = 2000,
                      seed: int = 0) -> Path:
    """The mini-VOC under ``root``, images and boxes scaled by ``scale``, ~``per_image``
    proposals per trainval image."""
    small = root / "small"
    make_minivoc(small, seed=seed, num_images=num_images, verbose=False)
    src, dst = small / "VOCdevkit" / "VOC2007", root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for f in (src / "ImageSets" / "Main").iterdir():
        (dst / "ImageSets" / "Main" / f.name).write_text(f.read_text())
    for jpg in sorted((src / "JPEGImages").glob("*.jpg")):
        im = Image.open(jpg)
        im.resize((im.width * scale, im.height * scale), Image.BILINEAR).save(
            dst / "JPEGImages" / jpg.name, quality=92)
        tree = ET.parse(src / "Annotations" / f"{jpg.stem}.xml")  # our own files
        for tag in ("size/width", "size/height"):
            node = tree.getroot().find(tag)
            node.text = str(int(node.text) * scale)
        for box in tree.getroot().iter("bndbox"):
            for node in box:  # 1-based pixel corners
                node.text = str((int(float(node.text)) - 1) * scale + 1)
        tree.write(dst / "Annotations" / f"{jpg.stem}.xml")
    rng = np.random.default_rng(seed)
    for split in ("trainval", "test"):
        ids = (dst / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        props = load_proposals(small / "selective_search_data" / f"voc_2007_{split}.mat", ids)
        dense = []
        for image_id, boxes in zip(ids, props):
            w, h = Image.open(dst / "JPEGImages" / f"{image_id}.jpg").size
            boxes = boxes * scale
            extra = boxes[rng.integers(0, len(boxes), max(per_image - len(boxes), 0))]
            size = np.concatenate([extra[:, 2:] - extra[:, :2] + 1] * 2, 1)
            extra = extra + rng.normal(0, 0.1, extra.shape) * size
            b = np.clip(np.concatenate([boxes, extra]), 0, [w - 1, h - 1, w - 1, h - 1])
            b[:, 2:] = np.maximum(b[:, 2:], np.minimum(b[:, :2] + 8, [w - 1, h - 1]))
            dense.append(b[:, (1, 0, 3, 2)] + 1)  # the .mat layout: [y1 x1 y2 x2] 1-based
        save_proposals_mat(root / "selective_search_data" / f"voc_2007_{split}.mat", dense)
    return root


def msra_weights(cfg, path: Path) -> Path:
    """The VGG16 OHEM train net's params, conv layers from Caffe's msra filler, as a .caffemodel."""
    net = build_net(read_solver(str(SOLVER)), SOLVER, cfg=cfg)
    g = torch.Generator().manual_seed(cfg.RNG_SEED)
    with torch.no_grad():
        for rec in net.layers:
            if rec.type == "Convolution":
                w, b = net.layer_params(rec.name)
                fan_in = w[0].numel()
                w.copy_(torch.randn(w.shape, generator=g) * float(np.sqrt(2.0 / fan_in)))
                b.zero_()
    net.save_caffemodel(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=40, help="mini-VOC images (60%% trainval)")
    ap.add_argument("--out", help="working directory (default: a temporary one)")
    ap.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="config override, e.g. --set TRAIN.OHEM_READONLY_DTYPE bfloat16")
    args = ap.parse_args(argv)
    tmp = None if args.out else tempfile.mkdtemp(prefix="gpu_train_")
    root = Path(args.out or tmp)
    cfg = load_config([OHEM_CFG], [["TRAIN.SNAPSHOT_ITERS", "1000000"]] + args.set)
    t0 = time.perf_counter()
    data = make_fullsize_voc(root / "data", args.images)
    weights = msra_weights(cfg, root / "vgg16_msra.caffemodel")
    print(f"data and initial weights: {time.perf_counter() - t0:.1f} s", flush=True)
    imdb = get_imdb("voc_2007_trainval", data, cfg=cfg, cache_dir=False)
    trainer = setup_training(SOLVER, cfg, imdb, weights, root / "output", args.device,
                             verbose=False)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps, step = [], trainer.solver.step

    def timed_step(feed=None):  # Trainer calls solver.step: time and record each iteration
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = step(feed)
        if cuda:
            torch.cuda.synchronize()
        steps.append((time.perf_counter() - t, out["loss"]))
        return out

    trainer.solver.step = timed_step
    run_training(trainer, args.iters)
    secs, losses = zip(*steps)
    spi = statistics.median(secs[10:] or secs)
    first, last = float(np.mean(losses[:20])), float(np.mean(losses[-20:]))
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    print(f"{len(steps)} iterations on {args.device}: {spi:.3f} s/iter (median), loss "
          f"{first:.4f} (first 20) -> {last:.4f} (last 20), peak GPU memory {peak:.0f} MiB")
    print(f"train_check iters {len(steps)} s_per_iter {spi:.4f} loss_first {first:.4f} "
          f"loss_last {last:.4f} peak_mib {peak:.0f}")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if np.isfinite(losses).all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
