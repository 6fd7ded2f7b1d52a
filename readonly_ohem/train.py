"""Training: the original ``fast_rcnn/train.py`` (``SolverWrapper``) and the steps of ``train_net.py``.

The sequence (``readonly-ohem train``, ``readonly_ohem.commands.train``; the demo runs the same):
``setup_training`` — seeds (``RNG_SEED`` for numpy, torch and Python), the training roidb with
the bbox-target means/stds (``readonly_ohem.roi_data.roidb.training_roidb``), the solver's train
net, the initial weights (a ``.caffemodel`` matched by layer name, or a torchvision VGG16 state
dict, see ``readonly_ohem.pretrained``), the roidb handed to the data layer; then
``run_training`` — ``Solver.step`` until the iteration asked for (``Trainer.train``).

Snapshots (every ``TRAIN.SNAPSHOT_ITERS`` and at the end), in the output directory:

- ``{snapshot_prefix}[_{SNAPSHOT_INFIX}]_iter_{n}.caffemodel``: the net, with ``bbox_pred``
  un-normalized when ``TRAIN.BBOX_REG`` and ``TRAIN.BBOX_NORMALIZE_TARGETS``
  (W ← W·std, b ← b·std + mean, class-major 4-vectors), restored afterwards, as the original
  (``unnormalized_bbox_pred``; ``normalize_bbox_pred`` goes back, as ``inspect --def`` does);
- ``…_iter_{n}.state.safetensors``: everything ``--resume`` needs (weights as trained, solver
  history, iteration, torch/numpy/python RNG states, the data layer's order and cursor, the RPN
  layers' sampling generators, the config; per process under torchrun), as tensors and JSON:
  format in ``readonly_ohem.train_state``, nothing in it can run code (the pickle ``.state.pt`` of earlier versions is refused). Both files
  are written atomically (a temp file, then ``os.replace``), so a killed write leaves the previous
  snapshot intact, with the mode a plain ``open`` would give.

``--resume STATE`` continues so that the run equals one never interrupted; ``--resume auto``
continues from the newest loadable state of this solver in the output directory (a newer one that
does not load, e.g. truncated, is skipped with a warning naming it; none at all: a fresh start).
SIGINT/SIGTERM end the current iteration, write a snapshot and stop. A NaN/inf loss stops before
the update with a message naming the iteration and the loss blob and layer; the last good snapshot
stays.

Data-parallel under ``torchrun``: see ``readonly_ohem.distributed`` (each process its own shard of
the images; effective batch = processes × iter_size × IMS_PER_BATCH images).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import random
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from readonly_ohem import distributed, pretrained
from readonly_ohem import inspect  # the kept-RoI log (readonly_ohem.inspect, not the stdlib's)
from readonly_ohem import python_layers  # noqa: F401  (registers RoIDataLayer, OHEMDataLayer)
from readonly_ohem import train_state
from readonly_ohem.caffe import use_caffe_float32
from readonly_ohem.caffe.layers.python import parse_param_str
from readonly_ohem.caffe.solver import NonFiniteLossError, Solver, build_net, train_net_spec
from readonly_ohem.caffe.spec import load_net_spec, read_solver
from readonly_ohem.errors import ConfigError, OhemError, SpecError
from readonly_ohem.ohem.readonly import apply_readonly_dtype
from readonly_ohem.progress import Progress, clock
from readonly_ohem.roi_data.roidb import training_roidb
from readonly_ohem.rpn.sampling import layer_rng, rng_state


# -- small helpers ---------------------------------------------------------------------------------
def seed_rngs(seed: int) -> None:
    """``train_net.py``'s ``np.random.seed(cfg.RNG_SEED); caffe.set_random_seed(cfg.RNG_SEED)``
    (torch's generator stands for Caffe's), and Python's ``random`` too."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    random.seed(seed)


def find_data_layers(net) -> list:
    """Layers that take a roidb (``RoIDataLayer``): the modules with ``set_roidb``."""
    return [rec.module for rec in net.layers if hasattr(rec.module, "set_roidb")]


def find_sampling_layers(net) -> dict:
    """Layers with a random generator of their own (the RPN layers' subsampling): name -> module
    (those with ``random_state`` / ``load_random_state``)."""
    return {rec.name: rec.module for rec in net.layers if hasattr(rec.module, "load_random_state")}


