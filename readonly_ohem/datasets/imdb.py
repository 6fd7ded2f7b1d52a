"""The dataset protocol: an image database (imdb), as the original ``datasets/imdb.py``.

A dataset family (``pascal_voc.PascalVOC``, ``coco.COCODataset``) subclasses ``Imdb`` and is
registered with ``factory.register_dataset``; ``detection/``, ``roi_data/`` and ``train.py`` see
only this protocol. ``CombinedImdb`` (``a+b``) is one over several.

roidb entry (dict), built here from the protocol: ``boxes`` (N, 4) float64 0-based, gt rows first
then proposals; ``gt_classes`` (N,) int32 (0 for proposals); ``gt_overlaps`` (N, K) scipy csr
float32 (the IoU with the best gt at that gt's class, one non-zero per row at most; or -1 in
every column: a row excluded from training, a COCO crowd box or a proposal inside one);
``flipped`` False; ``image`` (path); ``image_id``; ``width``; ``height``.
"""

from __future__ import annotations

from functools import cached_property
from typing import Sequence

import numpy as np
import scipy.sparse

from readonly_ohem.datasets import cache
from readonly_ohem.datasets.image import image_size
from readonly_ohem.errors import DataError
from readonly_ohem.ops.boxes import bbox_overlaps, crowd_overlaps

CROWD_THRESH = 0.7  # the original COCO imdb's crowd_thresh: proposals more inside a crowd are excluded


# -- roidb entries ----------------------------------------------------------------------------------
def overlaps_matrix(classes: np.ndarray, overlaps: np.ndarray, num_classes: int, excluded=None):
    """(N, K) csr float32 with ``overlaps[i]`` at column ``classes[i]`` (rows with 0 stay empty);
    the rows flagged in ``excluded`` ((N,) bool) hold -1 in every column instead (the original
    COCO imdb's mark for a row excluded from training: its max overlap -1 is neither fg nor bg)."""
    classes = np.asarray(classes, dtype=np.int64)
    overlaps = np.asarray(overlaps, dtype=np.float32)
    n = classes.shape[0]
    excluded = np.zeros(n, bool) if excluded is None else np.asarray(excluded, bool)
    rows = np.nonzero((overlaps > 0) & ~excluded)[0]
    ex = np.nonzero(excluded)[0]
    data = np.concatenate([overlaps[rows], np.full(ex.size * num_classes, -1, np.float32)])
    r = np.concatenate([rows, np.repeat(ex, num_classes)])
    c = np.concatenate([classes[rows], np.tile(np.arange(num_classes), ex.size)])
    return scipy.sparse.csr_matrix((data, (r, c)), shape=(n, num_classes), dtype=np.float32)


def proposal_overlaps(boxes: np.ndarray, gt_boxes: np.ndarray, gt_classes: np.ndarray):
    """Best IoU (+1 widths) of each proposal with the gt and that gt's class: ((N,), (N,)).

    The original's ``create_roidb_from_box_list``: argmax takes the first gt on ties; rows with
    no overlap get class 0.
    """
    n = boxes.shape[0]
    if gt_boxes.shape[0] == 0 or n == 0:
        return np.zeros(n, np.float32), np.zeros(n, np.int64)
    ov = bbox_overlaps(boxes.astype(np.float64), gt_boxes.astype(np.float64))
    argmax = ov.argmax(axis=1)
    maxes = ov.max(axis=1).astype(np.float32)
    cls = np.where(maxes > 0, gt_classes[argmax], 0).astype(np.int64)
    return maxes, cls


