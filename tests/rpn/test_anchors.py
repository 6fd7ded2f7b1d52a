"""generate_anchors (the released code's values and rounding) and the anchors' order on a map."""

import numpy as np
import pytest
import torch

from readonly_ohem.errors import SpecError
from readonly_ohem.rpn.anchors import generate_anchors, shifted_anchors

from original_code import generate_anchors as original_generate_anchors
from rpn_testing import make_layer

# what py-faster-rcnn's generate_anchors() returns (not the MATLAB table quoted in its comment)
PY_FASTER_RCNN_ANCHORS = [
    [-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
    [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
    [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359],
]


def test_default_anchors_are_the_released_ones():
    a = generate_anchors()
    assert a.dtype == torch.float64
    assert a.tolist() == PY_FASTER_RCNN_ANCHORS
    # +1 widths: ratio 0.5 rounds to a 23 x 12 window, ratio 2 to 11 x 22, scaled by 8, 16, 32
    w = a[:, 2] - a[:, 0] + 1
    h = a[:, 3] - a[:, 1] + 1
    assert w.tolist() == [184, 368, 736, 128, 256, 512, 88, 176, 352]
    assert h.tolist() == [96, 192, 384, 128, 256, 512, 176, 352, 704]


@pytest.mark.parametrize("base,ratios,scales", [
    (16, [0.5, 1, 2], [4, 8, 16, 32]),
    (16, [0.5, 1, 2], [0.5, 1.5]),  # half-pixel corners
    (8, [0.25, 1, 3], [2, 5]),
    (5, [4.0], [1, 3]),  # sqrt(25 / 4) = 2.5 rounds half to even: 2 (half-up would give 3)
])
def test_anchors_equal_the_transcription(base, ratios, scales):
    ours = generate_anchors(base, ratios, scales).numpy()
    ref = original_generate_anchors(base, ratios, np.array(scales))
    np.testing.assert_array_equal(ours, ref)


def test_half_to_even_rounding():
    a = generate_anchors(5, [4.0], [1])[0]
    assert (a[2] - a[0] + 1).item() == 2.0  # ws = round(2.5) = 2
    assert (a[3] - a[1] + 1).item() == 8.0  # hs = round(2 * 4)


def test_shifted_anchors_order_is_h_w_a():
    base = torch.tensor([[0.0, 0.0, 15.0, 15.0], [-8.0, -8.0, 23.0, 23.0]], dtype=torch.float64)
    s = shifted_anchors(base, 2, 3, 16)
    assert s.shape == (2 * 3 * 2, 4)
    # row (h * W + w) * A + a
    assert s[(1 * 3 + 2) * 2 + 1].tolist() == [-8 + 32, -8 + 16, 23 + 32, 23 + 16]
    assert s[(0 * 3 + 1) * 2 + 0].tolist() == [16, 0, 31, 15]
    assert s[:2].tolist() == base.tolist()


def test_param_str_anchor_keys():
    layer = make_layer("ProposalLayer", "'feat_stride': 8 \\n'scales': !!python/tuple [2, 4]")
    assert layer.feat_stride == 8 and layer.num_anchors == 6
    assert layer.anchors.tolist() == generate_anchors(scales=[2, 4]).tolist()
    with pytest.raises(SpecError, match="layer 'layer'.*must give feat_stride"):
        make_layer("ProposalLayer", "'scales': [8]")
    with pytest.raises(SpecError, match="scales a list"):
        make_layer("ProposalLayer", "{'feat_stride': 16, 'scales': [8, 'x']}")
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['ratio'\]"):
        make_layer("ProposalLayer", "{'feat_stride': 16, 'ratio': [1]}")
