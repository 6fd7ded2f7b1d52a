"""Disk cache of an imdb's roidb (gt + proposals, before flipping): npz + json, never pickle.

Stored under ``cache_dir`` (default ``~/.cache/readonly_ohem``, ``$READONLY_OHEM_CACHE``), one
file pair per imdb and devkit path. Keyed by a hash of everything the roidb depends on: the imdb name and classes, ``use_diff``, the
proposals min size, the image-set file, every annotation and image file (mtime, size) and the
proposals file (mtime, size), plus a format version. A stale or unreadable cache is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from readonly_ohem.datasets.proposals import MIN_SIZE

VERSION = 1


def _stat(p) -> list:
    try:
        st = os.stat(p)
        return [st.st_mtime_ns, st.st_size]
    except OSError:
        return [None, None]


def cache_key(imdb) -> str:
    h = hashlib.sha1()
    head = dict(version=VERSION, name=imdb.name, classes=list(imdb.classes), use_diff=imdb.use_diff,
                min_size=MIN_SIZE, set_file=[str(imdb.image_set_file), *_stat(imdb.image_set_file)],
                proposals=[str(imdb.proposals_path), *_stat(imdb.proposals_path)] if imdb.proposals_path else None)
    h.update(json.dumps(head, sort_keys=True).encode())
    for i in range(imdb.num_images):
        h.update(json.dumps([imdb.image_index[i], *_stat(imdb.annotation_path_at(i)),
                             *_stat(imdb.image_path_at(i))]).encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$READONLY_OHEM_CACHE`` or ``~/.cache/readonly_ohem`` (never inside the dataset)."""
    env = os.environ.get("READONLY_OHEM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "readonly_ohem"


def _paths(imdb):
    if imdb.cache_dir is False:
        return None, None
    d = Path(imdb.cache_dir) if imdb.cache_dir else default_cache_dir()
    tag = hashlib.sha1(str(Path(imdb.devkit_path).resolve()).encode()).hexdigest()[:10]
    stem = f"{imdb.name}_{tag}_roidb"
    return d / f"{stem}.npz", d / f"{stem}.json"


def load(imdb):
    """The cached roidb of ``imdb`` if the key matches, else None."""
    from readonly_ohem.roi_data.roidb import overlaps_matrix

    npz_path, json_path = _paths(imdb)
    if npz_path is None or not npz_path.is_file() or not json_path.is_file():
        return None
    try:
        meta = json.loads(json_path.read_text())
        if meta.get("key") != cache_key(imdb):
            return None
        with np.load(npz_path, allow_pickle=False) as z:
            boxes, gt_classes, ov, cls = z["boxes"], z["gt_classes"], z["overlaps"], z["classes"]
        counts = np.asarray(meta["counts"], dtype=np.int64)
    except (OSError, ValueError, KeyError):
        return None
    starts = np.concatenate([[0], np.cumsum(counts)])
    roidb = []
    for i in range(imdb.num_images):
        a, b = starts[i], starts[i + 1]
        roidb.append(dict(boxes=boxes[a:b].copy(), gt_classes=gt_classes[a:b].copy(),
                          gt_overlaps=overlaps_matrix(cls[a:b], ov[a:b], imdb.num_classes),
                          flipped=False, image=imdb.image_path_at(i), image_id=imdb.image_index[i],
                          width=int(meta["sizes"][i][0]), height=int(meta["sizes"][i][1])))
    return roidb


def save(imdb, roidb) -> None:
    """Write the cache; silently does nothing where the directory is not writable."""
    npz_path, json_path = _paths(imdb)
    if npz_path is None:
        return
    dense = [e["gt_overlaps"].toarray() for e in roidb]
    try:
        npz_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = npz_path.with_suffix(".tmp.npz")
        np.savez(tmp, boxes=np.concatenate([e["boxes"] for e in roidb]).reshape(-1, 4),
                 gt_classes=np.concatenate([e["gt_classes"] for e in roidb]).astype(np.int32),
                 overlaps=np.concatenate([d.max(axis=1) if d.shape[0] else np.zeros(0, np.float32)
                                          for d in dense]).astype(np.float32),
                 classes=np.concatenate([d.argmax(axis=1) if d.shape[0] else np.zeros(0, np.int64)
                                         for d in dense]).astype(np.int64))
        os.replace(tmp, npz_path)
        json_path.write_text(json.dumps(dict(key=cache_key(imdb), name=imdb.name,
                                             counts=[int(e["boxes"].shape[0]) for e in roidb],
                                             sizes=[[e["width"], e["height"]] for e in roidb])))
    except OSError:
        return
