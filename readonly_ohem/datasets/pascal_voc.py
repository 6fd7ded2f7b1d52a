"""PASCAL VOC image databases (imdb): the VOCdevkit reader of the original ``datasets/pascal_voc.py``.

Layout: ``VOCdevkit/VOC<year>/{Annotations/<id>.xml, ImageSets/Main/<set>.txt, JPEGImages/<id>.jpg}``.
XML boxes are 1-based; the roidb holds them 0-based (``- 1``, truncated to integers as the
original's uint16 array); a box reaching outside its image is clipped to it with a warning
(``TRAIN.GT_OUTSIDE_IMAGE``; the original trained on it as written, see ``gt_boxes``).
Difficult objects are left out of training (``use_diff`` False) and kept, flagged, by
``annotations_at`` for evaluation. The class list belongs to the dataset.

Registers the family ``voc_<year>_<image_set>`` with the factory: ``get_imdb("voc_2007_trainval",
data_dir)``; ``"voc_2007_trainval+voc_2012_trainval"`` gives a ``CombinedImdb`` whose parts are
flipped separately and concatenated, as ``train_net.py`` does. Evaluation: the devkit's
(``voc_eval.evaluate_detections``).
"""

from __future__ import annotations

import warnings
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from readonly_ohem.config import default_config
from readonly_ohem.datasets import voc_eval
from readonly_ohem.datasets.factory import register_dataset
from readonly_ohem.datasets.imdb import Imdb, overlaps_matrix
from readonly_ohem.datasets.proposals import MIN_SIZE, find_proposals, load_proposals
from readonly_ohem.datasets.voc_eval import parse_voc_xml
from readonly_ohem.errors import ConfigError, DataError

VOC_CLASSES = ("__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")

# -- locating files --------------------------------------------------------------------------------
def resolve_devkit(data_dir: str | Path, year: str) -> Path:
    """The VOCdevkit directory holding ``VOC<year>``: ``data_dir`` may contain ``VOCdevkit<year>/`` or
    ``VOCdevkit/``, or be the VOCdevkit itself, or be ``VOC<year>`` itself."""
    data_dir = Path(data_dir)
    candidates = [data_dir / f"VOCdevkit{year}", data_dir / "VOCdevkit", data_dir]
    if data_dir.name == f"VOC{year}":
        candidates.append(data_dir.parent)
    for c in candidates:
        if (c / f"VOC{year}").is_dir():
            return c
    raise DataError(f"{data_dir}: no VOC{year} found (looked for "
                    + ", ".join(str(c / f"VOC{year}") for c in candidates) + ")")


GT_OUTSIDE_IMAGE = ("clip", "error", "keep")  # the choices of TRAIN.GT_OUTSIDE_IMAGE


def gt_outside_policy(cfg) -> str:
    """``TRAIN.GT_OUTSIDE_IMAGE``, checked."""
    policy = cfg.TRAIN.GT_OUTSIDE_IMAGE
    if policy not in GT_OUTSIDE_IMAGE:
        raise ConfigError(f"TRAIN.GT_OUTSIDE_IMAGE must be one of {', '.join(GT_OUTSIDE_IMAGE)}, "
                          f"got {policy!r}")
    return policy


