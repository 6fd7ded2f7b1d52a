"""Atomic file writes: a snapshot, a caffemodel or a cache file is either whole or absent.

The content goes to a temp file in the target's directory, is flushed and fsync'ed, and only
then renamed over the target (``os.replace`` is atomic on POSIX and Windows), so a run killed
mid-write leaves the previous file intact.

The file gets the permissions a plain ``open(path, "w")`` would give it: an existing target keeps
its mode, a new one gets ``0o666`` less the process umask (``mkstemp`` alone would make every
snapshot ``0o600``, unreadable to the group that shares an experiment directory).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask. Read from ``/proc/self/status`` where Linux shows it (no change of
    process state); elsewhere set and restored at once with ``os.umask``."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_mode(path: str | Path) -> int:
    """The permission bits ``open(path, "w")`` would leave: those of an existing ``path``, else
    ``0o666 & ~umask``."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb"):
    """``with atomic_write(path) as f: f.write(...)`` — the file appears only on success."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            os.chmod(tmp, open_mode(path))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
