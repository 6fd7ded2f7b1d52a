"""``readonly-ohem experiment``: does OHEM beat plain Fast R-CNN, and its rivals, beyond noise?

A paired comparison on the built-in mini-VOC (the demo's pieces: ``commands.demo.train_arm``,
``test_model``), sized so that the 95% interval of the mean paired OHEM - FRCN difference is
narrower than +-1.5 mAP points (how the sizes were chosen: docs/REPRODUCE.md, "The experiment").

Held equal, per seed S, between every method:

- the data: ONE mini-VOC (``DATASET_SEED``, ``DATASET_IMAGES``: 600 trainval, 400 test images),
  written once to ``DIR/minivoc`` and reused by every run;
- the start: ``DIR/init/seed_S.caffemodel``, the plain Fast R-CNN net's fresh fill with the
  filler generator seeded by S (the OHEM nets' readonly and trainable heads share those params);
- the images and their order: ``demo.SharedOrderPlanner(S)`` and 1 image per forward pass; the
  methods with 2 images per SGD step (1 per pass x ``iter_size`` 2) see the same images step by
  step, ``frcn-n1`` (1 image per step) the first half of that sequence;
- the solver (the small net's: lr 0.01, x0.1 after 2/3 of the iterations, momentum 0.9, weight
  decay 0.0005), the iterations, ``RNG_SEED`` = S, and the test (same test set, 100 detections
  per image at score > 0.05, VOC07 11-point AP over the 6 classes the mini-VOC has).

What differs is the method (``METHODS``); each one's train net and solver are written to
``DIR/nets/<method>/`` (so ``readonly-ohem train --solver DIR/nets/<method>/solver.prototxt``
repeats one arm). Outputs: ``DIR/results.json`` (``{"runs": [...], "summary": {...}}``),
``DIR/results.md``, ``DIR/results.png``; every finished run also in
``DIR/runs/<method>/seed_<S>/run.json`` (a rerun into the same DIR reuses the finished runs of the
same design, so a table can be extended seed by seed). ``--jobs J`` runs the runs on J worker
processes of one torch thread each (the default on 2 CPUs: 2; see ``experiment_command``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from google.protobuf import text_format

from readonly_ohem import python_layers  # noqa: F401  (registers the Python layers)
from readonly_ohem.atomic import atomic_write
from readonly_ohem.caffe import use_caffe_float32
from readonly_ohem.caffe.layers.python import parse_param_str
from readonly_ohem.caffe.solver import build_net
from readonly_ohem.caffe.spec import read_net, read_solver
from readonly_ohem.commands import demo
from readonly_ohem.commands.experiment_report import plot_results, summarize, write_markdown
from readonly_ohem.config import load_config
from readonly_ohem.datasets import get_imdb
from readonly_ohem.datasets.minivoc import make_minivoc
from readonly_ohem.errors import ConfigError
from readonly_ohem.ohem.focal_layer import focal_in_place_of
from readonly_ohem.progress import clock
from readonly_ohem.roi_data.roidb import training_roidb
from readonly_ohem.train import find_data_layers, find_ohem_layers, seed_rngs

# -- the design (chosen in docs/REPRODUCE.md, "The experiment") ---------------------------------
DATASET_SEED = 0  # the one fixed mini-VOC
DATASET_IMAGES = 1000  # 600 trainval (1200 with flips), 400 test
ITERS = 2000  # SGD steps of every method (lr x0.1 after 1333), by FRCN's convergence
SEEDS = (1, 2, 3, 4, 5)  # training seeds: initial weights, image order, sampling, dropout
TEST_SETTING = (100, 0.05)  # max_per_image, thresh: the original test_net.py defaults, for all
AUDIT_PASSES = 200  # training images scored to measure the hard negatives FRCN's sampler sees
QUICK = dict(images=10, iters=4, audit_passes=4)  # --quick: a smoke run of the whole pipeline
BASELINE = "frcn"


@dataclass(frozen=True)
class Method:
    """One arm: the plain or the OHEM train net of ``prototxt/small``, with these changes."""

    about: str
    ohem_net: bool = False  # readonly head + OHEMDataLayer (else the plain Fast R-CNN net)
    all_rois: bool = False  # fast_rcnn_ohem.yml's data keys (every RoI, bg in [0, 0.5))
    set_pairs: tuple = ()  # config keys over prototxt/cfgs/small.yml (+ fast_rcnn_ohem.yml)
    policy: tuple = ()  # OHEMDataLayer param_str additions: (("policy", name), (option, value))
    focal: bool = False  # loss_cls -> FocalLossLayer (readonly_ohem.ohem.focal_layer)
    iter_size: int | None = None  # solver override (None: the shipped solver's 2)


NO_NMS = (("TRAIN.OHEM_USE_NMS", False),)
METHODS = {
    "frcn": Method("Fast R-CNN: per image 64 sampled RoIs, <= 25% fg, bg IoU in [0.1, 0.5); "
                   "2 images per step"),
    "frcn-bg0": Method("frcn with bg IoU in [0, 0.5) (bg_lo 0)",
                       set_pairs=(("TRAIN.BG_THRESH_LO", 0.0),)),
    "frcn-n1": Method("frcn with 1 image of 128 RoIs per step (N = 1)",
                      set_pairs=(("TRAIN.BATCH_SIZE", 128),), iter_size=1),
    "ohem": Method("OHEM: readonly head scores every RoI, NMS 0.7, the 64 hardest per image",
                   ohem_net=True, all_rois=True),
    "ohem-nonms": Method("ohem without the NMS", ohem_net=True, all_rois=True, set_pairs=NO_NMS),
    "ratio": Method("MTCNN: the hardest 70% of every RoI (no NMS)", ohem_net=True, all_rois=True,
                    set_pairs=NO_NMS, policy=(("policy", "ratio"), ("keep_ratio", 0.7))),
    "neg-pos": Method("SSD: every fg RoI + the hardest bg, 3 per fg (no NMS)", ohem_net=True,
                      all_rois=True, set_pairs=NO_NMS,
                      policy=(("policy", "neg_pos"), ("neg_pos_ratio", 3.0))),
    "topk-threshold": Method("every RoI with loss >= the 64th largest (ties kept; no NMS)",
                             ohem_net=True, all_rois=True, set_pairs=NO_NMS,
                             policy=(("policy", "topk_threshold"),)),
    "focal": Method("focal loss (alpha 0.25, gamma 2, / #fg) on every RoI, no selection",
                    all_rois=True, focal=True),
}
FOCAL_PARAM_STR = "{'alpha': 0.25, 'gamma': 2.0, 'normalization': 'pos'}"


def say(text: str = "", stream=None) -> None:
    """One line on ``stream`` (stdout), in one write: worker output arrives from threads."""
    stream = stream if stream is not None else sys.stdout
    stream.write(text + "\n")
    stream.flush()


def method_config(name: str, seed: int):
    """small.yml (+ fast_rcnn_ohem.yml when the method takes every RoI), ``RNG_SEED`` = seed, then
    the method's keys."""
    m = METHODS[name]
    files = [demo.SMALL_CFG] + ([demo.OHEM_CFG] if m.all_rois else [])
    return load_config([str(f) for f in files], [["RNG_SEED", str(seed)]]
                       + [[k, repr(v)] for k, v in m.set_pairs])


