"""Object proposals: the Fast R-CNN selective-search ``.mat`` layout and a plain ``.npz``/``.json``.

``.mat`` (as distributed with Fast R-CNN, ``selective_search_data/<imdb>.mat``): key ``boxes``, a
cell array with one K×4 float matrix per image in image-set order, rows ``[y1 x1 y2 x2]`` 1-based.
``.npz``/``.json`` (ours): keyed by image id, rows ``[x1 y1 x2 y2]`` 0-based, our internal layout.

Every loader returns, per image, ``(K, 4)`` float64 ``[x1 y1 x2 y2]`` 0-based boxes after the
original's clean-up (``clean_proposals``): exact duplicates removed (first occurrence kept, file
order otherwise), then the small-box filter ``w = x2 - x1 >= 2 and h = y2 - y1 > 2`` (really
asymmetric and without +1, as ``ds_utils.filter_small_boxes`` with ``min_size`` 2).
Rows with NaN/inf or inverted corners are dropped with one warning per file that counts them.

Nothing in a proposals file can run code: ``.mat`` through ``scipy.io.loadmat`` (data only),
``.npz`` with ``allow_pickle=False``, ``.json``; pickled proposals (``.pkl``, as some of the
original's datasets used) are refused with a message.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.io

from readonly_ohem.errors import DataError

MIN_SIZE = 2  # the original pascal_voc config['min_size']
PICKLE_SUFFIXES = (".pkl", ".pickle", ".p")


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise DataError(f"{path}: pickled proposals are refused (loading a pickle can run any code "
                        "it names); convert them to .npz keyed by image id or the .mat layout")
PROPOSAL_EXTS = (".mat", ".npz", ".json")


def unique_boxes(boxes: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct box, in the original order: (K,).

    The original hashes ``round(box) . [1, 1e3, 1e6, 1e9]``; comparing rounded rows gives the same
    answer for every box with coordinates in [0, 1000) and no hash collisions elsewhere.
    """
    if boxes.shape[0] == 0:
        return np.zeros((0,), dtype=np.int64)
    _, index = np.unique(np.round(boxes), axis=0, return_index=True)
    return np.sort(index)


