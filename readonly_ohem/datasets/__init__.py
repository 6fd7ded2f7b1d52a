"""Datasets: the imdb protocol (``imdb.py``), the factory ``get_imdb`` by name, PASCAL VOC and
COCO-format sets, their evaluations.

Importing the package registers the built-in dataset families (``voc_<year>_<image_set>``,
``coco_<year>_<split>``, ``coco:<instances.json>``).
"""

from readonly_ohem.datasets.factory import get_imdb, register_dataset, registered_datasets
from readonly_ohem.datasets import pascal_voc  # noqa: F401  (registers voc_<year>_<image_set>)
from readonly_ohem.datasets import coco  # noqa: F401  (registers coco_<year>_<split>, coco:<file>)

__all__ = ["get_imdb", "register_dataset", "registered_datasets"]
