"""TensorBoard: a training run, its OHEM selections and the test AP as TensorBoard events.

Written through ``torch.utils.tensorboard`` (the ``tensorboard`` package, an optional extra:
``pip install 'readonly-ohem[tensorboard]'``; imported only when a writer is made). Tags:

- every ``display`` iterations (the solver's; every iteration when it is 0), at the iteration of
  the ``Iteration N, loss = ...`` line and with its values: ``train/loss`` (the total) and
  ``train/<loss top>`` (``loss_cls``, ``loss_bbox``, ...), both smoothed over the solver's
  ``average_loss`` as Caffe displays them; ``train/lr``; ``train/sec_per_iter`` (mean seconds of
  the SGD steps since the previous write, the ``speed:`` line's measure) and
  ``train/images_per_sec`` (images per iteration / sec_per_iter; images per iteration =
  processes × ``iter_size`` × ``TRAIN.IMS_PER_BATCH``);
- every ``log_every``-th iteration of a net with an OHEM layer (any mining policy), summed over
  the iteration's passes and images (``inspect.stats.iteration_stats``): ``ohem/rois_scored``,
  ``ohem/rois_kept``, ``ohem/fg_share_kept``, ``ohem/fg_share_all``, ``ohem/nms_suppressed``,
  ``ohem/harder_than_kept``, ``ohem/kept_loss_min``, ``ohem/kept_loss_max``,
  ``ohem/loss_mean_kept``, ``ohem/loss_mean_all``; histograms of the per-RoI loss of all scored
  vs the kept RoIs, total and parts (``ohem_loss/all``, ``ohem_loss/kept``, ``ohem_loss/cls_all``,
  ``ohem_loss/cls_kept``, ``ohem_loss/bbox_all``, ``ohem_loss/bbox_kept``); the picture of
  ``readonly-ohem inspect`` (``inspect.draw.render_selection``) of the iteration's first image,
  ``ohem/kept_rois`` (JPEG, see ``PICTURE_JPEG``);
- once per writer, a Custom Scalars layout (``LAYOUT``): the charts of the "OHEM" panel (and of
  the "training" one) in TensorBoard's Custom Scalars tab, related tags drawn together;
- at the end of a test: ``test/mAP``, ``test/AP/<class>`` and any other number of the dataset's
  evaluation as ``test/<key>``, at the snapshot's iteration.

A kept-RoI log (``train --log-kept-rois``) holds the same selections: ``write_log`` converts it
into the same OHEM scalars, histograms and pictures (``readonly-ohem inspect FILE --tensorboard
DIR``).

From Python (what the demo does; any experiment runner can do the same):

    from readonly_ohem.tensorboard import attach_tensorboard, model_iteration, run_dir, write_test_results
    trainer = setup_training(solver, cfg, imdb, ...)
    attach_tensorboard(trainer, run_dir(root, "OHEM", seed), log_every=20, classes=imdb.classes)
    models = run_training(trainer, iters)   # the hook writes as it trains; closed at the end
    result = test_net(net, test_imdb, cfg, ...)
    write_test_results(run_dir(root, "OHEM", seed), result["eval"], step=model_iteration(models[-1]))
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Callable

import numpy as np

from readonly_ohem.errors import ConfigError
from readonly_ohem.inspect.draw import render_selection
from readonly_ohem.inspect.log import (KeptRoiLog, default_classes, image_meta_from_plan, read_log,
                                       split_record)
from readonly_ohem.inspect.stats import iteration_stats, logged_iterations
from readonly_ohem.ohem.record import add_recorder
from readonly_ohem.train import find_data_layers, find_ohem_layers

EXTRA = "pip install 'readonly-ohem[tensorboard]'"
# tag -> key of inspect.stats.iteration_stats
OHEM_SCALARS = {
    "ohem/rois_scored": "rois", "ohem/rois_kept": "kept",
    "ohem/fg_share_kept": "fg_fraction", "ohem/fg_share_all": "all_fg_fraction",
    "ohem/nms_suppressed": "suppressed", "ohem/harder_than_kept": "harder_than_kept",
    "ohem/kept_loss_min": "kept_loss_min", "ohem/kept_loss_max": "kept_loss_max",
    "ohem/loss_mean_kept": "kept_mean_loss", "ohem/loss_mean_all": "all_mean_loss",
}
PICTURE_TAG = "ohem/kept_rois"
# the picture as JPEG (4:4:4, quality 90): about 25 ms and 0.5 MB for a megapixel picture of the
# mini-VOC here, where add_image's PNG took about 300 ms and 0.7 MB
PICTURE_JPEG = dict(format="JPEG", quality=90, subsampling=0)
# the Custom Scalars tab: charts of several tags (regular expressions) each
LAYOUT = {
    "OHEM": {
        "foreground share: kept vs all scored RoIs": ["Multiline", ["ohem/fg_share_.*"]],
        "RoIs per iteration: scored, kept": ["Multiline", ["ohem/rois_.*"]],
        "NMS: suppressed, and harder than the easiest kept":
            ["Multiline", ["ohem/nms_suppressed", "ohem/harder_than_kept"]],
        "per-RoI loss: kept min/max, mean of kept and of all":
            ["Multiline", ["ohem/kept_loss_.*", "ohem/loss_mean_.*"]],
    },
    "training": {"losses (smoothed)": ["Multiline", ["train/loss.*"]]},
}


def summary_writer(log_dir, purge_step: int | None = None):
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``; a one-line ``ConfigError``
    naming the extra when the tensorboard package is missing, or when ``log_dir`` cannot be made."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # heavy and optional: imported here
    except ImportError:
        raise ConfigError(f"--tensorboard {log_dir}: the tensorboard package is not installed "
                          f"({EXTRA})") from None
    try:
        return SummaryWriter(str(log_dir), purge_step=purge_step)
    except OSError as e:
        raise ConfigError(f"--tensorboard {log_dir}: cannot write ({e.strerror or e})") from None


def run_dir(root, method: str, seed: int) -> Path:
    """One run folder per method and seed under ``root`` (``root/ohem_seed0``), so that
    ``tensorboard --logdir root`` shows the runs side by side."""
    return Path(root) / f"{method.lower()}_seed{int(seed)}"


def model_iteration(path) -> int:
    """The iteration of a snapshot named ``..._iter_N.caffemodel`` (0 for any other name)."""
    m = re.search(r"_iter_(\d+)\.caffemodel$", str(path))
    return int(m.group(1)) if m else 0


# -- the OHEM selections -------------------------------------------------------------------------
class SelectionWriter:
    """Writes one logged iteration's selections: ``OHEM_SCALARS``, loss histograms, the picture.

    ``images``: [(meta, arrays)] of all passes and images of the iteration, as a kept-RoI log holds
    them (``inspect.log.split_record``; meta with ``iter`` and ``pass``)."""

    def __init__(self, writer, classes=None, pictures: bool = True):
        self.writer = writer
        self.classes = classes
        self.pictures = pictures

    def write(self, iteration: int, images: list) -> dict:
        """Returns the ``iteration_stats`` written."""
        w = self.writer
        row = iteration_stats(iteration, images)
        for tag, key in OHEM_SCALARS.items():
            if row[key] is not None:
                w.add_scalar(tag, row[key], iteration)
        cls = np.concatenate([a["loss_cls"].astype(np.float64) for _, a in images])
        bbox = np.concatenate([a["loss_bbox"].astype(np.float64) for _, a in images])
        kept = np.concatenate([a["kept"].astype(bool) for _, a in images])
        for part, values in (("", cls + bbox), ("cls_", cls), ("bbox_", bbox)):
            for which, v in (("all", values), ("kept", values[kept])):
                if v.size:
                    w.add_histogram(f"ohem_loss/{part}{which}", v, iteration)
        if self.pictures and images:
            meta, arrays = images[0]
            picture = render_selection(meta, arrays, self.classes)
            # what SummaryWriter.add_image does, with a JPEG instead of its slow PNG
            w._get_file_writer().add_summary(image_summary(PICTURE_TAG, picture), iteration)
        return row


def encode_picture(picture) -> bytes:
    """A PIL RGB picture as the bytes TensorBoard gets (``PICTURE_JPEG``)."""
    buf = io.BytesIO()
    picture.save(buf, **PICTURE_JPEG)
    return buf.getvalue()


def image_summary(tag: str, picture):
    """A TensorBoard image ``Summary`` of a PIL RGB picture (encoded by ``encode_picture``)."""
    from tensorboard.compat.proto.summary_pb2 import Summary  # optional: with the writer

    image = Summary.Image(height=picture.height, width=picture.width, colorspace=3,
                          encoded_image_string=encode_picture(picture))
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class SelectionBuffer:
    """An OHEM layer recorder: the per-image selections of every pass of each ``log_every``-th
    iteration (``iteration()``: the solver's current iteration), held until ``take``.

    ``data_layer``: the net's RoIDataLayer, whose ``last_plan`` names the images of a pass."""

    def __init__(self, iteration: Callable[[], int], log_every: int = 1, data_layer=None):
        if int(log_every) < 1:
            raise ConfigError(f"--log-every must be >= 1, got {log_every}")
        self.iteration = iteration
        self.log_every = int(log_every)
        self.data_layer = data_layer
        self._iter: int | None = None
        self._images: list = []
        self._passes = 0

    @property
    def active(self) -> bool:
        """Whether the next record will be kept (lets the layer skip the full NMS otherwise)."""
        return int(self.iteration()) % self.log_every == 0

    def __call__(self, record) -> None:
        it = int(self.iteration())
        if it % self.log_every:
            return
        if it != self._iter:
            self._iter, self._images, self._passes = it, [], 0
        plan = getattr(self.data_layer, "last_plan", None) if self.data_layer is not None else None
        metas = image_meta_from_plan(self.data_layer, plan) if plan else None
        for meta, arrays in split_record(record, metas):
            self._images.append((dict(meta, iter=it, **{"pass": self._passes}), arrays))
        self._passes += 1

    def take(self, iteration: int) -> list:
        """The [(meta, arrays)] recorded during ``iteration`` ([] if none), then forgotten."""
        if self._iter != iteration:
            return []
        images, self._images, self._iter = self._images, [], None
        return images


# -- training -------------------------------------------------------------------------------------
class TrainingBoard:
    """The ``Trainer`` hook (``trainer.hooks``) that writes a training run; ``attach_tensorboard``
    makes it. ``run_training`` closes it."""

    def __init__(self, writer, display: int, images_per_iter: int,
                 selections: SelectionBuffer | None = None, classes=None):
        self.writer = writer
        self.display = max(int(display), 1)
        self.images_per_iter = int(images_per_iter)
        self.selections = selections
        self.selection_writer = SelectionWriter(writer, classes) if selections is not None else None
        self._seconds, self._steps = 0.0, 0
        writer.add_custom_scalars({k: v for k, v in LAYOUT.items()
                                   if k == "training" or selections is not None})

    def after_step(self, trainer, iteration: int, out: dict, seconds: float) -> None:
        """After SGD iteration ``iteration`` (``out``: ``Solver.step``'s result; ``seconds``: its time)."""
        self._seconds += seconds
        self._steps += 1
        if iteration % self.display == 0:
            solver = trainer.solver
            self.write_training(iteration, solver.smoothed_loss(), solver.smoothed_losses(), out["lr"])
        if self.selections is not None:
            images = self.selections.take(iteration)
            if images:
                self.selection_writer.write(iteration, images)

    def write_training(self, iteration: int, loss: float, losses: dict, lr: float) -> None:
        w = self.writer
        w.add_scalar("train/loss", loss, iteration)
        for name, value in losses.items():
            w.add_scalar(f"train/{name}", value, iteration)
        w.add_scalar("train/lr", lr, iteration)
        if self._steps:
            spi = self._seconds / self._steps
            w.add_scalar("train/sec_per_iter", spi, iteration)
            if spi > 0:
                w.add_scalar("train/images_per_sec", self.images_per_iter / spi, iteration)
        self._seconds, self._steps = 0.0, 0

    def close(self) -> None:
        self.writer.close()


def attach_tensorboard(trainer, log_dir, log_every: int = 1, classes=None) -> TrainingBoard | None:
    """``train --tensorboard DIR``: a ``TrainingBoard`` on ``trainer.hooks`` writing to ``log_dir``,
    and, for a net with OHEM layers, a ``SelectionBuffer`` recorder on them (beside a kept-RoI log
    recorder if one is attached) keeping every ``log_every``-th iteration's selections.

    Rank 0 only under torchrun (returns None elsewhere; its selections are rank 0's). Events an
    earlier run left in ``log_dir`` at or after the trainer's iteration are hidden (TensorBoard's
    purge on a restart): all of them for a fresh run, those past the resume point for ``--resume``.
    """
    if not trainer.is_main:
        return None
    solver = trainer.solver
    writer = summary_writer(log_dir, purge_step=solver.iter)
    world = trainer.ctx.world_size if trainer.ctx is not None else 1
    images_per_iter = world * solver.iter_size * int(trainer.cfg.TRAIN.IMS_PER_BATCH)
    buffer = None
    ohem = find_ohem_layers(trainer.net)
    if ohem:
        data = find_data_layers(trainer.net)
        buffer = SelectionBuffer(lambda: trainer.solver.iter, log_every, data[0] if data else None)
        for layer in ohem:
            add_recorder(layer, buffer)
        classes = list(classes) if classes is not None else default_classes(ohem[0].num_classes)
    board = TrainingBoard(writer, solver.param.display, images_per_iter, buffer, classes)
    trainer.hooks.append(board)
    return board


# -- a kept-RoI log, a test ------------------------------------------------------------------------
def write_log(log, log_dir) -> dict:
    """``inspect FILE --tensorboard DIR``: every logged iteration of a kept-RoI log (path or
    ``read_log`` result) as the OHEM scalars, histograms and pictures a live run writes.
    Returns ``{"iterations": number written, "dir": Path}``."""
    log = log if isinstance(log, KeptRoiLog) else read_log(log)
    writer = summary_writer(log_dir)
    n = 0
    try:
        writer.add_custom_scalars({"OHEM": LAYOUT["OHEM"]})
        selections = SelectionWriter(writer, log.classes)
        for it, images in logged_iterations(log):
            selections.write(it, images)
            n += 1
    finally:
        writer.close()
    return {"iterations": n, "dir": Path(log_dir)}


def evaluation_scalars(evaluation: dict, prefix: str = "test") -> dict[str, float]:
    """``{tag: value}`` of an evaluation (``imdb.evaluate_detections(...)["eval"]``):
    ``per_class`` -> ``<prefix>/AP/<class>``, every other number (mAP, COCO's AP, AP50, ...) ->
    ``<prefix>/<key>``; anything else (the metric's name) is left out."""
    out = {}
    for key, value in evaluation.items():
        if key == "per_class":
            out.update({f"{prefix}/AP/{c}": float(v) for c, v in value.items()})
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)
    return out


def write_test_results(log_dir, evaluation: dict, step: int = 0, prefix: str = "test") -> dict:
    """``test --tensorboard DIR``: ``evaluation_scalars(evaluation, prefix)`` at ``step`` (the snapshot's
    iteration, ``model_iteration``). Returns the scalars written."""
    scalars = evaluation_scalars(evaluation, prefix)
    writer = summary_writer(log_dir)
    try:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()
    return scalars
