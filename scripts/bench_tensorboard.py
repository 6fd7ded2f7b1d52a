"""Cost of ``--tensorboard`` per training iteration: the small OHEM net on a fresh mini-VOC.

    python scripts/bench_tensorboard.py [--rounds 3] [--block 20] [--images 20] [--device cpu]

Three trainers built alike (``setup_training``: same config, seed, data; the demo's settings,
``prototxt/cfgs/small.yml`` + ``fast_rcnn_ohem.yml``): without TensorBoard; with
``--tensorboard --log-every 20`` (the demo's K; the solver displays every 20 iterations); with
``--log-every 1`` (every iteration's selections, histograms and picture: the worst case). They
take turns, ``--block`` iterations each per round (the order rotating from round to round), so
that the load of a shared machine falls on all three alike. Each iteration is what ``Trainer.train`` runs: ``Solver.step`` (the OHEM
layer's recorder included: full NMS and the host copy on logged iterations), then the hooks
(scalars, histograms, the picture, queued to the SummaryWriter's writer thread).

Printed: ms/iter of each arm (all its iterations' time / their number, so the every-K-th costs
are spread over the block), the ratio of the totals to the arm without TensorBoard, and the
median over the rounds of the per-round ratio (robust to a burst of load in one round); the last
line is ``ratio_k20 X.XXX`` (the median).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from readonly_ohem.caffe import use_caffe_float32
from readonly_ohem.config import load_config
from readonly_ohem.datasets import get_imdb
from readonly_ohem.datasets.minivoc import make_minivoc
from readonly_ohem.tensorboard import attach_tensorboard
from readonly_ohem.train import find_data_layers, setup_training

REPO = Path(__file__).resolve().parents[1]
SOLVER = REPO / "prototxt/small/fast_rcnn_ohem/solver.prototxt"
CFGS = [REPO / "prototxt/cfgs/small.yml", REPO / "prototxt/cfgs/fast_rcnn_ohem.yml"]


def make_trainer(data_dir: Path, out: Path, device: str, log_every: int | None):
    """A trainer as ``readonly-ohem train`` builds it; with ``attach_tensorboard`` unless None."""
    cfg = load_config([str(p) for p in CFGS])
    imdb = get_imdb("voc_2007_trainval", data_dir, None, cfg, cache_dir=False)
    trainer = setup_training(SOLVER, cfg, imdb, output=out, device=device, verbose=False)
    if log_every is not None:
        attach_tensorboard(trainer, out / "tb", log_every=log_every, classes=imdb.classes)
    return trainer


def run_block(trainer, n: int, device: str) -> float:
    """Seconds of ``n`` iterations as ``Trainer.train`` runs them (step, then the hooks)."""
    total = 0.0
    for _ in range(n):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        it = trainer.solver.iter
        out = trainer.solver.step()
        seconds = time.perf_counter() - t0
        for hook in trainer.hooks:
            hook.after_step(trainer, it, out, seconds)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        total += time.perf_counter() - t0
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=20, help="iterations per arm per round")
    ap.add_argument("--images", type=int, default=20, help="mini-VOC images")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations per arm first")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    use_caffe_float32()
    arms = {"without --tensorboard": None, "--tensorboard --log-every 20": 20,
            "--tensorboard --log-every 1": 1}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_minivoc(tmp / "voc", seed=0, num_images=args.images, verbose=False)
        trainers = {name: make_trainer(data, tmp / f"arm{k}", args.device, k_every)
                    for k, (name, k_every) in enumerate(arms.items())}
        for t in trainers.values():
            run_block(t, args.warmup, args.device)
        rounds = []  # per round: arm -> seconds of its block
        names = list(arms)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            rounds.append({name: run_block(trainers[name], args.block, args.device) for name in order})
        for t in trainers.values():
            for hook in t.hooks:
                hook.close()
            for layer in find_data_layers(t.net):
                layer.close()
    n = args.rounds * args.block
    base = "without --tensorboard"
    total = {name: sum(r[name] for r in rounds) for name in arms}
    median = {name: statistics.median(r[name] / r[base] for r in rounds) for name in arms}
    print(f"small OHEM net, mini-VOC ({args.images} images), {args.device}, "
          f"{torch.get_num_threads()} torch threads; {args.rounds} rounds x {args.block} "
          f"iterations per arm, taking turns")
    print(f"{'arm':<30} {'ms/iter':>9} {'ratio':>7} {'median ratio of rounds':>23}")
    for name in arms:
        print(f"{name:<30} {1e3 * total[name] / n:>9.1f} {total[name] / total[base]:>7.3f} "
              f"{median[name]:>23.3f}")
    print(f"ratio_k20 {median['--tensorboard --log-every 20']:.3f}")


if __name__ == "__main__":
    main()
