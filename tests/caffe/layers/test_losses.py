"""SoftmaxWithLoss, SmoothL1Loss (Fast R-CNN fork) and Accuracy against slow float64 loops,
hand-worked numbers, gradcheck, and Caffe's goldens replayed layer by layer."""

import json
import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from readonly_ohem.errors import DataError, SpecError
from readonly_ohem.caffe.layers import LAYERS, LayerContext
from readonly_ohem.caffe.proto import caffe_pb2

from layer_testing import make

FLT_MIN = float(np.finfo(np.float32).tiny)


# -- SoftmaxWithLoss --------------------------------------------------------------------------


def softmax_loss_reference(x, labels, axis=1, ignore=None, mode="VALID"):
    """Caffe's SoftmaxWithLoss as plain float64 loops: (loss, d loss / d x)."""
    x = np.asarray(x, np.float64)
    lab = np.asarray(labels).reshape(-1)
    shape = x.shape
    outer, c = int(np.prod(shape[:axis])), shape[axis]
    inner = int(np.prod(shape[axis + 1:]))
    xv = x.reshape(outer, c, inner)
    prob = np.zeros_like(xv)
    loss, count = 0.0, 0
    grad = np.zeros_like(xv)
    for i in range(outer):
        for j in range(inner):
            col = xv[i, :, j]
            e = np.exp(col - col.max())
            prob[i, :, j] = e / e.sum()
            label = int(lab[i * inner + j])
            if ignore is not None and label == ignore:
                continue
            loss -= math.log(max(prob[i, label, j], FLT_MIN))
            count += 1
            grad[i, :, j] = prob[i, :, j]
            grad[i, label, j] -= 1
    norm = {"VALID": count, "FULL": outer * inner, "BATCH_SIZE": outer, "NONE": 1}[mode]
    norm = max(1.0, norm)
    return loss / norm, (grad / norm).reshape(shape), prob.reshape(shape)


def run_loss(layer, bottoms, grad_index=0):
    x = bottoms[grad_index].clone().requires_grad_(True)
    bottoms = list(bottoms)
    bottoms[grad_index] = x
    tops = layer(bottoms, [])
    tops[0].backward()
    return tops, x.grad


def test_softmax_loss_hand_worked():
    layer = make('name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss"')
    scores = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    (loss,), grad = run_loss(layer, [scores, torch.tensor([1.0, 0.0])])
    assert loss.item() == pytest.approx((-math.log(0.75) - math.log(0.5)) / 2, rel=1e-6)
    assert torch.allclose(grad, torch.tensor([[0.25, -0.25], [-0.5, 0.5]]) / 2)
    assert layer.loss_by_default


@pytest.mark.parametrize("mode,extra", [
    ("VALID", "normalization: VALID"), ("FULL", "normalization: FULL"),
    ("BATCH_SIZE", "normalization: BATCH_SIZE"), ("NONE", "normalization: NONE"),
    ("BATCH_SIZE", "normalize: false"), ("VALID", "normalize: true"),
    ("FULL", "normalize: false normalization: FULL"),  # normalization wins when both are set
])
def test_softmax_loss_modes_spatial(mode, extra):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 2, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (3, 1, 2, 4), generator=g).double()
    labels[0, 0, 1, 2] = labels[2, 0, 0, 0] = -1
    layer = make('name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" '
                 f'loss_param {{ ignore_label: -1 {extra} }}')
    (loss,), grad = run_loss(layer, [x, labels])
    ref_loss, ref_grad, _ = softmax_loss_reference(x, labels, 1, -1, mode)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    assert np.allclose(grad.numpy(), ref_grad, rtol=1e-12, atol=1e-15)
    assert (grad[0, :, 1, 2] == 0).all() and (grad[2, :, 0, 0] == 0).all()


def test_softmax_loss_axis_and_prob_top():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)  # classes on axis 2 (= -1)
    labels = torch.randint(0, 6, (2, 3), generator=g).double()
    layer = make('name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" '
                 'top: "prob" softmax_param { axis: -1 }')
    (loss, prob), grad = run_loss(layer, [x, labels])
    ref_loss, ref_grad, ref_prob = softmax_loss_reference(x, labels, 2)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    assert np.allclose(grad.numpy(), ref_grad, rtol=1e-12, atol=1e-15)
    assert prob.shape == x.shape and np.allclose(prob.detach().numpy(), ref_prob)
    assert not prob.requires_grad  # Caffe's backward ignores the prob top's diff
    assert layer.top_shapes([(2, 3, 6), (2, 3)]) == [(), (2, 3, 6)]


