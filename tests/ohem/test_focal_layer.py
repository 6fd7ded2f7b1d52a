"""SoftmaxFocalLoss, the focal-loss Python layer: hand-worked values, a plain-loop reference,
gradients by finite differences, its place in a net, and its errors."""

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from readonly_ohem.caffe.layers import LAYERS, LayerContext
from readonly_ohem.caffe.net import Net
from readonly_ohem.caffe.proto import caffe_pb2
from readonly_ohem.errors import DataError, SpecError
from readonly_ohem.ohem.focal_layer import SoftmaxFocalLoss


def make(param_str=""):
    """The layer as the experiment's focal net declares it (``param_str`` in double quotes)."""
    text = ('name: "loss_cls" type: "Python" bottom: "cls_score" bottom: "labels" top: "loss_cls" '
            'loss_weight: 1 python_param { module: "readonly_ohem.ohem.focal_layer" '
            f'layer: "SoftmaxFocalLoss" param_str: "{param_str}" }}')
    return LAYERS["Python"](text_format.Parse(text, caffe_pb2.LayerParameter()), LayerContext())


def reference(scores, labels, alpha=0.25, gamma=2.0, reduction="pos"):
    """Lin et al.'s softmax focal loss, one row at a time in float64."""
    total, n_valid, n_fg = 0.0, 0, 0
    for row, y in zip(scores.tolist(), labels.tolist()):
        if y < 0:
            continue
        m = max(row)
        z = sum(math.exp(v - m) for v in row)
        p = math.exp(row[y] - m) / z
        a = alpha if y > 0 else 1 - alpha
        total += -a * (1 - p) ** gamma * math.log(p)
        n_valid += 1
        n_fg += y > 0
    return {"sum": total, "mean": total / max(n_valid, 1), "pos": total / max(n_fg, 1)}[reduction]


def test_registered_and_hand_worked():
    layer = make()
    assert isinstance(layer, SoftmaxFocalLoss)
    # row 0: label 1, p = 1/2, fg weight 0.25; row 1: label 0, p = 3/4, bg weight 0.75
    scores = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    labels = torch.tensor([1.0, 0.0], dtype=torch.float64)
    want = 0.25 * 0.25 * math.log(2) + 0.75 * (1 / 16) * math.log(4 / 3)
    assert layer([scores, labels], [])[0].item() == pytest.approx(want)  # / 1 fg
    assert make("{'reduction': 'mean'}")([scores, labels], [])[0].item() == pytest.approx(want / 2)
    g0 = make("{'gamma': 0.0, 'alpha': 0.5, 'reduction': 'sum'}")([scores, labels], [])[0]
    assert g0.item() == pytest.approx(0.5 * (math.log(2) + math.log(4 / 3)))  # half the CE


@pytest.mark.parametrize("reduction", ["pos", "mean", "sum"])
def test_matches_the_plain_loop_with_ignored_labels(reduction):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(40, 5, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(-1, 5, (40,), generator=g).double()
    layer = make(f"{{'alpha': 0.4, 'gamma': 1.5, 'reduction': '{reduction}'}}")
    got = layer([scores, labels], [])[0].item()
    assert got == pytest.approx(reference(scores, labels.long(), 0.4, 1.5, reduction), rel=1e-12)


def test_gradient_by_finite_differences():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 3, 0, 0, -1, 2, 1, 0, 3, 0], dtype=torch.float64)
    layer = make()
    assert torch.autograd.gradcheck(lambda s: layer([s, labels], [])[0], (scores,))


def test_in_a_net_gives_the_loss_and_its_gradient():
    spec = """
    name: "focal"
    layer { name: "in" type: "Input" top: "x" top: "labels"
            input_param { shape { dim: 6 dim: 3 } shape { dim: 6 } } }
    layer { name: "cls_score" type: "InnerProduct" bottom: "x" top: "cls_score"
            inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.5 } } }
    layer { name: "loss_cls" type: "Python" bottom: "cls_score" bottom: "labels" top: "loss_cls"
            loss_weight: 1
            python_param { module: "readonly_ohem.ohem.focal_layer" layer: "SoftmaxFocalLoss" } }
    """
    net = Net(text_format.Parse(spec, caffe_pb2.NetParameter()))
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0.0, 1.0, 3.0, 0.0, 2.0, 0.0])
    blobs = net.forward({"x": x, "labels": labels}, retain_diffs=True)
    w, b = net.layer_params("cls_score")
    assert net.loss_weights == {"loss_cls": 1.0}  # the explicit loss_weight counts
    w64, b64 = (t.detach().double().requires_grad_(True) for t in (w, b))
    scores = x.double() @ w64.T + b64
    assert blobs["loss_cls"].item() == pytest.approx(reference(scores.detach(), labels.long()),
                                                     rel=1e-5)
    net.backward(blobs)
    make()([scores, labels.double()], [])[0].backward()  # the layer's own autograd, float64
    np.testing.assert_allclose(w.grad.numpy(), w64.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(b.grad.numpy(), b64.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_errors_name_the_layer():
    with pytest.raises(SpecError, match="loss_cls.*unknown key.*'beta'"):
        make("{'beta': 1}")
    with pytest.raises(SpecError, match="loss_cls.*reduction must be one of"):
        make("{'reduction': 'batch'}")
    with pytest.raises(SpecError, match="loss_cls.*alpha and gamma must be numbers"):
        make("{'alpha': 'x'}")
    layer = make()
    with pytest.raises(DataError, match="loss_cls.*labels below 3"):
        layer([torch.zeros(2, 3), torch.tensor([0.0, 3.0])], [])
    with pytest.raises(DataError, match="integer labels"):
        layer([torch.zeros(2, 3), torch.tensor([0.0, 1.5])], [])
    with pytest.raises(SpecError, match="must hold 2 labels"):
        layer([torch.zeros(2, 3), torch.tensor([0.0])], [])
