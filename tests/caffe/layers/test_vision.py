"""Convolution, Pooling, LRN: plain-loop float64 references of Caffe's code, gradcheck, goldens."""

import json
import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from readonly_ohem.errors import SpecError
from readonly_ohem.caffe.layers.base import LAYERS, LayerContext
from readonly_ohem.caffe.layers.vision import caffe_pooled_size
from readonly_ohem.caffe.proto import caffe_pb2

FLT_MAX = float(np.finfo(np.float32).max)


def make(text, phase="TEST"):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return LAYERS[param.type](param, LayerContext(phase=phase))


# -- Convolution ------------------------------------------------------------------------------
def conv_reference(x, weight, bias, stride, pad, dilation, group):
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    oh = (h + 2 * pad[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    ow = (w + 2 * pad[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    out = np.zeros((n, o, oh, ow))
    og = o // group
    for b in range(n):
        for f in range(o):
            g = f // og
            for y in range(oh):
                for xx in range(ow):
                    acc = 0.0 if bias is None else bias[f]
                    for ci in range(cg):
                        for ky in range(kh):
                            for kx in range(kw):
                                iy = y * stride[0] - pad[0] + ky * dilation[0]
                                ix = xx * stride[1] - pad[1] + kx * dilation[1]
                                if 0 <= iy < h and 0 <= ix < w:
                                    acc += weight[f, ci, ky, kx] * x[b, g * cg + ci, iy, ix]
                    out[b, f, y, xx] = acc
    return out


CONV_CASES = [
    ("num_output: 4 kernel_size: 3", (1, 1), (0, 0), (1, 1), 1, True),
    ("num_output: 4 kernel_size: 7 stride: 2", (2, 2), (0, 0), (1, 1), 1, True),
    ("num_output: 6 kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 2 group: 3",
     (1, 2), (1, 2), (1, 1), 3, True),
    ("num_output: 2 kernel_size: 3 pad: 2 dilation: 2 bias_term: false", (1, 1), (2, 2), (2, 2), 1, False),
    ("num_output: 3 kernel_size: 3 kernel_size: 1 stride: 2 stride: 1 pad: 0 pad: 1", (2, 1), (0, 1), (1, 1),
     1, True),
]


@pytest.mark.parametrize("conv_text,stride,pad,dilation,group,bias_term", CONV_CASES)
def test_convolution_matches_loop(conv_text, stride, pad, dilation, group, bias_term):
    layer = make(f'name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param {{ {conv_text} }}')
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6 if group == 3 else 3, 11, 13, generator=g, dtype=torch.float64)
    blobs = layer.param_blobs([tuple(x.shape)])
    assert len(blobs) == (2 if bias_term else 1)
    params = [torch.randn(b.shape, generator=g, dtype=torch.float64) for b in blobs]
    (y,) = layer.forward([x], params)
    want = conv_reference(x.numpy(), params[0].numpy(), params[1].numpy() if bias_term else None,
                          stride, pad, dilation, group)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-12, atol=1e-12)


def test_convolution_shapes_fillers_and_floor():
    layer = make('name: "conv1" type: "Convolution" bottom: "x" top: "y" convolution_param { '
                 'num_output: 96 kernel_size: 7 stride: 2 group: 2 weight_filler { type: "gaussian" '
                 'std: 0.01 } }')
    weight, bias = layer.param_blobs([(1, 4, 17, 20)])
    assert weight.shape == (96, 2, 7, 7) and bias.shape == (96,)
    assert weight.filler.type == "gaussian" and weight.filler.std == pytest.approx(0.01)
    assert bias.filler is None  # Caffe's default: constant 0
    # floor: (17 - 7) / 2 + 1 = 6, (20 - 7) / 2 + 1 = 7 (the last input column is not covered)
    assert layer.top_shapes([(1, 4, 17, 20)]) == [(1, 96, 6, 7)]


def test_convolution_gradcheck_and_shared_weights_over_two_bottoms():
    layer = make('name: "c" type: "Convolution" bottom: "a" bottom: "b" top: "p" top: "q" '
                 'convolution_param { num_output: 2 kernel_size: 3 pad: 1 stride: 2 group: 2 }')
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: layer.forward(t[:2], t[2:]), (a, b, w, bias), fast_mode=True)
    p, q = layer.forward([a, b], [w, bias])
    assert p.shape == (1, 2, 3, 3) and q.shape == (2, 2, 2, 2)


@pytest.mark.parametrize("conv_text,message", [
    ("num_output: 2 kernel_size: 3 axis: 2", "axis 2"),
    ("num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", "not both"),
    ("num_output: 2 kernel_h: 3", "together"),
    ("num_output: 2", "kernel_size"),
    ("kernel_size: 3", "num_output"),
    ("num_output: 3 kernel_size: 3 group: 2", "group"),
    ("num_output: 2 kernel_size: 3 stride: 0", "> 0"),
])
def test_convolution_bad_params_name_the_layer(conv_text, message):
    with pytest.raises(SpecError, match=message) as err:
        make(f'name: "bad_conv" type: "Convolution" bottom: "x" top: "y" convolution_param {{ {conv_text} }}')
    assert "bad_conv" in str(err.value)


def test_convolution_bad_inputs():
    layer = make('name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param '
                 '{ num_output: 2 kernel_size: 3 group: 2 }')
    with pytest.raises(SpecError, match="group"):
        layer.param_blobs([(1, 3, 5, 5)])
    with pytest.raises(SpecError, match="channels"):
        layer.forward([torch.zeros(1, 6, 5, 5)], [torch.zeros(2, 2, 3, 3), torch.zeros(2)])
    with pytest.raises(SpecError, match="kernel extent"):
        layer.forward([torch.zeros(1, 4, 2, 5)], [torch.zeros(2, 2, 3, 3), torch.zeros(2)])
    with pytest.raises(SpecError, match="4 axes"):
        layer.forward([torch.zeros(4, 5, 5)], [torch.zeros(2, 2, 3, 3), torch.zeros(2)])


# -- Pooling ----------------------------------------------------------------------------------
def pool_reference(x, method, k, s, p, ceil_mode=True, top_diff=None):
    """Caffe's PoolingLayer Reshape/Forward_cpu/Backward_cpu, loop by loop, float64."""
    n, c, h, w = x.shape
    rnd = math.ceil if ceil_mode else math.floor
    oh = int(rnd((h + 2 * p[0] - k[0]) / s[0])) + 1
    ow = int(rnd((w + 2 * p[1] - k[1]) / s[1])) + 1
    if p[0] or p[1]:
        if (oh - 1) * s[0] >= h + p[0]:
            oh -= 1
        if (ow - 1) * s[1] >= w + p[1]:
            ow -= 1
    top = np.zeros((n, c, oh, ow))
    mask = -np.ones((n, c, oh, ow), np.int64)
    diff = np.zeros(x.shape)
    for b in range(n):
        for ch in range(c):
            for y in range(oh):
                for xx in range(ow):
                    hs, ws = y * s[0] - p[0], xx * s[1] - p[1]
                    if method == "MAX":
                        he, we = min(hs + k[0], h), min(ws + k[1], w)
                        hs, ws = max(hs, 0), max(ws, 0)
                        best, idx = -FLT_MAX, -1
                        for yy in range(hs, he):
                            for x2 in range(ws, we):
                                if x[b, ch, yy, x2] > best:
                                    best, idx = x[b, ch, yy, x2], yy * w + x2
                        top[b, ch, y, xx], mask[b, ch, y, xx] = best, idx
                        if top_diff is not None and idx >= 0:
                            diff[b, ch, idx // w, idx % w] += top_diff[b, ch, y, xx]
                    else:
                        he, we = min(hs + k[0], h + p[0]), min(ws + k[1], w + p[1])
                        size = (he - hs) * (we - ws)
                        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                        total = sum(x[b, ch, yy, x2] for yy in range(hs, he) for x2 in range(ws, we))
                        top[b, ch, y, xx] = total / size
                        if top_diff is not None:
                            diff[b, ch, hs:he, ws:we] += top_diff[b, ch, y, xx] / size
    return top, mask, diff


def pool_layer(method, k, s, p, ceil_mode=True, two_tops=False):
    mask_top = 'top: "m"' if two_tops else ""
    text = (f'name: "pool" type: "Pooling" bottom: "x" top: "y" {mask_top} '
            f'pooling_param {{ pool: {method} kernel_h: {k[0]} kernel_w: {k[1]} stride_h: {s[0]} '
            f'stride_w: {s[1]} pad_h: {p[0]} pad_w: {p[1]} '
            f'round_mode: {"CEIL" if ceil_mode else "FLOOR"} }}')
    return make(text)


POOL_CASES = [  # (H, W, kernel, stride, pad, ceil_mode): PyTorch's path and the unfold path
    (11, 8, (3, 3), (2, 2), (0, 0), True),  # ceil adds the last column (golden pooling_max_ceil)
    (7, 10, (3, 3), (2, 2), (1, 1), True),
    (9, 8, (3, 3), (2, 2), (1, 1), True),  # golden pooling_ave_pad
    (7, 9, (2, 2), (2, 2), (0, 0), True),  # VGG16 pools on odd sizes
    (7, 10, (3, 3), (2, 2), (1, 1), False),  # round_mode FLOOR
    (6, 7, (2, 3), (1, 2), (1, 0), True),  # rectangular everything
    (6, 5, (3, 3), (3, 3), (2, 2), True),  # pad > kernel / 2: unfold path
    (5, 7, (1, 2), (3, 3), (0, 0), True),  # stride > kernel, no pad: last row window off the map
    (8, 8, (3, 3), (2, 2), (2, 1), True),  # the minus-one rule (pad 2 on rows)
    (2, 5, (3, 3), (2, 2), (0, 0), True),  # map smaller than the kernel: Caffe still gives 1 row
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("h,w,k,s,p,ceil_mode", POOL_CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_pooling_matches_caffe_loops(method, h, w, k, s, p, ceil_mode, ties):
    g = torch.Generator().manual_seed(h * w)
    if ties:
        x = torch.randint(-2, 3, (2, 3, h, w), generator=g).double()
    else:
        x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    x.requires_grad_()
    layer = pool_layer(method, k, s, p, ceil_mode, two_tops=method == "MAX")
    tops = layer.forward([x], [])
    top_diff = torch.randn(tops[0].shape, generator=g, dtype=torch.float64)
    want, want_mask, want_diff = pool_reference(x.detach().numpy(), method, k, s, p, ceil_mode,
                                                top_diff.numpy())
    assert tops[0].shape == want.shape
    np.testing.assert_allclose(tops[0].detach().numpy(), want, rtol=1e-12, atol=1e-12)
    if method == "MAX":
        np.testing.assert_array_equal(tops[1].numpy(), want_mask)
    tops[0].backward(top_diff)
    np.testing.assert_allclose(x.grad.numpy(), want_diff, rtol=1e-12, atol=1e-12)


def test_pooled_sizes_by_hand():
    assert caffe_pooled_size(11, 3, 0, 2, True, False) == 5  # (11-3)/2+1 exactly
    assert caffe_pooled_size(8, 3, 0, 2, True, False) == 4  # ceil(5/2)+1; floor would give 3
    assert caffe_pooled_size(10, 3, 1, 2, True, True) == 6  # floor would give 5
    assert caffe_pooled_size(8, 3, 1, 2, True, True) == 5  # golden out_c width
    assert caffe_pooled_size(8, 3, 2, 2, True, True) == 5  # ceil(9/2)+1 = 6, but 5*2 >= 8+2: 5
    assert caffe_pooled_size(5, 1, 0, 3, True, False) == 3  # no pad: no minus-one, window at 6
    assert caffe_pooled_size(10, 3, 1, 2, False, True) == 5


def test_max_pool_tie_gradient_goes_to_first_in_window():
    """PyTorch's max_pool2d sends a tie's gradient to the first cell in row-major window order, as
    Caffe's strict > does (so the fast path may use it); the unfold path does the same."""
    # pad 1: window (0, 0) covers rows/columns -1..1; pad 2 (> kernel/2: unfold): rows/cols 1..3
    for pad, first, second in ((1, (0, 1), (1, 0)), (2, (1, 2), (2, 1))):
        x = torch.full((1, 1, 4, 4), -1.0)
        x[(0, 0) + first] = x[(0, 0) + second] = 4.0
        xx = x.clone().requires_grad_()
        y = pool_layer("MAX", (3, 3), (3, 3), (pad, pad)).forward([xx], [])[0]
        assert y.shape == (1, 1, 2, 2)
        y.sum().backward()
        assert xx.grad[(0, 0) + first] == 1 and xx.grad[(0, 0) + second] == 0
        if pad == 1:
            xx = x.clone().requires_grad_()
            torch.nn.functional.max_pool2d(xx, 3, 3, 1, ceil_mode=True).sum().backward()
            assert xx.grad[(0, 0) + first] == 1 and xx.grad[(0, 0) + second] == 0


@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_channels_last_route_equals_plain_nchw(ties):
    """On the CPU MAX pooling takes its argmax from a channels-last copy and gathers the values
    (a faster kernel): the same values, mask and gradient as ``F.max_pool2d`` on the NCHW map,
    ties and overlapping windows (a cell that is the maximum of several) included."""
    g = torch.Generator().manual_seed(4)
    for shape, k, s, p in (((2, 5, 13, 11), 2, 2, 0), ((1, 7, 9, 12), 3, 2, 1), ((1, 3, 8, 8), 3, 3, 1)):
        x = (torch.randint(-2, 3, shape, generator=g).float() if ties
             else torch.randn(shape, generator=g))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        want, want_idx = torch.nn.functional.max_pool2d(xa, k, s, p, ceil_mode=True,
                                                        return_indices=True)
        got, mask = pool_layer("MAX", (k, k), (s, s), (p, p), two_tops=True).forward([xb], [])
        assert got.is_contiguous() and torch.equal(got, want)
        assert torch.equal(mask, want_idx.float())
        top_diff = torch.randn(want.shape, generator=g)
        want.backward(top_diff)
        got.backward(top_diff)
        assert torch.equal(xb.grad, xa.grad)


def test_ave_pool_divisor_counts_padding_not_beyond_by_hand():
    x = torch.ones(1, 1, 4, 4)
    y = pool_layer("AVE", (3, 3), (2, 2), (1, 1)).forward([x], [])[0]
    # out 3x3 (ceil(3/2)+1=3; window 2 starts at 3 < 4+1). Window (0,0): rows -1..1 -> 4 real / 9;
    # window (2,2): rows 3..5 clipped to [-1, 5) = 3..4 -> 2 rows, 1 real: 1 / (2*2).
    assert y.shape == (1, 1, 3, 3)
    assert y[0, 0, 0, 0].item() == pytest.approx(4 / 9)
    assert y[0, 0, 2, 2].item() == pytest.approx(1 / 4)
    assert y[0, 0, 1, 1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("pad", [1, 2])
def test_pooling_gradcheck(method, pad):
    g = torch.Generator().manual_seed(pad)
    x = (torch.randperm(2 * 7 * 8, generator=g).double().view(1, 2, 7, 8) / 10).requires_grad_()
    layer = pool_layer(method, (3, 3), (2, 2), (pad, pad))
    assert torch.autograd.gradcheck(lambda t: layer.forward([t], [])[0], (x,), fast_mode=True)


def test_global_pooling():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    for method, want in (("MAX", x.amax(dim=(2, 3))), ("AVE", x.mean(dim=(2, 3)))):
        layer = make(f'name: "g" type: "Pooling" bottom: "x" top: "y" pooling_param {{ pool: {method} '
                     'global_pooling: true }')
        (y,) = layer.forward([x], [])
        assert y.shape == (2, 3, 1, 1)
        torch.testing.assert_close(y.view(2, 3), want)


@pytest.mark.parametrize("pool_text,message", [
    ("pool: STOCHASTIC kernel_size: 2", "STOCHASTIC"),
    ("pool: MAX", "kernel_size"),
    ("pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2", "not both"),
    ("pool: MAX global_pooling: true kernel_size: 2", "global_pooling"),
    ("pool: MAX global_pooling: true stride: 2", "global_pooling"),
    ("pool: MAX kernel_size: 3 pad: 3", "smaller than the kernel"),
    ("pool: MAX kernel_size: 3 pad_h: 1", "pad_h and pad_w"),
    ("pool: MAX kernel_size: 3 stride: 0", "stride"),
])
def test_pooling_bad_params_name_the_layer(pool_text, message):
    with pytest.raises(SpecError, match=message) as err:
        make(f'name: "bad_pool" type: "Pooling" bottom: "x" top: "y" pooling_param {{ {pool_text} }}')
    assert "bad_pool" in str(err.value)
    with pytest.raises(SpecError, match="mask"):
        make('name: "p" type: "Pooling" bottom: "x" top: "y" top: "m" pooling_param '
             '{ pool: AVE kernel_size: 2 }')


def test_pooling_too_small_input_is_an_error():
    layer = make('name: "p5" type: "Pooling" bottom: "x" top: "y" pooling_param { kernel_size: 5 '
                 'stride: 2 }')
    with pytest.raises(SpecError, match="p5"):
        layer.forward([torch.zeros(1, 1, 2, 2)], [])


# -- LRN --------------------------------------------------------------------------------------
def lrn_reference(x, size, alpha, beta, k, across=True):
    n, c, h, w = x.shape
    out = np.zeros(x.shape)
    half = (size - 1) // 2
    for b in range(n):
        for ch in range(c):
            for y in range(h):
                for xx in range(w):
                    if across:
                        sq = sum(x[b, cc, y, xx] ** 2 for cc in range(ch - half, ch + half + 1) if 0 <= cc < c)
                        scale = k + alpha / size * sq
                    else:
                        sq = sum(x[b, ch, yy, x2] ** 2 for yy in range(y - half, y + half + 1)
                                 for x2 in range(xx - half, xx + half + 1) if 0 <= yy < h and 0 <= x2 < w)
                        scale = 1 + alpha * sq / size ** 2
                    out[b, ch, y, xx] = x[b, ch, y, xx] * scale ** -beta
    return out


def lrn_layer(size, alpha, beta, k, region="ACROSS_CHANNELS"):
    return make(f'name: "norm" type: "LRN" bottom: "x" top: "y" lrn_param {{ local_size: {size} '
                f'alpha: {alpha} beta: {beta} k: {k} norm_region: {region} }}')


def test_lrn_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    (y,) = lrn_layer(3, 3, 1, 1).forward([x], [])  # alpha/n = 1: scale = 1 + sum of squares
    torch.testing.assert_close(y.view(-1), torch.tensor([1 / 6, 2 / 15, 3 / 14], dtype=torch.float64))
    x = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    (y,) = lrn_layer(3, 9, 1, 100, "WITHIN_CHANNEL").forward([x], [])  # k ignored; 4/9 mean
    assert y.item() == pytest.approx(2 / 5)


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
@pytest.mark.parametrize("size", [1, 3, 5])
def test_lrn_matches_loop_and_gradcheck(region, size):
    g = torch.Generator().manual_seed(size)
    x = (torch.randn(2, 6, 4, 5, generator=g, dtype=torch.float64) * 30).requires_grad_()
    layer = lrn_layer(size, 0.0005, 0.75, 2, region)
    (y,) = layer.forward([x], [])
    want = lrn_reference(x.detach().numpy(), size, 0.0005, 0.75, 2, region == "ACROSS_CHANNELS")
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-6)  # alpha is a float32 field
    assert torch.autograd.gradcheck(lambda t: layer.forward([t], [])[0], (x,), fast_mode=True)


def test_lrn_even_size_is_an_error():
    with pytest.raises(SpecError, match="odd"):
        lrn_layer(4, 1, 0.75, 1)


# -- Caffe goldens ----------------------------------------------------------------------------
GOLDEN_CASES = ["pooling_max_ceil", "pooling_ave_pad", "lrn_across", "conv_basic"]


def run_golden(case_dir):
    """Build each layer of the case from its prototxt, load the caffemodel's blobs, run forward,
    seed backward with top_diff.npz, and compare every recorded array at the case's tolerance."""
    meta = json.loads((case_dir / "meta.json").read_text())
    net = text_format.Parse((case_dir / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    saved = caffe_pb2.NetParameter()
    saved.ParseFromString((case_dir / "weights.caffemodel").read_bytes())
    stored = {layer.name: [np.array(b.data, np.float32).reshape(tuple(b.shape.dim))
                           for b in layer.blobs] for layer in saved.layer}
    blobs = {k: torch.tensor(v, requires_grad=True) for k, v in np.load(case_dir / "inputs.npz").items()}
    params = {}
    for lp in net.layer:
        if lp.type == "Input":
            continue
        layer = LAYERS[lp.type](lp, LayerContext(phase=meta["phase"]))
        bottoms = [blobs[b] for b in lp.bottom]
        shapes = [b.shape for b in layer.param_blobs([tuple(t.shape) for t in bottoms])]
        assert shapes == [a.shape for a in stored.get(lp.name, [])], lp.name
        params[lp.name] = [torch.tensor(a, requires_grad=True) for a in stored.get(lp.name, [])]
        for name, top in zip(lp.top, layer.forward(bottoms, params[lp.name])):
            top.retain_grad()
            blobs[name] = top
    top_diff = np.load(case_dir / "top_diff.npz")
    torch.autograd.backward([blobs[k] for k in top_diff], [torch.tensor(v) for v in top_diff.values()])
    expected = np.load(case_dir / "expected.npz")
    for key in expected:
        if key.startswith("diff/"):
            got = blobs[key[5:]].grad
        elif key.startswith("param_diff/"):
            _, layer_name, i = key.split("/")
            got = params[layer_name][int(i)].grad
        else:
            got = blobs[key]
        got = got.detach().numpy()
        assert got.shape == expected[key].shape, key
        np.testing.assert_allclose(got, expected[key], rtol=meta["rtol"], atol=meta["atol"], err_msg=key)
    return expected


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_fixture(case, fixtures_dir):
    expected = run_golden(fixtures_dir / "caffe_goldens" / case)
    assert any(k.startswith("diff/") for k in expected)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_shared(case, shared_dir):
    run_golden(shared_dir / "caffe_goldens" / case)
