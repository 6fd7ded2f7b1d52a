"""Crafted files whose loading by an unsafe reader runs code: each would create a marker file.

``RunsCode(marker)`` pickles to ``os.system("touch <marker>")``: ``pickle.loads`` (and
``torch.load(weights_only=False)``, ``np.load(allow_pickle=True)``) runs it. The tests hand such
files to our loaders and check that the marker never appears; ``assert_live`` shows, once per kind
of file, that the payload really runs under the unsafe reader (so the check could fail).
"""

import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import torch


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def pickle_bytes(marker: Path) -> bytes:
    """A raw pickle of ``{"weights": RunsCode}`` (protocol 2+, starts with 0x80)."""
    return pickle.dumps({"format": "readonly-ohem train state 1", "weights": RunsCode(marker)})


def torch_save_file(path: Path, marker: Path, **extra) -> Path:
    """A ``torch.save`` zip (the old ``.state.pt`` / a ``.pth``) holding ``RunsCode``."""
    torch.save({"format": "readonly-ohem train state 1", "iter": 3, "evil": RunsCode(marker),
                **extra}, path)
    return path


def object_array(marker: Path) -> np.ndarray:
    """A 1-element object array: ``np.save`` pickles it, ``np.load(allow_pickle=True)`` runs it."""
    a = np.empty(1, dtype=object)
    a[0] = RunsCode(marker)
    return a


def assert_live(load, path: Path, marker: Path) -> None:
    """The unsafe reader ``load(path)`` does create ``marker``: the crafted file is a real threat."""
    assert not marker.exists()
    try:
        load(path)
    except Exception:  # noqa: BLE001 - what the unsafe reader does after running the code is moot
        pass
    assert marker.exists(), f"{path}: the crafted payload did not run under the unsafe reader"
    marker.unlink()
