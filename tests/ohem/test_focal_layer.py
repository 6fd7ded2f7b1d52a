"""FocalLossLayer, the RoI head's focal loss (the faster_rcnn_end2end_focal nets): a hand-worked
value, a plain-loop reference for each normalization, finite-difference gradients, its place
in a net (a loss by default) and its errors."""

import math

import pytest
import torch
from google.protobuf import text_format

from readonly_ohem import python_layers  # noqa: F401  (registers FocalLossLayer)
from readonly_ohem.caffe.layers import LAYERS, LayerContext
from readonly_ohem.caffe.net import Net
from readonly_ohem.caffe.proto import caffe_pb2
from readonly_ohem.errors import DataError, SpecError


def focal_layer(param_str="", name="loss_cls"):
    text = (f'name: "{name}" type: "Python" bottom: "cls_score" bottom: "labels" top: "loss_cls" '
            f'python_param {{ module: "ohem.focal_loss_layer" layer: "FocalLossLayer" '
            f'param_str: "{param_str}" }}')
    return LAYERS["Python"](text_format.Parse(text, caffe_pb2.LayerParameter()), LayerContext())


def loop_focal(scores, labels, alpha=0.25, gamma=2.0, normalization="valid"):
    """Per row: -a_t (1 - p_t)^gamma log p_t, a_t = alpha for label > 0, 1 - alpha for 0; -1 skipped."""
    total, valid, pos = 0.0, 0, 0
    for row, label in zip(scores.tolist(), labels.tolist()):
        if label < 0:
            continue
        m = max(row)
        z = sum(math.exp(v - m) for v in row)
        logp = row[int(label)] - m - math.log(z)
        a = alpha if label > 0 else 1 - alpha
        total += -a * (1 - math.exp(logp)) ** gamma * logp
        valid += 1
        pos += label > 0
    return {"valid": total / max(valid, 1), "pos": total / max(pos, 1), "none": total}[normalization]


def test_hand_worked_value():
    # two equal scores: p = 0.5 -> 0.25 * (1 - 0.5)^2 * log 2 for a foreground RoI
    loss = focal_layer()([torch.zeros(1, 2), torch.tensor([1.0])], [])[0]
    assert loss.shape == () and float(loss) == pytest.approx(0.25 * 0.25 * math.log(2))
    # gamma 0, alpha 0.5: half the cross-entropy
    loss = focal_layer("{'alpha': 0.5, 'gamma': 0}")([torch.tensor([[1.0, 3.0]]), torch.tensor([0.0])], [])[0]
    assert float(loss) == pytest.approx(0.5 * (math.log(math.exp(1) + math.exp(3)) - 1), rel=1e-6)


@pytest.mark.parametrize("normalization", ["valid", "pos", "none"])
def test_matches_a_plain_loop(normalization):
    g = torch.Generator().manual_seed(0)
    scores = 3 * torch.randn(12, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 4, 0, -1, 2, 0, 0, 3, -1, 0, 1], dtype=torch.float64)
    layer = focal_layer(f"{{'alpha': 0.3, 'gamma': 1.5, 'normalization': '{normalization}'}}")
    got = layer([scores, labels], [])[0]
    assert float(got) == pytest.approx(loop_focal(scores, labels, 0.3, 1.5, normalization), rel=1e-12)


def test_gradient_by_finite_differences():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, -1, 1, 0, 3], dtype=torch.float64)
    layer = focal_layer()
    assert torch.autograd.gradcheck(lambda s: layer([s, labels], [])[0], (scores,))
    layer([scores, labels], [])[0].backward()
    assert not scores.grad[2].any()  # the ignored RoI gets no gradient


def test_in_a_net_it_is_a_loss_of_weight_one():
    text = """
    layer { name: "in" type: "Input" top: "cls_score" top: "labels"
            input_param { shape { dim: 3 dim: 2 } shape { dim: 3 } } }
    layer { name: "loss_cls" type: "Python" bottom: "cls_score" bottom: "labels" top: "loss_cls"
            propagate_down: true propagate_down: false
            python_param { module: "ohem.focal_loss_layer" layer: "FocalLossLayer" } }
    """
    net = Net(text_format.Parse(text, caffe_pb2.NetParameter()))
    scores = torch.tensor([[0.0, 2.0], [1.0, -1.0], [0.5, 0.5]])
    labels = torch.tensor([1.0, 1.0, 0.0])
    blobs = net.forward({"cls_score": scores, "labels": labels})
    assert net.loss_weights == {"loss_cls": 1.0}
    assert float(net.total_loss(blobs)) == pytest.approx(loop_focal(scores.double(), labels), rel=1e-6)


def test_errors_name_the_layer():
    with pytest.raises(SpecError, match="'loss_cls'.*unknown key.*'beta'"):
        focal_layer("{'beta': 1}")
    with pytest.raises(SpecError, match="alpha in \\[0, 1\\]"):
        focal_layer("{'alpha': 2}")
    with pytest.raises(SpecError, match="normalization 'mean' is not one of"):
        focal_layer("{'normalization': 'mean'}")
    with pytest.raises(SpecError, match="gamma must be a number"):
        focal_layer("{'gamma': 'two'}")
    with pytest.raises(DataError, match="'loss_cls'.*bottom 'labels' has label 5"):
        focal_layer()([torch.zeros(2, 3), torch.tensor([0.0, 5.0])], [])
    with pytest.raises(SpecError, match="must hold 2 labels, got 3"):
        focal_layer()([torch.zeros(2, 3), torch.zeros(3)], [])
