"""What +M (multi-scale training and testing) and +B (iterative bbox regression with voting)
change on the mini-VOC, for plain Fast R-CNN and OHEM, over several seeds.

For each seed: the mini-VOC of that seed; FRCN and OHEM trained as the demo trains them (same
initial weights, same images per SGD step, ``readonly_ohem.commands.demo.train_method``) at one
scale (small.yml) and with +M (small_multiscale.yml: one scale per image drawn from five); each
model tested at 100 detections / 0.05 without and with +B (iter_bbox_reg_vote.yml), the +M models
on the five-scale pyramid. Prints the mAP table (mean over the classes present) with the mean and
spread over seeds, and writes ``results.json``.

    python scripts/experiment_msb.py --output msb_runs --seeds 0 1 [--iters 600]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from readonly_ohem.caffe import use_caffe_float32
from readonly_ohem.commands import demo
from readonly_ohem.datasets.minivoc import make_minivoc

CFGS = demo.PROTOTXT / "cfgs"
M_CFG = CFGS / "small_multiscale.yml"
B_CFG = CFGS / "iter_bbox_reg_vote.yml"
SETTING = (100, 0.05)
COLUMNS = ("base", "+M", "+B", "+M+B")


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_seed(seed: int, out: Path, iters: int | None) -> dict:
    data = out / "minivoc"
    make_minivoc(data, seed=seed)
    init, res = None, {}
    for method in demo.METHODS:
        res[method] = {}
        for multi in (False, True):
            name = method.lower() + ("_M" if multi else "")
            train_cfg = [M_CFG] if multi else []
            print(f"seed {seed}: training {name} ({load()})", flush=True)
            r = demo.train_method(method, data, out / name, iters, seed, init, extra_cfg=train_cfg)
            init = r["init"]
            for vote in (False, True):
                col = ("+M" if multi else "") + ("+B" if vote else "") or "base"
                t0 = time.perf_counter()
                test = demo.test_model(r["model"], data, out / name / ("B" if vote else "plain"), seed,
                                       (SETTING,), extra_cfg=train_cfg + ([B_CFG] if vote else []))
                res[method][col] = {"mAP": test[SETTING]["mAP"], "train_sec_per_iter": r["sec_per_iter"],
                                    "test_seconds": time.perf_counter() - t0,
                                    "per_class": test[SETTING]["per_class"]}
    return res


def table(all_res: dict) -> str:
    head = f"{'seed':>5} {'method':<6}" + "".join(f" {c:>7}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for seed, res in all_res.items():
        for method, cols in res.items():
            lines.append(f"{seed:>5} {method:<6}" + "".join(f" {cols[c]['mAP']:>7.4f}" for c in COLUMNS))
    for method in demo.METHODS:
        v = np.array([[res[method][c]["mAP"] for c in COLUMNS] for res in all_res.values()])
        lines.append(f"{'mean':>5} {method:<6}" + "".join(f" {x:>7.4f}" for x in v.mean(0)))
        lines.append(f"{'range':>5} {method:<6}" + "".join(f" {x:>7.4f}" for x in v.max(0) - v.min(0)))
        d = v - v[:, :1]
        lines.append(f"{'gain':>5} {method:<6}" + "".join(f" {x:>+7.4f}" for x in d.mean(0))
                     + "   (mean change vs base; per seed: "
                     + "; ".join(", ".join(f"{x:+.3f}" for x in row[1:]) for row in d) + ")")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="msb_runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--iters", type=int, default=None, help="default: the small solvers' max_iter")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a loaded machine 2 threads ran 3x slower here)")
    a = p.parse_args(argv)
    use_caffe_float32()
    torch.set_num_threads(a.threads)
    out = Path(a.output)
    t0 = time.perf_counter()
    print(f"start: {load()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads", flush=True)
    all_res = {}
    for s in a.seeds:
        all_res[s] = run_seed(s, out / f"seed{s}", a.iters)
        (out / "partial.json").write_text(json.dumps(all_res, indent=2, default=float) + "\n")
    text = table(all_res)
    print(text)
    summary = f"{(time.perf_counter() - t0) / 60:.1f} min; end: {load()}"
    print(summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"seeds": all_res, "table": text, "summary": summary},
                                                 indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
