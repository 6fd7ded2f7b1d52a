"""``readonly-ohem train``: the original ``tools/train_net.py``.

Config (defaults, ``--cfg`` files, ``--set`` pairs), the imdb by name, then the training sequence
of ``readonly_ohem.train`` (``setup_training``, ``run_training``: seeds, roidb, net, solver,
initial weights, snapshots, resume, the kept-RoI log) until ``--iters`` (default: the solver's
``max_iter``). Under ``torchrun`` every process runs this (``readonly_ohem.distributed``).
"""

from __future__ import annotations

import sys

import torch

from readonly_ohem import distributed
from readonly_ohem.config import load_config
from readonly_ohem.datasets import get_imdb
from readonly_ohem.errors import ConfigError
from readonly_ohem.tensorboard import attach_tensorboard
from readonly_ohem.train import run_training, setup_training


def train_command(solver, weights=None, imdb="voc_2007_trainval", data=None, proposals=None,
                  iters=None, cfg=(), set_pairs=(), output="output", device="cpu", resume=None,
                  log_kept_rois=None, log_every=1, tensorboard=None, stream=None) -> int:
    """``readonly-ohem train``: the original ``tools/train_net.py``. Returns the exit status."""
    stream = stream if stream is not None else sys.stdout
    if log_every is not None and log_every < 1:
        raise ConfigError(f"--log-every must be >= 1, got {log_every}")
    if iters is not None and iters < 1:
        raise ConfigError(f"--iters must be >= 1, got {iters}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    ctx = distributed.init_from_env(device)
    device = distributed.device_for(device, ctx)
    config = load_config(cfg, set_pairs)
    is_main = ctx is None or ctx.is_main
    if is_main:
        print(f"Using config: {list(cfg or [])} {list(set_pairs or [])}", file=stream, flush=True)
    imdb_obj = get_imdb(imdb, data, proposals, config)
    if is_main:
        print(f"Loaded dataset `{imdb_obj.name}` for training", file=stream, flush=True)
    trainer = setup_training(solver, config, imdb_obj, weights, output, device, ctx, resume=resume,
                             log_kept_rois=log_kept_rois, log_every=log_every, stream=stream)
    if tensorboard:
        attach_tensorboard(trainer, tensorboard, log_every=log_every, classes=imdb_obj.classes)
    max_iters = iters if iters is not None else trainer.solver.max_iter
    if max_iters is None or max_iters <= 0:
        raise ConfigError(f"{solver}: no iteration count (give --iters or max_iter in the solver)")
    if resume and max_iters <= trainer.solver.iter:
        raise ConfigError(f"--resume {resume}: the state is at iteration {trainer.solver.iter}, "
                          f"already at or past the {max_iters} asked for (--iters counts from 0)")
    trainer.log(f"Output will be saved to `{trainer.output_dir}`; solving to iteration {max_iters}")
    models = run_training(trainer, max_iters)
    trainer.log("done solving; snapshots: " + ", ".join(str(m) for m in models))
    if trainer.interrupted is not None:
        return 128 + int(trainer.interrupted)
    return 0