def test_softmax_loss_all_ignored_and_clamp():
    layer = make('name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" '
                 'loss_param { ignore_label: 7 }')
    (loss,), grad = run_loss(layer, [torch.randn(4, 3), torch.full((4,), 7.0)])
    assert loss.item() == 0 and (grad == 0).all()  # VALID normalizer max(1, 0) = 1
    # prob of the label underflows to 0 in float32: loss = -log(FLT_MIN), the gradient is still
    # Caffe's (prob - onehot), not the zero gradient of a clamp
    layer = make('name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss"')
    scores = torch.tensor([[200.0, -200.0, 0.0]])
    (loss,), grad = run_loss(layer, [scores, torch.tensor([1.0])])
    assert loss.item() == pytest.approx(-math.log(FLT_MIN), rel=1e-6)
    assert torch.allclose(grad, torch.tensor([[1.0, -1.0, 0.0]]))


def test_softmax_loss_label_truncation_and_errors():
    layer = make('name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss"')
    x = torch.randn(3, 4, dtype=torch.float64)
    (a,), _ = run_loss(layer, [x, torch.tensor([1.9, 0.2, 3.7], dtype=torch.float64)])
    (b,), _ = run_loss(layer, [x, torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)])
    assert a.item() == b.item()  # static_cast<int> truncates
    with pytest.raises(DataError, match="label 4"):
        layer([x, torch.tensor([1.0, 4.0, 0.0])], [])
    with pytest.raises(SpecError, match="number of labels"):
        layer([x, torch.zeros(3, 2)], [])


def test_softmax_loss_gradcheck():
    layer = make('name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" '
                 'loss_param { ignore_label: 2 normalization: FULL }')
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0.0, 2.0, 3.0], [1.0, 1.0, 2.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: layer([s, labels], [])[0], (x,))


# -- SmoothL1Loss -----------------------------------------------------------------------------


def smooth_l1_reference(pred, target, in_w=None, out_w=None, sigma=1.0):
    """The fork's SmoothL1Loss as float64 loops: (loss, d/d pred)."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    flat = [a.reshape(-1) for a in (pred, target)]
    iw = np.ones_like(flat[0]) if in_w is None else np.asarray(in_w, np.float64).reshape(-1)
    ow = np.ones_like(flat[0]) if out_w is None else np.asarray(out_w, np.float64).reshape(-1)
    s2 = sigma * sigma
    loss, grad = 0.0, np.zeros_like(flat[0])
    for k in range(flat[0].size):
        d = iw[k] * (flat[0][k] - flat[1][k])
        if abs(d) < 1 / s2:
            loss += ow[k] * 0.5 * d * d * s2
            grad[k] = ow[k] * iw[k] * s2 * d
        else:
            loss += ow[k] * (abs(d) - 0.5 / s2)
            grad[k] = ow[k] * iw[k] * np.sign(d)
    n = pred.shape[0]
    return loss / n, (grad / n).reshape(pred.shape)


def test_smooth_l1_hand_worked():
    layer = make('name: "l" type: "SmoothL1Loss" bottom: "p" bottom: "t" top: "l"')
    pred = torch.tensor([[0.5, 3.0], [-2.0, 0.0]])
    (loss,), grad = run_loss(layer, [pred, torch.zeros(2, 2)])
    # f = 0.125 + 2.5 + 1.5 + 0 over N = 2 rows
    assert loss.item() == pytest.approx(4.125 / 2)
    assert torch.equal(grad, torch.tensor([[0.25, 0.5], [-0.5, 0.0]]))
    assert not layer.loss_by_default  # the fork's quirk: no loss_weight -> weight 0


@pytest.mark.parametrize("sigma", [1.0, 3.0, 0.5])
def test_smooth_l1_against_loops(sigma):
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(5, 8, generator=g, dtype=torch.float64) * 2
    target = torch.randn(5, 8, generator=g, dtype=torch.float64)
    in_w = (torch.rand(5, 8, generator=g, dtype=torch.float64) > 0.4).double() * 1.5
    out_w = (in_w > 0).double() * 0.7
    layer = make('name: "l" type: "SmoothL1Loss" bottom: "p" bottom: "t" bottom: "i" '
                 f'bottom: "o" top: "l" smooth_l1_loss_param {{ sigma: {sigma} }}')
    p, t = pred.clone().requires_grad_(), target.clone().requires_grad_()
    iw, ow = in_w.clone().requires_grad_(), out_w.clone().requires_grad_()
    (loss,) = layer([p, t, iw, ow], [])
    loss.backward()
    ref_loss, ref_grad = smooth_l1_reference(pred, target, in_w, out_w, sigma)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    assert np.allclose(p.grad.numpy(), ref_grad, rtol=1e-12, atol=1e-15)
    assert torch.equal(t.grad, -p.grad)  # the fork back-propagates to the targets too
    assert iw.grad is None and ow.grad is None  # never to the weights
    # no weights: plain smooth L1 of pred - target
    layer2 = make('name: "l" type: "SmoothL1Loss" bottom: "p" bottom: "t" top: "l" '
                  f'smooth_l1_loss_param {{ sigma: {sigma} }}')
    (loss2,), grad2 = run_loss(layer2, [pred, target])
    ref_loss2, ref_grad2 = smooth_l1_reference(pred, target, sigma=sigma)
    assert loss2.item() == pytest.approx(ref_loss2, rel=1e-12)
    assert np.allclose(grad2.numpy(), ref_grad2, rtol=1e-12, atol=1e-15)


def test_smooth_l1_gradcheck_and_errors():
    layer = make('name: "l" type: "SmoothL1Loss" bottom: "p" bottom: "t" bottom: "i" '
                 'bottom: "o" top: "l" smooth_l1_loss_param { sigma: 2 }')
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    in_w = torch.rand(4, 8, generator=g, dtype=torch.float64) + 0.5
    out_w = torch.rand(4, 8, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p, t: layer([p, t, in_w, out_w], [])[0],
                                    (pred, target))
    with pytest.raises(SpecError, match="both inside and outside"):
        make('name: "l" type: "SmoothL1Loss" bottom: "p" bottom: "t" bottom: "i" top: "l"')
    with pytest.raises(SpecError, match="does not match"):
        layer([pred, target[:, :4], in_w, out_w], [])
    # Caffe compares counts, not shapes: (4, 8) against (4, 2, 4) is fine
    (loss,) = layer([pred, target.reshape(4, 2, 4), in_w, out_w], [])
    assert torch.isfinite(loss)


# -- Accuracy ---------------------------------------------------------------------------------


def accuracy_reference(x, labels, top_k=1, axis=1, ignore=None):
    """Caffe's AccuracyLayer::Forward_cpu as loops."""
    x = np.asarray(x, np.float64)
    lab = np.asarray(labels).reshape(-1)
    outer, c = int(np.prod(x.shape[:axis])), x.shape[axis]
    inner = int(np.prod(x.shape[axis + 1:]))
    xv = x.reshape(outer, c, inner)
    acc, count = 0, 0
    nums, hits = np.zeros(c), np.zeros(c)
    for i in range(outer):
        for j in range(inner):
            label = int(lab[i * inner + j])
            if ignore is not None and label == ignore:
                continue
            nums[label] += 1
            true = xv[i, label, j]
            better = -1
            k = 0
            while k < c and better < top_k:
                better += xv[i, k, j] >= true
                k += 1
            if better < top_k:
                acc += 1
                hits[label] += 1
            count += 1
    per_class = np.where(nums > 0, hits / np.maximum(nums, 1), 0)
    return (acc / count if count else 0.0), per_class


