"""Minibatches per second of the OHEM all-RoIs data path, with and without prefetch workers.

    python scripts/bench_minibatch.py [--data DIR] [--batches 40] [--rois 2000] [--workers 2]

Uses the mini-VOC (generated into a temporary directory unless --data is given) with proposals
topped up to --rois distinct boxes per image, the OHEM config (1 image per minibatch, every RoI)
and the default TRAIN.SCALES 600 / MAX_SIZE 1000, through the real RoIDataLayer.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from google.protobuf import text_format

from readonly_ohem.caffe.layers.base import PYTHON_LAYERS, LayerContext
from readonly_ohem.caffe.proto import caffe_pb2
from readonly_ohem.config import load_config
from readonly_ohem.datasets import get_imdb
from readonly_ohem.datasets.minivoc import make_minivoc
from readonly_ohem.datasets.proposals import save_proposals_npz
from readonly_ohem.roi_data.layer import RoIDataLayer  # noqa: F401  (registers the layer)
from readonly_ohem.roi_data.roidb import training_roidb

REPO = Path(__file__).resolve().parents[1]


def topped_up_proposals(imdb, n: int, out: Path) -> Path:
    """Each image's proposals plus random distinct integer boxes, n in all."""
    rng = np.random.RandomState(0)
    boxes = []
    for i in range(imdb.num_images):
        w, h = imdb.image_sizes[i]
        b = imdb.proposal_boxes(i)
        seen = {tuple(r) for r in b.tolist()}
        extra = []
        while len(seen) < n:
            x1, x2 = np.sort(rng.randint(0, w, 2))
            y1, y2 = np.sort(rng.randint(0, h, 2))
            if x2 - x1 >= 4 and y2 - y1 >= 4 and (x1, y1, x2, y2) not in seen:
                seen.add((x1, y1, x2, y2))
                extra.append((x1, y1, x2, y2))
        boxes.append(np.vstack([b, np.array(extra, dtype=np.float64).reshape(-1, 4)])[:n])
    save_proposals_npz(out, imdb.image_index, boxes)
    return out


def bench(layer, n: int) -> float:
    layer([], [])  # warm-up (starts the workers)
    t = time.perf_counter()
    for _ in range(n):
        layer([], [])
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a mini-VOC / VOC root (default: generate one)")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--rois", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    root = Path(args.data) if args.data else make_minivoc(Path(tmp.name) / "minivoc", seed=0, verbose=False)
    cfg = load_config([REPO / "prototxt" / "fast_rcnn_ohem.yml"] if (REPO / "prototxt" / "fast_rcnn_ohem.yml").is_file() else [])
    cfg.set_list([("TRAIN.BG_THRESH_LO", "0.0"), ("TRAIN.IMS_PER_BATCH", "1"), ("TRAIN.BATCH_SIZE", "64"),
                  ("TRAIN.USE_OHEM", "True"), ("TRAIN.ASPECT_GROUPING", "False")])
    base = get_imdb("voc_2007_trainval", root, cfg=cfg, cache_dir=False)
    props = topped_up_proposals(base, args.rois, Path(tmp.name) / "proposals.npz")
    imdb = get_imdb("voc_2007_trainval", root, proposals=props, cfg=cfg, cache_dir=False)
    roidb, _, _ = training_roidb(imdb, cfg, verbose=False)

    param = text_format.Parse(
        "name: 'data' type: 'Python' top: 'data' top: 'rois' top: 'labels' top: 'bbox_targets' "
        "top: 'bbox_inside_weights' top: 'bbox_outside_weights' python_param { module: "
        "'roi_data_layer.layer' layer: 'RoIDataLayer' param_str: \"'num_classes': 21\" }",
        caffe_pb2.LayerParameter())
    print(f"{len(roidb)} roidb entries, {np.mean([e['boxes'].shape[0] for e in roidb]):.0f} RoIs per image, "
          f"torch threads {torch.get_num_threads()}")
    for label, prefetch in (("no prefetch", False), (f"prefetch, {args.workers} workers", True)):
        layer = PYTHON_LAYERS[("roi_data_layer.layer", "RoIDataLayer")](param, LayerContext(cfg=cfg))
        layer.set_roidb(roidb, prefetch=prefetch, num_workers=args.workers)
        rate = bench(layer, args.batches)
        shapes = [tuple(t.shape) for t in layer([], [])[:2]]
        print(f"OHEM all-RoIs minibatches/s ({label}): {rate:.1f}   e.g. data {shapes[0]}, rois {shapes[1]}")
        layer.close()


if __name__ == "__main__":
    main()
