"""Caffe's SGD solver: learning-rate policies, the update rule, iter_size accumulation, resume state.

This is ``SGDSolver`` of Caffe (the one the original OHEM training used), not ``torch.optim.SGD``:
the learning rate sits inside the momentum buffer, so the two differ after an lr change.

One iteration (``Solver.step``), in Caffe's order (``Solver::Step`` + ``SGDSolver::ApplyUpdate``):

1. ``iter_size`` forward/backward passes; param diffs (``.grad``) accumulate; the reported loss is
   the mean over the passes of the weighted total loss.
2. (data-parallel only) the diffs are averaged across processes (the application's ``reducer``).
3. ``clip_gradients`` (if ≥ 0): when the global L2 norm of all diffs exceeds it, every diff is
   scaled by ``clip / norm`` — before the ``iter_size`` normalization, as Caffe does.
4. per param: ``g = diff / iter_size``; ``g += weight_decay·decay_mult·w`` (L2) or
   ``·sign(w)`` (L1); ``h = momentum·h + lr·lr_mult·g``; ``w −= h``.

Params with ``lr_mult`` 0 are never touched (Caffe's history for them stays 0, so they cannot
move). ``net.learnable_params()`` lists every shared tensor once, so shared params are updated once
with their summed diff. A param that gets no gradient has diff 0 and is still decayed, as in Caffe.
"""

from __future__ import annotations

import math
import os
from collections import deque
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from readonly_ohem.caffe.net import Net
from readonly_ohem.caffe.spec import read_solver, solver_net_path
from readonly_ohem.errors import OhemError, SpecError, WeightsError

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


class NonFiniteLossError(OhemError):
    """A loss became NaN or inf: training stops before the update (weights stay the last good)."""


def _f32(x: float) -> float:
    """Round to float32, as Caffe's ``Dtype rate`` does."""
    return float(np.float32(x))


def learning_rate(param, it: int, current_step: int = 0) -> tuple[float, int]:
    """Caffe's ``SGDSolver::GetLearningRate`` at iteration ``it``.

    Returns ``(rate, current_step)``; only ``multistep`` changes ``current_step``, and as in Caffe it
    advances by at most one per call (``if``, not ``while``): called once per iteration, it moves
    past each ``stepvalue`` at that iteration. ``step`` sets it to ``it // stepsize``.
    """
    policy = param.lr_policy
    base_lr = param.base_lr
    if policy == "fixed":
        rate = base_lr
    elif policy == "step":
        current_step = it // param.stepsize
        rate = base_lr * math.pow(param.gamma, current_step)
    elif policy == "exp":
        rate = base_lr * math.pow(param.gamma, it)
    elif policy == "inv":
        rate = base_lr * math.pow(1.0 + param.gamma * it, -param.power)
    elif policy == "multistep":
        if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
            current_step += 1
        rate = base_lr * math.pow(param.gamma, current_step)
    elif policy == "poly":
        rate = base_lr * math.pow(1.0 - float(np.float32(it) / np.float32(param.max_iter)), param.power)
    elif policy == "sigmoid":
        rate = base_lr * (1.0 / (1.0 + math.exp(-param.gamma * (it - param.stepsize))))
    else:  # checked in check_solver_param; kept for direct callers
        raise SpecError(f"unknown lr_policy {policy!r}; known: {', '.join(LR_POLICIES)}")
    return _f32(rate), current_step


def check_solver_param(param, source: str = "<solver>") -> None:
    """Raise ``SpecError`` (naming the solver file and field) where Caffe would abort."""
    where = f"{source}:"
    solver_type = param.type if param.HasField("type") else "SGD"
    if param.HasField("solver_type") and not param.HasField("type"):
        solver_type = param.SolverType.Name(param.solver_type)
    if solver_type.upper() != "SGD":
        raise SpecError(f"{where} solver type {solver_type!r} is not supported (only SGD, "
                        "which the original training uses)")
    if not param.HasField("lr_policy"):
        raise SpecError(f"{where} lr_policy is required (one of {', '.join(LR_POLICIES)})")
    if param.lr_policy not in LR_POLICIES:
        raise SpecError(f"{where} unknown lr_policy {param.lr_policy!r}; "
                        f"known: {', '.join(LR_POLICIES)}")
    if param.lr_policy == "step" and param.stepsize <= 0:
        raise SpecError(f"{where} lr_policy step needs stepsize > 0, got {param.stepsize}")
    if param.lr_policy in ("step", "exp", "inv") and param.gamma < 0:
        raise SpecError(f"{where} gamma must be >= 0 for lr_policy {param.lr_policy}, got {param.gamma}")
    if param.lr_policy == "poly" and param.max_iter <= 0:
        raise SpecError(f"{where} lr_policy poly needs max_iter > 0, got {param.max_iter}")
    if param.regularization_type not in ("L1", "L2"):
        raise SpecError(f"{where} unknown regularization_type {param.regularization_type!r} "
                        "(L1 or L2)")
    if param.iter_size < 1:
        raise SpecError(f"{where} iter_size must be >= 1, got {param.iter_size}")
    if param.average_loss < 1:
        raise SpecError(f"{where} average_loss must be >= 1, got {param.average_loss}")