def filter_small_boxes(boxes: np.ndarray, min_size: int = MIN_SIZE) -> np.ndarray:
    """Indices of boxes with ``x2 - x1 >= min_size`` and ``y2 - y1 > min_size`` (the original)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return np.where((w >= min_size) & (h > min_size))[0]


def clean_proposals(boxes: np.ndarray, min_size: int = MIN_SIZE) -> tuple[np.ndarray, int]:
    """Drop invalid rows, duplicates and small boxes: (K, 4) 0-based -> ((K', 4) float64, #invalid).

    Invalid = any NaN/inf or x2 < x1 or y2 < y1 (the original would have crashed or kept garbage).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    valid = np.isfinite(boxes).all(axis=1) & (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
    n_bad = int((~valid).sum())
    boxes = boxes[valid]
    boxes = boxes[unique_boxes(boxes)]
    boxes = boxes[filter_small_boxes(boxes, min_size)]
    return np.ascontiguousarray(boxes), n_bad


def _as_box_array(a, path, what) -> np.ndarray:
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {what} is not a numeric box array") from None
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise DataError(f"{path}: {what} has shape {arr.shape}, expected (K, 4)")
    return arr


def read_mat_boxes(path: str | Path) -> list[np.ndarray]:
    """The raw ``boxes`` cell of a Fast R-CNN proposals ``.mat``: per image (K, 4) [y1 x1 y2 x2] 1-based."""
    path = Path(path)
    try:
        mat = scipy.io.loadmat(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: proposals file not found") from None
    except Exception as e:  # scipy raises assorted errors on corrupt files
        raise DataError(f"{path}: cannot read proposals .mat ({e})") from None
    if "boxes" not in mat:
        raise DataError(f"{path}: no 'boxes' variable (keys: {sorted(k for k in mat if not k.startswith('__'))})")
    cell = mat["boxes"]
    if cell.dtype != object:
        raise DataError(f"{path}: 'boxes' must be a cell array with one matrix per image")
    cell = cell.ravel()
    return [_as_box_array(cell[i], path, f"boxes{{{i + 1}}}") for i in range(cell.shape[0])]


def load_proposals(path: str | Path, image_ids: Sequence[str], min_size: int = MIN_SIZE) -> list[np.ndarray]:
    """Proposals for ``image_ids`` (image-set order): list of (K, 4) float64 0-based, cleaned.

    ``.mat``: one matrix per image in image-set order (count must match). ``.npz``/``.json``:
    keyed by image id, rows already [x1 y1 x2 y2] 0-based.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    _refuse_pickle(path)
    if suffix == ".mat":
        raw = read_mat_boxes(path)
        if len(raw) != len(image_ids):
            raise DataError(f"{path}: holds proposals for {len(raw)} images, but the image set has "
                            f"{len(image_ids)} (the cell must follow the image-set order)")
        raw = [r[:, (1, 0, 3, 2)] - 1 for r in raw]
    elif suffix in (".npz", ".json"):
        table = read_keyed(path)
        missing = [i for i in image_ids if i not in table]
        if missing:
            raise DataError(f"{path}: no proposals for {len(missing)} image(s) of the image set, "
                            f"e.g. {missing[:3]}")
        raw = [_as_box_array(table[i], path, f"proposals of image {i!r}") for i in image_ids]
    else:
        raise DataError(f"{path}: unknown proposals format (expected .mat, .npz or .json)")

    out, n_bad, n_imgs_bad = [], 0, 0
    for image_id, boxes in zip(image_ids, raw):
        clean, bad = clean_proposals(boxes, min_size)
        n_bad += bad
        n_imgs_bad += bad > 0
        if clean.shape[0] == 0:
            raise DataError(f"{path}: image {image_id!r} has no proposals (none left after removing "
                            f"invalid, duplicate and boxes smaller than {min_size} px)")
        out.append(clean)
    if n_bad:
        warnings.warn(f"{path}: dropped {n_bad} proposal(s) with NaN/inf or inverted corners "
                      f"in {n_imgs_bad} image(s)", stacklevel=2)
    return out


def read_keyed(path: Path) -> dict:
    """A ``.npz`` or ``.json`` proposals file as a dict: image id (or ``boxes``) -> rows."""
    _refuse_pickle(path)
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:  # an object (pickled) array raises
                return {k: z[k] for k in z.files}
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: proposals file not found") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read proposals ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a .json proposals file must map image id -> [[x1, y1, x2, y2], ...]")
    return data


def load_image_proposals(path: Path, image_id: str) -> np.ndarray:
    """(K, 4) 0-based cleaned proposals of one image from .npz/.json (by id or ``boxes``) or .mat."""
    if not path.is_file():
        raise DataError(f"--proposals {path}: file not found")
    if path.suffix.lower() == ".mat":
        raw = read_mat_boxes(path)
        if len(raw) != 1:
            raise DataError(f"{path}: holds proposals for {len(raw)} images; give a one-image file "
                            f"or a .npz keyed by image id")
        boxes = raw[0][:, (1, 0, 3, 2)] - 1
    else:
        table = read_keyed(path)
        key = image_id if image_id in table else ("boxes" if "boxes" in table else None)
        if key is None:
            raise DataError(f"{path}: no proposals for image {image_id!r} (keys: {sorted(table)[:5]})")
        boxes = np.asarray(table[key], dtype=np.float64).reshape(-1, 4)
    boxes, _ = clean_proposals(boxes)
    if boxes.shape[0] == 0:
        raise DataError(f"{path}: no usable proposals for image {image_id!r}")
    return boxes


def save_proposals_mat(path: str | Path, boxes_per_image: Sequence[np.ndarray]) -> None:
    """Write 0-based [x1 y1 x2 y2] boxes in the Fast R-CNN ``.mat`` layout ([y1 x1 y2 x2] 1-based)."""
    cell = np.empty((1, len(boxes_per_image)), dtype=object)
    for i, b in enumerate(boxes_per_image):
        b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
        cell[0, i] = b[:, (1, 0, 3, 2)] + 1
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"boxes": cell}, do_compression=True)


def save_proposals_npz(path: str | Path, image_ids: Sequence[str], boxes_per_image: Sequence[np.ndarray]) -> None:
    """Write our keyed form: image id -> (K, 4) float64 [x1 y1 x2 y2] 0-based."""
    np.savez_compressed(path, **{i: np.asarray(b, dtype=np.float64).reshape(-1, 4)
                                 for i, b in zip(image_ids, boxes_per_image)})


def find_proposals(name: str, data_dir: Path, devkit: Path, proposals=None) -> Path | None:
    """Where the proposals of imdb ``name`` are: an explicit file, a directory holding
    ``<name>.mat|.npz|.json``, a dict ``{name: path}``, or (None) the original layout
    ``<data_dir>/selective_search_data/<name>.mat`` (also beside or inside ``devkit``, the
    dataset's own folder: VOCdevkit, or coco/)."""
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
