"""COCO-format image databases (imdb): an ``instances`` json and its images, read as the original
``datasets/coco.py`` (py-faster-rcnn's, shipped unchanged with the OHEM code) reads them, with
plain ``json`` (pycocotools is needed to evaluate only: ``coco_eval``).

Two forms in the factory:

- ``coco_<year>_<split>`` (``coco_2014_train``, ``coco_2014_minival``, ``coco_2017_val``,
  ``coco_2015_test-dev``): in ``DIR/coco`` or ``DIR`` (``--data DIR``, default ``cfg.DATA_DIR``),
  ``annotations/instances_<split><year>.json`` (or ``image_info_`` for a test split) and the images in
  ``images/<split><year>/`` or ``<split><year>/`` (minival and valminusminival 2014 read
  val2014's, test-dev test's, as the original's view map);
- ``coco:PATH/instances.json``: any COCO-format json, its images under ``--images DIR`` (an
  alias of ``--data``; default: the json's folder).

Categories: the json's, in its order, are classes 1..K (``category_ids[k - 1]`` is class k's json
id; results go back to json ids). Images: the json's order; ``image_index`` holds their ids as
strings, ``image_ids`` as the json has them. Ground truth: every annotation with ``area > 0``
whose box is not empty once clipped, 0-based inclusive as the original: x1 = max(0, x),
x2 = min(W - 1, x1 + max(0, w - 1)) (y alike), floored (its uint16 array). ``iscrowd`` ones are
crowd rows (``is_crowd``): excluded from training with the proposals more than ``crowd_thresh``
(0.7) inside them (``imdb.merge_gt_and_proposals``), and left to pycocotools at evaluation.
Proposals: ``--proposals`` (``.mat`` in image order, ``.npz``/``.json`` keyed by image id: see
``proposals.py``) or ``selective_search_data/<name>.mat|.npz|.json``; duplicates and small boxes
removed, then the first ``top_k`` (2000) kept, as the original's COCO proposals.

Detections become a results json (``detections_<split><year>_results.json``; kept, where the
original deletes it unless in competition mode): per box ``{"image_id", "category_id"``
(the json's ids), ``"bbox": [x1, y1, x2 - x1 + 1, y2 - y1 + 1], "score"}``, the original's
conversion of 0-based inclusive corners to COCO's ``[x, y, w, h]``; evaluated by pycocotools.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

import numpy as np

from readonly_ohem.atomic import atomic_write
from readonly_ohem.config import default_config
from readonly_ohem.datasets import coco_eval
from readonly_ohem.datasets.factory import register_dataset
from readonly_ohem.datasets.imdb import CROWD_THRESH, Imdb, overlaps_matrix
from readonly_ohem.datasets.proposals import MIN_SIZE, find_proposals, load_proposals
from readonly_ohem.errors import DataError, OhemError

TOP_K = 2000  # the original COCO imdb's config['top_k']: proposals kept per image
# image sets that are views of another's images (the original's _view_map, and test-dev's)
VIEWS = {"minival2014": "val2014", "valminusminival2014": "val2014",
         "test-dev2015": "test2015", "test-dev2017": "test2017"}


# -- the json --------------------------------------------------------------------------------------
def read_coco_json(path: Path) -> dict:
    """The json of a COCO-format annotation (or image-info) file, its structure checked."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read COCO json ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise DataError(f"{path}: not a COCO json (needs 'images' and 'categories' lists)")
    for what, keys in (("images", ("id", "file_name", "width", "height")),
                       ("categories", ("id", "name")),
                       ("annotations", ("id", "image_id", "category_id", "bbox", "area"))):
        for k, item in enumerate(data.get(what, [])):
            missing = [key for key in keys if not isinstance(item, dict) or key not in item]
            if missing:
                raise DataError(f"{path}: {what}[{k}] lacks {', '.join(repr(m) for m in missing)}")
    return data


