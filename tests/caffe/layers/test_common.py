"""Caffe's common layers against slow float64 loops, hand-worked numbers and gradcheck.

(The InnerProduct → ReLU → Dropout TEST golden runs layer by layer in test_losses.py.)"""

import math

import numpy as np
import pytest
import torch

from readonly_ohem.errors import SpecError

from layer_testing import gradcheck, make, rand


# -- Input, Silence, Split --------------------------------------------------------------------


def test_input_shapes_and_feed():
    one = make('name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } }')
    assert one.top_shapes([]) == [(2, 3), (2, 3)]
    per = make('name: "in" type: "Input" top: "a" top: "b" '
               'input_param { shape { dim: 2 } shape { dim: 4 dim: 5 } }')
    assert per.top_shapes([]) == [(2,), (4, 5)]
    with pytest.raises(SpecError, match="not fed"):
        per([], [])
    with pytest.raises(SpecError, match="declares no shape"):
        make('name: "in" type: "Input" top: "a"').top_shapes([])
    with pytest.raises(SpecError, match="once per top"):
        make('name: "in" type: "Input" top: "a" top: "b" top: "c" '
             'input_param { shape { dim: 2 } shape { dim: 3 } }')


def test_silence_and_split():
    assert make('name: "s" type: "Silence" bottom: "a" bottom: "b"')([rand(2), rand(3)], []) == []
    split = make('name: "sp" type: "Split" bottom: "a" top: "a1" top: "a2" top: "a3"')
    x = rand(2, 3).requires_grad_(True)
    tops = split([x], [])
    assert len(tops) == 3 and all(torch.equal(t, x) for t in tops)
    (tops[0] * 1 + tops[1] * 2 + tops[2] * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((2, 3), 6.0, dtype=torch.float64))


# -- InnerProduct, Softmax --------------------------------------------------------------------


def inner_product_reference(x, w, b, axis, transpose):
    x = np.asarray(x, np.float64)
    m, k = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))
    x2 = x.reshape(m, k)
    w = np.asarray(w, np.float64)
    n = w.shape[1] if transpose else w.shape[0]
    out = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            acc = 0.0
            for q in range(k):
                acc += x2[i, q] * (w[q, j] if transpose else w[j, q])
            out[i, j] = acc + (b[j] if b is not None else 0.0)
    return out.reshape(x.shape[:axis] + (n,))


@pytest.mark.parametrize("axis,transpose,bias", [(1, False, True), (2, False, True),
                                                 (1, True, True), (-1, False, False)])
def test_inner_product_against_loop(axis, transpose, bias):
    layer = make('name: "fc" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { '
                 f'num_output: 5 axis: {axis} transpose: {str(transpose).lower()} '
                 f'bias_term: {str(bias).lower()} weight_filler {{ type: "gaussian" std: 0.1 }} }}')
    x = rand(2, 3, 4, seed=10)
    a = axis % 3
    k = int(np.prod(x.shape[a:]))
    blobs = layer.param_blobs([tuple(x.shape)])
    assert [b.shape for b in blobs] == [(k, 5) if transpose else (5, k)] + ([(5,)] if bias else [])
    assert blobs[0].filler.type == "gaussian"
    params = [rand(*b.shape, seed=11 + i) for i, b in enumerate(blobs)]
    (y,) = layer([x], params)
    ref = inner_product_reference(x, params[0], params[1] if bias else None, a, transpose)
    assert y.shape == tuple(x.shape[:a]) + (5,) == layer.top_shapes([tuple(x.shape)])[0]
    assert np.allclose(y.numpy(), ref)
    assert gradcheck(lambda t, *p: layer([t], list(p))[0], x, *params)
    with pytest.raises(SpecError, match="incompatible"):
        layer([rand(2, 3, 5)], params)


def test_softmax_axis_against_loop():
    x = rand(2, 3, 4, seed=12)
    layer = make('name: "p" type: "Softmax" bottom: "x" top: "y" softmax_param { axis: 1 }')
    (y,) = layer([x], [])
    for n in range(2):
        for k in range(4):
            col = [x[n, c, k].item() for c in range(3)]
            e = [math.exp(v - max(col)) for v in col]
            assert y[n, :, k].tolist() == pytest.approx([v / sum(e) for v in e])
    assert gradcheck(lambda t: layer([t], [])[0], x)
    last = make('name: "p" type: "Softmax" bottom: "x" top: "y" softmax_param { axis: -1 }')
    assert torch.allclose(last([x], [])[0].sum(-1), torch.ones(2, 3, dtype=torch.float64))


# -- Concat, Slice, Eltwise, Flatten, Reshape -------------------------------------------------