def find_ohem_layers(net) -> list:
    """Layers that hand their selection to a ``recorder`` (``OHEMDataLayer``)."""
    return [rec.module for rec in net.layers if hasattr(rec.module, "recorder")]


# -- bbox_pred and the normalized bbox targets ----------------------------------------------------
def bbox_targets_normalized(cfg) -> bool:
    """Whether training regresses normalized targets (``TRAIN.BBOX_REG`` and
    ``TRAIN.BBOX_NORMALIZE_TARGETS``), so that the trained ``bbox_pred`` predicts normalized deltas."""
    return bool(cfg.TRAIN.BBOX_REG and cfg.TRAIN.BBOX_NORMALIZE_TARGETS)


def find_bbox_pred(net, names=("bbox_pred",)) -> str | None:
    """The first of ``names`` that is a layer of ``net``, if it has a weight and a bias, else None."""
    layers = {rec.name for rec in net.layers}
    name = next((n for n in names if n in layers), None)
    if name is None or len(net.layer_params(name)) != 2:
        return None
    return name


def _bbox_pred_params(net, layer: str, means, stds):
    """(W (4K, D), b (4K,), means (4K,), stds (4K,)) in W's dtype and device; ``ConfigError``
    when the stds do not fit W's rows."""
    w, b = net.layer_params(layer)
    stds = torch.as_tensor(np.asarray(stds), dtype=w.dtype, device=w.device)
    means = torch.as_tensor(np.asarray(means), dtype=b.dtype, device=b.device)
    if stds.numel() != w.shape[0]:
        raise ConfigError(f"{layer} has {w.shape[0]} outputs, the target stds "
                          f"{stds.numel()} (num_classes × 4 must match the dataset)")
    return w, b, means, stds


@torch.no_grad()
def unnormalize_bbox_pred(net, means, stds, layer: str = "bbox_pred") -> None:
    """In place: W ← W·std, b ← b·std + mean, so the layer predicts raw deltas (what a test net
    and a ``.caffemodel`` snapshot hold). means/stds: (4K,) class-major 4-vectors."""
    w, b, means, stds = _bbox_pred_params(net, layer, means, stds)
    w.mul_(stds.view(-1, *([1] * (w.ndim - 1))))
    b.mul_(stds).add_(means)


@torch.no_grad()
def normalize_bbox_pred(net, means, stds, layer: str = "bbox_pred") -> None:
    """In place, the inverse of ``unnormalize_bbox_pred``: b ← (b - mean) / std, W ← W / std
    (a snapshot back at the scale it was trained at)."""
    w, b, means, stds = _bbox_pred_params(net, layer, means, stds)
    b.sub_(means).div_(stds)
    w.div_(stds.view(-1, *([1] * (w.ndim - 1))))


@contextlib.contextmanager
def unnormalized_bbox_pred(net, means, stds, layer: str = "bbox_pred"):
    """``unnormalize_bbox_pred`` for the ``with`` block; the trained values are copied back after
    (not re-normalized, so they stay bit-exact)."""
    w, b = net.layer_params(layer)
    orig_w, orig_b = w.detach().clone(), b.detach().clone()
    unnormalize_bbox_pred(net, means, stds, layer)
    try:
        yield
    finally:
        with torch.no_grad():
            w.copy_(orig_w)
            b.copy_(orig_b)


# -- snapshot names and the state file -----------------------------------------------------------
def snapshot_stem(output_dir, solver_param, cfg) -> Path:
    """``output_dir/{snapshot_prefix}[_{SNAPSHOT_INFIX}]``: a snapshot is ``{stem}_iter_{n}.…``."""
    infix = cfg.TRAIN.SNAPSHOT_INFIX
    infix = f"_{infix}" if infix else ""
    return Path(output_dir) / f"{solver_param.snapshot_prefix}{infix}"


def config_json(cfg) -> dict:
    """The config tree as JSON values (tuples and arrays become lists)."""
    return json.loads(json.dumps(cfg, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)))


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _warn_config_changes(path: Path, saved, cfg) -> None:
    """Warn, naming the keys, when resuming under a config other than the one the state was
    written with: the run then need not equal an uninterrupted one."""
    if not isinstance(saved, dict):
        return
    a, b = _flat(saved), _flat(config_json(cfg))
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if changed:
        warnings.warn(f"{path}: resuming with a config that differs from the run's in "
                      f"{', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}", stacklevel=3)


