"""A write that dies half-way leaves the previous file intact and no temp file behind."""

import os
import stat

import pytest

from readonly_ohem.atomic import atomic_write, current_umask


def test_atomic_write_replaces_on_success(tmp_path):
    target = tmp_path / "snap.caffemodel"
    target.write_bytes(b"old")
    with atomic_write(target) as f:
        f.write(b"new content")
    assert target.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["snap.caffemodel"]


def test_atomic_write_killed_mid_write_keeps_previous(tmp_path):
    target = tmp_path / "snap.caffemodel"
    target.write_bytes(b"previous snapshot")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as f:
            f.write(b"half of the new one")
            raise KeyboardInterrupt  # SIGINT arriving mid-write
    assert target.read_bytes() == b"previous snapshot"
    assert [p.name for p in tmp_path.iterdir()] == ["snap.caffemodel"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_atomic_write_gives_a_new_file_the_mode_open_would(tmp_path, umask):
    """Not mkstemp's 0o600: 0o666 less the umask, exactly what a plain open() creates."""
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "snap.caffemodel") as f:
            f.write(b"x")
        with open(tmp_path / "plain", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    got = stat.S_IMODE(os.stat(tmp_path / "snap.caffemodel").st_mode)
    assert got == 0o666 & ~umask
    assert got == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    assert current_umask() == old


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    target = tmp_path / "snap.caffemodel"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    with atomic_write(target) as f:
        f.write(b"new")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