def write_nets(name: str, dest: Path) -> Path:
    """The method's train net and solver, from the shipped small ones, in ``dest``; returns the
    solver (its ``train_net`` an absolute path)."""
    m = METHODS[name]
    kind = "fast_rcnn_ohem" if m.ohem_net else "fast_rcnn"
    net = read_net(demo.SMALL / kind / "train.prototxt")
    if m.policy:
        mining = next(l for l in net.layer if l.python_param.layer == "OHEMDataLayer")
        opts = parse_param_str(mining) | dict(m.policy)
        mining.python_param.param_str = "{" + ", ".join(f"'{k}': {v!r}" for k, v in opts.items()) + "}"
    if m.focal:
        loss = next(l for l in net.layer if l.name == "loss_cls")
        loss.CopyFrom(focal_in_place_of(loss, FOCAL_PARAM_STR))
    solver = read_solver(demo.SMALL / kind / "solver.prototxt")
    dest.mkdir(parents=True, exist_ok=True)
    solver.train_net = str((dest / "train.prototxt").resolve())
    if m.iter_size is not None:
        solver.iter_size = m.iter_size
    head = f"# readonly-ohem experiment, method {name}: {m.about}\n"
    for file, msg in (("train.prototxt", net), ("solver.prototxt", solver)):
        with atomic_write(dest / file) as f:  # workers may write and read them side by side
            f.write((head + text_format.MessageToString(msg)).encode())
    return dest / "solver.prototxt"


