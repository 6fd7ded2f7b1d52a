"""Training-step cost of OHEM vs plain Fast R-CNN on the same images and net (issue 6 targets).

    python scripts/bench_train_step.py                      # small CPU net on a fresh mini-VOC
    python scripts/bench_train_step.py --net vgg16 --device cuda   # VGG16 at 600 px (a GPU)

What is timed: ``Solver.step`` (forward, backward and Caffe's SGD update) of each net, fed with
minibatches its own RoIDataLayer built beforehand (so JPEG decoding is not in the figure; the
layer prefetches in training). Both nets see the same images: the same roidb order (no aspect
grouping, one seed; each net's roidb is filtered by its own config, as in training),
2 images per SGD iteration (FRCN: IMS_PER_BATCH 2, 128 sampled RoIs; OHEM: 1 image × iter_size 2,
every RoI through the readonly head, 64 hard RoIs per pass through the trainable one).

The ideal OHEM step = the FRCN step + the readonly head's forward over all RoIs (roi pooling,
fc6, fc7, cls_score, bbox_pred, softmax), timed alone on the same feature maps. Memory: on CUDA
the peak allocated bytes of a step; on CPU (no allocator statistics) the bytes saved for backward
during a step, deduplicated, which is what the readonly branch must not add.

Printed: per-net median s/iter and memory, the readonly head's time, the ratios; the last line is
``ratio_to_ideal X.XX`` (OHEM step / ideal). ``--set TRAIN.OHEM_READONLY_DTYPE bfloat16`` runs the
readonly branch (and its timing alone) under bfloat16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from readonly_ohem import python_layers  # noqa: F401  (registers RoIDataLayer, OHEMDataLayer)
from readonly_ohem.caffe import use_caffe_float32
from readonly_ohem.caffe.solver import Solver, build_net
from readonly_ohem.caffe.spec import read_solver
from readonly_ohem.config import load_config
from readonly_ohem.datasets import get_imdb
from readonly_ohem.datasets.minivoc import make_minivoc
from readonly_ohem.ohem.readonly import DTYPES, apply_readonly_dtype, readonly_branch
from readonly_ohem.roi_data.roidb import training_roidb

REPO = Path(__file__).resolve().parents[1]
NETS = {
    "small": ("prototxt/small/fast_rcnn", "prototxt/small/fast_rcnn_ohem", ["prototxt/cfgs/small.yml"]),
    "vgg16": ("prototxt/VGG16/fast_rcnn", "prototxt/VGG16/fast_rcnn_ohem", []),
}


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def build(kind_dir, cfg_files, ohem, imdb_name, data_dir, proposals, device, set_pairs):
    files = [str(REPO / f) for f in cfg_files]
    if ohem:
        files.append(str(REPO / "prototxt/cfgs/fast_rcnn_ohem.yml"))
    cfg = load_config(files, [["TRAIN.ASPECT_GROUPING", "False"]] + set_pairs)
    roidb, _, _ = training_roidb(get_imdb(imdb_name, data_dir, proposals, cfg), cfg, verbose=False)
    solver_path = REPO / kind_dir / "solver.prototxt"
    sp = read_solver(str(solver_path))
    torch.manual_seed(cfg.RNG_SEED)
    net = build_net(sp, solver_path, cfg=cfg)
    apply_readonly_dtype(net, cfg)  # --set TRAIN.OHEM_READONLY_DTYPE bfloat16
    net.to(device)
    data = [rec for rec in net.layers if hasattr(rec.module, "set_roidb")][0]
    data.module.set_roidb(roidb)
    return Solver(sp, net, source=solver_path), data, cfg


def make_feeds(data_rec, n, device):
    """n minibatches from the net's own data layer, as feeds (top name -> tensor)."""
    feeds = []
    for _ in range(n):
        with torch.no_grad():
            tops = data_rec.module.forward([], [])
        feeds.append({name: t.to(device) for name, t in zip(data_rec.tops, tops)})
    return feeds


class SavedBytes:
    """Bytes saved for backward during a step (deduplicated by storage)."""

    def __init__(self):
        self.seen, self.total = set(), 0

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in self.seen:
            self.seen.add(key)
            self.total += t.numel() * t.element_size()
        return t

    @staticmethod
    def unpack(t):
        return t


def time_step(solver, batch, device):
    """Seconds of one SGD iteration on ``batch`` (iter_size feeds)."""
    sync(device)
    t0 = time.perf_counter()
    solver.step(lambda p: batch[p])
    sync(device)
    return time.perf_counter() - t0


def step_memory(solver, feeds, device):
    batch = feeds[: solver.iter_size]
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        solver.step(lambda p: batch[p])
        sync(device)
        return torch.cuda.max_memory_allocated(device), "peak CUDA memory allocated"
    saved = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        solver.step(lambda p: batch[p])
    return saved.total, "bytes saved for backward (CPU)"


