"""Benchmark: our OHEMDataLayer vs the original algorithm as released (per-RoI Python loops and
py-faster-rcnn's pure-numpy NMS, transcribed once in tests/original_code.py), on realistic
readonly-head outputs.

Cases: 1 image x 2000 RoIs and 2 images x 2000 RoIs, 21 classes, NMS on and off. Each case
asserts both keep identical RoIs in identical order, then prints the best of --repeat times. The last line
is the time ratio of the NMS-on, 2-image case: ``speedup X.X``.

    python scripts/bench_mining.py [--repeat 20] [--batch-size 128] [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format

from readonly_ohem.config import default_config
from readonly_ohem.caffe.layers.base import LayerContext
from readonly_ohem.ohem.layer import OHEMDataLayer
from readonly_ohem.ops.boxes import bbox_overlaps, bbox_transform
from readonly_ohem.caffe.proto import caffe_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from original_code import get_ohem_minibatch, ohem_loss  # noqa: E402  (the one transcription)

NUM_CLASSES = 21


def reference_ohem(cls_prob, bbox_pred, rois, labels, bbox_targets, bbox_inside_weights,
                   bbox_outside_weights, batch_size, use_nms, nms_thresh):
    """The original OHEMDataLayer.forward: its loss, then get_ohem_minibatch's hard indices, with
    numpy's argsort as released (SPEC §5)."""
    loss = ohem_loss(cls_prob, bbox_pred, labels, bbox_targets, bbox_inside_weights,
                     bbox_outside_weights)
    return get_ohem_minibatch(loss, rois, labels, batch_size, use_nms, nms_thresh)[0]


# -- realistic readonly-head outputs ---------------------------------------------------------
def make_case(num_images: int, rois_per_image: int, seed: int = 0):
    """Boxes clustered around objects (so NMS suppresses), softmax of random logits with a share
    of confident-correct rows, bbox targets/weights as the original minibatch lays them out."""
    rng = np.random.default_rng(seed)
    all_rois, all_labels, all_targets = [], [], []
    for im in range(num_images):
        h, w = 600.0, 800.0
        n_obj = int(rng.integers(2, 6))
        ctr = rng.uniform([100, 100], [w - 100, h - 100], size=(n_obj, 2))
        size = rng.uniform(60, 300, size=(n_obj, 2))
        gt = np.concatenate((ctr - size / 2, ctr + size / 2), axis=1).clip(0, [w - 1, h - 1, w - 1, h - 1])
        gt_cls = rng.integers(1, NUM_CLASSES, size=n_obj)
        n_near = rois_per_image * 2 // 5
        src = rng.integers(0, n_obj, size=n_near)
        gw = (gt[src, 2] - gt[src, 0])[:, None]
        gh = (gt[src, 3] - gt[src, 1])[:, None]
        jit = rng.normal(0, 0.12, size=(n_near, 4)) * np.concatenate((gw, gh, gw, gh), axis=1)
        near = gt[src] + jit
        xy = rng.uniform([0, 0], [w - 40, h - 40], size=(rois_per_image - n_near, 2))
        wh = rng.uniform(16, 400, size=(rois_per_image - n_near, 2))
        rand = np.concatenate((xy, xy + wh), axis=1)
        boxes = np.concatenate((near, rand)).clip(0, [w - 1, h - 1, w - 1, h - 1])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        boxes = boxes * 0.96  # image scale, unrounded as the original
        ov = bbox_overlaps(boxes, gt * 0.96)
        arg = ov.argmax(1)
        labels = np.where(ov.max(1) >= 0.5, gt_cls[arg], 0)
        t = bbox_transform(boxes, gt[arg] * 0.96) / np.array([0.1, 0.1, 0.2, 0.2])
        all_rois.append(np.concatenate((np.full((rois_per_image, 1), im), boxes), axis=1))
        all_labels.append(labels)
        all_targets.append(np.where((labels > 0)[:, None], t, 0.0))
    rois = np.concatenate(all_rois).astype(np.float32)
    labels = np.concatenate(all_labels)
    t = np.concatenate(all_targets)
    r = rois.shape[0]
    targets = np.zeros((r, 4 * NUM_CLASSES), np.float32)
    inside = np.zeros_like(targets)
    for k in range(4):
        targets[np.arange(r), 4 * labels + k] = t[:, k]
        inside[np.arange(r), 4 * labels + k] = (labels > 0).astype(np.float32)
    outside = (inside > 0).astype(np.float32)
    logits = rng.normal(0, 2.0, size=(r, NUM_CLASSES))
    confident = rng.random(r) < 0.5
    logits[np.arange(r), labels] += np.where(confident, 7.0, 0.0)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob = (prob / prob.sum(1, keepdims=True)).astype(np.float32)
    pred = (targets + rng.normal(0, 0.8, size=targets.shape)).astype(np.float32)
    return [prob, pred, rois, labels.astype(np.float32), targets, inside, outside]