def initial_weights(seed: int, path: Path) -> Path:
    """The plain Fast R-CNN train net's fresh fill with the filler generator seeded by ``seed``
    (as the original's ``caffe.set_random_seed(RNG_SEED)`` before the solver is made), saved once."""
    if not path.is_file():
        seed_rngs(seed)
        solver = demo.SMALL / "fast_rcnn" / "solver.prototxt"
        net = build_net(read_solver(solver), solver, cfg=method_config(BASELINE, seed), seed=seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        net.save_caffemodel(str(tmp))
        os.replace(tmp, path)
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def order_sha256(images: list) -> str:
    """A fingerprint of the passes' images [(path, flipped), ...] (paths relative to their folder)."""
    return hashlib.sha256(json.dumps([[Path(p).name, f] for p, f in images]).encode()).hexdigest()


def dataset(out: Path, num_images: int, stream) -> Path:
    """The fixed mini-VOC under ``out/minivoc``, written once (``design.json`` says which; written
    beside and renamed into place, so runs started side by side into one DIR share it)."""
    data = out / "minivoc"
    want = {"seed": DATASET_SEED, "images": num_images}
    marker = data / "design.json"
    if marker.is_file() and json.loads(marker.read_text()) == want:
        say(f"mini-VOC: reusing {data} ({num_images} images, dataset seed {DATASET_SEED})", stream)
        return data
    t0 = time.perf_counter()
    tmp = out / f"minivoc.tmp{os.getpid()}"
    with contextlib.redirect_stdout(stream):
        make_minivoc(tmp, seed=DATASET_SEED, num_images=num_images)
    (tmp / "design.json").write_text(json.dumps(want) + "\n")
    if data.exists() and not (marker.is_file() and json.loads(marker.read_text()) == want):
        shutil.rmtree(data)  # another design's dataset
    try:
        os.rename(tmp, data)
    except OSError:  # a run beside this one put the same dataset in place first
        shutil.rmtree(tmp)
    say(f"mini-VOC: {num_images} images in {time.perf_counter() - t0:.0f} s", stream)
    return data


# -- the share of hard negatives FRCN's sampler sees ---------------------------------------------
def hard_negative_audit(trainer, ohem_solver: Path, work_dir: Path, data_dir: Path, seed: int,
                        passes: int) -> dict:
    """Score ``passes`` training images with the trained FRCN weights as OHEM would (the OHEM
    train net of ``ohem_solver``, TRAIN phase: dropout on, NMS 0.7, the 64 hardest per image) and
    count, among the background RoIs: ``bg`` all, ``pool`` those FRCN's sampler draws from (IoU
    in [TRAIN.BG_THRESH_LO 0.1, 0.5)), ``hard`` those OHEM keeps, ``hard_in_pool`` both; and
    ``kept``, every RoI OHEM keeps.

    FRCN draws its bg RoIs uniformly from the pool, so ``hard_in_pool / pool`` is the expected
    share of hard negatives among the bg RoIs it trains on.
    """
    weights = work_dir / "audit_weights.caffemodel"
    work_dir.mkdir(parents=True, exist_ok=True)
    trainer.net.save_caffemodel(str(weights))  # as trained: bbox_pred predicts normalized deltas
    cfg = method_config("ohem", seed)
    bg_lo = float(method_config(BASELINE, seed).TRAIN.BG_THRESH_LO)
    net = build_net(read_solver(ohem_solver), ohem_solver, cfg=cfg)
    net.load_caffemodel(str(weights))
    weights.unlink()
    imdb = get_imdb("voc_2007_trainval", data_dir, None, cfg, cache_dir=False)
    roidb, _, _ = training_roidb(imdb, cfg, verbose=False)
    data_layer = find_data_layers(net)[0]
    data_layer.set_roidb(roidb)
    data_layer.planner = demo.SharedOrderPlanner(roidb, cfg, order_seed=seed)
    records = []
    for layer in find_ohem_layers(net):
        layer.recorder = records.append
    counts = dict(bg=0, pool=0, hard=0, hard_in_pool=0, kept=0)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _ in range(passes):
            records.clear()
            net.forward()
            rec, plan = records[-1], data_layer.last_plan
            overlaps = roidb[int(plan["db_inds"][0])]["max_overlaps"][plan["keep"][0]]
            bg = rec.labels.cpu().numpy() == 0
            kept = rec.kept.cpu().numpy()
            pool = bg & (overlaps >= bg_lo)
            for key, mask in (("bg", bg), ("pool", pool), ("hard", bg & kept),
                              ("hard_in_pool", pool & kept), ("kept", kept)):
                counts[key] += int(mask.sum())
    return counts


# -- one run, and the whole table -----------------------------------------------------------------
def finished(out: Path, name: str, seed: int, design: dict) -> dict | None:
    """The record of a finished run of this design in ``out``, or None."""
    path = out / "runs" / name / f"seed_{seed}" / "run.json"
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("design") == design:
            return record
    return None


def run_one(name: str, seed: int, out: Path, data_dir: Path, design: dict, stream) -> dict:
    """Train and test one method with one seed; the record of ``results.json``'s ``runs``."""
    run_dir = out / "runs" / name / f"seed_{seed}"
    record_path = run_dir / "run.json"
    old = finished(out, name, seed, design)
    if old is not None:
        say(f"  reusing the finished run in {run_dir}", stream)
        return old
    cpu0 = time.process_time()
    init = initial_weights(seed, out / "init" / f"seed_{seed}.caffemodel")
    solver = write_nets(name, out / "nets" / name)
    audit = {}

    def after(trainer):
        if name == BASELINE and design["audit_passes"]:
            audit.update(hard_negative_audit(trainer, write_nets("ohem", out / "nets" / "ohem"),
                                             run_dir, data_dir, seed, design["audit_passes"]))

    r = demo.train_arm(solver, method_config(name, seed), data_dir, run_dir / "train",
                       design["iters"], seed, init, stream=stream, after=after)
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stderr(stream):
        test = demo.test_model(r["model"], data_dir, run_dir / "test", seed, (TEST_SETTING,),
                               stream)[TEST_SETTING]
    record = {
        "method": name, "seed": seed, "mAP": test["mAP"],
        "ap": {c: test["per_class"][c] for c in test["classes"]},
        "train_seconds": r["train_seconds"], "fg_fraction": r["fg_fraction"],
        "test_seconds": time.perf_counter() - t0, "iters": r["iters"],
        "sec_per_iter": r["sec_per_iter"], "rois_per_iter": r["rois_per_iter"],
        "cpu_sec_per_iter": r["cpu_sec_per_iter"], "test_cpu_seconds": time.process_time() - c0,
        "cpu_seconds": time.process_time() - cpu0,
        "init": str(init), "init_sha256": file_sha256(init), "image_passes": len(r["images"]),
        "image_order_sha256": order_sha256(r["images"]),
        "image_order_first_sha256": order_sha256(r["images"][:r["iters"]]), "model": str(r["model"]),
        "load_average": os.getloadavg()[0], "torch_threads": torch.get_num_threads(),
        "design": design,
    }
    if audit:
        record["hard_negatives"] = audit
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "images.json").write_text(json.dumps(r["images"]) + "\n")
    with atomic_write(record_path) as f:
        f.write((json.dumps(record, indent=1) + "\n").encode())
    return record


