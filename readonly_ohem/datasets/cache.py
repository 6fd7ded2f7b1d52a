"""Disk cache of an imdb's roidb (gt + proposals, before flipping): npz + json, never pickle.

Stored under ``imdb.cache_dir`` (None: ``$READONLY_OHEM_CACHE`` or ``~/.cache/readonly_ohem``;
False: no cache), one file pair ``<name>_<tag>_roidb.{npz,json}`` per imdb, ``tag`` a hash of the
imdb's own description (so two datasets of one name do not share a file). Keyed through the imdb
protocol only: ``imdb.cache_inputs()`` gives ``(description, files)``, a JSON-able description of
everything the roidb depends on besides files (name, classes, options, where the data is) and
the files whose (mtime, size) matter; the key hashes both with a format version. A stale cache
is ignored; an unreadable or malformed one too, with a warning naming the file (it is rebuilt).
Nothing in it can run code: ``np.load(allow_pickle=False)`` and ``json`` only. Written atomically.

The npz holds the entries concatenated: ``boxes`` (R, 4) float64, ``gt_classes`` (R,) int32 and
the stacked ``gt_overlaps`` as csr arrays (``overlaps_data``, ``overlaps_indices``,
``overlaps_indptr``); the json the key, the rows per image and the (width, height) per image.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse

from readonly_ohem.atomic import atomic_write

VERSION = 2


def _stat(p) -> list:
    try:
        st = os.stat(p)
        return [st.st_mtime_ns, st.st_size]
    except OSError:
        return [None, None]


def _description_json(description: dict) -> str:
    return json.dumps(dict(version=VERSION, description=description), sort_keys=True)


def cache_key(inputs: tuple[dict, list]) -> str:
    """sha1 of the format version and ``imdb.cache_inputs()``: its description and its files'
    (path, mtime, size)."""
    description, files = inputs
    h = hashlib.sha1(_description_json(description).encode())
    for f in files:
        h.update(json.dumps([str(f), *_stat(f)]).encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$READONLY_OHEM_CACHE`` or ``~/.cache/readonly_ohem`` (never inside the dataset)."""
    env = os.environ.get("READONLY_OHEM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "readonly_ohem"


def _paths(imdb, description: dict):
    d = Path(imdb.cache_dir) if imdb.cache_dir else default_cache_dir()
    tag = hashlib.sha1(_description_json(description).encode()).hexdigest()[:10]
    stem = f"{imdb.name}_{tag}_roidb"
    return d / f"{stem}.npz", d / f"{stem}.json"


def _read(imdb, inputs, npz_path: Path, json_path: Path):
    """(meta, arrays) of a cache whose key matches, None when stale; ``ValueError`` naming what
    is wrong when it cannot be used."""
    try:
        meta = json.loads(json_path.read_text())
    except ValueError as e:
        raise ValueError(f"{json_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("key") != cache_key(inputs):
        return None
    with np.load(npz_path, allow_pickle=False) as z:  # never unpickles: an object array raises
        arrays = {k: z[k] for k in ("boxes", "gt_classes", "overlaps_data", "overlaps_indices",
                                    "overlaps_indptr")}
    counts = np.asarray(meta["counts"], dtype=np.int64)
    n = imdb.num_images
    rows = arrays["boxes"].shape[0]
    if (counts.shape != (n,) or len(meta["sizes"]) != n or int(counts.sum()) != rows
            or arrays["boxes"].shape != (rows, 4) or arrays["overlaps_indptr"].shape != (rows + 1,)):
        raise ValueError(f"{npz_path}: rows, counts and image sizes do not agree")
    return meta, arrays


def load(imdb):
    """The cached roidb of ``imdb`` if the key matches, else None."""
    if imdb.cache_dir is False:
        return None
    inputs = imdb.cache_inputs()
    npz_path, json_path = _paths(imdb, inputs[0])
    if not npz_path.is_file() or not json_path.is_file():
        return None
    try:
        found = _read(imdb, inputs, npz_path, json_path)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        warnings.warn(f"{npz_path}: ignoring the roidb cache, it cannot be used ({e}); rebuilding it",
                      stacklevel=2)
        return None
    if found is None:
        return None
    meta, z = found
    boxes, gt_classes = z["boxes"], z["gt_classes"]
    data, indices, indptr = z["overlaps_data"], z["overlaps_indices"], z["overlaps_indptr"]
    counts = np.asarray(meta["counts"], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    roidb = []
    for i in range(imdb.num_images):
        a, b = starts[i], starts[i + 1]
        p, q = indptr[a], indptr[b]
        overlaps = scipy.sparse.csr_matrix((data[p:q].copy(), indices[p:q].copy(), indptr[a:b + 1] - p),
                                           shape=(int(b - a), imdb.num_classes))
        roidb.append(dict(boxes=boxes[a:b].copy(), gt_classes=gt_classes[a:b].copy(),
                          gt_overlaps=overlaps, flipped=False, image=imdb.image_path_at(i),
                          image_id=imdb.image_index[i],
                          width=int(meta["sizes"][i][0]), height=int(meta["sizes"][i][1])))
    return roidb


def save(imdb, roidb) -> None:
    """Write the cache; silently does nothing where the directory is not writable."""
    if imdb.cache_dir is False:
        return
    inputs = imdb.cache_inputs()
    npz_path, json_path = _paths(imdb, inputs[0])
    overlaps = scipy.sparse.vstack([e["gt_overlaps"] for e in roidb], format="csr", dtype=np.float32)
    try:
        npz_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(npz_path) as f:
            np.savez(f, boxes=np.concatenate([e["boxes"] for e in roidb]).reshape(-1, 4),
                     gt_classes=np.concatenate([e["gt_classes"] for e in roidb]).astype(np.int32),
                     overlaps_data=overlaps.data, overlaps_indices=overlaps.indices,
                     overlaps_indptr=overlaps.indptr)
        with atomic_write(json_path, "w") as f:
            f.write(json.dumps(dict(key=cache_key(inputs), name=imdb.name,
                                    counts=[int(e["boxes"].shape[0]) for e in roidb],
                                    sizes=[[e["width"], e["height"]] for e in roidb])))
    except OSError:
        return
