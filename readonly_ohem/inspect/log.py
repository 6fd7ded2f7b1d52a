"""The kept-RoI log: which RoIs each OHEM selection kept, per logged iteration and image.

Two append-only files (format in ``docs/inspect.md``):

- ``FILE``: JSON lines. A ``header`` line each time a run opens the log (classes, settings), then
  one ``record`` line per (iteration, pass, image): image id/path, flip, scale, counts, loss
  range, and where its arrays are (``offset``, ``length``, ``crc32`` in ``FILE.blobs``).
- ``FILE.blobs``: the arrays of every record, one ``.npz`` archive after another.

A record's blob is written and flushed before its index line, so a crash leaves at worst an
unreferenced blob tail or a last line without its newline; ``read_log`` skips lines that do not
parse or whose blob range lies outside ``FILE.blobs``, and a reader of the arrays checks the CRC.
Readable with ``json`` + ``numpy`` alone (see the docs for the ten-line reader).
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch.distributed as dist

from readonly_ohem.datasets.pascal_voc import VOC_CLASSES
from readonly_ohem.errors import DataError
from readonly_ohem.roi_data.blob import blob_scale

FORMAT = "readonly-ohem kept-rois"
VERSION = 1
BLOBS_SUFFIX = ".blobs"
# per-RoI arrays of a record's blob, with their dtypes (R = RoIs of that image in that pass)
ARRAYS = {
    "boxes": np.float32,       # (R, 4) [x1, y1, x2, y2] in the ORIGINAL image (unscaled, unflipped)
    "labels": np.int16,        # (R,) class index (0 = background)
    "loss_cls": np.float32,    # (R,) -log p[label]
    "loss_bbox": np.float32,   # (R,) smooth-L1 sum (0 for background)
    "suppressed": np.bool_,    # (R,) removed by the OHEM NMS
    "kept": np.bool_,          # (R,) among the hard RoIs
    "keep_rank": np.int32,     # (R,) 0 = hardest of the pass, -1 = not kept
    "harder_than_kept": np.bool_,  # (R,) suppressed, yet harder than the easiest kept (see docs)
    "rows": np.int32,          # (R,) row in the pass's rois blob
    "roidb_rows": np.int32,    # (R,) row of the roidb entry's boxes (-1 when unknown)
}


def blobs_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + BLOBS_SUFFIX)


def default_classes(num_classes: int) -> list[str]:
    """VOC names for 21 classes, else ``__background__, class1, ...``."""
    if num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return ["__background__"] + [f"class{i}" for i in range(1, num_classes)]


# -- per-image view of one SelectionRecord ----------------------------------------------------------
def image_meta_from_plan(data_layer, plan: dict) -> list[dict]:
    """Per image of a RoIDataLayer minibatch: id, path, flip, size, scale and roidb rows (None
    for a ``TRAIN.HAS_RPN`` minibatch, whose RoIs are the net's own proposals)."""
    cfg = data_layer.cfg
    out = []
    for i, db in enumerate(plan["db_inds"]):
        e = data_layer.roidb[int(db)]
        scale = blob_scale(int(e["height"]), int(e["width"]),
                           cfg.TRAIN.SCALES[int(plan["scale_inds"][i])], cfg.TRAIN.MAX_SIZE)
        keep = None if plan.get("keep") is None else np.asarray(plan["keep"][i], dtype=np.int64)
        out.append(dict(image_id=str(e.get("image_id", db)), image_path=str(e.get("image", "")),
                        flipped=bool(e.get("flipped", False)), width=int(e["width"]),
                        height=int(e["height"]), scale=float(scale), db_index=int(db),
                        roidb_rows=keep,
                        roidb_boxes=None if keep is None else np.asarray(e["boxes"])[keep]))
    return out


def original_boxes(scaled: np.ndarray, meta: dict) -> np.ndarray:
    """(R, 4) boxes in the network's (scaled, maybe flipped) image -> the original image.

    Exact from the roidb rows when the meta carries them (``roidb_boxes``), else divided by the
    scale; then unflipped: x1 = W - x2' - 1, x2 = W - x1' - 1."""
    rb = meta.get("roidb_boxes")
    if rb is not None and rb.shape[0] == scaled.shape[0]:
        boxes = np.asarray(rb, dtype=np.float64).copy()
    else:
        boxes = np.asarray(scaled, dtype=np.float64) / float(meta.get("scale", 1.0))
    if meta.get("flipped") and meta.get("width"):
        w = float(meta["width"])
        x1 = boxes[:, 0].copy()
        boxes[:, 0] = w - boxes[:, 2] - 1
        boxes[:, 2] = w - x1 - 1
    return boxes


def split_record(record, metas: Sequence[dict] | None = None) -> list[tuple[dict, dict]]:
    """One ``SelectionRecord`` (a pass) -> [(meta, arrays)] per image, arrays as in ``ARRAYS``.

    ``metas[i]``: what is known of batch image i (``image_meta_from_plan``), or None.
    Copies the record to the host (one transfer per tensor)."""
    r = record.to_numpy()
    loss = np.asarray(r["loss"], dtype=np.float64)
    kept = np.asarray(r["kept"], dtype=bool)
    keep = np.asarray(r["keep"], dtype=np.int64)
    suppressed = np.asarray(r["suppressed"], dtype=bool)
    n = loss.shape[0]
    rank = np.full(n, -1, dtype=np.int64)
    rank[keep] = np.arange(keep.shape[0])
    min_kept = float(loss[keep].min()) if keep.size else float("inf")
    full = keep.size >= min(int(r["batch_size"]), n) if r["policy"] == "topk" else True
    harder = suppressed & ((loss > min_kept) | (not full))
    image = np.asarray(r["image"], dtype=np.int64)
    pass_info = dict(pass_num_rois=int(n), pass_num_kept=int(keep.size),
                     pass_min_kept_loss=min_kept if keep.size else None,
                     policy=str(r["policy"]), batch_size=int(r["batch_size"]),
                     use_nms=bool(r["use_nms"]), nms_thresh=float(r["nms_thresh"]))
    out = []
    for b in np.unique(image):
        rows = np.nonzero(image == b)[0]
        m = dict(metas[b]) if metas is not None and b < len(metas) and metas[b] else {}
        boxes = original_boxes(np.asarray(r["boxes"])[rows], m)
        rr = m.get("roidb_rows")
        rr = np.asarray(rr) if rr is not None and len(rr) == rows.size else np.full(rows.size, -1)
        arrays = dict(boxes=boxes, labels=r["labels"][rows], loss_cls=r["loss_cls"][rows],
                      loss_bbox=r["loss_bbox"][rows], suppressed=suppressed[rows],
                      kept=kept[rows], keep_rank=rank[rows], harder_than_kept=harder[rows],
                      rows=rows, roidb_rows=rr)
        arrays = {k: np.ascontiguousarray(np.asarray(v).astype(ARRAYS[k])) for k, v in arrays.items()}
        li = loss[rows]
        lk = li[kept[rows]]
        meta = dict(image=int(b), image_id=str(m.get("image_id", b)),
                    image_path=m.get("image_path") or None, flipped=bool(m.get("flipped", False)),
                    scale=float(m.get("scale", 1.0)), width=m.get("width"), height=m.get("height"),
                    db_index=m.get("db_index"), num_rois=int(rows.size),
                    num_kept=int(kept[rows].sum()),
                    num_kept_fg=int((kept[rows] & (arrays["labels"] > 0)).sum()),
                    num_fg=int((arrays["labels"] > 0).sum()),
                    num_suppressed=int(suppressed[rows].sum()),
                    num_harder_than_kept=int(harder[rows].sum()),
                    loss_min=float(li.min()) if li.size else None,
                    loss_max=float(li.max()) if li.size else None,
                    kept_loss_min=float(lk.min()) if lk.size else None,
                    kept_loss_max=float(lk.max()) if lk.size else None, **pass_info)
        out.append((meta, arrays))
    return out


# -- writer ---------------------------------------------------------------------------------------
def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


class KeptRoiLogger:
    """An OHEM layer ``recorder`` that appends every ``log_every``-th iteration's selections.

    ``iteration()``: the current solver iteration (None: every call is its own iteration);
    ``data_layer``: the net's RoIDataLayer, whose ``last_plan`` names the images of the pass.
    Calls within one iteration are its passes (``iter_size``), numbered 0, 1, ...
    Off-iterations return at once: no host copy, no file access.
    """

    def __init__(self, path: str | Path, log_every: int = 1, iteration: Callable[[], int] | None = None,
                 data_layer=None, classes: Sequence[str] | None = None):
        if int(log_every) < 1:
            raise DataError(f"kept-RoI log {path}: log_every must be >= 1, got {log_every}")
        self.path = Path(path)
        self.blobs = blobs_path(self.path)
        self.log_every = int(log_every)
        self.iteration = iteration
        self.data_layer = data_layer
        self.classes = list(classes) if classes is not None else None
        self._calls = 0
        self._last_iter: int | None = None
        self._pass = 0
        self._opened = False
        self.records_written = 0

    def _current(self) -> tuple[int, int]:
        it = int(self.iteration()) if self.iteration is not None else self._calls
        self._calls += 1
        self._pass = self._pass + 1 if it == self._last_iter else 0
        self._last_iter = it
        return it, self._pass

    @property
    def active(self) -> bool:
        """Whether the next call will be written (lets a layer skip building a record)."""
        it = int(self.iteration()) if self.iteration is not None else self._calls
        return it % self.log_every == 0

    def _open(self, num_classes: int) -> None:
        """Start a session: end a torn last line, then append a header line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            if f.tell() > 0:
                with open(self.path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        f.write(b"\n")  # the torn line stays a bad line; readers skip it
            classes = self.classes or default_classes(num_classes)
            head = dict(kind="header", format=FORMAT, version=VERSION, blobs=self.blobs.name,
                        classes=classes, log_every=self.log_every,
                        started=time.strftime("%Y-%m-%dT%H:%M:%S"))
            f.write((json.dumps(head) + "\n").encode())
        self.blobs.touch()
        self._opened = True

    def __call__(self, record, iteration: int | None = None, metas: Sequence[dict] | None = None):
        if iteration is None:
            iteration, pass_index = self._current()
        else:
            pass_index = self._pass + 1 if iteration == self._last_iter else 0
            self._pass, self._last_iter = pass_index, iteration
        if iteration % self.log_every:
            return
        if metas is None and self.data_layer is not None and getattr(self.data_layer, "last_plan", None):
            metas = image_meta_from_plan(self.data_layer, self.data_layer.last_plan)
        num_classes = int(getattr(self.data_layer, "num_classes", 0) or 21)
        self.write(split_record(record, metas), iteration, pass_index, num_classes)

    def write(self, images: list[tuple[dict, dict]], iteration: int, pass_index: int = 0,
              num_classes: int = 21) -> None:
        """Append [(meta, arrays)] of one pass: blobs first (flushed), then the index lines."""
        if not self._opened:
            self._open(num_classes)
        lines = []
        with open(self.blobs, "ab") as f:
            for meta, arrays in images:
                data = _npz_bytes(arrays)
                offset = f.tell()
                f.write(data)
                lines.append(dict(kind="record", iter=int(iteration), **{"pass": int(pass_index)},
                                  **meta, offset=offset, length=len(data),
                                  crc32=zlib.crc32(data)))
            f.flush()  # before the index line (no fsync: 20 ms a call; see docs/inspect.md)
        with open(self.path, "ab") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines).encode())
            f.flush()
        self.records_written += len(lines)


def make_recorder(path, every: int = 1, iteration: Callable[[], int] | None = None, data_layer=None,
                  classes=None) -> KeptRoiLogger:
    """The hook ``readonly_ohem.train.attach_kept_roi_log`` calls. Under torchrun, process r > 0
    writes ``FILE.rank<r>`` (rank 0 writes ``FILE``)."""
    path = Path(path)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and dist.get_rank():
        path = path.with_name(f"{path.name}.rank{dist.get_rank()}")
    return KeptRoiLogger(path, every, iteration, data_layer, classes)


# -- reader ---------------------------------------------------------------------------------------
@dataclass
class ImageSelection:
    """One logged (iteration, pass, image): the index line's fields in ``meta``, arrays on demand."""

    meta: dict
    blobs: Path
    _arrays: dict | None = field(default=None, repr=False)

    def __getattr__(self, name):
        meta = self.__dict__.get("meta", {})
        if name in meta:
            return meta[name]
        raise AttributeError(name)

    @property
    def key(self) -> tuple[int, int, int]:
        return (int(self.meta["iter"]), int(self.meta["pass"]), int(self.meta["image"]))

    def read_arrays(self) -> dict:
        """The per-RoI arrays (``ARRAYS``), read now and not cached; CRC-checked."""
        off, n = int(self.meta["offset"]), int(self.meta["length"])
        with open(self.blobs, "rb") as f:
            f.seek(off)
            data = f.read(n)
        if len(data) != n or zlib.crc32(data) != int(self.meta["crc32"]):
            raise DataError(f"{self.blobs}: the blob of iteration {self.meta['iter']} image "
                            f"{self.meta['image_id']} (bytes {off}..{off + n}) is damaged (CRC mismatch)")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:  # never unpickles
                return {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{self.blobs}: the blob of iteration {self.meta['iter']} image "
                            f"{self.meta['image_id']} is not an .npz of plain arrays ({e})") from None

    @property
    def arrays(self) -> dict:
        if self._arrays is None:
            self._arrays = self.read_arrays()
        return self._arrays


class KeptRoiLog(list):
    """``read_log``'s result: ImageSelections by (iteration, pass, image), plus ``classes``,
    ``skipped`` (index lines that were torn or pointed past the blobs) and ``path``."""

    def __init__(self, items=(), path=None, classes=None, skipped=0, headers=()):
        super().__init__(items)
        self.path, self.classes, self.skipped, self.headers = path, classes, skipped, list(headers)

    @property
    def iterations(self) -> list[int]:
        return sorted({r.meta["iter"] for r in self})

    def at(self, iteration: int) -> list[ImageSelection]:
        return [r for r in self if r.meta["iter"] == iteration]


def read_log(path: str | Path) -> KeptRoiLog:
    """Read a kept-RoI log, tolerating a torn last record (skipped and counted).

    A record logged twice (a resumed run re-doing iterations) keeps its last copy."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: kept-RoI log not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the kept-RoI log ({e.strerror})") from None
    headers, by_key, skipped = [], {}, 0
    blobs = blobs_path(path)
    blob_size = blobs.stat().st_size if blobs.is_file() else 0
    for k, line in enumerate(raw.split(b"\n")):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if not isinstance(obj, dict):
            skipped += 1
            continue
        if obj.get("kind") == "header":
            if obj.get("format") != FORMAT:
                raise DataError(f"{path}: line {k + 1} is not a {FORMAT} header")
            if int(obj.get("version", 0)) > VERSION:
                raise DataError(f"{path}: log version {obj['version']} is newer than this reader "
                                f"({VERSION}); update readonly-ohem")
            headers.append(obj)
            blobs = path.with_name(obj.get("blobs", blobs.name))
            blob_size = blobs.stat().st_size if blobs.is_file() else 0
            continue
        try:
            end = int(obj["offset"]) + int(obj["length"])
            key = (int(obj["iter"]), int(obj["pass"]), int(obj["image"]))
        except (KeyError, TypeError, ValueError):
            skipped += 1
            continue
        if obj.get("kind") != "record" or end > blob_size:
            skipped += 1
            continue
        by_key.pop(key, None)
        by_key[key] = ImageSelection(obj, blobs)
    if not headers:
        raise DataError(f"{path}: not a kept-RoI log (no {FORMAT!r} header line)")
    items = sorted(by_key.values(), key=lambda r: r.key)
    return KeptRoiLog(items, path, headers[-1]["classes"], skipped, headers)


def find_record(log: KeptRoiLog, iteration: int | None = None, image: str | None = None) -> ImageSelection:
    """The record of ``iteration`` (default: the last logged) and image id or batch index
    ``image`` (default: the first image of that iteration); DataError naming what exists."""
    if not len(log):
        raise DataError(f"{log.path}: the log holds no records yet")
    its = log.iterations
    if iteration is None:
        iteration = its[-1]
    recs = log.at(iteration)
    if not recs:
        near = sorted(its, key=lambda i: abs(i - iteration))[:5]
        raise DataError(f"{log.path}: iteration {iteration} was not logged (nearest logged: "
                        f"{', '.join(map(str, sorted(near)))}; {len(its)} iterations from {its[0]} "
                        f"to {its[-1]})")
    if image is None:
        return recs[0]
    for r in recs:
        if str(image) in (str(r.meta["image_id"]), Path(str(r.meta.get("image_path") or "")).stem) \
                or Path(str(image)).stem == str(r.meta["image_id"]):
            return r
    ids = ", ".join(str(r.meta["image_id"]) for r in recs)
    raise DataError(f"{log.path}: iteration {iteration} has no image {image!r} (it has: {ids})")