def test_accuracy_ties_hand_worked():
    layer = make('name: "a" type: "Accuracy" bottom: "s" bottom: "l" top: "a" top: "pc"')
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 1.0, 1.0]])
    acc, per_class = layer([scores, torch.tensor([1.0, 1.0, 2.0])], [])
    assert acc.item() == pytest.approx(1 / 3)  # row 0: a tie with class 0 is a miss
    assert torch.allclose(per_class, torch.tensor([0.0, 0.5, 0.0]))
    assert not layer.backprop_to_bottoms
    top2 = make('name: "a" type: "Accuracy" bottom: "s" bottom: "l" top: "a" '
                'accuracy_param { top_k: 2 }')
    # row 2: class 2 ties class 1 behind class 0 -> two scores >= it -> top-2 miss
    assert top2([scores, torch.tensor([1.0, 1.0, 2.0])], [])[0].item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("top_k,ignore", [(1, None), (2, None), (3, 0), (1, 4)])
def test_accuracy_against_loops(top_k, ignore):
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 4, (6, 5, 3), generator=g).float()  # many ties
    labels = torch.randint(0, 5, (6, 3), generator=g).float()
    extra = "" if ignore is None else f"ignore_label: {ignore}"
    layer = make('name: "a" type: "Accuracy" bottom: "s" bottom: "l" top: "a" top: "pc" '
                 f'accuracy_param {{ top_k: {top_k} {extra} }}')
    acc, per_class = layer([x, labels], [])
    ref_acc, ref_pc = accuracy_reference(x, labels, top_k, 1, ignore)
    assert acc.item() == pytest.approx(ref_acc, rel=1e-6)
    assert np.allclose(per_class.numpy(), ref_pc, rtol=1e-6)
    assert layer.top_shapes([(6, 5, 3), (6, 3)]) == [(), (5,)]