def gt_boxes(objs: list[dict], xml, size: tuple[int, int] | None = None,
             outside: str = "keep") -> np.ndarray:
    """(G, 4) float64 0-based training boxes of the parsed XML objects ``objs`` (those kept for
    training) of the file ``xml``: ``- 1`` and floored, as the original's uint16 array.

    A box starting at 0 in the 1-based file is clamped to 0 with a warning (the original's uint16
    would wrap around). A box reaching past the image of ``size`` (width, height), 0-based
    ``x2 > W - 1`` or ``y2 > H - 1``, is handled by ``outside`` (``TRAIN.GT_OUTSIDE_IMAGE``):
    ``"clip"`` to the image, with one warning naming ``xml`` and each object (class and box as
    in the XML); ``"error"``: a ``DataError``; ``"keep"``: trained on as written (the original,
    and what ``size=None`` does). A box with no pixel in the image cannot be clipped: an error
    unless kept.
    """
    boxes = np.array([o["bbox"] for o in objs], dtype=np.float64).reshape(-1, 4) - 1
    if (boxes < 0).any():
        warnings.warn(f"{xml}: a box starts at 0 in 1-based coordinates; clamped to 0", stacklevel=3)
    boxes = np.floor(np.maximum(boxes, 0))
    if size is None or outside == "keep":
        return boxes
    width, height = size
    past = (boxes[:, 2] > width - 1) | (boxes[:, 3] > height - 1)
    if not past.any():
        return boxes
    beyond = (boxes[:, 0] > width - 1) | (boxes[:, 1] > height - 1)
    named = [f"object {o['name']!r} {tuple(o['bbox'])}" for o in objs]
    refused = beyond if outside == "clip" else past
    if refused.any():
        k = int(np.nonzero(refused)[0][0])
        if beyond[k]:
            raise DataError(f"{xml}: {named[k]} lies entirely outside its {width}x{height} image; "
                            "fix the annotation (TRAIN.GT_OUTSIDE_IMAGE 'keep' trains on it as "
                            "written, as the original)")
        raise DataError(f"{xml}: {named[k]} reaches outside its {width}x{height} image "
                        "(TRAIN.GT_OUTSIDE_IMAGE 'error'; 'clip' clips it to the image)")
    boxes[:, 2] = np.minimum(boxes[:, 2], width - 1)
    boxes[:, 3] = np.minimum(boxes[:, 3], height - 1)
    clipped = "; ".join(f"{named[k]} -> {tuple(int(v) for v in boxes[k] + 1)}"
                        for k in np.nonzero(past)[0])
    warnings.warn(f"{xml}: box(es) reaching outside the {width}x{height} image clipped to it "
                  f"(1-based, as the XML): {clipped}", stacklevel=3)
    return boxes


