"""Fast R-CNN data: VOC imdb, proposals, roidb, minibatches, RoIDataLayer, mini-VOC."""