def test_accuracy_axis_all_ignored_and_errors():
    layer = make('name: "a" type: "Accuracy" bottom: "s" bottom: "l" top: "a" '
                 'accuracy_param { axis: -1 ignore_label: 1 }')
    x = torch.randn(2, 3, 4)
    labels = torch.tensor([[0.0, 3.0, 1.0], [2.0, 1.0, 3.0]])
    ref, _ = accuracy_reference(x.numpy(), labels.numpy(), 1, 2, 1)
    assert layer([x, labels], [])[0].item() == pytest.approx(ref)
    assert layer([x, torch.ones(2, 3)], [])[0].item() == 0.0
    with pytest.raises(SpecError, match="top_k"):
        make('name: "a" type: "Accuracy" bottom: "s" bottom: "l" top: "a" '
             'accuracy_param { top_k: 5 }')([x, labels], [])
    with pytest.raises(DataError, match="label 9"):
        layer([x, torch.full((2, 3), 9.0)], [])


# -- Caffe goldens, layer by layer ------------------------------------------------------------

GOLDEN_CASES = ["softmax_with_loss_valid", "smooth_l1_fast_rcnn", "smooth_l1_no_loss_weight",
                "accuracy_tie", "inner_product_relu_dropout_test"]


def _blob_array(blob) -> np.ndarray:
    data = np.asarray(blob.double_data if len(blob.double_data) else blob.data, np.float32)
    shape = (tuple(blob.shape.dim) if blob.HasField("shape")
             else (blob.num, blob.channels, blob.height, blob.width))
    return data.reshape(shape)


def replay_golden(case_dir):
    """Build each layer of the case from net.prototxt, load weights.caffemodel, feed inputs.npz,
    run forward and (when meta.backward) Caffe's backward; return what the case records."""
    meta = json.loads((case_dir / "meta.json").read_text())
    net = text_format.Parse((case_dir / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    weights = caffe_pb2.NetParameter()
    weights.ParseFromString((case_dir / "weights.caffemodel").read_bytes())
    stored = {lp.name: [torch.from_numpy(_blob_array(b)) for b in lp.blobs]
              for lp in weights.layer}
    inputs = np.load(case_dir / "inputs.npz")
    ctx = LayerContext(phase=meta["phase"])
    blobs, first, params, seeds = {}, {}, {}, []
    for lp in net.layer:
        if lp.type == "Input":
            for top in lp.top:
                blobs[top] = first[top] = torch.from_numpy(inputs[top]).requires_grad_(True)
            continue
        layer = LAYERS[lp.type](lp, ctx)
        params[lp.name] = [p.clone().requires_grad_(True) for p in stored.get(lp.name, [])]
        shapes = [tuple(p.shape) for p in layer.param_blobs([blobs[b].shape for b in lp.bottom])]
        assert shapes == [tuple(p.shape) for p in params[lp.name]]
        tops = layer([blobs[b] for b in lp.bottom], params[lp.name])
        for i, (name, t) in enumerate(zip(lp.top, tops)):
            if t.requires_grad and name not in first:
                t.retain_grad()
                first[name] = t
            blobs[name] = t
            weight = (lp.loss_weight[i] if i < len(lp.loss_weight)
                      else float(i == 0 and layer.loss_by_default))
            seeds.append((name, t, weight))
    got = {k: v.detach().numpy() for k, v in blobs.items()}
    if meta["backward"]:
        if (case_dir / "top_diff.npz").exists():
            top_diff = np.load(case_dir / "top_diff.npz")
            total = sum((blobs[k] * torch.from_numpy(top_diff[k])).sum() for k in top_diff.files)
        else:
            total = sum(w * t.sum() for _, t, w in seeds)
            for name, _, w in seeds:
                got[f"diff/{name}"] = np.float32(w)  # Caffe seeds a loss top's diff with its weight
        if isinstance(total, torch.Tensor) and total.requires_grad:
            total.backward()
        for name in meta["diff_blobs"]:
            if f"diff/{name}" in got:
                continue
            g = first[name].grad
            got[f"diff/{name}"] = (np.zeros(first[name].shape, np.float32) if g is None
                                   else g.numpy())
        for lname, ps in params.items():
            for i, p in enumerate(ps):
                got[f"param_diff/{lname}/{i}"] = (np.zeros(p.shape, np.float32) if p.grad is None
                                                  else p.grad.numpy())
    return meta, got


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_caffe_golden_layer_level(case, fixtures_dir):
    meta, got = replay_golden(fixtures_dir / "caffe_goldens" / case)
    expected = np.load(fixtures_dir / "caffe_goldens" / case / "expected.npz")
    for key in expected.files:
        assert key in got, key
        assert np.allclose(got[key], expected[key], rtol=meta["rtol"], atol=meta["atol"]), key