def test_concat():
    a, b = rand(2, 3, 4, seed=13), rand(2, 5, 4, seed=14)
    layer = make('name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y"')
    assert torch.equal(layer([a, b], [])[0], torch.cat([a, b], 1))
    assert layer.top_shapes([(2, 3, 4), (2, 5, 4)]) == [(2, 8, 4)]
    legacy = make('name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y" '
                  'concat_param { concat_dim: 0 }')
    assert legacy([a, a], [])[0].shape == (4, 3, 4)
    last = make('name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y" '
                'concat_param { axis: -1 }')
    assert last([a, a], [])[0].shape == (2, 3, 8)
    assert gradcheck(lambda s, t: layer([s, t], [])[0], a, b)
    with pytest.raises(SpecError, match="outside axis"):
        layer([a, rand(3, 5, 4)], [])
    with pytest.raises(SpecError, match="not both"):
        make('name: "c" type: "Concat" bottom: "a" top: "y" concat_param { axis: 1 concat_dim: 1 }')


def test_slice_points_equal_and_legacy():
    x = rand(2, 6, 3, seed=15)
    points = make('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" top: "c" '
                  'slice_param { slice_point: 1 slice_point: 4 }')
    a, b, c = points([x], [])
    assert torch.equal(a, x[:, :1]) and torch.equal(b, x[:, 1:4]) and torch.equal(c, x[:, 4:])
    assert points.top_shapes([(2, 6, 3)]) == [(2, 1, 3), (2, 3, 3), (2, 2, 3)]
    equal = make('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" top: "c" '
                 'slice_param { axis: -1 }')
    parts = equal([x], [])
    assert all(torch.equal(p, x[..., i:i + 1]) for i, p in enumerate(parts))
    legacy = make('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" '
                  'slice_param { slice_dim: 0 }')
    assert [p.shape for p in legacy([x], [])] == [(1, 6, 3), (1, 6, 3)]
    xg = x.clone().requires_grad_(True)
    a, b, c = points([xg], [])
    (2 * b).sum().backward()  # unused tops give zero gradient
    assert xg.grad[:, 1:4].eq(2).all() and xg.grad[:, :1].eq(0).all() and xg.grad[:, 4:].eq(0).all()
    with pytest.raises(SpecError, match="evenly"):
        make('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" top: "c" top: "d"')([x], [])
    with pytest.raises(SpecError, match="slice_point"):
        make('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" slice_param { slice_point: 1 '
             'slice_point: 2 }')
    with pytest.raises(SpecError, match="does not fit"):
        make('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" '
             'slice_param { slice_point: 7 }')([x], [])


def test_eltwise_sum_prod():
    a, b, c = rand(3, 4, seed=16), rand(3, 4, seed=17), rand(3, 4, seed=18)
    s = make('name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "y" '
             'eltwise_param { operation: SUM coeff: 1 coeff: -2 coeff: 0.5 }')
    assert torch.allclose(s([a, b, c], [])[0], a - 2 * b + 0.5 * c)
    assert gradcheck(lambda *t: s(list(t), [])[0], a, b, c)
    p = make('name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "y" '
             'eltwise_param { operation: PROD }')
    assert torch.allclose(p([a, b, c], [])[0], a * b * c)
    assert gradcheck(lambda *t: p(list(t), [])[0], a, b, c)
    with pytest.raises(SpecError, match="only takes coefficients for summation"):
        make('name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "y" '
             'eltwise_param { operation: PROD coeff: 1 coeff: 2 }')
    with pytest.raises(SpecError, match="one coefficient per bottom"):
        make('name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "y" '
             'eltwise_param { coeff: 1 }')