def make_layer(cfg):
    param = text_format.Parse(
        'name: "hard_roi_mining" type: "Python" python_param { module: "roi_data_layer.layer" '
        "layer: \"OHEMDataLayer\" param_str: \"'num_classes': 21\" }"
        + "".join(f' bottom: "b{i}"' for i in range(7)) + "".join(f' top: "t{i}"' for i in range(5)),
        caffe_pb2.LayerParameter())
    return OHEMDataLayer(param, LayerContext(cfg=cfg))


def best_time(fn, repeat: int, sync=lambda: None) -> float:
    """Fastest of ``repeat`` runs: on a shared machine the minimum is the stable statistic."""
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128, help="TRAIN.BATCH_SIZE (default 128)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the reference is single-threaded, and the "
                         "layer's small tensors gain nothing from OpenMP, whose barriers stall "
                         "for milliseconds on a busy shared machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device {device}, torch threads {torch.get_num_threads()}, "
          f"BATCH_SIZE {args.batch_size}, {NUM_CLASSES} classes")
    ratio = 0.0
    for use_nms in (False, True):
        for n_img in (1, 2):
            cfg = default_config()
            cfg.set_key("TRAIN.BATCH_SIZE", args.batch_size)
            cfg.set_key("TRAIN.OHEM_USE_NMS", use_nms)
            arrays = make_case(n_img, 2000, seed=n_img)
            ref_args = arrays + [args.batch_size, use_nms, cfg.TRAIN.OHEM_NMS_THRESH]
            ref_keep = reference_ohem(*ref_args)
            layer = make_layer(cfg)
            bottoms = [torch.from_numpy(a).to(device) for a in arrays]
            got = []
            layer.recorder = got.append
            layer.forward(bottoms, [])
            layer.recorder = None
            ours_keep = got[0].keep.cpu().numpy()
            assert np.array_equal(ours_keep, ref_keep), (use_nms, n_img, ours_keep, ref_keep)
            n_supp = int(got[0].suppressed.sum())
            # the timed call runs without a recorder (the fast path): it must keep the same rows
            fast_rois = layer.forward(bottoms, [])[0].cpu().numpy()
            assert np.array_equal(fast_rois, arrays[2][ref_keep]), (use_nms, n_img)
            t_ref = best_time(lambda: reference_ohem(*ref_args), max(3, args.repeat // 4))
            t_ours = best_time(lambda: layer.forward(bottoms, []), args.repeat, sync)
            ratio = t_ref / t_ours
            print(f"NMS {'on ' if use_nms else 'off'} {n_img} image(s) x 2000 RoIs: kept "
                  f"{len(ref_keep)} identical (NMS suppressed {n_supp}); reference "
                  f"{t_ref * 1e3:.2f} ms, ours {t_ours * 1e3:.3f} ms, ratio {ratio:.1f}")
    print(f"speedup {ratio:.1f}")
    return ratio


if __name__ == "__main__":
    main()