def merge_gt_and_proposals(gt: dict, proposals: np.ndarray | None, num_classes: int,
                           crowd_thresh: float = CROWD_THRESH) -> dict:
    """One imdb roidb entry: gt rows first, then proposals (gt may be None: proposals only).

    Crowd gt rows (``gt["is_crowd"]`` (G,) bool, COCO's ``iscrowd``) are excluded from training
    (-1 in every column), and so are the proposals whose ``crowd_overlaps`` with a crowd box is
    > ``crowd_thresh``; as the original COCO imdb (and Detectron), proposals are matched against
    every gt row, crowds included, so one overlapping a crowd less than that takes its class.
    """
    if gt is None:
        gt_boxes, gt_classes = np.zeros((0, 4)), np.zeros(0, np.int32)
    else:
        gt_boxes, gt_classes = gt["boxes"], gt["gt_classes"]
    props = np.zeros((0, 4)) if proposals is None else proposals
    p_ov, p_cls = proposal_overlaps(props, gt_boxes, gt_classes)
    crowd = np.zeros(gt_boxes.shape[0], bool)
    if gt is not None and "is_crowd" in gt:
        crowd = np.asarray(gt["is_crowd"], bool).reshape(-1)
    inside = np.zeros(props.shape[0], bool)
    if crowd.any() and props.shape[0]:
        inside = crowd_overlaps(props.astype(np.float64), gt_boxes[crowd].astype(np.float64))
        inside = inside.max(axis=1) > crowd_thresh
    boxes = np.vstack([gt_boxes, props]).astype(np.float64)
    ov = np.concatenate([np.ones(gt_boxes.shape[0], np.float32), p_ov])
    cls = np.concatenate([gt_classes.astype(np.int64), p_cls])
    return dict(boxes=boxes,
                gt_classes=np.concatenate([gt_classes, np.zeros(props.shape[0], np.int32)]).astype(np.int32),
                gt_overlaps=overlaps_matrix(cls, ov, num_classes, np.concatenate([crowd, inside])),
                flipped=False)


def build_imdb_roidb(imdb, proposals: bool = True) -> list[dict]:
    """The original ``selective_search_roidb`` for one imdb: gt rows then proposals per image (gt
    left out where ``imdb.has_gt()`` is False), from the disk cache when valid.

    ``proposals=False``: the original's ``gt`` proposal method (``TRAIN.PROPOSAL_METHOD: gt``,
    Faster R-CNN end-to-end, whose RPN makes the RoIs): gt rows only, no proposals file read,
    not cached (it is the annotations alone).
    """
    if proposals:
        cached = cache.load(imdb)
        if cached is not None:
            return cached
    gt = imdb.gt_roidb() if imdb.has_gt() else [None] * imdb.num_images
    sizes = imdb.image_sizes
    roidb = []
    for i in range(imdb.num_images):
        e = merge_gt_and_proposals(gt[i], imdb.proposal_boxes(i) if proposals else None,
                                   imdb.num_classes, imdb.crowd_thresh)
        e.update(image=imdb.image_path_at(i), image_id=imdb.image_index[i],
                 width=int(sizes[i, 0]), height=int(sizes[i, 1]))
        roidb.append(e)
    if proposals:
        cache.save(imdb, roidb)
    return roidb


