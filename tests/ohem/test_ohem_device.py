"""The OHEM layer with its bottoms on ``--device`` (see conftest): the device gathers and
counts, the host ranks; the original's rows, tops on the device; the readonly branch under
bfloat16 autocast there."""

import numpy as np
import pytest
import torch

from readonly_ohem.caffe.net import Net
from readonly_ohem.config import load_config
from readonly_ohem.ohem.readonly import apply_readonly_dtype

from original_code import ohem_loss as ref_loss
from test_ohem_layer import cfg_with, make_inputs, make_layer, ref_select, tied_inputs
from test_readonly_dtype import OHEM_CFG, REPO, SHAPES, R

pytestmark = pytest.mark.device


class Records(list):
    def __call__(self, record):
        self.append(record)


def run_on(device, arrays, cfg, active):
    layer = make_layer(cfg)
    layer.recorder = Records()
    layer.recorder.active = active  # inactive: the fast path; active: NMS for every RoI
    tops = layer.forward([torch.from_numpy(a).to(device) for a in arrays], [])
    return tops, layer.recorder[0]


@pytest.mark.parametrize("seed", range(4))
def test_the_layer_on_the_device_keeps_the_original_rows(device, seed):
    rng = np.random.default_rng(200 + seed)
    arrays = tied_inputs(rng, 2, 300) if seed % 2 else make_inputs(rng, 2, 1000)
    if seed == 2:
        arrays = make_inputs(rng, 2, 200, general_weights=True)  # the general bbox-loss path
    loss = ref_loss(arrays[0], arrays[1], arrays[3], *arrays[4:7])
    for use_nms in (True, False):
        cfg = cfg_with(BATCH_SIZE=64, OHEM_USE_NMS=use_nms)
        hard, _ = ref_select(loss, arrays[2], arrays[3], 64, use_nms, 0.7)
        for active in (True, False):
            tops, rec = run_on(device, arrays, cfg, active)
            assert rec.keep.tolist() == hard.tolist(), (use_nms, active)
            np.testing.assert_allclose(rec.loss.numpy(), loss, rtol=1e-15, atol=0)
            assert all(t.device.type == device.type for t in tops)
            for t, a in zip(tops, [arrays[2], arrays[3]] + arrays[4:7]):
                np.testing.assert_array_equal(t.cpu().numpy(), a[hard])


def test_bfloat16_readonly_branch_on_the_device(device):
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 40, (R, 2))
    rois = np.concatenate((np.zeros((R, 1)), xy, xy + rng.uniform(8, 24, (R, 2))), 1)
    feed = {"data": torch.from_numpy(rng.normal(0, 50, SHAPES["data"]).astype(np.float32)),
            "rois": torch.from_numpy(rois.astype(np.float32)), "labels": torch.zeros(R),
            "bbox_targets": torch.zeros(R, 84), "bbox_inside_weights": torch.zeros(R, 84),
            "bbox_outside_weights": torch.zeros(R, 84)}
    feed = {k: v.to(device) for k, v in feed.items()}
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config([OHEM_CFG, REPO / "prototxt" / "cfgs" / "small.yml"],
                          [["TRAIN.OHEM_READONLY_DTYPE", repr(dtype)], ["TRAIN.BATCH_SIZE", "4"]])
        torch.manual_seed(0)
        net = Net.from_file(REPO / "prototxt" / "small" / "fast_rcnn_ohem" / "train.prototxt",
                            phase="TEST", cfg=cfg, input_shapes=SHAPES, build_data_layers=False)
        apply_readonly_dtype(net, cfg)
        with torch.no_grad():
            out[dtype] = net.to(device).forward(feed)
    a, b = out["float32"], out["bfloat16"]
    assert b["cls_prob_readonly"].dtype == torch.float32 and b["rois_hard"].shape == (4, 5)
    assert not torch.equal(a["fc7_readonly"], b["fc7_readonly"])
    torch.testing.assert_close(b["fc7_readonly"], a["fc7_readonly"], rtol=0.05, atol=0.05)
