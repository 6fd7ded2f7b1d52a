"""The dataset factory: an imdb by name from the registered dataset families (the original
``datasets/factory.py``).

A family is registered once, beside its code (``pascal_voc.py`` registers ``voc_<year>_<image_set>``):
``register_dataset(pattern, constructor, form, example)`` where ``pattern`` is a regular
expression a whole name must match, ``constructor(match, data_dir, proposals, cfg, cache_dir) ->
Imdb`` builds the dataset from the ``re.Match`` (``data_dir``, ``proposals``, ``cfg``,
``cache_dir`` as ``get_imdb`` got them), and ``form``/``example`` say in error messages what the
names look like. Adding a dataset family is one module and its registration; importing
``readonly_ohem.datasets`` registers the built-in ones.

``get_imdb("a+b")`` combines image sets into a ``CombinedImdb`` (training flips each part).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, NamedTuple

from readonly_ohem.datasets.imdb import CombinedImdb, Imdb
from readonly_ohem.errors import DataError


class DatasetFamily(NamedTuple):
    pattern: re.Pattern
    constructor: Callable
    form: str
    example: str


_FAMILIES: dict[str, DatasetFamily] = {}


def register_dataset(pattern: str, constructor: Callable, form: str, example: str) -> None:
    """Register a dataset family (see the module docstring); ``form`` names it (one registration
    per form)."""
    old = _FAMILIES.get(form)
    if old is not None and old.constructor is not constructor:
        raise ValueError(f"dataset family {form!r} is already registered")
    _FAMILIES[form] = DatasetFamily(re.compile(pattern), constructor, form, example)


def registered_datasets() -> list[str]:
    """The registered families' forms, in registration order (``["voc_<year>_<image_set>"]``)."""
    return list(_FAMILIES)


def _one(name: str, data_dir, proposals, cfg, cache_dir) -> Imdb:
    for family in _FAMILIES.values():
        m = family.pattern.fullmatch(name)
        if m:
            return family.constructor(m, data_dir, proposals, cfg, cache_dir)
    expected = "; or ".join(f"{f.form}, e.g. {f.example}" for f in _FAMILIES.values())
    raise DataError(f"unknown imdb {name!r} (expected {expected or 'a registered dataset family'})")


def get_imdb(name: str, data_dir=None, proposals=None, cfg=None, cache_dir=None) -> Imdb:
    """An imdb by the original's name (``voc_2007_trainval``, ``voc_2007_test``, ``a+b``).

    ``proposals``: a file (single imdb), a directory with ``<name>.mat|.npz|.json``, a dict
    name -> file, or None for ``<data_dir>/selective_search_data/<name>.mat``.
    ``cache_dir``: where the built roidb is cached (None: ``~/.cache/readonly_ohem`` or
    ``$READONLY_OHEM_CACHE``; False: no cache).
    """
    names = name.split("+")
    if len(names) > 1 and proposals is not None and not isinstance(proposals, dict) \
            and not Path(proposals).is_dir():
        raise DataError(f"{name}: one proposals file cannot serve several image sets; "
                        f"give a directory holding <imdb>.mat files")
    parts = [_one(n.strip(), data_dir, proposals, cfg, cache_dir) for n in names]
    return parts[0] if len(parts) == 1 else CombinedImdb(parts)