# -- the protocol -----------------------------------------------------------------------------------
class Imdb:
    """What every dataset provides (a subclass sets ``name``, ``classes``, ``image_index`` and
    implements the methods that raise ``NotImplementedError`` here):

    - ``name``: str, the factory's name (``voc_2007_trainval``).
    - ``classes``: tuple of str, index 0 ``"__background__"``; ``num_classes`` = its length.
    - ``image_index``: list of image ids (str), in the image set's order; ``num_images``.
    - ``image_path_at(i)`` -> str: the image file of image i.
    - ``gt_roidb()`` -> list of ``{boxes (G, 4) float64 0-based, gt_classes (G,) int32,
      gt_overlaps (G, K) csr (1 at the class), flipped False}``, one per image (the training gt);
      an entry may add ``is_crowd`` (G,) bool: crowd regions, excluded from training with the
      proposals more than ``crowd_thresh`` inside them (``merge_gt_and_proposals``).
    - ``has_gt()`` -> bool: whether ``gt_roidb`` exists (False for a set without public
      annotations: its roidb is proposals only).
    - ``proposal_boxes(i)`` -> (P, 4) float64 0-based proposals of image i.
    - ``image_sizes``: (N, 2) int64 (width, height); read from the image headers unless overridden.
    - ``roidb``: gt rows then proposals per image (the module docstring's entries), built once by
      ``build_imdb_roidb`` and cached on disk (``cache.py``) under ``cache_dir`` (None: the
      default cache directory; False: no cache).
    - ``cache_inputs()`` -> ``(description, files)``: what the roidb depends on, the cache's key —
      a JSON-able description (name, classes, options, where the data is) and the files whose
      (mtime, size) matter (annotations, images, image set, proposals).
    - ``evaluate_detections(all_boxes, output_dir)`` -> dict: write the dataset's result files for
      ``all_boxes[class][image]`` ((D, 5) float32 ``[x1, y1, x2, y2, score]``, 0-based) into
      ``output_dir`` and evaluate them: ``{"eval": {"mAP", "per_class", "metric"} or None (not
      evaluated; COCO adds "AP50", "AP75", "stats"), "result_files": {class: path} (COCO: one
      file for all), "results_at": str (where, for the log), "report": str (the text to print:
      the AP table, or why there is none)}``.
    - ``parts``: the image sets flipped and prepared separately for training (``[self]``).

    A dataset evaluated against per-image object lists also gives ``annotations_at(i)`` (all
    objects of image i, difficult included).
    """

    name: str
    classes: tuple
    image_index: list
    cache_dir = None
    crowd_thresh = CROWD_THRESH

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_images(self) -> int:
        return len(self.image_index)

    @property
    def parts(self) -> list:
        return [self]

    def image_path_at(self, i: int) -> str:
        raise NotImplementedError

    def gt_roidb(self) -> list[dict]:
        raise NotImplementedError

    def has_gt(self) -> bool:
        raise NotImplementedError

    def proposal_boxes(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def cache_inputs(self) -> tuple[dict, list]:
        raise NotImplementedError

    def evaluate_detections(self, all_boxes, output_dir) -> dict:
        raise NotImplementedError

    @cached_property
    def image_sizes(self) -> np.ndarray:
        """(N, 2) int64 (width, height), read from the image headers."""
        return np.array([image_size(self.image_path_at(i)) for i in range(self.num_images)],
                        dtype=np.int64).reshape(-1, 2)

    @cached_property
    def roidb(self) -> list[dict]:
        return build_imdb_roidb(self)


class CombinedImdb(Imdb):
    """``a+b``: the parts in order, one class list; ``roidb`` concatenates the parts' own (each
    cached on its own), and training flips each part separately, as ``train_net.py``."""

    def __init__(self, parts: Sequence[Imdb]):
        self._parts = list(parts)
        self.name = "+".join(p.name for p in self._parts)
        self.classes = self._parts[0].classes
        for p in self._parts[1:]:
            if p.classes != self.classes:
                raise DataError(f"{self.name}: {p.name} has a different class list from "
                                f"{self._parts[0].name}")
        self._where = [(k, i) for k, p in enumerate(self._parts) for i in range(p.num_images)]
        self.image_index = [p.image_index[i] for p in self._parts for i in range(p.num_images)]

    @property
    def parts(self) -> list:
        return self._parts

    def _at(self, name, i):
        k, j = self._where[i]
        return getattr(self._parts[k], name)(j)

    def image_path_at(self, i):
        return self._at("image_path_at", i)

    def annotations_at(self, i):
        return self._at("annotations_at", i)

    def proposal_boxes(self, i):
        return self._at("proposal_boxes", i)

    def gt_roidb(self):
        return [e for p in self._parts for e in p.gt_roidb()]

    def has_gt(self):
        return all(p.has_gt() for p in self._parts)

    @cached_property
    def image_sizes(self):
        return np.concatenate([p.image_sizes for p in self._parts]).reshape(-1, 2)

    def cache_inputs(self):
        inputs = [p.cache_inputs() for p in self._parts]
        return dict(parts=[d for d, _ in inputs]), [f for _, files in inputs for f in files]

    @property
    def roidb(self):
        return [e for p in self._parts for e in p.roidb]

    def evaluate_detections(self, all_boxes, output_dir) -> dict:
        """Evaluated as one image set, by the evaluation of its parts' family (they share one)."""
        families = {type(p) for p in self._parts}
        if len(families) != 1:
            raise DataError(f"{self.name}: image sets of different dataset families cannot be "
                            f"evaluated together")
        return families.pop().evaluate_detections(self, all_boxes, output_dir)