# -- the imdb ---------------------------------------------------------------------------------------
class PascalVOC(Imdb):
    """One VOC image set: ids, paths, annotations, proposals and the (unflipped) roidb
    (``Imdb``'s protocol; entries as ``imdb.py`` describes)."""

    def __init__(self, image_set: str, year: str, data_dir=None, proposals=None, cfg=None,
                 classes: Sequence[str] = VOC_CLASSES, use_diff: bool = False, cache_dir=None):
        self.cfg = cfg if cfg is not None else default_config()
        self.year, self.image_set = str(year), image_set
        self.name = f"voc_{self.year}_{image_set}"
        self.classes = tuple(classes)
        self.class_to_ind = {c: i for i, c in enumerate(self.classes)}
        self.use_diff = use_diff
        self.data_dir = Path(data_dir if data_dir is not None else self.cfg.DATA_DIR)
        self.devkit_path = resolve_devkit(self.data_dir, self.year)
        self.data_path = self.devkit_path / f"VOC{self.year}"
        self._proposals_arg = proposals
        self.cache_dir = cache_dir
        set_file = self.data_path / "ImageSets" / "Main" / f"{image_set}.txt"
        try:
            self.image_index = [ln.split()[0] for ln in set_file.read_text().splitlines() if ln.strip()]
        except FileNotFoundError:
            raise DataError(f"{set_file}: image set file not found") from None
        if not self.image_index:
            raise DataError(f"{set_file}: the image set is empty")
        self.image_set_file = set_file

    # paths -------------------------------------------------------------------------------------
    def image_path_at(self, i: int) -> str:
        return str(self.data_path / "JPEGImages" / f"{self.image_index[i]}.jpg")

    def annotation_path_at(self, i: int) -> Path:
        return self.data_path / "Annotations" / f"{self.image_index[i]}.xml"

    @cached_property
    def proposals_path(self) -> Path | None:
        return find_proposals(self.name, self.data_dir, self.devkit_path, self._proposals_arg)

    # annotations -------------------------------------------------------------------------------
    def annotations_at(self, i: int) -> list[dict]:
        """All objects of image i, difficult included (for evaluation), 1-based as in the XML."""
        return parse_voc_xml(self.annotation_path_at(i))

    def _gt_entry(self, i: int) -> dict:
        path = self.annotation_path_at(i)
        objs = [o for o in parse_voc_xml(path) if self.use_diff or not o["difficult"]]
        for o in objs:
            if o["name"] not in self.class_to_ind or o["name"] == self.classes[0]:
                raise DataError(f"{path}: class {o['name']!r} is not in the class list of {self.name}")
        policy = gt_outside_policy(self.cfg)
        size = None if policy == "keep" else tuple(self.image_sizes[i])
        boxes = gt_boxes(objs, path, size, policy)
        gt_classes = np.array([self.class_to_ind[o["name"]] for o in objs], dtype=np.int32)
        return dict(boxes=boxes, gt_classes=gt_classes)

    def gt_roidb(self) -> list[dict]:
        """Non-difficult gt per image: ``boxes`` (G, 4) float64 0-based, ``gt_classes`` (G,) int32,
        ``gt_overlaps`` (G, K) csr (1 at the class), ``flipped`` False."""
        out = []
        for i in range(self.num_images):
            e = self._gt_entry(i)
            n = e["boxes"].shape[0]
            e["gt_overlaps"] = overlaps_matrix(e["gt_classes"], np.ones(n, np.float32), self.num_classes)
            e["flipped"] = False
            out.append(e)
        return out

    def is_test_set(self) -> bool:
        return self.image_set == "test"

    def has_gt(self) -> bool:
        """The original ``selective_search_roidb``: a test set of a year other than 2007 has no
        public annotations, so its roidb is proposals only."""
        return self.year == "2007" or not self.is_test_set()

    # proposals -----------------------------------------------------------------------------------
    def proposal_boxes(self, i: int) -> np.ndarray:
        """(K, 4) float64 0-based proposals of image i, after dedup and the min-size filter."""
        return self._proposal_list[i]

    @cached_property
    def _proposal_list(self) -> list[np.ndarray]:
        path = self.proposals_path
        if path is None:
            raise DataError(f"no proposals for {self.name}: looked for selective_search_data/"
                            f"{self.name}.mat|.npz|.json in {self.data_dir}, {self.devkit_path} and "
                            f"{self.devkit_path.parent}; pass the file with --proposals")
        return load_proposals(path, self.image_index)

    # the roidb cache and evaluation ----------------------------------------------------------------
    def cache_inputs(self) -> tuple[dict, list]:
        """The description (name, classes, ``use_diff``, the proposals' min size,
        ``TRAIN.GT_OUTSIDE_IMAGE``, the devkit and proposals paths) and the files: image set, proposals, every annotation and image."""
        proposals = self.proposals_path
        description = dict(name=self.name, classes=list(self.classes), use_diff=self.use_diff,
                           min_size=MIN_SIZE, devkit=str(Path(self.devkit_path).resolve()),
                           proposals=str(proposals) if proposals else None,
                           gt_outside_image=gt_outside_policy(self.cfg))
        files = [self.image_set_file, *([proposals] if proposals else [])]
        for i in range(self.num_images):
            files += [self.annotation_path_at(i), self.image_path_at(i)]
        return description, files

    def evaluate_detections(self, all_boxes, output_dir) -> dict:
        """Devkit result files ``comp4_det_<image_set>_<class>.txt`` and their AP (VOC07 metric
        for years < 2010), see ``voc_eval.evaluate_detections``."""
        return voc_eval.evaluate_detections(self, all_boxes, output_dir)


def _from_name(match, data_dir, proposals, cfg, cache_dir) -> PascalVOC:
    return PascalVOC(match.group(2), match.group(1), data_dir=data_dir, proposals=proposals,
                     cfg=cfg, cache_dir=cache_dir)


register_dataset(r"voc_(\d{4})_([A-Za-z0-9_-]+)", _from_name, form="voc_<year>_<image_set>",
                 example="voc_2007_trainval")
