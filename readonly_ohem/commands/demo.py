"""``readonly-ohem demo``: the FRCN-vs-OHEM experiment on the built-in mini-VOC, in minutes on a CPU.

Steps (each prints its progress): write the mini-VOC (``datasets.minivoc``); train the small net
(``prototxt/small``) with plain Fast R-CNN and with OHEM; test both with the SAME detection
settings (``--max-per-image 100 --thresh 0.05``, the original ``test_net.py`` defaults) and, in a
second column, with the settings the original OHEM script used (2000 per image at 1e-5); print a
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

``--detector faster-rcnn``: the same experiment end-to-end (``prototxt/small/faster_rcnn_end2end``
with ``prototxt/cfgs/faster_rcnn_end2end.yml``: the net's RPN makes the RoIs, trained with it).
"Faster" samples 64 of its proposals per image as the original ProposalTargetLayer does (fg up
to 25 %, bg in [0, 0.5)); "Faster+OHEM" (``faster_rcnn_end2end_ohem``, with
``faster_rcnn_end2end_ohem.yml`` and ``TRAIN.OHEM_BATCH_SIZE`` 64) scores every proposal with the
readonly head and trains on the 64 hardest. Same seed, initial weights (RPN included), image
order and images per step; both tested with the net's own proposals (``TEST.HAS_RPN``).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from readonly_ohem import python_layers  # noqa: F401  (registers RoIDataLayer, OHEMDataLayer)
from readonly_ohem.caffe import use_caffe_float32
from readonly_ohem.caffe.net import Net
from readonly_ohem.config import load_config
from readonly_ohem.datasets.minivoc import DEFAULT_IMAGES, make_minivoc
from readonly_ohem.datasets import get_imdb
from readonly_ohem.detection.test import test_net
from readonly_ohem.errors import ConfigError
from readonly_ohem.inspect import summarize_selection
from readonly_ohem.roi_data.layer import MinibatchPlanner
from readonly_ohem.tensorboard import attach_tensorboard, run_dir, write_test_results
from readonly_ohem.train import attach_kept_roi_log, find_data_layers, run_training, setup_training

_PACKAGE = Path(__file__).resolve().parents[1]
# the repository's prototxt/ (editable install, checkout), or a copy packaged inside the package
PROTOTXT = next((d for d in (_PACKAGE.parent / "prototxt", _PACKAGE / "prototxt") if d.is_dir()),
                _PACKAGE.parent / "prototxt")
SMALL = PROTOTXT / "small"
SMALL_CFG = PROTOTXT / "cfgs" / "small.yml"
OHEM_CFG = PROTOTXT / "cfgs" / "fast_rcnn_ohem.yml"
E2E_CFG = PROTOTXT / "cfgs" / "faster_rcnn_end2end.yml"
E2E_OHEM_CFG = PROTOTXT / "cfgs" / "faster_rcnn_end2end_ohem.yml"
METHODS = {  # name -> (solver, extra cfg files after small.yml)
    "FRCN": (SMALL / "fast_rcnn" / "solver.prototxt", []),
    "OHEM": (SMALL / "fast_rcnn_ohem" / "solver.prototxt", [OHEM_CFG]),
    "Faster": (SMALL / "faster_rcnn_end2end" / "solver.prototxt", [E2E_CFG]),
    "Faster+OHEM": (SMALL / "faster_rcnn_end2end_ohem" / "solver.prototxt", [E2E_CFG, E2E_OHEM_CFG]),
}
# --set pairs of a method beyond RNG_SEED: the small net keeps its 64 RoIs per image with OHEM
METHOD_SETS = {"Faster+OHEM": [["TRAIN.OHEM_BATCH_SIZE", "64"]]}
TEST_DEF = SMALL / "fast_rcnn" / "test.prototxt"
# --detector -> (the plain method, the OHEM method, the test net); the plain method's config tests both
DETECTORS = {
    "fast-rcnn": ("FRCN", "OHEM", TEST_DEF),
    "faster-rcnn": ("Faster", "Faster+OHEM", SMALL / "faster_rcnn_end2end" / "test.prototxt"),
}
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
    """Counts the labels reaching ``loss_cls`` (the RoIs the trainable head learns from) and
    notes the images of every pass (``images``: [(image path, flipped), ...] in pass order)."""

    def __init__(self, net, data_layer, layer: str = "loss_cls"):
        self.fg = self.total = 0
        self.images: list[tuple[str, bool]] = []
        self.data_layer = data_layer
        net.layer(layer).register_forward_pre_hook(self._count)
        data_layer.register_forward_hook(self._note_images)

    def _count(self, module, args):
        labels = args[0][1].detach().reshape(-1)
        self.fg += int((labels > 0).sum())
        self.total += int(labels.numel())

    def _note_images(self, module, args, output):
        roidb = self.data_layer.roidb
        self.images += [(str(roidb[i]["image"]), bool(roidb[i]["flipped"]))
                        for i in self.data_layer.last_plan["db_inds"]]

    @property
    def fg_fraction(self) -> float:
        return self.fg / self.total if self.total else float("nan")


class StepTimer:
    """Wraps ``solver.step``: seconds spent in SGD iterations only (no snapshots, no set-up);
    wall time (``seconds``) and this process's CPU time, all threads (``cpu_seconds``: less
    sensitive than wall time to other jobs on the machine)."""

    def __init__(self, solver):
        self.seconds, self.cpu_seconds, self.steps = 0.0, 0.0, 0
        self._step = solver.step
        solver.step = self

    def __call__(self, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        out = self._step(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        self.steps += 1
        return out

    @property
    def sec_per_iter(self) -> float:
        return self.seconds / self.steps if self.steps else float("nan")


def method_config(method: str, seed: int, extra_cfg=()):
    """small.yml (+ fast_rcnn_ohem.yml for OHEM) (+ ``extra_cfg`` files, e.g. +M / +B) with
    ``RNG_SEED`` = seed."""
    _, extra = METHODS[method]
    return load_config([str(SMALL_CFG)] + [str(p) for p in extra] + [str(p) for p in extra_cfg],
                       [["RNG_SEED", str(seed)]] + METHOD_SETS.get(method, []))


def train_method(method: str, data_dir: Path, out_dir: Path, iters: int | None, seed: int,
                 init_weights: Path | None = None, stream=None, kept_roi_log: Path | None = None,
                 log_every: int = 20, tensorboard: Path | None = None, extra_cfg=()) -> dict:
    """Train one arm of the comparison (``METHODS[method]``) on the mini-VOC's trainval set:
    ``train_arm`` with that solver and ``method_config(method, seed, extra_cfg)``."""
    solver_path, _ = METHODS[method]
    return train_arm(solver_path, method_config(method, seed, extra_cfg), data_dir, out_dir, iters,
                     seed, init_weights, stream=stream, kept_roi_log=kept_roi_log,
                     log_every=log_every, tensorboard=tensorboard)


def train_arm(solver_path: Path, cfg, data_dir: Path, out_dir: Path, iters: int | None, seed: int,
              init_weights: Path | None = None, stream=None, kept_roi_log: Path | None = None,
              log_every: int = 20, tensorboard: Path | None = None, after=None) -> dict:
    """Train one net on the mini-VOC's trainval set (the training sequence of ``readonly-ohem
    train``: ``setup_training``, ``run_training``), image order from ``SharedOrderPlanner(seed)``.

    ``init_weights``: None for the first arm (its fresh fill is saved as ``init.caffemodel``
    next to ``out_dir`` and returned), else that file. ``iters``: None = the solver's
    ``max_iter``; otherwise the lr step moves with it (same fraction of the run).
    ``tensorboard``: a run folder for TensorBoard events (``readonly_ohem.tensorboard``).
    ``after(trainer)``: called once training is done (the trained net is ``trainer.net``).
    Returns ``{"model", "init", "iters", "sec_per_iter", "cpu_sec_per_iter", "train_seconds",
    "fg_fraction", "rois_per_iter", "lr", "stepsize", "images"}``.
    """
    stream = stream if stream is not None else sys.stdout
    imdb = get_imdb("voc_2007_trainval", data_dir, None, cfg, cache_dir=False)
    trainer = setup_training(solver_path, cfg, imdb,
                             weights=str(init_weights) if init_weights else None,
                             output=out_dir, verbose=False, stream=stream)
    param = trainer.solver.param
    if iters is None:
        iters = param.max_iter
    elif param.max_iter and param.lr_policy == "step":
        param.stepsize = max(1, round(param.stepsize * iters / param.max_iter))
    if init_weights is None:
        init_weights = out_dir.parent / "init.caffemodel"
        trainer.net.save_caffemodel(str(init_weights))
    data_layers = find_data_layers(trainer.net)
    for layer in data_layers:
        layer.planner = SharedOrderPlanner(layer.roidb, cfg, order_seed=seed)
    if kept_roi_log is not None:
        for p in (kept_roi_log, kept_roi_log.with_name(kept_roi_log.name + ".blobs")):
            p.unlink(missing_ok=True)  # a rerun into the same directory starts a fresh log
        attach_kept_roi_log(trainer.net, str(kept_roi_log), log_every, lambda: trainer.solver.iter)
    if tensorboard is not None:
        attach_tensorboard(trainer, tensorboard, log_every=log_every, classes=imdb.classes)
    counter = RoICounter(trainer.net, data_layers[0])
    timer = StepTimer(trainer.solver)
    t0 = time.perf_counter()
    models = run_training(trainer, iters)
    train_seconds = time.perf_counter() - t0
    if after is not None:
        after(trainer)
    return {"model": Path(models[-1]), "init": Path(init_weights), "iters": iters,
            "sec_per_iter": timer.sec_per_iter, "train_seconds": train_seconds,
            "cpu_sec_per_iter": timer.cpu_seconds / max(timer.steps, 1),
            "fg_fraction": counter.fg_fraction, "rois_per_iter": counter.total / max(iters, 1),
            "lr": param.base_lr, "stepsize": param.stepsize, "images": counter.images}


def present_classes(imdb) -> list[str]:
    """Classes with a non-difficult object in the image set (the mini-VOC has 6 of VOC's 20)."""
    names = {o["name"] for i in range(imdb.num_images) for o in imdb.annotations_at(i)
             if not o["difficult"]}
    return [c for c in imdb.classes if c in names]


def test_model(model: Path, data_dir: Path, out_dir: Path, seed: int, settings=TEST_SETTINGS,
               stream=None, detector: str = "fast-rcnn", extra_cfg=()) -> dict:
    """Test one model on the mini-VOC test set at each ``(max_per_image, thresh)``, with the
    ``detector``'s test net and its plain method's config.

    Returns ``{(max_per_image, thresh): {"mAP" (over the classes present), "mAP_voc20" (over all
    20, absent classes AP 0), "per_class", "images_per_second", "result_dir"}}``.
    """
    stream = stream if stream is not None else sys.stdout
    plain, _, test_def = DETECTORS[detector]
    cfg = method_config(plain, seed, extra_cfg)
    net = Net.from_file(str(test_def), phase="TEST", cfg=cfg)
    net.load_caffemodel(str(model))
    imdb = get_imdb("voc_2007_test", data_dir, None, cfg, cache_dir=False)
    classes = present_classes(imdb)
    out = {}
    for max_per_image, thresh in settings:
        sub = out_dir / f"dets_{max_per_image}_{thresh:g}"
        sub.mkdir(parents=True, exist_ok=True)
        with open(sub / "test_log.txt", "w") as log, contextlib.redirect_stdout(log):
            r = test_net(net, imdb, cfg, max_per_image=max_per_image, thresh=thresh, output_dir=sub)
        per_class = r["eval"]["per_class"]
        m_ap = float(np.mean([per_class[c] for c in classes])) if classes else 0.0
        out[(max_per_image, thresh)] = {
            "mAP": m_ap, "mAP_voc20": r["eval"]["mAP"], "per_class": per_class, "classes": classes,
            "images_per_second": r["images_per_second"], "result_dir": str(sub)}
        say(f"  max_per_image {max_per_image}, thresh {thresh:g}: mAP {m_ap:.4f} ("
            + ", ".join(f"{c} {per_class[c]:.3f}" for c in classes)
            + f"); {r['images_per_second']:.1f} images/s; per-class table and result files in {sub}",
            stream)
    return out


def format_table(results: dict, settings=TEST_SETTINGS) -> str:
    """The comparison table: one row per method, mAP at each detection setting."""
    (mp0, th0), rest = settings[0], settings[1:]
    width = max([6] + [len(name) for name in results])
    head = f"{'method':<{width}} {f'mAP ({mp0}/{th0:g})':>15}"
    head += "".join(f" {f'mAP ({mp}/{th:g})':>17}" for mp, th in rest)
    head += f" {'s/iter':>7} {'fg of trained RoIs':>18} {'RoIs/iter':>9} {'test im/s':>9}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        tests = r["test"]
        row = f"{name:<{width}} {tests[settings[0]]['mAP']:>15.4f}"
        row += "".join(f" {tests[s]['mAP']:>17.4f}" for s in rest)
        row += (f" {r['sec_per_iter']:>7.3f} {100 * r['fg_fraction']:>17.1f}% "
                f"{r['rois_per_iter']:>9.0f} {tests[settings[0]]['images_per_second']:>9.1f}")
        lines.append(row)
    return "\n".join(lines)


def _jsonable(results: dict) -> dict:
    out = {}
    for name, r in results.items():
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()
             if k not in ("test", "images")}
        d["test"] = {f"{mp}/{th:g}": v for (mp, th), v in r["test"].items()}
        out[name] = d
    return out


