"""``readonly-ohem make-minivoc DIR``: write the built-in mini-VOC (``readonly_ohem.datasets.minivoc``)."""

from __future__ import annotations

from readonly_ohem.datasets.minivoc import DEFAULT_IMAGES, make_minivoc


def make_minivoc_command(dir, seed: int = 0, images: int | None = None) -> int:
    """``readonly-ohem make-minivoc DIR [--seed S] [--images N]``."""
    make_minivoc(dir, seed=seed, num_images=images or DEFAULT_IMAGES)
    return 0
