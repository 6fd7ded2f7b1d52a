"""Benchmark: our ProposalLayer vs the original's forward in plain numpy (py-faster-rcnn's
``rpn/proposal_layer.py`` with its pure-numpy NMS, transcribed once in tests/original_code.py),
on the RPN outputs of one 600 x 1000 image: a 38 x 63 map, 9 anchors per cell, 21,546 anchors.

The outputs look like a half-trained RPN's: foreground probabilities high on anchors that
overlap a few objects and low elsewhere (with noise), deltas toward the nearest object plus
noise. For each phase's keys (TRAIN: top 12000 -> NMS 0.7 -> 2000; TEST: 6000 -> 300) it
asserts both give the same proposals and scores (on the CPU bit for bit: both compute in numpy),
then prints the best of --repeat times of each (the thread's CPU time; on a GPU, wall-clock).
Both run on one CPU thread (``--threads``), numpy and torch alike. The last line is the ratio of
the summed times of both phases: ``speedup X.X``.

The reference is timed as transcribed: setup (``generate_anchors``, ~0.1 ms) and forward.
Nearly all of the time of both is the NMS: the original visits the 1,291 (TRAIN) survivors one
by one, each against every box left; ours compares a kept box only with the boxes near it
(``ops/nms_window.py``), in chunks, in numpy.

    python scripts/bench_rpn.py [--repeat 10] [--threads 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format

from readonly_ohem.caffe.layers.base import LayerContext
from readonly_ohem.caffe.proto import caffe_pb2
from readonly_ohem.config import default_config
from readonly_ohem.ops.boxes import bbox_overlaps, bbox_transform
from readonly_ohem.rpn.anchors import generate_anchors, shifted_anchors
from readonly_ohem.rpn.proposal_layer import ProposalLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from original_code import argsort_desc_stable, proposal_layer_forward  # noqa: E402

HEIGHT, WIDTH, SCALE = 600, 1000, 1.6  # the scaled image; its feature map is 38 x 63 at stride 16


def make_case(seed: int = 0):
    """(rpn_cls_prob_reshape (1, 18, H, W), rpn_bbox_pred (1, 36, H, W), im_info (1, 3)) float32."""
    rng = np.random.default_rng(seed)
    h, w = -(-HEIGHT // 16), -(-WIDTH // 16)
    anchors = shifted_anchors(generate_anchors(), h, w, 16).numpy()  # (h * w * 9, 4)
    n_obj = 6
    ctr = rng.uniform([100, 100], [WIDTH - 100, HEIGHT - 100], size=(n_obj, 2))
    size = rng.uniform(60, 400, size=(n_obj, 2))
    gt = np.concatenate((ctr - size / 2, ctr + size / 2), 1).clip(0, [WIDTH - 1, HEIGHT - 1] * 2)
    ov = bbox_overlaps(anchors, gt)
    best = ov.argmax(1)
    logit = 8 * ov.max(1) - 4 + rng.normal(0, 1.5, len(anchors))
    fg = 1 / (1 + np.exp(-logit))
    deltas = bbox_transform(anchors, gt[best]) * 0.5 + rng.normal(0, 0.1, (len(anchors), 4))
    prob = np.concatenate((1 - fg.reshape(h, w, 9), fg.reshape(h, w, 9)), 2)
    prob = prob.transpose(2, 0, 1)[None].astype(np.float32)
    deltas = deltas.reshape(h, w, 36).transpose(2, 0, 1)[None].astype(np.float32)
    return prob, deltas, np.array([[HEIGHT, WIDTH, SCALE]], np.float32)


def make_layer(cfg, phase: str) -> ProposalLayer:
    param = text_format.Parse(
        'name: "proposal" type: "Python" bottom: "rpn_cls_prob_reshape" bottom: "rpn_bbox_pred" '
        'bottom: "im_info" top: "rois" top: "scores" python_param { module: "rpn.proposal_layer" '
        "layer: \"ProposalLayer\" param_str: \"'feat_stride': 16\" }", caffe_pb2.LayerParameter())
    return ProposalLayer(param, LayerContext(phase=phase, cfg=cfg))


def best_time(fn, repeat: int, sync=None) -> float:
    """Fastest of ``repeat`` runs. On the CPU (``sync`` None) this thread's CPU time: on a shared
    machine it leaves out the time other processes hold the cores, which wall-clock times count
    (the minimum of those is still far off here). On a GPU the wall-clock time after ``sync``."""
    clock = time.thread_time if sync is None else time.perf_counter
    fn()
    times = []
    for _ in range(repeat):
        if sync is not None:
            sync()
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        times.append(clock() - t0)
    return min(times)


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    cfg = default_config()
    arrays = make_case()
    bottoms = [torch.from_numpy(a).to(device) for a in arrays]
    print(f"{arrays[0].shape[2] * arrays[0].shape[3] * 9} anchors, device {device}, "
          f"{args.threads} thread(s)")
    total_ref = total_ours = 0.0
    for phase in ("TRAIN", "TEST"):
        layer = make_layer(cfg, phase)
        rois, scores = (t.cpu().numpy() for t in layer(bottoms, []))
        ref_rois, ref_scores = proposal_layer_forward(*arrays, cfg, phase,
                                                      argsort_desc=argsort_desc_stable)
        assert rois.shape == ref_rois.shape, (phase, rois.shape, ref_rois.shape)
        if device.type == "cpu":
            np.testing.assert_array_equal(rois, ref_rois)
        else:  # torch's float32 exp may differ from numpy's in the last bit
            np.testing.assert_allclose(rois, ref_rois, rtol=1e-6, atol=1e-4)
        np.testing.assert_array_equal(scores, ref_scores)
        t_ref = best_time(lambda: proposal_layer_forward(*arrays, cfg, phase), args.repeat)
        t_ours = best_time(lambda: layer(bottoms, []), args.repeat, sync)
        total_ref += t_ref
        total_ours += t_ours
        c = cfg[phase]
        print(f"{phase}: top {c.RPN_PRE_NMS_TOP_N} -> NMS {c.RPN_NMS_THRESH} -> {len(rois)} "
              f"proposals, identical; reference {t_ref * 1e3:.1f} ms, ours {t_ours * 1e3:.2f} ms, "
              f"ratio {t_ref / t_ours:.1f}")
    ratio = total_ref / total_ours
    print(f"speedup {ratio:.1f}")
    return ratio


if __name__ == "__main__":
    main()
