"""Caffe's neuron layers against slow float64 loops, hand-worked numbers and gradcheck.

(The InnerProduct → ReLU → Dropout TEST golden runs layer by layer in test_losses.py.)"""

import math

import numpy as np
import pytest
import torch

from readonly_ohem.errors import SpecError

from layer_testing import gradcheck, make, rand


@pytest.mark.parametrize("slope", [0.0, 0.1, -0.3])
def test_relu_against_loop_and_grad_at_zero(slope):
    relu = make('name: "r" type: "ReLU" bottom: "x" top: "x" '
                f'relu_param {{ negative_slope: {slope} }}')
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    (y,) = relu([x], [])
    ref = [max(v, 0.0) + slope * min(v, 0.0) for v in x.tolist()]
    assert y.tolist() == pytest.approx(ref)
    y.sum().backward()
    assert x.grad.tolist() == pytest.approx([slope, slope, slope, 1.0, 1.0])  # at 0: the slope
    assert gradcheck(lambda t: relu([t], [])[0], rand(3, 4, seed=1))


def test_prelu_channelwise_and_shared():
    prelu = make('name: "p" type: "PReLU" bottom: "x" top: "y"')
    (blob,) = prelu.param_blobs([(2, 3, 4)])
    assert blob.shape == (3,) and blob.filler.type == "constant" and blob.filler.value == 0.25
    x = rand(2, 3, 4, seed=2)
    x[0, 1, 2] = 0.0
    slope = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    (y,) = prelu([x], [slope])
    ref = np.zeros(x.shape)
    for n in range(2):
        for c in range(3):
            for k in range(4):
                v = x[n, c, k].item()
                ref[n, c, k] = max(v, 0) + slope[c].item() * min(v, 0)
    assert np.allclose(y.numpy(), ref)
    xg, sg = x.clone().requires_grad_(True), slope.clone().requires_grad_(True)
    top_diff = rand(2, 3, 4, seed=3)
    (prelu([xg], [sg])[0] * top_diff).sum().backward()
    assert xg.grad[0, 1, 2].item() == pytest.approx(top_diff[0, 1, 2].item() * -0.2)
    ref_sg = [(top_diff[:, c] * x[:, c] * (x[:, c] <= 0)).sum().item() for c in range(3)]
    assert sg.grad.tolist() == pytest.approx(ref_sg)
    assert gradcheck(lambda a, s: prelu([a], [s])[0], rand(2, 3, 4, seed=4), slope)

    shared = make('name: "p" type: "PReLU" bottom: "x" top: "y" prelu_param { channel_shared: true '
                  'filler { type: "constant" value: 0.5 } }')
    (blob,) = shared.param_blobs([(2, 3, 4)])
    assert blob.shape == () and blob.filler.value == 0.5  # Caffe's shared slope is a 0-axis blob
    s = torch.tensor(0.5, dtype=torch.float64)
    assert torch.allclose(shared([x], [s])[0], torch.where(x > 0, x, 0.5 * x))
    assert gradcheck(lambda a, t: shared([a], [t])[0], rand(2, 3, 4, seed=5), s)
    with pytest.raises(SpecError, match="negative slope"):
        prelu([x], [torch.ones(4, dtype=torch.float64)])


def test_sigmoid_tanh_against_math():
    x = rand(3, 5, seed=6)
    sig = make('name: "s" type: "Sigmoid" bottom: "x" top: "y"')
    tanh = make('name: "t" type: "TanH" bottom: "x" top: "y"')
    flat = x.reshape(-1).tolist()
    ref = [1 / (1 + math.exp(-v)) for v in flat]
    assert sig([x], [])[0].reshape(-1).tolist() == pytest.approx(ref)
    assert tanh([x], [])[0].reshape(-1).tolist() == pytest.approx([math.tanh(v) for v in flat])
    assert gradcheck(lambda t: sig([t], [])[0], x)
    assert gradcheck(lambda t: tanh([t], [])[0], x)


@pytest.mark.parametrize("power,scale,shift", [(2.0, 0.5, 1.0), (3.0, 2.0, 0.0), (0.5, 1.5, 4.0),
                                               (1.0, -2.0, 0.5), (1.0, 1.0, 0.0)])
def test_power_against_loop(power, scale, shift):
    layer = make(f'name: "p" type: "Power" bottom: "x" top: "y" '
                 f'power_param {{ power: {power} scale: {scale} shift: {shift} }}')
    x = rand(2, 6, seed=7)
    (y,) = layer([x], [])
    assert y.reshape(-1).tolist() == pytest.approx(
        [(shift + scale * v) ** power for v in x.reshape(-1).tolist()])
    assert gradcheck(lambda t: layer([t], [])[0], x)


def test_power_constant_cases():
    x = rand(4, seed=8).requires_grad_(True)
    zero_scale = make('name: "p" type: "Power" bottom: "x" top: "y" '
                      'power_param { power: 2 scale: 0 shift: 3 }')
    assert zero_scale([x], [])[0].tolist() == [9.0] * 4
    zero_power = make('name: "p" type: "Power" bottom: "x" top: "y" '
                      'power_param { power: 0 shift: -1 }')
    assert zero_power([x], [])[0].tolist() == [1.0] * 4


def test_dropout_test_phase_and_scale_train_false():
    x = rand(4, 5, seed=9)
    drop = make('name: "d" type: "Dropout" bottom: "x" top: "y" '
                'dropout_param { dropout_ratio: 0.3 }', phase="TEST")
    xg = x.clone().requires_grad_(True)
    (y,) = drop([xg], [])
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))
    fork = make('name: "d" type: "Dropout" bottom: "x" top: "y" '
                'dropout_param { dropout_ratio: 0.3 scale_train: false }', phase="TEST")
    factor = float(np.float32(1.0 / np.float32(1.0 / (1.0 - np.float32(0.3)))))
    assert torch.equal(fork([x], [])[0], x * factor)
    assert factor == pytest.approx(0.7, rel=1e-6)


@pytest.mark.parametrize("scale_train", [True, False])
def test_dropout_train_statistics(scale_train):
    torch.manual_seed(0)
    ratio = 0.25
    drop = make('name: "d" type: "Dropout" bottom: "x" top: "y" '
                f'dropout_param {{ dropout_ratio: {ratio} '
                f'scale_train: {str(scale_train).lower()} }}')
    x = (torch.rand(200, 500) + 0.5).requires_grad_(True)
    (y,) = drop([x], [])
    kept = y != 0
    scale = 1 / (1 - ratio) if scale_train else 1.0
    assert kept.float().mean().item() == pytest.approx(1 - ratio, abs=0.01)
    assert torch.allclose(y[kept], x.detach()[kept] * scale)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() * scale)  # the same mask in backward
    assert not torch.equal(drop([x], [])[0] != 0, kept)  # a fresh mask per forward
    with pytest.raises(SpecError, match="dropout_ratio"):
        make('name: "d" type: "Dropout" bottom: "x" top: "y" dropout_param { dropout_ratio: 1 }')
