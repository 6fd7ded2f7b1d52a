"""ROIPooling, the Fast R-CNN fork's layer: max-pool each RoI into a fixed pooled_h x pooled_w grid.

bottoms: features (N, C, H, W), rois (R, 5) [batch_idx, x1, y1, x2, y2] in image coordinates
(or the older (R, 5, 1, 1)); top: (R, C, pooled_h, pooled_w). The arithmetic (C rounding of the
scaled corners, float bin edges, empty bins, Caffe's backward) lives in ``ops.roi_pool``.
The rois get no gradient, as in Caffe.
"""

from __future__ import annotations

from readonly_ohem.errors import DataError
from readonly_ohem.caffe.layers.base import Layer, register
from readonly_ohem.ops.roi_pool import roi_pool


@register("ROIPooling")
class ROIPooling(Layer):
    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        p = param.roi_pooling_param
        self.pooled_h, self.pooled_w = int(p.pooled_h), int(p.pooled_w)
        self.spatial_scale = float(p.spatial_scale)
        if self.pooled_h <= 0 or self.pooled_w <= 0:
            raise self.error(f"roi_pooling_param pooled_h and pooled_w must be > 0, got "
                             f"{self.pooled_h} x {self.pooled_w}")

    def forward(self, bottoms, params):
        features, rois = bottoms
        try:
            return [roi_pool(features, rois, self.spatial_scale, self.pooled_h, self.pooled_w)]
        except DataError as err:
            raise DataError(f"layer {self.name!r} (ROIPooling), bottoms {list(self.param.bottom)}: "
                            f"{err}") from None

    def top_shapes(self, bottom_shapes):
        if len(bottom_shapes[0]) != 4:
            raise self.error(f"bottom {self.param.bottom[0]!r} must have 4 axes (N, C, H, W), "
                             f"got shape {tuple(bottom_shapes[0])}")
        c, rois = bottom_shapes[0][1], bottom_shapes[1]
        return [(rois[0], c, self.pooled_h, self.pooled_w)]