def net_path(param, source: str | os.PathLike | None = None) -> Path:
    """The solver's ``train_net`` (or ``net``) file: relative to the working directory first (as
    Caffe, whose original experiments run from the repository root), then to the solver file's
    directory, so a solver next to its net works from anywhere (``spec.solver_net_path``)."""
    return solver_net_path(param, source if source is not None else "solver.prototxt")


def train_net_spec(param, source: str | os.PathLike | None = None) -> tuple[Any, str]:
    """What the solver's train net is built from, and its name in messages: the inline
    ``train_net_param``/``net_param`` (``"<solver>:<field>"``), else the file (``net_path``)."""
    for field in ("train_net_param", "net_param"):
        if param.HasField(field):
            return getattr(param, field), f"{source}:{field}"
    path = net_path(param, source)
    return path, str(path)


def build_net(param, source: str | os.PathLike | None = None, **net_kwargs):
    """The solver's train net (``train_net_spec``), in the TRAIN phase unless told otherwise."""
    net_kwargs.setdefault("phase", "TRAIN")
    spec, name = train_net_spec(param, source)
    if isinstance(spec, Path):
        return Net.from_file(str(spec), **net_kwargs)
    return Net(spec, source=name, **net_kwargs)


class Solver:
    """Caffe's SGD on a ``readonly_ohem.caffe.net.Net``.

    ``solver_param``: a ``caffe_pb2.SolverParameter`` (``readonly_ohem.caffe.spec.read_solver``);
    ``source``: the solver file (for messages and for resolving the net path);
    ``reducer``: for data-parallel training, an object with ``reduce_grads(tensors)`` (average in
    place across processes) and ``all_true(flag) -> bool``; the application's data-parallel
    code provides one.
    """

    def __init__(self, solver_param, net, source: str | os.PathLike | None = None,
                 reducer: Any = None, seed_offset: int = 0):
        check_solver_param(solver_param, str(source or "<solver>"))
        self.param = solver_param
        self.net = net
        self.source = None if source is None else str(source)
        self.reducer = reducer
        self.iter = 0
        self.current_step = 0
        self.history: dict[str, torch.Tensor] = {}  # param key -> momentum buffer h
        window = solver_param.average_loss
        self._losses: deque = deque(maxlen=window)  # total loss per iteration (smoothing window)
        self._blob_losses: dict[str, deque] = {}  # loss blob -> its window
        if solver_param.random_seed >= 0:  # Caffe::set_random_seed(random_seed + solver_rank)
            torch.manual_seed(solver_param.random_seed + seed_offset)
        self._check_keys()

    @classmethod
    def from_file(cls, path: str | os.PathLike, net=None, **kw) -> "Solver":
        """Read a solver.prototxt and build its train net (``**kw`` go to the Net: cfg, extras...)."""
        param = read_solver(str(path))
        if net is None:
            net = build_net(param, path, **{k: v for k, v in kw.items() if k != "reducer"})
        return cls(param, net, source=path, reducer=kw.get("reducer"))

    def net_path(self) -> Path:
        return net_path(self.param, self.source)

    # -- the iteration --------------------------------------------------------------------------
    @property
    def iter_size(self) -> int:
        return self.param.iter_size

    @property
    def max_iter(self) -> int:
        return self.param.max_iter

    def learning_rate(self) -> float:
        """The rate of the current iteration (advances ``current_step`` for multistep)."""
        rate, self.current_step = learning_rate(self.param, self.iter, self.current_step)
        return rate

    def step(self, feed_fn: Callable[[int], dict | None] | None = None) -> dict:
        """One SGD iteration: ``iter_size`` forward/backward passes, then Caffe's update.

        ``feed_fn(pass_index)`` gives each pass's feed (dict blob -> Tensor) or None to let the
        net's data layers run. Returns ``{"loss", "lr", "losses": {loss blob: value}}`` where loss
        is the mean over the passes of the weighted total loss and ``losses`` the mean of each loss
        blob's (unweighted) value. Raises ``NonFiniteLossError`` before touching the weights when a
        loss is NaN or inf.
        """
        params = self.net.learnable_params()
        for p in params:
            p.tensor.grad = None  # Net::ClearParamDiffs
        names = list(self.net.loss_weights)
        per_pass = []
        for i in range(self.iter_size):
            feed = feed_fn(i) if feed_fn is not None else None
            blobs = self.net.forward(feed)
            loss = self.net.total_loss(blobs)
            if loss.requires_grad:
                loss.backward()
            vals = [loss.detach().reshape(())] + [blobs[n].detach().sum().reshape(()) for n in names]
            per_pass.append(torch.stack([v.to(torch.float64) for v in vals]))
        values = torch.stack(per_pass).cpu().numpy()  # (iter_size, 1 + #loss blobs), one sync
        finite = bool(np.isfinite(values).all())
        if self.reducer is not None:
            finite = self.reducer.all_true(finite)
        if not finite:
            raise NonFiniteLossError(self._nonfinite_message(values, names))
        # Caffe: loss += ForwardBackward() in float, then /= iter_size.
        loss_value = float(np.float32(values[:, 0].astype(np.float32).sum(dtype=np.float32)
                                      / np.float32(self.iter_size)))
        blob_values = {n: float(values[:, j + 1].mean()) for j, n in enumerate(names)}
        rate = self.learning_rate()
        if self.reducer is not None:
            self.reducer.reduce_grads([p.tensor for p in params if p.lr_mult != 0])
        self.apply_update(params, rate)
        self._update_smoothed(loss_value, blob_values)
        self.iter += 1
        return {"loss": loss_value, "lr": rate, "losses": blob_values}

    def _nonfinite_message(self, values: np.ndarray, names: list[str]) -> str:
        bad = [n for j, n in enumerate(names) if not np.isfinite(values[:, j + 1]).all()]
        if not bad and np.isfinite(values[:, 0]).all():
            return f"iteration {self.iter}: a non-finite loss in another process; stopped"
        layers = {}
        for rec in getattr(self.net, "layers", []):
            for t in getattr(rec, "tops", ()):
                layers.setdefault(t, rec.name)
        what = ", ".join(f"blob {n!r} (layer {layers.get(n, '?')!r}) = "
                         f"{values[:, j + 1].tolist()}" for j, n in enumerate(names) if n in bad)
        return (f"iteration {self.iter}: the loss is not finite "
                f"({what or 'total ' + str(values[:, 0].tolist())}); training stopped, "
                "weights not updated")

    @torch.no_grad()
    def apply_update(self, params, rate: float) -> None:
        """``SGDSolver::ApplyUpdate`` on the accumulated ``.grad`` of ``params``."""
        p = self.param
        if p.clip_gradients >= 0:
            grads = [q.tensor.grad for q in params if q.tensor.grad is not None]
            sumsq = sum(float(g.double().pow(2).sum()) for g in grads)
            l2norm = math.sqrt(sumsq)
            if l2norm > p.clip_gradients:
                scale = _f32(p.clip_gradients / l2norm)
                for g in grads:
                    g.mul_(scale)
        inv_iter = _f32(1.0 / self.iter_size)
        momentum = _f32(p.momentum)
        for q in params:
            if q.lr_mult == 0:
                continue
            w = q.tensor
            g = w.grad if w.grad is not None else torch.zeros_like(w)
            if self.iter_size > 1:
                g = g * inv_iter
            local_decay = _f32(np.float32(p.weight_decay) * np.float32(q.decay_mult))
            if local_decay:
                reg = w if p.regularization_type == "L2" else torch.sign(w)
                g = g + local_decay * reg
            local_rate = _f32(np.float32(rate) * np.float32(q.lr_mult))
            h = self.history.get(q.key)
            if h is None or h.shape != w.shape or h.device != w.device:
                h = self.history[q.key] = torch.zeros_like(w) if h is None else h.to(w.device)
            h.mul_(momentum).add_(g, alpha=local_rate)
            w.sub_(h)

    # -- smoothed losses (Caffe's average_loss window) ------------------------------------------
    def _update_smoothed(self, loss: float, blob_values: dict[str, float]) -> None:
        self._losses.append(loss)
        for n, v in blob_values.items():
            self._blob_losses.setdefault(n, deque(maxlen=self.param.average_loss)).append(v)

    def smoothed_loss(self) -> float:
        """Mean total loss over the last ``average_loss`` iterations (Caffe's display value)."""
        return float(np.mean(self._losses)) if self._losses else float("nan")

    def smoothed_losses(self) -> dict[str, float]:
        """Each loss blob's mean over the last ``average_loss`` iterations."""
        return {n: float(np.mean(d)) for n, d in self._blob_losses.items()}

    # -- resume state ----------------------------------------------------------------------------
    def _check_keys(self) -> None:
        keys = [q.key for q in self.net.learnable_params()]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise SpecError(f"learnable params with the same key: {dup}")

    def state_dict(self) -> dict:
        """Iteration, multistep position, momentum history (CPU copies) and the loss windows."""
        return {
            "iter": self.iter,
            "current_step": self.current_step,
            "history": {k: v.detach().cpu().clone() for k, v in self.history.items()},
            "losses": list(self._losses),
            "blob_losses": {n: list(d) for n, d in self._blob_losses.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        shapes = {q.key: q.tensor for q in self.net.learnable_params()}
        history = {}
        for k, v in state["history"].items():
            if k not in shapes:
                raise WeightsError(f"solver state: history for unknown param {k!r}")
            if tuple(v.shape) != tuple(shapes[k].shape):
                raise WeightsError(f"solver state: history {k!r} has shape {tuple(v.shape)}, "
                                   f"the param {tuple(shapes[k].shape)}")
            history[k] = v.to(device=shapes[k].device, dtype=shapes[k].dtype).clone()
        self.history = history
        self.iter = int(state["iter"])
        self.current_step = int(state["current_step"])
        self._losses = deque(state.get("losses", []), maxlen=self.param.average_loss)
        self._blob_losses = {n: deque(v, maxlen=self.param.average_loss)
                             for n, v in state.get("blob_losses", {}).items()}