def test_eltwise_max_caffe_mask():
    layer = make('name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "y" '
                 'eltwise_param { operation: MAX }')
    a = torch.tensor([1.0, 2.0, 5.0, 0.0, 3.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1.0, 3.0, 4.0, 0.0, 3.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.0, 3.0, 5.0, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    (y,) = layer([a, b, c], [])
    assert y.tolist() == [1.0, 3.0, 5.0, 1.0, 3.0]
    y.sum().backward()
    # Caffe: a beats b only when strictly greater (a 0-vs-1 tie goes to b); a later bottom wins
    # only when strictly greater than the running max.
    mask = [[0, 0, 1, 0, 0], [1, 1, 0, 0, 1], [0, 0, 0, 1, 0]]
    assert [a.grad.tolist(), b.grad.tolist(), c.grad.tolist()] == mask
    with pytest.raises(SpecError, match="differs"):
        layer([a, b, torch.zeros(4)], [])


def test_flatten():
    x = rand(2, 3, 4, 5, seed=19)
    assert make('name: "f" type: "Flatten" bottom: "x" top: "y"')([x], [])[0].shape == (2, 60)
    mid = make('name: "f" type: "Flatten" bottom: "x" top: "y" '
               'flatten_param { axis: 1 end_axis: 2 }')
    assert torch.equal(mid([x], [])[0], x.reshape(2, 12, 5))
    assert mid.top_shapes([(2, 3, 4, 5)]) == [(2, 12, 5)]
    with pytest.raises(SpecError, match="in-place"):
        make('name: "f" type: "Flatten" bottom: "x" top: "x"')


@pytest.mark.parametrize("spec,shape", [
    ("shape { dim: 0 dim: -1 }", (2, 60)),
    ("shape { dim: 0 dim: 2 dim: -1 dim: 5 }", (2, 2, 6, 5)),
    ("shape { dim: -1 }", (120,)),
    ("shape { dim: 6 dim: 2 } axis: 1 num_axes: 2", (2, 6, 2, 5)),
    ("shape { dim: 1 } axis: 0 num_axes: 0", (1, 2, 3, 4, 5)),
    ("shape { dim: 1 } axis: -1 num_axes: 0", (2, 3, 4, 5, 1)),
    ("shape { dim: 2 dim: -1 } axis: -3", (2, 3, 2, 10)),
])
def test_reshape(spec, shape):
    layer = make(f'name: "r" type: "Reshape" bottom: "x" top: "y" reshape_param {{ {spec} }}')
    x = rand(2, 3, 4, 5, seed=20)
    (y,) = layer([x], [])
    assert y.shape == shape == layer.top_shapes([(2, 3, 4, 5)])[0]
    assert torch.equal(y.reshape(-1), x.reshape(-1))


def test_reshape_errors():
    x = rand(2, 3, 4, seed=21)
    with pytest.raises(SpecError, match="multiple -1"):
        make('name: "r" type: "Reshape" bottom: "x" top: "y" '
             'reshape_param { shape { dim: -1 dim: -1 } }')
    with pytest.raises(SpecError, match="divisible"):
        make('name: "r" type: "Reshape" bottom: "x" top: "y" '
             'reshape_param { shape { dim: 5 dim: -1 } }')([x], [])
    with pytest.raises(SpecError, match="must match input count"):
        make('name: "r" type: "Reshape" bottom: "x" top: "y" '
             'reshape_param { shape { dim: 5 dim: 5 } }')([x], [])
    with pytest.raises(SpecError, match="no corresponding bottom axis"):
        make('name: "r" type: "Reshape" bottom: "x" top: "y" '
             'reshape_param { shape { dim: 0 dim: 0 dim: 0 dim: 0 } }')([x], [])
    with pytest.raises(SpecError, match="in-place"):
        make('name: "r" type: "Reshape" bottom: "x" top: "x" reshape_param { shape { dim: -1 } }')


# -- Scale, Bias ------------------------------------------------------------------------------


def test_scale_learned_with_bias():
    layer = make('name: "s" type: "Scale" bottom: "x" top: "y" scale_param { bias_term: true '
                 'axis: 1 num_axes: 2 bias_filler { type: "constant" value: 0.5 } }')
    blobs = layer.param_blobs([(2, 3, 4, 5)])
    assert [b.shape for b in blobs] == [(3, 4), (3, 4)]
    assert blobs[0].filler.type == "constant" and blobs[0].filler.value == 1.0  # Caffe default
    assert blobs[1].filler.value == 0.5
    x, s, b = rand(2, 3, 4, 5, seed=22), rand(3, 4, seed=23), rand(3, 4, seed=24)
    (y,) = layer([x], [s, b])
    ref = np.zeros(x.shape)
    for n in range(2):
        for c in range(3):
            for h in range(4):
                ref[n, c, h] = x[n, c, h].numpy() * s[c, h].item() + b[c, h].item()
    assert np.allclose(y.numpy(), ref)
    assert gradcheck(lambda *t: layer([t[0]], list(t[1:]))[0], x, s, b)


def test_scale_from_bottom_and_scalar():
    layer = make('name: "s" type: "Scale" bottom: "x" bottom: "s" top: "y" scale_param { axis: 0 '
                 'bias_term: true }')
    assert [b.shape for b in layer.param_blobs([(2, 3, 4), (2, 3)])] == [(2, 3)]
    x, s, b = rand(2, 3, 4, seed=25), rand(2, 3, seed=26), rand(2, 3, seed=27)
    assert torch.allclose(layer([x, s], [b])[0], x * s[..., None] + b[..., None])
    assert gradcheck(lambda t, u, v: layer([t, u], [v])[0], x, s, b)
    scalar = make('name: "s" type: "Scale" bottom: "x" top: "y" scale_param { num_axes: 0 }')
    assert [b.shape for b in scalar.param_blobs([(2, 3, 4)])] == [()]
    assert torch.allclose(scalar([x], [torch.tensor(3.0, dtype=torch.float64)])[0], 3 * x)
    with pytest.raises(SpecError, match="does not match"):
        layer([x, rand(3, 3)], [b])


def test_bias_learned_and_bottom():
    layer = make('name: "b" type: "Bias" bottom: "x" top: "y" bias_param { axis: -1 }')
    assert [b.shape for b in layer.param_blobs([(2, 3, 4)])] == [(4,)]
    x, b = rand(2, 3, 4, seed=28), rand(4, seed=29)
    assert torch.allclose(layer([x], [b])[0], x + b)
    assert gradcheck(lambda t, u: layer([t], [u])[0], x, b)
    two = make('name: "b" type: "Bias" bottom: "x" bottom: "b" top: "y"')
    assert two.param_blobs([(2, 3, 4), (3,)]) == []
    c = rand(3, seed=30)
    assert torch.allclose(two([x, c], [])[0], x + c[:, None])


# -- BatchNorm --------------------------------------------------------------------------------


def test_batchnorm_global_stats():
    layer = make('name: "bn" type: "BatchNorm" bottom: "x" top: "y"', phase="TEST")
    assert layer.frozen_params and layer.use_global_stats
    assert [b.shape for b in layer.param_blobs([(2, 3, 4, 4)])] == [(3,), (3,), (1,)]
    x = rand(2, 3, 4, 4, seed=31).requires_grad_(True)
    mean_s = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    var_s = torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    (y,) = layer([x], [mean_s, var_s, s])
    for c in range(3):
        m, v = mean_s[c].item() / 2, var_s[c].item() / 2
        assert torch.allclose(y[:, c], (x[:, c] - m) / math.sqrt(v + 1e-5))
    y.sum().backward()
    assert torch.allclose(x.grad[:, 1], torch.full((2, 4, 4), 1 / math.sqrt(0.5 + 1e-5),
                                                   dtype=torch.float64))
    assert mean_s.grad is None and var_s.grad is None and s.grad is None  # never learned
    # s == 0: Caffe's scale factor is 0, so mean = var = 0 and y = x / sqrt(eps)
    zero = [torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
            torch.zeros(1, dtype=torch.float64)]
    eps = make('name: "bn" type: "BatchNorm" bottom: "x" top: "y" '
               'batch_norm_param { use_global_stats: true eps: 0.01 }', phase="TRAIN")
    assert torch.allclose(eps([x], zero)[0], x / 0.1)


def test_batchnorm_train_batch_stats_and_running_update():
    layer = make('name: "bn" type: "BatchNorm" bottom: "x" top: "y" '
                 'batch_norm_param { moving_average_fraction: 0.9 } '
                 'param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }')
    assert not layer.use_global_stats
    x = rand(3, 2, 5, seed=32) * 3 + 1
    f64 = dict(dtype=torch.float64)
    params = [torch.tensor([0.2, 0.4], **f64), torch.tensor([1.0, 2.0], **f64),
              torch.tensor([1.5], **f64)]
    old = [p.clone() for p in params]
    (y,) = layer([x], params)
    m = 15
    for c in range(2):
        vals = [x[n, c, k].item() for n in range(3) for k in range(5)]
        mean = sum(vals) / m
        var = sum((v - mean) ** 2 for v in vals) / m
        ref = [(v - mean) / math.sqrt(var + 1e-5) for v in vals]
        assert y[:, c].reshape(-1).tolist() == pytest.approx(ref)
        assert params[0][c].item() == pytest.approx(mean + 0.9 * old[0][c].item())
        assert params[1][c].item() == pytest.approx(var * m / (m - 1) + 0.9 * old[1][c].item())
    assert params[2].item() == pytest.approx(0.9 * 1.5 + 1)
    # gradient through the batch statistics (Caffe's full BN backward)
    fresh = lambda: [torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                     torch.zeros(1, dtype=torch.float64)]
    assert gradcheck(lambda t: layer([t], fresh())[0] * torch.arange(30.0).reshape(3, 2, 5), x)
    # use_global_stats: false in TEST still uses the batch
    test = make('name: "bn" type: "BatchNorm" bottom: "x" top: "y" '
                'batch_norm_param { use_global_stats: false }', phase="TEST")
    assert torch.allclose(test([x], fresh())[0], y)


def test_batchnorm_rejects_learnable_stats():
    with pytest.raises(SpecError, match="lr_mult"):
        make('name: "bn" type: "BatchNorm" bottom: "x" top: "y" param { lr_mult: 0 } param { }')
