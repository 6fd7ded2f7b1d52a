"""ops on ``--device`` (see conftest): NMS (the vectorized steps on a GPU, the bit loop on a
CPU) against the plain loop, prefix NMS, RoI pooling against the CPU."""

import numpy as np
import pytest
import torch

from readonly_ohem.ops.nms import batched_nms, greedy_nms, nms, prefix_nms
from readonly_ohem.ops.roi_pool import roi_pool

from test_nms import clustered_boxes, loop_nms, per_group_loop

pytestmark = pytest.mark.device


@pytest.mark.parametrize("n,thresh,seed", [(300, 0.7, 0), (1200, 0.5, 1), (800, 0.3, 2)])
def test_nms_on_the_device_matches_the_loop(device, n, thresh, seed):
    rng = np.random.default_rng(seed)
    boxes = clustered_boxes(rng, n, n_clusters=8, scale=0.937)
    scores = rng.integers(0, n // 3, size=n).astype(np.float32)  # many ties
    dets = np.concatenate((boxes, scores[:, None]), 1)
    b, s = torch.from_numpy(boxes).to(device), torch.from_numpy(scores).to(device)
    for eq in (False, True):
        assert nms(b, s, thresh, suppress_equal=eq).tolist() == loop_nms(dets, thresh, eq)
    groups = rng.integers(0, 5, size=n)
    want = []
    for g in range(5):
        sel = np.flatnonzero(groups == g)
        want += sel[loop_nms(dets[sel], thresh)].tolist()
    got = batched_nms(b, s, torch.from_numpy(groups).to(device), thresh)
    assert sorted(got.tolist()) == sorted(want)
    keep, _ = greedy_nms(b, thresh, scores=s, max_keep=40)
    assert keep[:40].tolist() == loop_nms(dets, thresh)[:40]  # (it may decide a few more)


def test_prefix_nms_on_the_device(device):
    rng = np.random.default_rng(3)
    boxes = clustered_boxes(rng, 256, n_clusters=5, scale=0.96)
    groups = rng.integers(0, 4, size=256) * 21
    got = prefix_nms(torch.from_numpy(boxes).to(device), torch.from_numpy(groups).to(device), 0.7)
    assert got.device.type == device.type
    assert got.tolist() == per_group_loop(boxes, groups, 0.7).tolist()


def test_roi_pool_on_the_device_matches_the_cpu(device):
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(2, 16, 20, 30, generator=g)
    rois = torch.cat([torch.randint(0, 2, (50, 1), generator=g).float(),
                      torch.rand(50, 4, generator=g) * 400 - 20], 1)
    cpu = feats.clone().requires_grad_()
    dev = feats.to(device).requires_grad_()
    out_c = roi_pool(cpu, rois, 1 / 16, 7, 7)
    out_d = roi_pool(dev, rois.to(device), 1 / 16, 7, 7)
    assert torch.equal(out_c, out_d.cpu())
    top_diff = torch.randn(out_c.shape, generator=g)
    out_c.backward(top_diff)
    out_d.backward(top_diff.to(device))
    torch.testing.assert_close(cpu.grad, dev.grad.cpu())