def _with_hint(read, path: Path):
    """``read(path)``; its ``ConfigError`` gets ``"; the newest loadable state beside it is …"``
    when there is one."""
    try:
        return read(path)
    except ConfigError as e:
        stem = train_state.state_stem(path)
        good = train_state.newest_loadable(stem, exclude=path)[0] if stem is not None else None
        hint = f"; the newest loadable state beside it is {good} (or use --resume auto)" if good else ""
        raise ConfigError(f"{e}{hint}") from None


def resolve_resume(resume, stem: Path) -> Path | None:
    """``--resume``: a path, checked (``train_state.check_state``: a ``ConfigError`` naming it, and
    the newest loadable state beside it, before any slow work); ``auto``: the newest
    ``{stem}_iter_{n}.state.safetensors`` that passes that check, each newer one that does not
    skipped with a warning naming it and why; no state at all: None (a fresh start).
    ``ConfigError`` when states exist but none loads, or only pickle ``.state.pt`` ones (refused)."""
    if resume is None:
        return None
    if str(resume) != "auto":
        _with_hint(train_state.check_state, Path(resume))
        return Path(resume)
    good, skipped = train_state.newest_loadable(stem)
    for bad, why in skipped:
        warnings.warn(f"--resume auto: skipped {bad} ({why})"
                      + (f"; resuming from {good}" if good else ""), stacklevel=2)
    if good is not None:
        return good
    if skipped:
        raise ConfigError(f"--resume auto: no training state under {stem}_iter_* loads (the newest, "
                          f"{skipped[0][0]}: {skipped[0][1]})")
    legacy = train_state.snapshot_states(stem, legacy=True)
    if legacy:
        raise ConfigError(f"--resume auto: {stem.parent} holds only pickle states of an earlier "
                          f"version (e.g. {legacy[0].name}), refused since loading a pickle can "
                          f"run code; start without --resume")
    return None


class TrainProgress(Progress):
    """``iter 120/40000  loss 0.8123  lr 0.001  0.412 s/iter  ETA 4:33:10`` (loss smoothed)."""

    def __init__(self, total: int, start: int = 0, stream=None):
        super().__init__(total, desc="train", unit="it", stream=stream)
        self.n = start
        self._start_n = start
        self.loss = float("nan")
        self.lr = float("nan")

    def line(self) -> str:
        done = self.n - self._start_n
        elapsed = time.perf_counter() - self.start
        spi = elapsed / done if done > 0 else float("nan")
        left = self.total - self.n
        eta = clock(spi * left) if done > 0 and left > 0 else ("--:--" if left else clock(elapsed))
        tail = "ETA" if left else "done in"
        return (f"iter {self.n}/{self.total}  loss {self.loss:.4f}  lr {self.lr:g}  "
                f"{spi:.3f} s/iter  {tail} {eta}")


