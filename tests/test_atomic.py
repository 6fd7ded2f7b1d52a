"""A write that dies half-way leaves the previous file intact and no temp file behind."""

import pytest

from readonly_ohem.atomic import atomic_write


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