def clean_box(bbox, width: int, height: int, where: str):
    """COCO ``[x, y, w, h]`` -> 0-based inclusive ``[x1, y1, x2, y2]`` clipped to the image, as the
    original (x2 = min(W - 1, x1 + max(0, w - 1))), or None where that leaves no box."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise DataError(f"{where}: bbox {bbox!r} is not [x, y, w, h]") from None
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1))
    return (x1, y1, x2, y2) if x2 >= x1 and y2 >= y1 else None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)


# -- the imdb ---------------------------------------------------------------------------------------
class COCODataset(Imdb):
    """One COCO-format image set: the json's images and categories, crowd-aware gt, proposals,
    the results json and pycocotools' evaluation (``Imdb``'s protocol)."""

    def __init__(self, ann_file, image_dir, name: str, results_tag: str | None = None,
                 data_dir=None, root=None, proposals=None, cache_dir=None, top_k: int = TOP_K,
                 crowd_thresh: float = CROWD_THRESH):
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.name = name
        self.results_tag = results_tag or _safe(self.ann_file.stem)
        self.cache_dir = cache_dir
        self.top_k, self.crowd_thresh = int(top_k), float(crowd_thresh)
        self._proposals_arg = proposals
        self._search = (Path(data_dir) if data_dir is not None else self.ann_file.parent,
                        Path(root) if root is not None else self.ann_file.parent.parent)
        data = read_coco_json(self.ann_file)
        cats = data["categories"]
        self.category_ids = [c["id"] for c in cats]
        self._cat_to_class = {c: k + 1 for k, c in enumerate(self.category_ids)}
        self.classes = ("__background__", *(str(c["name"]) for c in cats))
        if len(set(self.classes)) != len(self.classes) or len(set(self.category_ids)) != len(cats):
            raise DataError(f"{self.ann_file}: two categories share a name or an id")
        self.images = data["images"]
        if not self.images:
            raise DataError(f"{self.ann_file}: the json lists no images")
        self.image_ids = [im["id"] for im in self.images]
        self.image_index = [str(i) for i in self.image_ids]
        if len(set(self.image_index)) != len(self.image_index):
            raise DataError(f"{self.ann_file}: two images share an id")
        self._has_gt = "annotations" in data
        self._annotations = {i: [] for i in self.image_index}
        for ann in data.get("annotations", []):
            key = str(ann["image_id"])
            if key not in self._annotations:
                raise DataError(f"{self.ann_file}: annotation {ann['id']}: image_id {ann['image_id']!r} "
                                f"is not among the images")
            self._annotations[key].append(ann)
        first = self.image_path_at(0)
        if not Path(first).is_file():
            raise DataError(f"{first}: image file not found (the images of {self.ann_file} belong "
                            f"in {self.image_dir}; give their folder with --images DIR)")

    # paths -----------------------------------------------------------------------------------------
    def image_path_at(self, i: int) -> str:
        return str(self.image_dir / self.images[i]["file_name"])

    @cached_property
    def image_sizes(self) -> np.ndarray:
        """(N, 2) int64 (width, height) from the json, as the original (flipping uses them)."""
        return np.array([[im["width"], im["height"]] for im in self.images], dtype=np.int64).reshape(-1, 2)

    @cached_property
    def proposals_path(self) -> Path | None:
        return find_proposals(self.name, *self._search, self._proposals_arg)

    # annotations -------------------------------------------------------------------------------
    def has_gt(self) -> bool:
        """Whether the json has annotations (an ``image_info`` file of a test split has none)."""
        return self._has_gt

    def _gt_entry(self, i: int) -> dict:
        w, h = (int(v) for v in self.image_sizes[i])
        cat_to_class = self._cat_to_class
        boxes, classes, crowd = [], [], []
        for ann in self._annotations[self.image_index[i]]:
            where = f"{self.ann_file}: annotation {ann['id']} (image {self.image_ids[i]!r})"
            if ann["category_id"] not in cat_to_class:
                raise DataError(f"{where}: category_id {ann['category_id']!r} is not among the categories")
            box = clean_box(ann["bbox"], w, h, where)
            try:
                area = float(ann["area"])
            except (TypeError, ValueError):
                raise DataError(f"{where}: area {ann['area']!r} is not a number") from None
            if box is None or not area > 0:
                continue  # the original's sanitizing: degenerate boxes are dropped
            boxes.append(box)
            classes.append(cat_to_class[ann["category_id"]])
            crowd.append(bool(ann.get("iscrowd", 0)))
        boxes = np.floor(np.array(boxes, dtype=np.float64).reshape(-1, 4))
        classes = np.array(classes, dtype=np.int32)
        crowd = np.array(crowd, dtype=bool)
        return dict(boxes=boxes, gt_classes=classes, is_crowd=crowd, flipped=False,
                    gt_overlaps=overlaps_matrix(classes, np.ones(len(classes), np.float32),
                                                self.num_classes, crowd))

    def gt_roidb(self) -> list[dict]:
        """Per image: ``boxes`` (G, 4) float64 0-based, ``gt_classes`` (G,) int32, ``is_crowd``
        (G,) bool, ``gt_overlaps`` (G, K) csr (1 at the class; -1 everywhere on crowd rows),
        ``flipped`` False. Crowd boxes are kept, as the original, so that the proposals inside
        them can be excluded."""
        return [self._gt_entry(i) for i in range(self.num_images)]

    # proposals -----------------------------------------------------------------------------------
    def proposal_boxes(self, i: int) -> np.ndarray:
        """(P, 4) float64 0-based proposals of image i, cleaned, at most ``top_k``."""
        return self._proposal_list[i]

    @cached_property
    def _proposal_list(self) -> list[np.ndarray]:
        path = self.proposals_path
        if path is None:
            data_dir, root = self._search
            where = ", ".join(str(d) for d in (data_dir, root, root.parent))
            raise DataError(f"no proposals for {self.name}: looked for selective_search_data/"
                            f"{self.name}.mat|.npz|.json in {where}; pass the file with --proposals")
        return [b[:self.top_k] for b in load_proposals(path, self.image_index)]

    # the roidb cache ------------------------------------------------------------------------------
    def cache_inputs(self) -> tuple[dict, list]:
        """The description (name, classes, json ids, crowd threshold, top_k, min size, the json,
        image folder and proposals paths) and the files: the json and the proposals (image sizes
        come from the json, so the images themselves do not matter)."""
        proposals = self.proposals_path
        description = dict(name=self.name, classes=list(self.classes),
                           category_ids=self.category_ids, crowd_thresh=self.crowd_thresh,
                           top_k=self.top_k, min_size=MIN_SIZE,
                           annotations=str(self.ann_file.resolve()),
                           images=str(self.image_dir.resolve()),
                           proposals=str(proposals) if proposals else None)
        return description, [self.ann_file, *([proposals] if proposals else [])]

    # results and evaluation -------------------------------------------------------------------------
    def coco_results(self, all_boxes) -> list[dict]:
        """``all_boxes[class][image]`` ((D, 5) float32 0-based ``[x1, y1, x2, y2, score]``) as COCO
        results, class by class then image by image, as the original's
        ``_write_coco_results_file``: ``bbox`` ``[x1, y1, x2 - x1 + 1, y2 - y1 + 1]`` computed in
        float64."""
        results = []
        for j in range(1, self.num_classes):
            cat_id = self.category_ids[j - 1]
            for i, image_id in enumerate(self.image_ids):
                dets = all_boxes[j][i]
                if dets is None or len(dets) == 0:
                    continue
                d = np.asarray(dets).astype(np.float64)
                xs, ys = d[:, 0], d[:, 1]
                bbox = np.stack([xs, ys, d[:, 2] - xs + 1, d[:, 3] - ys + 1], axis=1).tolist()
                results += [{"image_id": image_id, "category_id": cat_id, "bbox": b, "score": s}
                            for b, s in zip(bbox, d[:, -1].tolist())]
        return results

    def evaluate_detections(self, all_boxes, output_dir) -> dict:
        """Write ``detections_<tag>_results.json`` into ``output_dir`` and evaluate it with
        pycocotools (``coco_eval.evaluate_coco``): ``eval`` holds ``mAP`` (AP@[.50:.95]), ``AP50``,
        ``AP75``, the 12 ``stats`` and per-class APs; None for a set without annotations or
        without pycocotools (the report says which)."""
        if not isinstance(self, COCODataset):  # a CombinedImdb of COCO sets: one json per set
            raise DataError(f"{self.name}: COCO sets are evaluated one at a time (test each set)")
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / f"detections_{self.results_tag}_results.json"
        with atomic_write(path, "w") as f:
            json.dump(self.coco_results(all_boxes), f)
        out = {"eval": None, "result_files": {c: path for c in self.classes[1:]},
               "results_at": str(path)}
        if not self.has_gt():
            return {**out, "report": f"not evaluated: {self.ann_file} has no annotations"}
        try:
            coco_eval.pycocotools()
        except OhemError as e:  # the results file is written: evaluate it later with `eval --coco`
            return {**out, "report": f"not evaluated: {e}"}
        result = coco_eval.evaluate_coco(self.ann_file, path)
        return {**out, "eval": result, "report": coco_eval.format_coco_report(result)}


# -- the factory's two forms -------------------------------------------------------------------------
def resolve_coco(data_dir: Path, year: str, split: str) -> tuple[Path, Path, Path]:
    """``(root, annotation json, image folder)`` of ``coco_<year>_<split>`` under ``data_dir``
    (``data_dir/coco`` or ``data_dir`` itself); a test split without ``instances_`` annotations
    reads its ``image_info_`` file."""
    image_set = f"{split}{year}"
    folder = VIEWS.get(image_set, image_set)
    prefixes = ("instances", "image_info") if "test" in split else ("instances",)
    candidates = [root / "annotations" / f"{prefix}_{image_set}.json"
                  for root in (data_dir / "coco", data_dir) for prefix in prefixes]
    for ann in candidates:
        if ann.is_file():
            root = ann.parent.parent
            for d in (root / "images" / folder, root / folder):
                if d.is_dir():
                    return root, ann, d
            raise DataError(f"{ann}: no image folder {root / 'images' / folder} or {root / folder}")
    raise DataError(f"{data_dir}: no COCO annotations for coco_{year}_{split} (looked for "
                    + ", ".join(str(c) for c in candidates) + ")")


def _from_name(match, data_dir, proposals, cfg, cache_dir) -> COCODataset:
    year, split = match.group(1), match.group(2)
    cfg = cfg if cfg is not None else default_config()
    data_dir = Path(data_dir if data_dir is not None else cfg.DATA_DIR)
    root, ann, images = resolve_coco(data_dir, year, split)
    return COCODataset(ann, images, f"coco_{year}_{split}", results_tag=f"{split}{year}",
                       data_dir=data_dir, root=root, proposals=proposals, cache_dir=cache_dir)


def _from_file(match, data_dir, proposals, cfg, cache_dir) -> COCODataset:
    ann = Path(match.group(1))
    images = Path(data_dir) if data_dir is not None else ann.parent
    return COCODataset(ann, images, f"coco_{_safe(ann.stem)}", proposals=proposals,
                       cache_dir=cache_dir)


register_dataset(r"coco_(\d{4})_([A-Za-z0-9_-]+)", _from_name, form="coco_<year>_<split>",
                 example="coco_2014_train")
register_dataset(r"coco:(.+)", _from_file, form="coco:<instances.json>",
                 example="coco:annotations/instances_val2017.json")