# -- the trainer (the original SolverWrapper) ---------------------------------------------------
class Trainer:
    """Runs a ``Solver`` with the original's snapshots, plus resume, signals and NaN stop.

    ``bbox_means``/``bbox_stds``: (4K,) the target normalization (None: no un-normalization);
    ``feed_fn(iteration, pass_index) -> dict | None``: feeds for nets without a data layer (tests);
    ``ctx``: a ``distributed.DistContext`` under torchrun (rank 0 prints and writes snapshots).
    """

    def __init__(self, solver: Solver, cfg, output_dir: str | Path, bbox_means=None, bbox_stds=None,
                 feed_fn: Callable[[int, int], dict | None] | None = None, ctx=None, stream=None):
        use_caffe_float32()  # Caffe computes in true float32: no TF32 on GPUs
        self.solver = solver
        self.net = solver.net
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.bbox_means = None if bbox_means is None else np.asarray(bbox_means, np.float64).ravel()
        self.bbox_stds = None if bbox_stds is None else np.asarray(bbox_stds, np.float64).ravel()
        self.feed_fn = feed_fn
        self.ctx = ctx
        self.stream = stream if stream is not None else sys.stdout
        self.snapshots: list[Path] = []
        self._stop_signal: int | None = None
        self._progress: Progress | None = None
        # after each SGD step: hook.after_step(trainer, iteration, out, seconds); run_training
        # calls hook.close() at the end (readonly_ohem.tensorboard.TrainingBoard is one)
        self.hooks: list = []

    @property
    def is_main(self) -> bool:
        return self.ctx is None or self.ctx.is_main

    def log(self, text: str) -> None:
        if not self.is_main:
            return
        if self._progress is not None:  # clears a terminal's in-place line first, redraws after
            self._progress.write(text)
        else:
            print(text, file=self.stream, flush=True)

    # snapshots ----------------------------------------------------------------------------------
    def snapshot_base(self, iteration: int) -> Path:
        return Path(f"{snapshot_stem(self.output_dir, self.solver.param, self.cfg)}_iter_{iteration}")

    def _scale_bbox_params(self) -> bool:
        return (bbox_targets_normalized(self.cfg) and self.bbox_stds is not None
                and find_bbox_pred(self.net) is not None)

    @torch.no_grad()
    def save_caffemodel(self, path: Path) -> None:
        """The net as a .caffemodel; bbox_pred un-normalized for the saved copy only."""
        if not self._scale_bbox_params():
            self.net.save_caffemodel(str(path))
            return
        with unnormalized_bbox_pred(self.net, self.bbox_means, self.bbox_stds):
            self.net.save_caffemodel(str(path))

    def state(self) -> dict:
        """This process's resumable state (weights as trained, not un-normalized): tensors and
        JSON values only (``readonly_ohem.train_state``)."""
        data_states = [layer.data_order_state() for layer in find_data_layers(self.net)
                       if hasattr(layer, "data_order_state")]
        solver = self.solver.state_dict()
        solver["losses"] = [float(x) for x in solver["losses"]]
        solver["blob_losses"] = {n: [float(x) for x in v] for n, v in solver["blob_losses"].items()}
        return {
            "iter": self.solver.iter,
            "weights": {q.key: q.tensor.detach().cpu().clone() for q in self.net.learnable_params()},
            "solver": solver,
            "rng": train_state.rng_state(),
            "data": data_states,
            "layer_rng": {n: m.random_state() for n, m in find_sampling_layers(self.net).items()},
            "config": config_json(self.cfg),
        }

    def snapshot(self) -> Path:
        """Write the .caffemodel and the state file for the current iteration; return the model."""
        base = self.snapshot_base(self.solver.iter)
        own = self.state()
        if self.ctx is not None:  # every process's RNG and data cursor, in one file
            gathered = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(gathered, {"rng": own["rng"], "data": own["data"],
                                                           "layer_rng": own["layer_rng"]})
            own["ranks"] = gathered
        model = base.with_name(base.name + ".caffemodel")
        if self.is_main:
            base.parent.mkdir(parents=True, exist_ok=True)
            self.save_caffemodel(model)
            train_state.save_state(base.with_name(base.name + train_state.SUFFIX), own)
            self.log(f"Wrote snapshot to: {model}")
        distributed.barrier(self.ctx)
        self.snapshots.append(model)
        return model

    def load_state(self, path: str | Path) -> None:
        """Continue from a ``.state.safetensors`` written by ``snapshot``. Anything else, a missing
        key or a tensor that does not fit the net is a ``ConfigError`` naming the file and key."""
        path = Path(path)
        state = _with_hint(train_state.read_state, path)
        need = functools.partial(train_state.require, state, path=path)
        weights = need("weights", kind=dict)
        params = {q.key: q.tensor for q in self.net.learnable_params()}
        missing = sorted(set(params) ^ set(weights))
        if missing:
            raise ConfigError(f"{path}: the state's weights do not match the net "
                              f"(params on one side only: {missing[:6]})")
        for k, t in params.items():
            src = weights[k]
            if not isinstance(src, torch.Tensor):
                raise ConfigError(f"{path}: key 'weights.{k}' of the training state is not a tensor")
            if tuple(src.shape) != tuple(t.shape):
                raise ConfigError(f"{path}: key 'weights.{k}' has shape {tuple(src.shape)} in the "
                                  f"state, param {k!r} has {tuple(t.shape)} in the net")
        solver = {k: need(f"solver.{k}", kind=kind) for k, kind in
                  (("iter", int), ("current_step", int), ("history", dict), ("losses", list),
                   ("blob_losses", dict))}
        for k, h in solver["history"].items():
            if not isinstance(h, torch.Tensor):
                raise ConfigError(f"{path}: key 'solver.history.{k}' of the training state is not "
                                  "a tensor")
        own = state
        if self.ctx is not None:
            ranks = state.get("ranks")
            if not isinstance(ranks, list) or len(ranks) != self.ctx.world_size:
                n = len(ranks) if isinstance(ranks, list) else 1
                raise ConfigError(f"{path}: written by {n} process(es), resumed with "
                                  f"{self.ctx.world_size}")
            own = ranks[self.ctx.rank]
            where = f"ranks.{self.ctx.rank}."
        else:
            where = ""
        data = train_state.require(own, "data", path, list, prefix=where.rstrip("."))
        rng = train_state.require(own, "rng", path, dict, prefix=where.rstrip("."))
        layers = [layer for layer in find_data_layers(self.net) if hasattr(layer, "load_data_order_state")]
        if len(data) < len(layers):
            raise ConfigError(f"{path}: key '{where}data' holds {len(data)} data layer state(s), "
                              f"the net has {len(layers)} data layer(s)")
        samplers = find_sampling_layers(self.net)
        layer_states = train_state.require(own, "layer_rng", path, dict, prefix=where.rstrip(".")) \
            if samplers else {}
        missing_rng = sorted(set(samplers) - set(layer_states))
        if missing_rng:
            raise ConfigError(f"{path}: key '{where}layer_rng' has no random state for layer(s) "
                              f"{missing_rng} of the net")
        _warn_config_changes(path, state.get("config"), self.cfg)

        # the file holds all it should: now into the trainer (what is left to fail names its key)
        with torch.no_grad():
            for k, t in params.items():
                t.copy_(weights[k].to(device=t.device, dtype=t.dtype))
        try:
            self.solver.load_state_dict(solver)
        except OhemError as e:
            raise ConfigError(f"{path}: {e}") from None
        for i, (layer, s) in enumerate(zip(layers, data)):
            try:
                layer.load_data_order_state(s)
            except (OhemError, KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"{path}: key '{where}data.{i}' is not a data layer state "
                                  f"({e!r})") from None
        for name, layer in samplers.items():
            try:
                layer.load_random_state(layer_states[name])
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"{path}: key '{where}layer_rng.{name}' is not a random state "
                                  f"({e!r})") from None
        train_state.set_rng_state(rng, path, key=f"{where}rng")

    # the loop -----------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        def handler(signum, frame):
            self._stop_signal = signum

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return old

    def _should_stop(self) -> bool:
        flag = self._stop_signal is not None
        if self.ctx is not None:
            reducer = self.solver.reducer
            flag = not reducer.all_true(not flag)
        return flag

    def train(self, max_iters: int) -> list[Path]:
        """``train_model``: step to ``max_iters``, snapshots at ``SNAPSHOT_ITERS`` and at the end.

        Returns the .caffemodel paths written. Raises ``NonFiniteLossError`` (an ``OhemError``)
        on a NaN/inf loss, after which the weights are those of the last good iteration.
        """
        solver, param = self.solver, self.solver.param
        display = param.display
        snapshot_iters = self.cfg.TRAIN.SNAPSHOT_ITERS
        last_snapshot_iter = -1
        progress = TrainProgress(max_iters, start=solver.iter,
                                 stream=self.stream if self.is_main else io.StringIO())
        self._progress = progress if self.is_main else None
        old_handlers = self._install_signal_handlers()
        timer_total, timer_n = 0.0, 0
        try:
            while solver.iter < max_iters:
                t0 = time.perf_counter()
                it = solver.iter
                feed = (lambda i: self.feed_fn(it, i)) if self.feed_fn is not None else None
                try:
                    out = solver.step(feed)
                except NonFiniteLossError as e:
                    progress.close()
                    last = self.snapshots[-1] if self.snapshots else None
                    keep = f"; the last good snapshot is {last}" if last else "; no snapshot written"
                    raise NonFiniteLossError(f"{e}{keep}") from None
                seconds = time.perf_counter() - t0
                timer_total += seconds
                timer_n += 1
                for hook in self.hooks:
                    hook.after_step(self, it, out, seconds)
                progress.loss, progress.lr = solver.smoothed_loss(), out["lr"]
                if display and it % display == 0:
                    parts = ", ".join(f"{n} = {v:.4f}" for n, v in solver.smoothed_losses().items())
                    self.log(f"Iteration {it}, loss = {solver.smoothed_loss():.4f} ({parts}), "
                             f"lr = {out['lr']:g}")
                if display and solver.iter % (10 * display) == 0:
                    self.log(f"speed: {timer_total / timer_n:.3f}s / iter")
                progress.update()
                if solver.iter % snapshot_iters == 0:
                    last_snapshot_iter = solver.iter
                    self.snapshot()
                if self._should_stop():
                    progress.close()
                    if last_snapshot_iter != solver.iter:
                        last_snapshot_iter = solver.iter
                        self.snapshot()
                    name = signal.Signals(self._stop_signal or signal.SIGTERM).name
                    self.log(f"{name}: stopped at iteration {solver.iter}; resume with "
                             f"--resume {self.snapshot_base(solver.iter)}{train_state.SUFFIX} "
                             "(or --resume auto)")
                    return self.snapshots
            progress.close()
            if last_snapshot_iter != solver.iter:
                self.snapshot()
            return self.snapshots
        finally:
            self._progress = None
            for sig, h in old_handlers.items():
                signal.signal(sig, h)

    @property
    def interrupted(self) -> int | None:
        """The signal that stopped training, if any."""
        return self._stop_signal


