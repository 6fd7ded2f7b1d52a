"""Input checks the RPN layers share: one-line errors naming the layer and the blob or key."""

from __future__ import annotations

import torch


def check_unknown_keys(layer, params: dict, known: tuple[str, ...]) -> None:
    """``param_str`` keys the original layer does not read are an error (not silently ignored)."""
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise layer.error(f"param_str has unknown key(s) {unknown}; it takes {list(known)}")


def check_gt_boxes(layer, gt_boxes: torch.Tensor, index: int) -> None:
    """gt_boxes (G, 5) ``[x1, y1, x2, y2, class]``; G may be 0."""
    if gt_boxes.dim() != 2 or gt_boxes.shape[1] != 5:
        raise layer.error(f"bottom {layer.param.bottom[index]!r} must be gt boxes (G, 5) "
                          f"[x1, y1, x2, y2, class], got {tuple(gt_boxes.shape)}")


def check_im_info(layer, im_info: torch.Tensor, index: int) -> None:
    """im_info (1, 3) ``[height, width, scale]`` (the first row is read, as the original)."""
    if im_info.dim() != 2 or im_info.shape[0] < 1 or im_info.shape[1] < 3:
        raise layer.error(f"bottom {layer.param.bottom[index]!r} must be im_info (1, 3) "
                          f"[height, width, scale], got {tuple(im_info.shape)}")