def run_demo(output="demo_output", iters: int | None = None, seed: int = 0,
             num_images: int = DEFAULT_IMAGES, settings=TEST_SETTINGS, log_every: int = 20,
             tensorboard=None, stream=None, detector: str = "fast-rcnn") -> dict:
    """The whole experiment (see the module docstring) for ``detector`` (``fast-rcnn`` or
    ``faster-rcnn``); returns the results, also written to ``output/results.json`` and
    ``output/results.txt``. ``tensorboard``: a folder for TensorBoard events, one run per method
    (``tensorboard/frcn_seed0``, ``tensorboard/ohem_seed0``)."""
    stream = stream if stream is not None else sys.stdout
    if detector not in DETECTORS:
        raise ConfigError(f"--detector {detector!r}: one of {', '.join(DETECTORS)}")
    *methods, test_def = DETECTORS[detector]
    needed = [SMALL_CFG, test_def] + [p for m in methods for p in [METHODS[m][0], *METHODS[m][1]]]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise ConfigError(f"the demo needs the shipped nets and configs; not found: {', '.join(missing)} "
                          "(install from a checkout: pip install -e .)")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = out / "minivoc"
    say(f"[1/5] mini-VOC ({num_images} images, seed {seed}) -> {data}", stream)
    with contextlib.redirect_stdout(stream):
        make_minivoc(data, seed=seed, num_images=num_images)

    results, init = {}, None
    for k, method in enumerate(methods):
        say(f"\n[{2 + k}/5] training {method} (prototxt/small, "
            f"{'solver max_iter' if iters is None else iters} iterations, seed {seed})", stream)
        log = out / "kept_rois.jsonl" if method == methods[1] else None
        board = run_dir(tensorboard, method_dir(method), seed) if tensorboard else None
        r = train_method(method, data, out / method_dir(method), iters, seed, init, stream=stream,
                         kept_roi_log=log, log_every=log_every, tensorboard=board)
        init = r["init"]
        say(f"{method}: {r['iters']} iterations, {r['sec_per_iter']:.3f} s/iter, "
            f"fg {100 * r['fg_fraction']:.1f}% of the {r['rois_per_iter']:.0f} RoIs/iter the heads "
            f"trained on; model {r['model']}", stream)
        say(f"testing {method} on voc_2007_test at "
            + ", ".join(f"max_per_image {mp} thresh {th:g}" for mp, th in settings), stream)
        r["test"] = test_model(r["model"], data, out / method_dir(method), seed, settings, stream,
                               detector)
        if board is not None:  # mAP over the classes present, and their AP, per test setting
            for k, ((mp, th), t) in enumerate(r["test"].items()):
                write_test_results(board, {"mAP": t["mAP"], "per_class": {
                    c: t["per_class"][c] for c in t["classes"]}}, step=r["iters"],
                    prefix="test" if k == 0 else f"test_{mp}_{th:g}")
        results[method] = r

    n_classes = len(next(iter(results.values()))["test"][settings[0]]["classes"])
    say(f"\n[4/5] {methods[0]} vs {methods[1]} on the mini-VOC test set (VOC07 11-point AP, "
        f"mean over the {n_classes} classes present):", stream)
    table = format_table(results, settings)
    say(table, stream)
    mp0, th0 = settings[0]
    notes = [f"Both models tested with the same settings ({mp0} detections per image, score > "
             f"{th0:g}); the second mAP column uses what the original OHEM script used "
             "(2000, 1e-5; the original FRCN baseline used 100, 0.05)."
             if len(settings) > 1 else f"Both models tested with {mp0} per image, score > {th0:g}.",
             "Same seed, initial weights (init.caffemodel), images per SGD step (2: 1 per pass × "
             "iter_size 2) and image order for both; s/iter is wall time of the SGD steps on "
             f"this machine ({torch.get_num_threads()} torch threads)."]
    orders = [r["images"] for r in results.values()]
    same_images = all(o == orders[0] for o in orders[1:])
    notes.append("Images per SGD step identical in both runs (checked, pass by pass): "
                 f"{'yes' if same_images else 'NO'} ({len(orders[0])} image passes).")
    for n in notes:
        say(n, stream)

    say("\n[5/5] which RoIs OHEM kept (readonly_ohem.inspect)", stream)
    picture = out / "kept_rois.png"
    stats = summarize_selection(out / "kept_rois.jsonl", stream=stream, picture=picture)
    say(f"wrote {picture} (the last logged iteration's first image)", stream)

    elapsed = time.perf_counter() - t_start
    summary = {"seed": seed, "detector": detector, "num_images": num_images,
               "total_seconds": elapsed,
               "same_images_per_step": same_images,
               "settings": [list(s) for s in settings], "methods": _jsonable(results),
               "table": table, "picture": str(picture)}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.txt").write_text(table + "\n\n" + "\n".join(notes) + "\n")
    say(f"\ndemo done in {elapsed / 60:.1f} min; table in {out / 'results.txt'}, "
        f"everything in {out}/", stream)
    return {"results": results, "table": table, "stats": stats, "seconds": elapsed,
            "same_images_per_step": same_images,
            "picture": picture, "output": out}


def method_dir(method: str) -> str:
    """The output subdirectory of a method: ``frcn``, ``ohem``, ``faster``, ``faster_ohem``."""
    return method.lower().replace("+", "_")


def demo_command(output="demo_output", iters=None, seed=0, tensorboard=None,
                 detector="fast-rcnn") -> int:
    """``readonly-ohem demo [--output DIR] [--iters N] [--seed S] [--tensorboard DIR]
    [--detector fast-rcnn|faster-rcnn]``."""
    use_caffe_float32()  # Caffe computes in true float32: no TF32 on GPUs
    if iters is not None and iters < 1:
        raise ConfigError(f"--iters must be >= 1, got {iters}")
    run_demo(output, iters=iters, seed=seed, tensorboard=tensorboard, detector=detector)
    return 0