# -- building everything (train_net.py) -----------------------------------------------------------
def load_initial_weights(net, weights: str | Path, cfg, stream=None) -> None:
    """``.caffemodel`` via ``net.load_caffemodel``; a torch file as a torchvision VGG16."""
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"--weights {path}: file not found")
    if pretrained.is_torch_file(path):
        report = pretrained.load_torchvision_vgg16(net, path, cfg.PIXEL_MEANS)
        text = (f"{path}: loaded torchvision VGG16 layers {', '.join(report['loaded'])}; "
                f"not in the file: {', '.join(report['missing_in_file']) or '-'}")
    else:
        text = str(net.load_caffemodel(str(path)))
    if stream is not None:
        print(text, file=stream, flush=True)


def attach_kept_roi_log(net, path: str, every: int, iteration: Callable[[], int],
                        classes=None) -> None:
    """``--log-kept-rois FILE --log-every K``: set each OHEM layer's ``recorder`` to
    ``readonly_ohem.inspect.make_recorder(path, every=, iteration=, data_layer=, classes=)``."""
    layers = find_ohem_layers(net)
    if not layers:
        raise ConfigError(f"--log-kept-rois {path}: the train net has no OHEM layer "
                          "(OHEMDataLayer) whose selections could be logged")
    data_layers = find_data_layers(net)
    recorder = inspect.make_recorder(path, every=every, iteration=iteration,
                             data_layer=data_layers[0] if data_layers else None, classes=classes)
    for layer in layers:
        layer.recorder = recorder


