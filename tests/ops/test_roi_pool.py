"""ops.roi_pool against a plain-loop transcription of the Fast R-CNN fork's kernels."""

import math

import numpy as np
import pytest
import torch

from readonly_ohem.errors import DataError
from readonly_ohem.ops import roi_pool as rp
from readonly_ohem.ops.roi_pool import caffe_round, roi_pool, roi_pool_backward, roi_pool_forward


def c_round(v):
    """C round(): half away from zero."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def reference(features, rois, scale, ph_n, pw_n, top_diff=None):
    """The fork's ROIPoolingForward and GPU ROIPoolingBackward, loop by loop, in numpy.

    Corner products and bin sizes in the features' dtype (Caffe's Dtype).
    -> (top (R, C, PH, PW), argmax, bottom_diff or None)."""
    feats = np.asarray(features)
    dt = feats.dtype.type
    n, c, h, w = feats.shape
    rois = np.asarray(rois, dtype=feats.dtype).reshape(-1, 5)
    r = rois.shape[0]
    top = np.zeros((r, c, ph_n, pw_n), feats.dtype)
    arg = -np.ones((r, c, ph_n, pw_n), np.int64)

    def geometry(roi):
        sw, sh, ew, eh = (c_round(float(dt(roi[k]) * dt(scale))) for k in (1, 2, 3, 4))
        bh = dt(max(eh - sh + 1, 1)) / dt(ph_n)
        bw = dt(max(ew - sw + 1, 1)) / dt(pw_n)
        return int(roi[0]), sw, sh, ew, eh, bh, bw

    for i in range(r):
        b, sw, sh, ew, eh, bh, bw = geometry(rois[i])
        for ci in range(c):
            for py in range(ph_n):
                for px in range(pw_n):
                    hs = min(max(int(np.floor(dt(py) * bh)) + sh, 0), h)
                    he = min(max(int(np.ceil(dt(py + 1) * bh)) + sh, 0), h)
                    ws = min(max(int(np.floor(dt(px) * bw)) + sw, 0), w)
                    we = min(max(int(np.ceil(dt(px + 1) * bw)) + sw, 0), w)
                    if he <= hs or we <= ws:
                        continue
                    best, best_i = -np.finfo(np.float32).max, -1
                    for y in range(hs, he):
                        for x in range(ws, we):
                            if feats[b, ci, y, x] > best:
                                best, best_i = feats[b, ci, y, x], y * w + x
                    top[i, ci, py, px], arg[i, ci, py, px] = best, best_i
    if top_diff is None:
        return top, arg, None
    top_diff = np.asarray(top_diff)
    diff = np.zeros_like(feats)
    for nb in range(n):
        for ci in range(c):
            for y in range(h):
                for x in range(w):
                    g = 0.0
                    for i in range(r):
                        b, sw, sh, ew, eh, bh, bw = geometry(rois[i])
                        if b != nb or not (sw <= x <= ew and sh <= y <= eh):
                            continue
                        ps = min(max(int(np.floor(dt(y - sh) / bh)), 0), ph_n)
                        pe = min(max(int(np.ceil(dt(y - sh + 1) / bh)), 0), ph_n)
                        qs = min(max(int(np.floor(dt(x - sw) / bw)), 0), pw_n)
                        qe = min(max(int(np.ceil(dt(x - sw + 1) / bw)), 0), pw_n)
                        for py in range(ps, pe):
                            for px in range(qs, qe):
                                if arg[i, ci, py, px] == y * w + x:
                                    g += top_diff[i, ci, py, px]
                    diff[nb, ci, y, x] = g
    return top, arg, diff


# RoIs in image coordinates for a (2, C, 6, 8) map at scale 1/4: whole image, interior, crossing
# the right/bottom and left/top borders, tiny, half-way corners (2/4 = 0.5 -> 1, 10/4 = 2.5 -> 3,
# -2/4 = -0.5 -> -1), malformed (x2 < x1 and y2 < y1), fully outside (every bin empty).
ROIS = [
    [0, 0, 0, 31, 23], [1, 4, 4, 20, 16], [0, 18, 10, 40, 30], [1, -9, -7, 9, 5],
    [0, 12, 8, 12, 8], [1, 2, 10, 10, 14], [0, -2, -2, 6, 2], [1, 20, 16, 8, 4],
    [0, 40, 30, 60, 50], [1, 0, 0, 2.5, 30],
]


def _features(dtype, ties=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(-2, 3, (2, 3, 6, 8), generator=g).to(dtype)
    return torch.randperm(2 * 3 * 6 * 8, generator=g).to(dtype).view(2, 3, 6, 8) / 7 - 20


def test_caffe_round_is_half_away_from_zero():
    x = torch.tensor([2.5, -0.5, 0.5, -2.5, 1.5, 0.49999997, -0.49999997, 3.4999998, 7.0, -0.0])
    assert caffe_round(x).tolist() == [3, -1, 1, -3, 2, 0, 0, 3, 7, 0]
    assert torch.round(torch.tensor([2.5, -0.5])).tolist() == [2, -0.0]  # why we do not use it


def test_hand_worked_numbers():
    # 1x1x4x4 map, values 0..15 row-major; RoI covers columns 0..2, rows 1..3 at scale 1.
    feats = torch.arange(16.0).view(1, 1, 4, 4)
    out = roi_pool(feats, torch.tensor([[0.0, 0, 1, 2, 3]]), 1.0, 2, 2)
    # roi 3x3, bin 1.5: rows [1,3) and [2,4), columns [0,2) and [1,3).
    assert out.view(-1).tolist() == [9.0, 10.0, 13.0, 14.0]
    # 2.5 * 0.5 = 1.25 -> 1; 5 * 0.5 = 2.5 -> 3 (half away): columns 1..3, rows 0..0.
    out = roi_pool(feats, torch.tensor([[0.0, 2.5, 0, 5, 0]]), 0.5, 1, 3)
    assert out.view(-1).tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_plain_loop_reference(dtype, ties):
    feats = _features(dtype, ties)
    rois = torch.tensor(ROIS, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    top_diff = torch.randn(len(ROIS), 3, 3, 2, generator=g, dtype=dtype)
    want_top, want_arg, want_diff = reference(feats.numpy(), rois.numpy(), 0.25, 3, 2, top_diff.numpy())
    out, arg = roi_pool_forward(feats, rois, 0.25, 3, 2)
    np.testing.assert_array_equal(out.numpy(), want_top)
    np.testing.assert_array_equal(arg.numpy(), want_arg)
    diff = roi_pool_backward(top_diff, arg, rois, feats.shape, 0.25)
    np.testing.assert_allclose(diff.numpy(), want_diff, rtol=1e-6, atol=1e-6)
    f = feats.clone().requires_grad_()
    roi_pool(f, rois, 0.25, 3, 2).backward(top_diff)
    np.testing.assert_allclose(f.grad.numpy(), want_diff, rtol=1e-6, atol=1e-6)


def test_random_rois_many_bins_match_reference():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 4, 13, 17, generator=g)
    xy = torch.rand(40, 4, generator=g) * torch.tensor([300.0, 220, 300, 220]) - 20
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=g).float(), xy], 1)
    top_diff = torch.randn(40, 4, 7, 5, generator=g)
    want_top, want_arg, want_diff = reference(feats.numpy(), rois.numpy(), 1 / 16, 7, 5, top_diff.numpy())
    out, arg = roi_pool_forward(feats, rois, 1 / 16, 7, 5)
    np.testing.assert_array_equal(out.numpy(), want_top)
    np.testing.assert_array_equal(arg.numpy(), want_arg)
    diff = roi_pool_backward(top_diff, arg, rois, feats.shape, 1 / 16)
    np.testing.assert_allclose(diff.numpy(), want_diff, rtol=1e-6, atol=1e-6)


def test_empty_bins_output_zero_and_malformed_roi_gets_no_gradient():
    feats = _features(torch.float32).requires_grad_()
    rois = torch.tensor([[0, 40, 30, 60, 50], [1, 20, 16, 8, 4]], dtype=torch.float32)
    out = roi_pool(feats, rois, 0.25, 3, 2)
    assert torch.all(out[0] == 0)  # starts at (10, 7) on a 6x8 map: every bin empty
    # malformed: forced to 1x1 at its (rounded) start (5, 4) -> every bin pools that one cell
    assert torch.equal(out[1], feats[1, :, 4, 5].detach().view(3, 1, 1).expand(3, 3, 2))
    out.sum().backward()
    assert torch.all(feats.grad == 0)


def test_cell_past_roi_end_in_last_bin_gets_no_gradient():
    """Float bin edges: roi 57 rows / 7 bins, ceil(7 * (57/7 in float32)) = 58, so the last bin
    reaches one row past the RoI; Caffe's backward, which checks the row against [start, end],
    sends that cell nothing. We copy both halves."""
    feats = torch.zeros(1, 1, 60, 2)
    feats[0, 0, 57, 0] = 5.0  # row start + 57 = one past the RoI's last row (56)
    rois = torch.tensor([[0.0, 0, 0, 1, 56]])
    f = feats.clone().requires_grad_()
    out = roi_pool(f, rois, 1.0, 7, 1)
    assert out[0, 0, 6, 0] == 5.0
    out.sum().backward()
    assert f.grad[0, 0, 57, 0] == 0
    _, _, want = reference(feats.numpy(), rois.numpy(), 1.0, 7, 1, np.ones((1, 1, 7, 1), np.float32))
    np.testing.assert_array_equal(f.grad.numpy(), want)


def test_ties_go_to_first_in_row_major_order():
    feats = torch.zeros(1, 1, 3, 3)
    feats[0, 0, 0, 2] = feats[0, 0, 1, 0] = feats[0, 0, 2, 2] = 1.0
    f = feats.clone().requires_grad_()
    out = roi_pool(f, torch.tensor([[0.0, 0, 0, 2, 2]]), 1.0, 1, 1)
    out.sum().backward()
    assert f.grad.view(-1).tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0]


def test_zero_rois():
    feats = _features(torch.float32).requires_grad_()
    out = roi_pool(feats, torch.zeros(0, 5), 0.25, 7, 7)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert torch.all(feats.grad == 0)


def test_gradcheck_float64():
    feats = _features(torch.float64).requires_grad_()  # distinct values: no argmax flips
    # without the malformed RoI, whose forward depends on a cell that Caffe gives no gradient
    rois = torch.tensor([r for r in ROIS if r[3] >= r[1]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_pool(f, rois, 0.25, 3, 2), (feats,))


def test_rois_get_no_gradient_and_shapes_are_checked():
    feats = _features(torch.float32)
    rois = torch.tensor(ROIS, dtype=torch.float32, requires_grad=True)
    out = roi_pool(feats.requires_grad_(), rois, 0.25, 2, 2)
    out.sum().backward()
    assert rois.grad is None
    assert roi_pool(feats, rois.detach().view(-1, 5, 1, 1), 0.25, 2, 2).shape == (10, 3, 2, 2)
    with pytest.raises(DataError, match="batch index 2"):
        roi_pool(feats, torch.tensor([[2.0, 0, 0, 4, 4]]), 0.25, 2, 2)
    with pytest.raises(DataError, match="batch index -1"):
        roi_pool(feats, torch.tensor([[-1.0, 0, 0, 4, 4]]), 0.25, 2, 2)
    with pytest.raises(DataError, match=r"\(R, 5\)"):
        roi_pool(feats, torch.zeros(3, 4), 0.25, 2, 2)


def test_large_map_chunks_agree(monkeypatch):
    """Chunking over RoIs (bounded temporaries) does not change the result."""
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(1, 8, 38, 50, generator=g)
    xy = torch.rand(64, 2, generator=g) * torch.tensor([700.0, 500])
    wh = torch.rand(64, 2, generator=g) * 400
    rois = torch.cat([torch.zeros(64, 1), xy, xy + wh], 1)
    out, arg = roi_pool_forward(feats, rois, 1 / 16, 7, 7)
    monkeypatch.setattr(rp, "_CHUNK_ELEMENTS", 1000)
    out2, arg2 = roi_pool_forward(feats, rois, 1 / 16, 7, 7)
    assert torch.equal(out, out2) and torch.equal(arg, arg2)
    top_diff = torch.randn(64, 8, 7, 7, generator=g)
    d2 = roi_pool_backward(top_diff, arg, rois, feats.shape, 1 / 16)
    monkeypatch.setattr(rp, "_CHUNK_ELEMENTS", 1 << 22)
    d1 = roi_pool_backward(top_diff, arg, rois, feats.shape, 1 / 16)
    torch.testing.assert_close(d1, d2)
    want_top, want_arg, _ = reference(feats[:, :2].numpy(), rois.numpy(), 1 / 16, 7, 7)
    np.testing.assert_array_equal(out[:, :2].numpy(), want_top)
    np.testing.assert_array_equal(arg[:, :2].numpy(), want_arg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reused_workspace_leaves_no_trace(dtype):
    """The tables live in a reused buffer whose rows past the map's edge are never written: a
    call after one on a larger map of huge values (which fills that buffer with them) still
    equals the plain loop, and a call on the first map again gives the same output."""
    big = torch.full((2, 5, 30, 34), 1e30, dtype=dtype)
    big_rois = torch.tensor([[0, 0, 0, 135, 119], [1, 8, 8, 100, 90]], dtype=dtype)
    first = roi_pool_forward(big, big_rois, 0.25, 2, 2)
    feats = _features(dtype, seed=3)
    rois = torch.tensor(ROIS, dtype=dtype)
    out, arg = roi_pool_forward(feats, rois, 0.25, 3, 2)
    want_top, want_arg, _ = reference(feats.numpy(), rois.numpy(), 0.25, 3, 2)
    np.testing.assert_array_equal(out.numpy(), want_top)
    np.testing.assert_array_equal(arg.numpy(), want_arg)
    again = roi_pool_forward(big, big_rois, 0.25, 2, 2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert float(first[0].min()) == float(big.max())  # every bin of the huge map pools 1e30


def test_second_call_on_the_same_map_reuses_tables_only_while_valid(monkeypatch):
    """OHEM pools one map twice: the second call reuses the tables (fewer or equal levels); a
    change of the map (in place, or through numpy) or a new map rebuilds them; every output
    equals the plain loop."""
    builds = []
    real = rp._sparse_table
    monkeypatch.setattr(rp, "_sparse_table", lambda *a: builds.append(a[1:3]) or real(*a))
    feats = _features(torch.float32, seed=5)
    rois = torch.tensor(ROIS, dtype=torch.float32)

    def check(f, r):
        out, arg = roi_pool_forward(f, r, 0.25, 3, 2)
        want_top, want_arg, _ = reference(f.numpy(), r.numpy(), 0.25, 3, 2)
        np.testing.assert_array_equal(out.numpy(), want_top)
        np.testing.assert_array_equal(arg.numpy(), want_arg)

    check(feats, rois[4:5])  # a one-cell RoI: level (0, 0) only
    check(feats, rois)  # the whole-image RoI needs more levels: rebuilt
    assert builds == [(0, 0), (1, 2)]
    check(feats, rois[4:6])  # reused
    check(feats, rois)
    assert len(builds) == 2
    feats.mul_(-1)  # in place
    check(feats, rois[1:2])
    assert len(builds) == 3
    feats.numpy()[0, 0, 0, 0] += 1  # behind autograd's back (no version change): still seen
    check(feats, rois)
    assert len(builds) == 4
    other = _features(torch.float32, seed=6)
    check(other, rois)
    check(feats, rois)  # back to the first map: rebuilt (one memo)
    assert len(builds) == 6


def test_torchvision_used_only_when_it_agrees(monkeypatch):
    """Routing: a torchvision op that equals ours is used (power-of-two scales only); one that
    does not (here: torch.round's half-to-even corners) is rejected by the self-check."""
    calls = []

    def ours(features, rois, scale, ph, pw):
        geo = rp.RoIGeometry(rois, scale, ph, pw, *features.shape[2:], features.dtype)
        out, arg = rp._forward_ours(features, geo, ph, pw)
        return out, arg.long()

    def good(features, rois, scale, ph, pw):
        calls.append(scale)
        return ours(features, rois, scale, ph, pw)

    def bad(features, rois, scale, ph, pw):
        calls.append(scale)
        rounded = torch.cat([rois[:, :1], torch.round(rois[:, 1:] * scale) / scale], 1)
        return ours(features, rounded, scale, ph, pw)

    feats = _features(torch.float32)
    rois = torch.tensor(ROIS, dtype=torch.float32)
    want = roi_pool_forward(feats, rois, 0.25, 3, 2, use_torchvision=False)
    monkeypatch.setattr(rp, "_torchvision_op", lambda: good)
    calls.clear()
    roi_pool_forward(feats, rois, 0.25, 3, 2)  # CPU: ours, even with torchvision present
    assert not calls
    monkeypatch.setattr(rp, "_TV_DEVICES", ("cpu",))
    for op, used in ((good, True), (bad, False)):
        monkeypatch.setattr(rp, "_TV_CHECKED", {})
        monkeypatch.setattr(rp, "_torchvision_op", lambda op=op: op)
        calls.clear()
        out, arg = roi_pool_forward(feats, rois, 0.25, 3, 2)
        assert torch.equal(out, want[0]) and torch.equal(arg, want[1])
        assert (len(calls) == 2) == used  # self-check + the real call
        calls.clear()
        roi_pool_forward(feats, rois, 1 / 14, 3, 2)  # scale not a power of two: never
        assert not calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(2, 16, 20, 30, generator=g)
    rois = torch.cat([torch.randint(0, 2, (50, 1), generator=g).float(),
                      torch.rand(50, 4, generator=g) * 400 - 20], 1)
    cpu = feats.clone().requires_grad_()
    gpu = feats.cuda().requires_grad_()
    out_c = roi_pool(cpu, rois, 1 / 16, 7, 7)
    out_g = roi_pool(gpu, rois.cuda(), 1 / 16, 7, 7)
    assert torch.equal(out_c, out_g.cpu())
    top_diff = torch.randn(out_c.shape, generator=g)
    out_c.backward(top_diff)
    out_g.backward(top_diff.cuda())
    torch.testing.assert_close(cpu.grad, gpu.grad.cpu())


def test_benchmark_script_runs_and_checks_equality(capsys):
    """scripts/bench_roi_pool.py on a few RoIs: its loop reference agrees with ours (it asserts)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_roi_pool.py"
    spec = importlib.util.spec_from_file_location("bench_roi_pool_script", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--rois", "12", "--repeat", "1"])
    assert "per-RoI Python loop" in capsys.readouterr().out