def readonly_head_time(solver, batch, device, dtype=None):
    """Forward of the readonly branch alone (``ohem.readonly.readonly_branch``) over all RoIs, on
    the blobs of a real forward of each pass of ``batch``, under autocast to ``dtype`` when given:
    (seconds per iteration, mean RoIs per pass)."""
    net = solver.net
    names = set(readonly_branch(net))
    recs = [r for r in net.layers if r.name in names]
    if not recs:
        raise SystemExit("the OHEM net has no readonly branch")
    cast = (torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None
            else contextlib.nullcontext())
    total, rois = 0.0, []
    for feed in batch:
        with torch.no_grad():
            blobs = net.forward(feed)
        inputs = {b: blobs[b] for r in recs for b in r.bottoms}
        rois.append(int(blobs["rois"].shape[0]))
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), cast:
            for r in recs:
                tops = r.module([inputs[b] for b in r.bottoms], net.layer_params(r.name))
                inputs.update(zip(r.tops, tops))
        sync(device)
        total += time.perf_counter() - t0
    return total, float(np.mean(rois))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", choices=sorted(NETS), default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", help="dataset root with VOCdevkit (default: a fresh mini-VOC)")
    ap.add_argument("--imdb", default="voc_2007_trainval")
    ap.add_argument("--proposals", help="proposals file (default: the dataset's own)")
    ap.add_argument("--images", type=int, default=40, help="mini-VOC size")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    ap.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="config override for both nets, e.g. --set TRAIN.OHEM_READONLY_DTYPE "
                         "bfloat16")
    args = ap.parse_args(argv)
    use_caffe_float32()  # as the commands: true float32 on GPUs
    if args.threads:
        torch.set_num_threads(args.threads)

    frcn_dir, ohem_dir, cfg_files = NETS[args.net]
    set_pairs = [] if args.net == "small" else [["TRAIN.SCALES", "(600,)"], ["TRAIN.MAX_SIZE", "1000"]]
    set_pairs += [list(p) for p in args.set]
    tmp = None
    data = args.data
    if data is None:
        tmp = tempfile.TemporaryDirectory()
        data = tmp.name
        make_minivoc(data, seed=0, num_images=args.images)
    runs = {}
    for name, kind_dir, ohem in (("FRCN", frcn_dir, False), ("OHEM", ohem_dir, True)):
        solver, data_rec, cfg = build(kind_dir, cfg_files, ohem, args.imdb, data,
                                      args.proposals, args.device, set_pairs)
        k = solver.iter_size
        feeds = make_feeds(data_rec, (args.warmup + args.iters + 1) * k, args.device)
        batches = [feeds[i * k:(i + 1) * k] for i in range(args.warmup + args.iters + 1)]
        mem, mem_what = step_memory(solver, batches[0], args.device)
        runs[name] = dict(solver=solver, batches=batches[1:], mem=mem, mem_what=mem_what,
                          rois=np.mean([f["rois"].shape[0] for f in feeds]), times=[],
                          dtype=DTYPES[str(cfg.TRAIN.OHEM_READONLY_DTYPE)])
    head_times, head_rois = [], []
    # interleaved, so that load on a shared machine hits both nets alike
    for i in range(args.warmup + args.iters):
        for name in ("FRCN", "OHEM"):
            r = runs[name]
            t = time_step(r["solver"], r["batches"][i], args.device)
            if i >= args.warmup:
                r["times"].append(t)
        t, n = readonly_head_time(runs["OHEM"]["solver"], runs["OHEM"]["batches"][i], args.device,
                                  runs["OHEM"]["dtype"])
        if i >= args.warmup:
            head_times.append(t)
            head_rois.append(n)
    for name, r in runs.items():
        r["time"] = statistics.median(r["times"])
        print(f"{name:5s} step  {r['time']:8.4f} s/iter  ({r['solver'].iter_size} pass(es)/iter, "
              f"{r['rois']:.0f} RoIs per pass into the net)  {r['mem_what']}: {r['mem'] / 2**20:.1f} MiB")
    head = statistics.median(head_times)
    frcn, ohem = runs["FRCN"]["time"], runs["OHEM"]["time"]
    ideal = frcn + head
    head_dtype = runs["OHEM"]["dtype"] or torch.float32
    print(f"readonly head forward over all RoIs ({np.mean(head_rois):.0f} per pass, "
          f"{str(head_dtype).replace('torch.', '')}): {head:.4f} s/iter")
    print(f"net {args.net}  device {args.device}  threads {torch.get_num_threads()}  "
          f"timed iters {args.iters} (median, interleaved)")
    print(f"OHEM / FRCN step time   {ohem / frcn:.2f}")
    print(f"ideal (FRCN + head)     {ideal:.4f} s/iter")
    print(f"peak memory OHEM / FRCN {runs['OHEM']['mem'] / max(runs['FRCN']['mem'], 1):.2f}")
    print(f"ratio_to_ideal {ohem / ideal:.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
