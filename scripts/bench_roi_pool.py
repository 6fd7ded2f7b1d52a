"""Benchmark RoI pooling: ours (vectorized) vs a plain per-RoI Python loop (vs torchvision).

A VGG16-sized conv5 map (1 x 512 x 38 x 50 for a 600 x 800 image), 2000 random RoIs inside the
image, spatial_scale 1/16, 7 x 7 bins, forward and backward. Asserts that the outputs agree,
prints the times side by side; no assertion on time.

    python scripts/bench_roi_pool.py [--device cuda] [--rois 2000] [--repeat 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from readonly_ohem.ops import roi_pool as rp


def loop_roi_pool(features, rois, scale, ph_n, pw_n):
    """The fork's forward, one RoI and one bin at a time -> (out, argmax)."""
    n, c, h, w = features.shape
    f32 = np.float32
    out = features.new_zeros((len(rois), c, ph_n, pw_n))
    arg = torch.full((len(rois), c, ph_n, pw_n), -1, dtype=torch.long, device=features.device)
    for i, roi in enumerate(rois.tolist()):
        b, sw, sh, ew, eh, bh, bw = _geometry(roi, scale, ph_n, pw_n)
        for py in range(ph_n):
            hs = min(max(int(math.floor(f32(py) * bh)) + sh, 0), h)
            he = min(max(int(math.ceil(f32(py + 1) * bh)) + sh, 0), h)
            for px in range(pw_n):
                ws = min(max(int(math.floor(f32(px) * bw)) + sw, 0), w)
                we = min(max(int(math.ceil(f32(px + 1) * bw)) + sw, 0), w)
                if he <= hs or we <= ws:
                    continue
                v, k = features[b, :, hs:he, ws:we].reshape(c, -1).max(dim=1)  # first maximum
                out[i, :, py, px] = v
                arg[i, :, py, px] = (hs + k // (we - ws)) * w + ws + k % (we - ws)
    return out, arg


def loop_roi_pool_backward(grad_out, arg, rois, shape, scale):
    """Scatter each bin's diff to its argmax, one RoI at a time (Caffe's in-RoI test included)."""
    n, c, h, w = shape
    grad = grad_out.new_zeros(shape).view(n, c, h * w)
    ph_n, pw_n = grad_out.shape[2:]
    for i, roi in enumerate(rois.tolist()):
        b, sw, sh, ew, eh, _, _ = _geometry(roi, scale, ph_n, pw_n)
        a = arg[i].view(c, -1)
        y, x = a // w, a % w
        keep = (a >= 0) & (x >= sw) & (x <= ew) & (y >= sh) & (y <= eh)
        grad[b].scatter_add_(1, a.clamp(min=0), grad_out[i].view(c, -1) * keep)
    return grad.view(shape)


def _geometry(roi, scale, ph_n, pw_n):
    f32 = np.float32
    rnd = lambda v: int(math.copysign(math.floor(abs(v) + 0.5), v))  # noqa: E731 (C round)
    sw, sh, ew, eh = (rnd(float(f32(v) * f32(scale))) for v in roi[1:])
    bh = f32(max(eh - sh + 1, 1)) / f32(ph_n)
    bw = f32(max(ew - sw + 1, 1)) / f32(pw_n)
    return int(roi[0]), sw, sh, ew, eh, bh, bw


def timed(fn, device, repeat):
    """-> (best wall seconds, CPU seconds of that run, result). CPU time is shown as well because
    wall time on a shared machine depends on its load."""
    best, cpu = math.inf, math.inf
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        if wall < best:
            best, cpu = wall, time.process_time() - c0
    return (best, cpu), result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rois", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--loop-repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    feats = torch.randn(1, 512, 38, 50, generator=g).to(device)
    corners = torch.rand(args.rois, 4, generator=g) * torch.tensor([800.0, 600, 800, 600])
    x1, x2 = corners[:, 0::2].min(1).values, corners[:, 0::2].max(1).values
    y1, y2 = corners[:, 1::2].min(1).values, corners[:, 1::2].max(1).values
    rois = torch.stack([torch.zeros(args.rois), x1, y1, x2, y2], 1).to(device)
    scale, pooled = 1 / 16, 7
    top_diff = torch.randn(args.rois, 512, pooled, pooled, generator=g).to(device)
    shape = tuple(feats.shape)

    rows = []
    t_f, (out, arg) = timed(lambda: rp.roi_pool_forward(
        feats, rois, scale, pooled, pooled, use_torchvision=False), device, args.repeat)
    t_b, grad = timed(lambda: rp.roi_pool_backward(top_diff, arg, rois, shape, scale), device,
                      args.repeat)
    rows.append(("ours (vectorized)", t_f, t_b))

    t_lf, (l_out, l_arg) = timed(lambda: loop_roi_pool(feats, rois, scale, pooled, pooled), device,
                                 args.loop_repeat)
    t_lb, l_grad = timed(lambda: loop_roi_pool_backward(top_diff, l_arg, rois, shape, scale),
                         device, args.loop_repeat)
    rows.append(("per-RoI Python loop", t_lf, t_lb))
    assert torch.equal(out, l_out), "forward differs from the loop reference"
    assert torch.equal(arg.long(), l_arg), "argmax differs from the loop reference"
    torch.testing.assert_close(grad, l_grad, rtol=1e-5, atol=1e-5)

    tv = rp._torchvision_op()
    if tv is not None:
        try:
            t_tf, (tv_out, tv_arg) = timed(lambda: tv(feats, rois, scale, pooled, pooled), device,
                                           args.repeat)
            t_tb, tv_grad = timed(lambda: torch.ops.torchvision._roi_pool_backward(
                top_diff, rois, tv_arg, scale, pooled, pooled, *shape), device, args.repeat)
            rows.append(("torchvision.ops.roi_pool", t_tf, t_tb))
            assert torch.equal(tv_out, out), "torchvision's forward differs"
            assert torch.equal(tv_arg.int(), arg), "torchvision's argmax differs"
            torch.testing.assert_close(tv_grad, grad, rtol=1e-5, atol=1e-5)
        except (RuntimeError, AttributeError) as err:
            print(f"torchvision present but unusable here: {err}")
    else:
        print("torchvision: not available (its compiled ops do not load)")

    print(f"\nRoI pooling, {device.type}, features {shape}, {args.rois} RoIs, 7x7, scale 1/16, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'implementation':<26}{'forward s':>10}{'(cpu s)':>9}{'backward s':>12}{'(cpu s)':>9}"
          f"{'fwd x ours':>12}{'bwd x ours':>12}")
    for name, (f, fc), (b, bc) in rows:
        print(f"{name:<26}{f:>10.4f}{fc:>9.3f}{b:>12.4f}{bc:>9.3f}"
              f"{f / t_f[0]:>12.1f}{b / t_b[0]:>12.1f}")
    print("outputs: forward and argmax identical, backward equal (rtol 1e-5)")


if __name__ == "__main__":
    main()