def _check_writable(path, option: str) -> None:
    """Fail before training, not at the first logged iteration, when ``path`` cannot be appended to."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot write ({e.strerror or e})") from None


def build_trainer(solver_path, cfg, roidb=None, bbox_means=None, bbox_stds=None, weights=None,
                  output="output", device="cpu", ctx=None, feed_fn=None, stream=None) -> Trainer:
    """Net + solver + initial weights + roidb, as ``SolverWrapper.__init__``. The fillers draw
    from a generator seeded with ``RNG_SEED``, as ``train_net.py``'s ``caffe.set_random_seed``
    seeds Caffe's before the solver builds the net."""
    stream = stream if stream is not None else sys.stdout
    sp = read_solver(str(solver_path))
    net = build_net(sp, solver_path, cfg=cfg, seed=int(cfg.RNG_SEED))
    apply_readonly_dtype(net, cfg)  # TRAIN.OHEM_READONLY_DTYPE (float32: nothing)
    if weights:
        load_initial_weights(net, weights, cfg, stream if ctx is None or ctx.is_main else None)
    net.to(device)
    reducer = None
    if ctx is not None:
        distributed.broadcast_params([q.tensor for q in net.learnable_params()])
        reducer = distributed.GradReducer()
    solver = Solver(sp, net, source=solver_path, reducer=reducer,
                    seed_offset=0 if ctx is None else ctx.rank)
    if roidb is not None:
        layers = find_data_layers(net)
        if not layers:
            raise ConfigError(f"{solver_path}: the train net has no RoIDataLayer to take the roidb")
        for layer in layers:
            layer.set_roidb(roidb)
    return Trainer(solver, cfg, output, bbox_means, bbox_stds, feed_fn=feed_fn, ctx=ctx,
                   stream=stream)


