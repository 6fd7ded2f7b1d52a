"""Datasets: the imdb protocol, the factory ``get_imdb`` by name, PASCAL VOC, VOC evaluation."""