def design_for(quick: bool, iters: int | None) -> dict:
    """What a finished run must match to be reused: the dataset, iterations, test, audit."""
    return {"dataset_seed": DATASET_SEED,
            "images": QUICK["images"] if quick else DATASET_IMAGES,
            "iters": iters or (QUICK["iters"] if quick else ITERS),
            "test": list(TEST_SETTING),
            "audit_passes": QUICK["audit_passes"] if quick else AUDIT_PASSES}


def work(name: str, seed: int, output: str, quick: bool, iters: int | None) -> None:
    """One run in a worker process (``run_jobs``): one torch thread, output on stdout."""
    use_caffe_float32()
    torch.set_num_threads(1)
    out = Path(output)
    design = design_for(quick, iters)
    run_one(name, seed, out, out / "minivoc", design, sys.stdout)


def _relay(lines, prefix: str, stream) -> None:
    for line in lines:
        say(prefix + line.rstrip("\n"), stream)


def run_jobs(tasks: list, out: Path, quick: bool, iters: int | None, jobs: int, stream) -> None:
    """The runs ``tasks`` [(method, seed), ...] on ``jobs`` worker processes at a time (``work``:
    one torch thread each, this package first on their path), each writing its run to ``out``;
    their output line by line on ``stream``, prefixed ``[method seed S]``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2])]
                                        + [x for x in [os.environ.get("PYTHONPATH")] if x])
    pending, running, failed, done = list(tasks), [], [], 0
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < jobs:
            name, seed = pending.pop(0)
            code = (f"from readonly_ohem.commands.experiment import work; "
                    f"work({name!r}, {seed}, {str(out)!r}, {quick}, {iters})")
            proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
            pump = threading.Thread(target=_relay, args=(proc.stdout, f"[{name} seed {seed}] ",
                                                         stream), daemon=True)
            pump.start()
            running.append((name, seed, proc, pump))
        time.sleep(0.2)
        for task in [r for r in running if r[2].poll() is not None]:
            running.remove(task)
            task[3].join()
            done += 1
            if task[2].returncode != 0:
                failed.append(f"{task[0]} seed {task[1]}")
            elapsed = time.perf_counter() - t0
            say(f"[workers] {done}/{len(tasks)} runs done, elapsed {clock(elapsed)}, ETA "
                f"{clock(elapsed / done * (len(tasks) - done))}", stream)
    if failed:
        raise ConfigError(f"--jobs: the run(s) {failed} failed (their output above); the finished "
                          f"runs are kept in {out}/runs")


def run_experiment(methods=None, seeds=None, output="experiment_output", quick: bool = False,
                   iters: int | None = None, jobs: int = 1, stream=None) -> dict:
    """The table (see the module docstring): every method x every seed, seed by seed; with
    ``jobs`` > 1 the runs not yet finished first go to that many single-thread worker processes
    (``run_jobs``), then this process collects them. Returns ``{"runs": [...], "summary":
    {...}}``, also written to ``output/results.json``."""
    stream = stream if stream is not None else sys.stdout
    methods = list(methods or METHODS)
    seeds = list(SEEDS if seeds is None else seeds)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method(s) {unknown} (one of {list(METHODS)})")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must name distinct seeds, got {seeds}")
    if iters is not None and iters < 1:
        raise ConfigError(f"--iters must be >= 1, got {iters}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    methods = list(dict.fromkeys(methods))
    design = design_for(quick, iters)
    num_images = design["images"]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    say(f"experiment: {len(methods)} method(s) {', '.join(methods)} x {len(seeds)} seed(s) "
        f"{', '.join(map(str, seeds))}, {design['iters']} iterations each"
        + (" (--quick)" if quick else "") + f"; output {out}/", stream)
    data_dir = dataset(out, num_images, stream)
    todo = [(m, s) for s in seeds for m in methods if not finished(out, m, s, design)]
    if jobs > 1 and len(todo) > 1:
        for s in dict.fromkeys(s for _, s in todo):  # before the workers, who would race for it
            initial_weights(s, out / "init" / f"seed_{s}.caffemodel")
        say(f"{len(todo)} runs on {jobs} worker processes (1 torch thread each)", stream)
        run_jobs(todo, out, quick, iters, jobs, stream)
        say("\nworkers done; collecting their runs", stream)
    runs, total, k = [], len(methods) * len(seeds), 0
    for seed in seeds:
        for name in methods:
            k += 1
            say(f"\n[run {k}/{total}] {name}, seed {seed}: {METHODS[name].about}", stream)
            rec = run_one(name, seed, out, data_dir, design, stream)
            runs.append(rec)
            elapsed = time.perf_counter() - t_start
            eta = elapsed / k * (total - k)
            say(f"[run {k}/{total}] {name}, seed {seed}: mAP {100 * rec['mAP']:.2f}, fg "
                f"{100 * rec['fg_fraction']:.1f}%, {rec['sec_per_iter']:.3f} s/iter, train "
                f"{rec['train_seconds'] / 60:.1f} min; elapsed {clock(elapsed)}, ETA {clock(eta)}",
                stream)
    summary = summarize(runs, methods, seeds, BASELINE)
    summary["design"] = design | {"methods": {m: METHODS[m].about for m in methods},
                                  "seeds": seeds, "total_seconds": time.perf_counter() - t_start}
    results = {"runs": runs, "summary": summary}
    with atomic_write(out / "results.json") as f:
        f.write((json.dumps(results, indent=1) + "\n").encode())
    write_markdown(results, out / "results.md")
    outputs = [out / "results.json", out / "results.md"]
    try:
        plot_results(results, out / "results.png")
        outputs.append(out / "results.png")
    except ImportError:  # the numbers are written; only the picture needs the plot extra
        say("results.png not drawn: matplotlib is not installed (pip install 'readonly-ohem[plot]')",
            stream)
    say("\n" + (out / "results.md").read_text(), stream)
    say(f"experiment done in {clock(time.perf_counter() - t_start)}: "
        + ", ".join(str(p) for p in outputs), stream)
    return results


def experiment_command(methods=None, seeds=None, output="experiment_output", quick=False,
                       iters=None, jobs=None) -> int:
    """``readonly-ohem experiment [--methods M...] [--seeds S...] [--output DIR] [--quick]
    [--iters N] [--jobs J]``; ``jobs`` None: 2 where there are 2 CPUs or more (two single-thread
    processes beat one of two threads on this small net: 1.35-1.4x from the second thread, 2x
    from the second process), else 1."""
    use_caffe_float32()  # Caffe computes in true float32: no TF32 on GPUs
    if jobs is None:
        jobs = min(2, os.cpu_count() or 1)
    run_experiment(methods, seeds, output, quick=quick, iters=iters, jobs=jobs)
    return 0
