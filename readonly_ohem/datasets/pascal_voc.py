"""PASCAL VOC image databases (imdb): the VOCdevkit reader of the original ``datasets/pascal_voc.py``.

Layout: ``VOCdevkit/VOC<year>/{Annotations/<id>.xml, ImageSets/Main/<set>.txt, JPEGImages/<id>.jpg}``.
XML boxes are 1-based; the roidb holds them 0-based (``- 1``, truncated to integers as the
original's uint16 array). Difficult objects are left out of training (``use_diff`` False) and kept,
flagged, by ``annotations_at`` for evaluation. The class list belongs to the dataset.

``get_imdb("voc_2007_trainval", data_dir)``; ``"voc_2007_trainval+voc_2012_trainval"`` gives a
``CombinedImdb`` whose parts are flipped separately and concatenated, as ``train_net.py`` does.
"""

from __future__ import annotations

import re
import warnings
import xml.etree.ElementTree as ET
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from readonly_ohem.errors import DataError

VOC_CLASSES = ("__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")

PROPOSAL_EXTS = (".mat", ".npz", ".json")


# -- annotations ---------------------------------------------------------------------------------
def _num(text: str | None, path, what):
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {what} is {text!r}, not a number") from None
    return int(v) if v.is_integer() else v


def parse_voc_xml(path: str | Path) -> list[dict]:
    """Objects of one VOC annotation file, in file order.

    Returns ``[{name, bbox: (xmin, ymin, xmax, ymax) as in the XML (1-based), difficult: bool,
    truncated: bool}]``; ``name`` lower-cased and stripped as the original. A missing
    ``difficult``/``truncated`` tag counts as 0 (VOC2012 omits some).
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except ET.ParseError as e:
        raise DataError(f"{path}: malformed XML ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read annotation ({e.strerror})") from None
    objs = []
    for k, obj in enumerate(root.iter("object")):
        name = obj.findtext("name")
        box = obj.find("bndbox")
        if name is None or box is None:
            raise DataError(f"{path}: object {k + 1} lacks <name> or <bndbox>")
        bbox = tuple(_num(box.findtext(t), path, f"object {k + 1} <{t}>")
                     for t in ("xmin", "ymin", "xmax", "ymax"))
        if bbox[2] < bbox[0] or bbox[3] < bbox[1]:
            raise DataError(f"{path}: object {k + 1} ({name.strip()}) has an inverted box {bbox}")
        objs.append(dict(
            name=name.lower().strip(),
            bbox=bbox,
            difficult=bool(int(_num(obj.findtext("difficult") or "0", path, f"object {k + 1} <difficult>"))),
            truncated=bool(int(_num(obj.findtext("truncated") or "0", path, f"object {k + 1} <truncated>"))),
        ))
    return objs


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


def find_proposals(name: str, data_dir: Path, devkit: Path, proposals=None) -> Path | None:
    """Where the proposals of imdb ``name`` are: an explicit file, a directory holding
    ``<name>.mat|.npz|.json``, a dict ``{name: path}``, or (None) the original layout
    ``<data_dir>/selective_search_data/<name>.mat`` (also beside or inside the devkit)."""
    if isinstance(proposals, dict):
        proposals = proposals.get(name)
    if proposals is not None:
        p = Path(proposals)
        if p.is_dir():
            for ext in PROPOSAL_EXTS:
                if (p / f"{name}{ext}").is_file():
                    return p / f"{name}{ext}"
            raise DataError(f"{p}: no {name}.mat/.npz/.json proposals in this directory")
        return p
    for d in (data_dir, devkit, devkit.parent):
        for ext in PROPOSAL_EXTS:
            f = d / "selective_search_data" / f"{name}{ext}"
            if f.is_file():
                return f
    return None


# -- the imdb ---------------------------------------------------------------------------------------
class PascalVOC:
    """One VOC image set: ids, paths, annotations, proposals and the (unflipped) roidb.

    roidb entry (dict): ``boxes`` (N, 4) float64 0-based, gt rows first then proposals;
    ``gt_classes`` (N,) int32 (0 for proposals); ``gt_overlaps`` (N, K) scipy csr float32;
    ``flipped``; ``image`` (path); ``image_id``; ``width``; ``height``.
    """

    def __init__(self, image_set: str, year: str, data_dir=None, proposals=None, cfg=None,
                 classes: Sequence[str] = VOC_CLASSES, use_diff: bool = False, cache_dir=None):
        from readonly_ohem.config import default_config

        self.cfg = cfg if cfg is not None else default_config()
        self.year, self.image_set = str(year), image_set
        self.name = f"voc_{self.year}_{image_set}"
        self.classes = tuple(classes)
        self.num_classes = len(self.classes)
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
    @property
    def num_images(self) -> int:
        return len(self.image_index)

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
        boxes = np.array([o["bbox"] for o in objs], dtype=np.float64).reshape(-1, 4) - 1
        if (boxes < 0).any():  # xmin 0 in a 1-based file: the original's uint16 would wrap around
            warnings.warn(f"{path}: a box starts at 0 in 1-based coordinates; clamped to 0", stacklevel=3)
            boxes = np.maximum(boxes, 0)
        boxes = np.floor(boxes)  # the original stores gt boxes in a uint16 array
        gt_classes = np.array([self.class_to_ind[o["name"]] for o in objs], dtype=np.int32)
        return dict(boxes=boxes, gt_classes=gt_classes)

    def gt_roidb(self) -> list[dict]:
        """Non-difficult gt per image: ``boxes`` (G, 4) float64 0-based, ``gt_classes`` (G,) int32,
        ``gt_overlaps`` (G, K) csr (1 at the class), ``flipped`` False."""
        from readonly_ohem.roi_data.roidb import overlaps_matrix

        out = []
        for i in range(self.num_images):
            e = self._gt_entry(i)
            n = e["boxes"].shape[0]
            e["gt_overlaps"] = overlaps_matrix(e["gt_classes"], np.ones(n, np.float32), self.num_classes)
            e["flipped"] = False
            out.append(e)
        return out

    def proposal_boxes(self, i: int) -> np.ndarray:
        """(K, 4) float64 0-based proposals of image i, after dedup and the min-size filter."""
        return self._proposal_list[i]

    @cached_property
    def _proposal_list(self) -> list[np.ndarray]:
        from readonly_ohem.datasets.proposals import load_proposals

        path = self.proposals_path
        if path is None:
            raise DataError(f"no proposals for {self.name}: looked for selective_search_data/"
                            f"{self.name}.mat|.npz|.json in {self.data_dir}, {self.devkit_path} and "
                            f"{self.devkit_path.parent}; pass the file with --proposals")
        return load_proposals(path, self.image_index)

    # sizes and the roidb ---------------------------------------------------------------------------
    @cached_property
    def image_sizes(self) -> np.ndarray:
        """(N, 2) int64 (width, height), read from the JPEG headers."""
        from readonly_ohem.roi_data.blob import image_size

        return np.array([image_size(self.image_path_at(i)) for i in range(self.num_images)],
                        dtype=np.int64).reshape(-1, 2)

    def is_test_set(self) -> bool:
        return self.image_set == "test"

    @cached_property
    def roidb(self) -> list[dict]:
        """The original ``selective_search_roidb``: gt rows then proposals with their overlaps; for a
        test set of a year other than 2007 (no public annotations) proposals only."""
        from readonly_ohem.roi_data.roidb import build_imdb_roidb

        return build_imdb_roidb(self)


class CombinedImdb:
    """``a+b``: the parts in order; ``roidb`` concatenates theirs (training flips each part)."""

    def __init__(self, parts: Sequence[PascalVOC]):
        self.parts = list(parts)
        self.name = "+".join(p.name for p in self.parts)
        self.classes = self.parts[0].classes
        for p in self.parts[1:]:
            if p.classes != self.classes:
                raise DataError(f"{self.name}: {p.name} has a different class list from {self.parts[0].name}")
        self.num_classes = len(self.classes)
        self._where = [(k, i) for k, p in enumerate(self.parts) for i in range(p.num_images)]
        self.image_index = [p.image_index[i] for p in self.parts for i in range(p.num_images)]

    @property
    def num_images(self) -> int:
        return len(self._where)

    def _at(self, name, i):
        k, j = self._where[i]
        return getattr(self.parts[k], name)(j)

    def image_path_at(self, i):
        return self._at("image_path_at", i)

    def annotations_at(self, i):
        return self._at("annotations_at", i)

    def proposal_boxes(self, i):
        return self._at("proposal_boxes", i)

    def gt_roidb(self):
        return [e for p in self.parts for e in p.gt_roidb()]

    @property
    def roidb(self):
        return [e for p in self.parts for e in p.roidb]


_NAME = re.compile(r"^voc_(\d{4})_([A-Za-z0-9_-]+)$")


def get_imdb(name: str, data_dir=None, proposals=None, cfg=None, cache_dir=None):
    """An imdb by the original's name (``voc_2007_trainval``, ``voc_2007_test``, ``a+b``).

    ``proposals``: a file (single imdb), a directory with ``<name>.mat|.npz|.json``, a dict
    name -> file, or None for ``<data_dir>/selective_search_data/<name>.mat``.
    ``cache_dir``: where the built roidb is cached (None: ``~/.cache/readonly_ohem`` or
    ``$READONLY_OHEM_CACHE``; False: no cache).
    """
    names = name.split("+")
    if len(names) > 1 and proposals is not None and not isinstance(proposals, dict) \
            and not Path(proposals).is_dir():
        raise DataError(f"{name}: one proposals file cannot serve several image sets; "
                        f"give a directory holding <imdb>.mat files")
    parts = []
    for n in names:
        m = _NAME.match(n.strip())
        if not m:
            raise DataError(f"unknown imdb {n!r} (expected voc_<year>_<image_set>, e.g. voc_2007_trainval)")
        parts.append(PascalVOC(m.group(2), m.group(1), data_dir=data_dir, proposals=proposals,
                               cfg=cfg, cache_dir=cache_dir))
    return parts[0] if len(parts) == 1 else CombinedImdb(parts)