def check_num_classes(solver_path, imdb) -> None:
    """Before the roidb is built (minutes on COCO): every Python layer of the solver's train net
    whose ``param_str`` gives ``num_classes`` (RoIDataLayer, OHEMDataLayer, ProposalTargetLayer)
    must give the dataset's class count, ``__background__`` included. ``ConfigError`` naming the
    net, the layer and the dataset otherwise (the original fails later: at the first snapshot, or
    at the first label beyond the net's outputs)."""
    spec, source = train_net_spec(read_solver(str(solver_path)), solver_path)
    for layer in load_net_spec(spec, "TRAIN", source=source).layer:
        if layer.type != "Python":
            continue
        try:
            n = parse_param_str(layer).get("num_classes")
        except SpecError:  # not a YAML mapping: the layer's own parsing decides when it is built
            continue
        if isinstance(n, int) and n != imdb.num_classes:
            k = imdb.num_classes
            raise ConfigError(f"{source}: layer {layer.name!r} ({layer.python_param.layer}) is "
                              f"made for {n} classes (param_str num_classes), the dataset "
                              f"{imdb.name} has {k} ({k - 1} categories + __background__); use a "
                              f"net made for {k} classes (scripts/make_prototxt.py --model MODEL "
                              f"--num-classes {k} --out DIR writes one)")


def make_output_dir(output) -> Path:
    """``--output DIR``, created (with parents); ``ConfigError`` when it cannot be."""
    out_dir = Path(output)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output {out_dir}: cannot create the output directory "
                          f"({e.strerror or e})") from None
    return out_dir


def setup_training(solver, cfg, imdb, weights=None, output="output", device="cpu", ctx=None,
                   resume=None, log_kept_rois=None, log_every: int = 1, verbose: bool = True,
                   stream=None) -> Trainer:
    """``train_net.py`` up to ``train_model``, in the original's order (after finding and checking
    the ``resume`` state, a path or ``"auto"``: ``resolve_resume``, and the net's class count
    against the dataset's: ``check_num_classes``): seeds (``RNG_SEED``); the training roidb of
    ``imdb`` with the bbox-target means/stds (this process's shard under torchrun); the output
    directory; the trainer (``build_trainer``: net, solver, ``weights`` unless resuming, the
    roidb); per-process seeds under torchrun; the state of ``resume``; the kept-RoI log
    (``attach_kept_roi_log``, ``imdb.classes`` named in it).

    ``verbose``: print the roidb statistics (filtered entries, target means/stds).
    """
    asked = resume  # found (or checked) first: a bad state fails before the roidb is built
    resume = resolve_resume(resume, snapshot_stem(output, read_solver(str(solver)), cfg))
    check_num_classes(solver, imdb)
    seed_rngs(cfg.RNG_SEED)
    roidb, means, stds = training_roidb(imdb, cfg, verbose=verbose)
    roidb = distributed.shard(roidb, ctx)
    out_dir = make_output_dir(output)
    if log_kept_rois:
        _check_writable(log_kept_rois, "--log-kept-rois")
    trainer = build_trainer(solver, cfg, roidb, means, stds, None if resume else weights,
                            out_dir, device, ctx, stream=stream)
    if ctx is not None:  # dropout etc. differ per replica; the weights were broadcast
        torch.manual_seed(cfg.RNG_SEED + ctx.rank)
        np.random.seed(cfg.RNG_SEED + ctx.rank)
        for name, layer in find_sampling_layers(trainer.net).items():  # the RPN layers' draws too
            layer.load_random_state(rng_state(layer_rng(cfg.RNG_SEED + ctx.rank, name)))
    if resume:
        trainer.load_state(resume)
        trainer.log(f"Resumed from {resume} at iteration {trainer.solver.iter}")
    elif asked:
        trainer.log(f"--resume auto: no training state in {out_dir}; starting from iteration 0")
    if log_kept_rois:
        attach_kept_roi_log(trainer.net, log_kept_rois, log_every, lambda: trainer.solver.iter,
                            classes=getattr(imdb, "classes", None))
    return trainer


def run_training(trainer: Trainer, max_iters: int) -> list[Path]:
    """``train_model``: ``trainer.train(max_iters)``, then the data layers' prefetch workers
    stopped and the trainer's hooks closed (also when training fails). Returns the .caffemodel
    paths written."""
    try:
        return trainer.train(max_iters)
    finally:
        for hook in trainer.hooks:
            hook.close()
        for layer in find_data_layers(trainer.net):
            if hasattr(layer, "close"):
                layer.close()  # prefetch workers
