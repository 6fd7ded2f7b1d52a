"""Atomic file writes: a snapshot, a caffemodel or a cache file is either whole or absent.

The content goes to a temp file in the target's directory, is flushed and fsync'ed, and only
then renamed over the target (``os.replace`` is atomic on POSIX and Windows), so a run killed
mid-write leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb"):
    """``with atomic_write(path) as f: f.write(...)`` — the file appears only on success."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
