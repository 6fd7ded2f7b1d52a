"""The OHEM family (``ohem.family``) against plain transcriptions of its reference write-ups
(``tests/reference_family.py``): random inputs, the corner cases each reference has (ties at the
cut, no positives, k larger than the candidates, labels -1/-2, probabilities of exactly 0 and 1,
zero kept samples), hand-worked numbers, and gradients (autograd beside the torch references;
finite differences for all: full Jacobians for the small inputs, gradcheck's fast mode, a random
projection of the Jacobian, for the larger ones)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from readonly_ohem.ohem import family
from readonly_ohem.ohem.family import (
    batch_weighted_focal_loss,
    mtcnn_cls_ohem,
    rpn_topk_class_loss,
    ssd_loss_torchcv,
    ssd_losses_tf,
    topk_cross_entropy,
)

import reference_family as ref

SEEDS = [0, 1, 2]


def _grad(fn, *inputs):
    """(value, grads) of fn at float copies of inputs that require grad."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [x.grad for x in leaves]


def test_the_module_holds_the_six_functions():
    assert sorted(family.__all__) == sorted([
        "mtcnn_cls_ohem", "rpn_topk_class_loss", "topk_cross_entropy",
        "batch_weighted_focal_loss", "ssd_loss_torchcv", "ssd_losses_tf"])


# -- 000: MTCNN cls_ohem -------------------------------------------------------------------------
def _mtcnn_inputs(n, seed):
    rng = np.random.default_rng(seed)
    face = rng.random(n).astype(np.float32)
    prob = np.stack([1 - face, face], 1).astype(np.float32)
    label = rng.choice([1, 0, -1, -2], size=n, p=[0.3, 0.4, 0.2, 0.1]).astype(np.int64)
    return prob, label


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [10, 90, 384])
@pytest.mark.parametrize("keep_ratio", [0.7, 0.3, 1.0])
def test_mtcnn_matches_the_reference(n, seed, keep_ratio):
    prob, label = _mtcnn_inputs(n, seed)
    want = ref.cls_ohem(prob, label, keep_ratio)
    got = mtcnn_cls_ohem(torch.from_numpy(prob), torch.from_numpy(label), keep_ratio)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(float(want), rel=2e-6)


def test_mtcnn_keep_count_is_the_float32_product():
    # 90 valid samples: int(float32(90) * float32(0.7)) = 63 (float64 would give 62)
    assert int(90 * 0.7) == 62 and int(np.float32(90) * np.float32(0.7)) == 63
    face = np.linspace(0.01, 0.99, 90)
    prob = torch.tensor(np.stack([1 - face, face], 1), dtype=torch.float32)
    label = torch.ones(90, dtype=torch.long)
    loss = -torch.log(prob[:, 1] + 1e-10)
    got = mtcnn_cls_ohem(prob, label)
    assert got.item() == pytest.approx(loss[:63].mean().item(), rel=1e-6)
    assert got.item() != pytest.approx(loss[:62].mean().item(), rel=1e-6)
    assert got.item() == pytest.approx(float(ref.cls_ohem(prob.numpy(), label.numpy())), rel=1e-6)


def test_mtcnn_ignored_labels_rank_as_zeros_and_ties_go_to_the_lower_index():
    # labels -1 / -2 have loss 0 but stay in the ranking; p = 1 gives loss -log(1) = 0 too.
    # n_valid = 3 -> k = 2: row 1 (-log 0.2), then the first of the zeros: row 0 (ignored).
    prob = torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.0, 1.0], [0.0, 1.0]])
    label = torch.tensor([-1, 0, 1, 1])
    value, (grad,) = _grad(lambda p: mtcnn_cls_ohem(p, label), prob)
    assert value.item() == pytest.approx(-math.log(0.2) / 2, rel=1e-6)
    assert value.item() == pytest.approx(float(ref.cls_ohem(prob.numpy(), label.numpy())), rel=1e-6)
    want = torch.zeros(4, 2)
    want[1, 0] = -1 / (2 * 0.2)
    assert torch.allclose(grad, want)
    # the same with the ignored row last: now row 2 (p = 1, loss 0) is kept and its gradient
    # -1 / (k * 1) flows although its loss is 0
    prob2, label2 = prob[[1, 2, 3, 0]], label[[1, 2, 3, 0]]
    value, (grad,) = _grad(lambda p: mtcnn_cls_ohem(p, label2), prob2)
    assert value.item() == pytest.approx(-math.log(0.2) / 2, rel=1e-6)
    want = torch.zeros(4, 2)
    want[0, 0], want[1, 1] = -1 / (2 * 0.2), -1 / 2
    assert torch.allclose(grad, want)


def test_mtcnn_ties_at_the_cut_in_the_loss():
    # five valid samples of equal loss: k = int(5 * 0.7) = 3, the three lowest indices
    prob = torch.full((5, 2), 0.5)
    label = torch.tensor([0, 1, 0, 1, 0])
    value, (grad,) = _grad(lambda p: mtcnn_cls_ohem(p, label), prob)
    assert value.item() == pytest.approx(math.log(2), rel=1e-6)
    want = torch.zeros(5, 2)
    want[0, 0], want[1, 1], want[2, 0] = -2 / 3, -2 / 3, -2 / 3
    assert torch.allclose(grad, want)


def test_mtcnn_probability_zero_and_one():
    prob = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    label = torch.tensor([1, 1, 0])  # k = int(3 * 0.7) = 2: -log(1e-10) and 0
    got = mtcnn_cls_ohem(prob, label)
    want = -math.log(float(np.float32(1e-10))) / 2
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert got.item() == pytest.approx(float(ref.cls_ohem(prob.numpy(), label.numpy())), rel=1e-6)


def test_mtcnn_corner_cases():
    prob, label = _mtcnn_inputs(12, 0)
    p, y = torch.from_numpy(prob), torch.from_numpy(label)
    # one valid sample: k = int(0.7) = 0, the mean of nothing is NaN in both
    one = torch.tensor([-1, 1, -2, -1])
    assert math.isnan(mtcnn_cls_ohem(p[:4], one).item())
    assert math.isnan(float(ref.cls_ohem(prob[:4], one.numpy())))
    # keep_ratio > 1: k > N makes the reference's top_k raise; ours keeps all N
    with pytest.raises(ValueError, match="at least k"):
        ref.cls_ohem(prob, label, 2.0)
    loss = -torch.log(p.gather(1, y.clamp(min=0)[:, None])[:, 0] + 1e-10) * (y >= 0)
    assert mtcnn_cls_ohem(p, y, 2.0).item() == pytest.approx(loss.mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="keep_ratio"):
        mtcnn_cls_ohem(p, y, -0.5)
    with pytest.raises(ValueError, match="label values must be <= 1"):
        mtcnn_cls_ohem(p, torch.full((12,), 2))
    with pytest.raises(ValueError, match=r"cls_prob must be \(N, 2\)"):
        mtcnn_cls_ohem(torch.rand(12, 3), y)


def test_mtcnn_gradient_finite_differences():
    prob, label = _mtcnn_inputs(40, 3)
    p = torch.from_numpy(prob).double().clamp(0.05, 0.95).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: mtcnn_cls_ohem(x, torch.from_numpy(label)), (p,))


# -- 001: Keras rpn_class_loss_graph with top-k --------------------------------------------------
def _rpn_inputs(b, a, seed):
    rng = np.random.default_rng(seed)
    match = rng.choice([1, -1, 0], size=(b, a, 1), p=[0.2, 0.5, 0.3]).astype(np.int32)
    logits = rng.normal(0, 2, size=(b, a, 2)).astype(np.float32)
    return match, logits


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 7, 30])
def test_rpn_matches_the_reference(seed, k):
    match, logits = _rpn_inputs(2, 40, seed)
    want = ref.rpn_class_loss_graph(k, match, logits)
    got = rpn_topk_class_loss(torch.from_numpy(match), torch.from_numpy(logits), k)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(float(want), rel=2e-6)


def test_rpn_k_is_over_the_whole_batch_and_ties_at_the_cut_are_kept():
    # image 0 holds the three hardest anchors; k = 2 over the batch keeps both of its tied
    # second-hardest ones (loss >= the 2nd largest), none of image 1
    match = torch.tensor([[[1], [1], [1], [0]], [[-1], [-1], [1], [1]]])
    logits = torch.tensor([[[3.0, 0.0], [2.0, 0.0], [2.0, 0.0], [9.0, 0.0]],
                           [[0.0, 1.0], [0.0, 0.5], [0.0, 1.0], [0.0, 2.0]]])
    value, (grad,) = _grad(lambda x: rpn_topk_class_loss(match, x, 2), logits)
    ce = lambda z: math.log(1 + math.exp(z))  # CE of fg with logits [z, 0]
    assert value.item() == pytest.approx((ce(3) + 2 * ce(2)) / 3, rel=1e-6)
    assert value.item() == pytest.approx(float(ref.rpn_class_loss_graph(
        2, match.numpy(), logits.numpy())), rel=1e-6)
    assert grad[1].abs().sum() == 0 and grad[0, 3].abs().sum() == 0
    for i, z in ((0, 3.0), (1, 2.0), (2, 2.0)):  # d CE / d z = sigmoid(z), / 3 kept
        s = 1 / (1 + math.exp(-z))
        assert grad[0, i].tolist() == pytest.approx([s / 3, -s / 3], rel=1e-5)


def test_rpn_corner_cases():
    match, logits = _rpn_inputs(2, 10, 0)
    m, x = torch.from_numpy(match), torch.from_numpy(logits)
    n_cand = int((m != 0).sum())
    # k > candidates: the reference's top_k raises; ours keeps every candidate
    with pytest.raises(ValueError, match="at least k"):
        ref.rpn_class_loss_graph(n_cand + 1, match, logits)
    assert rpn_topk_class_loss(m, x, n_cand + 5).item() == pytest.approx(
        float(ref.rpn_class_loss_graph(n_cand, match, logits)), rel=1e-6)
    # no candidate: 0 (Matterport's guard), still differentiable
    neutral = torch.zeros_like(m)
    value, (grad,) = _grad(lambda z: rpn_topk_class_loss(neutral, z, 4), x)
    assert value.item() == 0.0 and grad.abs().sum() == 0
    with pytest.raises(IndexError):  # the reference: vals[-1] of nothing
        ref.rpn_class_loss_graph(0, match, logits)
    with pytest.raises(ValueError, match="anchors_per_image"):
        rpn_topk_class_loss(m, x, 0)
    with pytest.raises(ValueError, match=r"rpn_match must be \(B, A, 1\)"):
        rpn_topk_class_loss(m[..., 0], x, 4)


def test_rpn_gradient_finite_differences():
    match, logits = _rpn_inputs(2, 12, 5)
    x = torch.from_numpy(logits).double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: rpn_topk_class_loss(torch.from_numpy(match), z, 5), (x,), fast_mode=True)


# -- 001: PyTorch topk_crossEntrophy ------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("top_k", [0.7, 0.25, 1.0])
def test_topk_cross_entropy_matches_the_reference_with_gradients(seed, dtype, top_k):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(30, 5, generator=g, dtype=dtype) * 2
    target = torch.randint(0, 5, (30,), generator=g)
    want, (want_grad,) = _grad(lambda x: ref.topk_crossEntrophy(top_k)(x, target), logits)
    got, (grad,) = _grad(lambda x: topk_cross_entropy(x, target, top_k), logits)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert got.item() == pytest.approx(want.item(), rel=tol)
    assert torch.allclose(grad, want_grad, rtol=tol, atol=tol)


def test_topk_cross_entropy_count_and_ties():
    # int(0.7 * 90) = 62 in Python floats (the reference's arithmetic)
    logits = torch.zeros(90, 3)
    logits[:, 0] = torch.linspace(-3, 3, 90)
    target = torch.zeros(90, dtype=torch.long)
    loss = F.cross_entropy(logits, target, reduction="none")
    assert topk_cross_entropy(logits, target).item() == pytest.approx(
        loss.sort(descending=True).values[:62].mean().item(), rel=1e-6)
    # equal rows at the cut: the same rows as the reference's torch.topk get the gradient
    logits = torch.tensor([[0.0, 1.0]] * 6 + [[2.0, 0.0]] * 4)
    target = torch.zeros(10, dtype=torch.long)
    want, (want_grad,) = _grad(lambda x: ref.topk_crossEntrophy(0.7)(x, target), logits)
    got, (grad,) = _grad(lambda x: topk_cross_entropy(x, target, 0.7), logits)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.equal(grad != 0, want_grad != 0) and torch.allclose(grad, want_grad)
    assert int((grad[:, 0] != 0).sum()) == 7


def test_topk_cross_entropy_corner_cases():
    logits, target = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    # k = int(0.2 * 4) = 0: NaN in both
    assert math.isnan(topk_cross_entropy(logits, target, 0.2).item())
    assert math.isnan(ref.topk_crossEntrophy(0.2)(logits, target).item())
    # top_k > 1: the reference's topk raises; ours keeps all rows
    with pytest.raises(RuntimeError):
        ref.topk_crossEntrophy(1.5)(logits, target)
    assert topk_cross_entropy(logits, target, 1.5).item() == pytest.approx(
        F.cross_entropy(logits, target).item(), rel=1e-6)
    with pytest.raises(ValueError, match="top_k"):
        topk_cross_entropy(logits, target, -0.1)
    with pytest.raises(ValueError, match=r"target must lie in \[0, 3\)"):
        topk_cross_entropy(logits, torch.tensor([0, -1, 1, 1]))


# -- 003: FocalLoss with batch class weights ----------------------------------------------------
def _focal_inputs(n, c, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    prob = torch.softmax(torch.randn(n, c, generator=g, dtype=dtype) * 2, 1)
    labels = torch.randint(0, c - 2, (n,), generator=g)  # the two top classes absent
    return prob, labels


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [2.0, 0.5, 0.0])
def test_focal_matches_the_reference_with_gradients(seed, dtype, gamma):
    prob, labels = _focal_inputs(64, 6, seed, dtype)
    want, (want_grad,) = _grad(lambda p: ref.FocalLoss(gamma)(p, labels), prob)
    got, (grad,) = _grad(lambda p: batch_weighted_focal_loss(p, labels, gamma), prob)
    assert got.dtype == dtype
    assert got.item() == pytest.approx(want.item(), rel=1e-7, abs=0)  # the same ops: ~bitwise
    assert torch.allclose(grad, want_grad, rtol=1e-7, atol=0)


def test_focal_hand_worked_weights():
    # labels 0, 0, 0, 1 of 3 classes: shares 0.75, 0.25, 0
    prob = torch.tensor([[0.5, 0.3, 0.2]] * 3 + [[0.1, 0.6, 0.3]])
    labels = torch.tensor([0, 0, 0, 1])
    w0, w1 = 1 / math.log(1.10 + 0.75), 1 / math.log(1.10 + 0.25)
    want = (3 * w0 * 0.5 ** 2 * -math.log(0.5) + w1 * 0.4 ** 2 * -math.log(0.6)) / 4
    assert batch_weighted_focal_loss(prob, labels).item() == pytest.approx(want, rel=1e-6)
    weights = family._batch_class_weights(labels, 3)
    assert weights.dtype == torch.float32
    assert weights.tolist() == pytest.approx([w0, w1, 1 / math.log(1.10)], rel=1e-6)
    assert torch.equal(weights, torch.from_numpy(ref.compute_class_weights(
        np.array([[3.0], [1.0], [0.0]], np.float32))))


def test_focal_probability_zero_and_one():
    labels = torch.tensor([0, 1])
    ones = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # p = 1: loss 0, gradient 0
    value, (grad,) = _grad(lambda p: batch_weighted_focal_loss(p, labels), ones)
    assert value.item() == 0.0 and grad.abs().sum() == 0
    zero = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # p = 0 for label 0: no clamp, inf
    assert batch_weighted_focal_loss(zero, labels).item() == math.inf
    assert ref.FocalLoss()(zero, labels).item() == math.inf


def test_focal_corner_cases():
    with pytest.raises(RuntimeError):  # the reference's torch.max of an empty batch
        ref.FocalLoss()(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert math.isnan(batch_weighted_focal_loss(torch.zeros(0, 3),
                                                torch.zeros(0, dtype=torch.long)).item())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        batch_weighted_focal_loss(torch.full((2, 3), 1 / 3), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        batch_weighted_focal_loss(torch.full((2, 3), 1 / 3), torch.tensor([0, 3]))


def test_focal_gradient_finite_differences():
    prob, labels = _focal_inputs(20, 4, 7, torch.float64)
    assert torch.autograd.gradcheck(lambda p: batch_weighted_focal_loss(p, labels),
                                    (prob.requires_grad_(True),))


# -- 003: torchcv SSDLoss ----------------------------------------------------------------------
def _ssd_inputs(n, a, c, seed, dtype=torch.float32, p_pos=0.1, p_ign=0.1):
    g = torch.Generator().manual_seed(seed)
    loc_preds = torch.randn(n, a, 4, generator=g, dtype=dtype)
    loc_targets = torch.randn(n, a, 4, generator=g, dtype=dtype)
    cls_preds = torch.randn(n, a, c, generator=g, dtype=dtype) * 2
    u = torch.rand(n, a, generator=g)
    cls_targets = torch.where(u < p_pos, torch.randint(1, c, (n, a), generator=g),
                              torch.zeros(n, a, dtype=torch.long))
    cls_targets[(u >= p_pos) & (u < p_pos + p_ign)] = -1
    cls_targets[0, -1] = -2  # another ignore value
    return loc_preds, loc_targets, cls_preds, cls_targets


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p_pos", [0.1, 0.4])  # 0.4: the quota outruns the negatives
def test_torchcv_matches_the_reference_with_gradients(seed, dtype, p_pos):
    lp, lt, cp, ct = _ssd_inputs(3, 40, 5, seed, dtype, p_pos)
    want, want_grads = _grad(lambda *x: ref.SSDLoss(5)(*x, ct), lp, lt, cp)
    got, grads = _grad(lambda *x: ssd_loss_torchcv(*x, ct), lp, lt, cp)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert got.item() == pytest.approx(want.item(), rel=tol)
    for g, w in zip(grads, want_grads):
        assert torch.allclose(g, w, rtol=tol, atol=tol)
    assert grads[2][ct < 0].abs().sum() == 0  # ignored anchors: loss 0, no gradient


def test_torchcv_hard_negatives_per_image_hand_worked():
    # image 0: one positive -> its 3 hardest negatives; image 1: no positive -> none
    c = 2
    cls_targets = torch.tensor([[1, 0, 0, 0, 0, -1], [0, 0, 0, 0, 0, 0]])
    z = torch.tensor([[0.0, 4.0, 3.0, 2.0, 1.0, 9.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    cls_preds = torch.stack([torch.zeros_like(z), z], 2)  # background CE = log(1 + e^z)
    loc_preds = torch.zeros(2, 6, 4)
    loc_targets = torch.zeros(2, 6, 4)
    loc_targets[0, 0] = torch.tensor([0.5, -2.0, 0.0, 0.0])
    ce = lambda v: math.log(1 + math.exp(v))
    want = (0.5 * 0.25 + 1.5) + ce(-0.0) + ce(4) + ce(3) + ce(2)  # / 1 positive
    got = ssd_loss_torchcv(loc_preds, loc_targets, cls_preds, cls_targets)
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert ref.SSDLoss(c)(loc_preds, loc_targets, cls_preds, cls_targets).item() == pytest.approx(
        want, rel=1e-6)


def test_torchcv_ties_at_the_cut_lower_index_first():
    # one positive, five equal negatives: 3 of them are kept, the three lowest indices
    cls_targets = torch.tensor([[0, 0, 1, 0, 0, 0]])
    cls_preds = torch.tensor([[[0.0, 1.0]] * 6])
    loc = torch.zeros(1, 6, 4)
    got, (grad,) = _grad(lambda x: ssd_loss_torchcv(loc, loc, x, cls_targets), cls_preds)
    want, (want_grad,) = _grad(
        lambda x: ref.SSDLoss(2, stable=True)(loc, loc, x, cls_targets), cls_preds)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.equal(grad, want_grad)
    assert (grad[0, :, 0] != 0).tolist() == [True, True, True, True, False, False]


def test_torchcv_zero_keys_tie_whatever_their_sign():
    # the quota (3) outruns the single negative: the zero keys of the ignored (-0.0) and of
    # the positive (0.0) tie, lower index first; the loss is the same either way
    cls_targets = torch.tensor([[-1, 0, 1, -1]])
    cls_preds = torch.tensor([[[0.0, 1.0], [0.0, 2.0], [1.0, 0.0], [0.0, 3.0]]])
    loc = torch.zeros(1, 4, 4)
    got = ssd_loss_torchcv(loc, loc, cls_preds, cls_targets)
    want = math.log(1 + math.exp(2)) + math.log(1 + math.exp(1))  # the negative, the positive
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert ref.SSDLoss(2)(loc, loc, cls_preds, cls_targets).item() == pytest.approx(want, rel=1e-6)


def test_torchcv_no_positive_is_nan():
    lp, lt, cp, ct = _ssd_inputs(2, 10, 3, 0, p_pos=0.0)
    assert math.isnan(ssd_loss_torchcv(lp, lt, cp, ct).item())
    assert math.isnan(ref.SSDLoss(3)(lp, lt, cp, ct).item())
    with pytest.raises(ValueError, match="cls_targets values must be < 3"):
        ssd_loss_torchcv(lp, lt, cp, torch.full_like(ct, 3))


def test_torchcv_gradient_finite_differences():
    lp, lt, cp, ct = _ssd_inputs(2, 12, 3, 4, torch.float64, p_pos=0.2)
    assert torch.autograd.gradcheck(lambda a, b, c: ssd_loss_torchcv(a, b, c, ct),
                                    (lp.requires_grad_(True), lt.requires_grad_(True),
                                     cp.requires_grad_(True)), fast_mode=True)


# -- 004: SSD-TensorFlow ssd_losses ------------------------------------------------------------
def _tf_inputs(m, c, seed, dtype=np.float32, p_pos=0.1):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(m, c)).astype(dtype)
    loc = rng.normal(0, 1.5, size=(m, 4)).astype(dtype)
    gloc = rng.normal(0, 1.5, size=(m, 4)).astype(dtype)
    u = rng.random(m)
    gscores = np.where(u < p_pos, rng.uniform(0.5, 1, m),
                       np.where(u < p_pos + 0.1, -1.0, rng.uniform(0, 0.5, m))).astype(dtype)
    gclasses = np.where(gscores > 0.5, rng.integers(1, c, m), 0).astype(np.int64)
    return logits, loc, gclasses, gloc, gscores


def _tf_call(inputs, batch_size, **kw):
    return ssd_losses_tf(*(torch.from_numpy(a) for a in inputs), batch_size, **kw)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [{}, {"negative_ratio": 0.7, "alpha": 0.5},
                                {"match_threshold": 0.3, "negative_ratio": 2.0}])
def test_ssd_tf_matches_the_reference(seed, dtype, kw):
    inputs = _tf_inputs(300, 4, seed, dtype)
    want = ref.ssd_losses(*inputs, 2, **kw)
    got = _tf_call(inputs, 2, **kw)
    tol = 2e-6 if dtype == np.float32 else 1e-12
    for g, w in zip(got, want):
        assert g.dtype == torch.from_numpy(inputs[0]).dtype
        assert g.item() == pytest.approx(float(w), rel=tol)


def _bg_ce(logits):
    return F.cross_entropy(torch.as_tensor(logits), torch.zeros(len(logits), dtype=torch.long),
                           reduction="none")


def test_ssd_tf_strict_cut_and_ties():
    # one positive, batch_size 1 -> n_neg = 3 + 1 = 4; background probs of the candidates
    # (logits [0, z]) fall with z; candidates 1..6 have z = 4, 3, 2, 2, 2, 1 -> the 4th smallest
    # probability is a z = 2 one, and strict < keeps only those below it: z = 4 and 3
    z = np.array([0.0, 4, 3, 2, 2, 2, 1, 0], np.float32)
    logits = np.stack([np.zeros(8, np.float32), z], 1)
    gscores = np.array([0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, -0.7], np.float32)
    gclasses = np.array([1, 0, 0, 0, 0, 0, 0, 0])
    loc = np.zeros((8, 4), np.float32)
    inputs = (logits, loc, gclasses, loc, gscores)
    cls_pos, cls_neg, l1 = _tf_call(inputs, 1)
    assert cls_neg.item() == pytest.approx(_bg_ce(logits[[1, 2]]).sum().item(), rel=1e-6)
    assert cls_pos.item() == pytest.approx(math.log(1 + math.exp(-0.0)), rel=1e-6)
    assert l1.item() == 0.0
    for g, w in zip((cls_pos, cls_neg, l1), ref.ssd_losses(*inputs, 1)):
        assert g.item() == pytest.approx(float(w), rel=1e-6)
    # batch_size 3: n_neg = 6 = all candidates; the 6th smallest (z = 1) itself is left out
    cls_neg = _tf_call(inputs, 3)[1]
    assert cls_neg.item() == pytest.approx(_bg_ce(logits[1:6]).sum().item() / 3, rel=1e-6)


def test_ssd_tf_keep_count_in_the_logits_dtype():
    # 90 positives, ratio 0.7: int(float32(0.7) * 90) = 63, float64 62; + batch_size 1
    m = 200
    z = np.linspace(5, -5, m)
    for dtype, n_neg in ((np.float32, 64), (np.float64, 63)):
        logits = np.stack([np.zeros(m), z], 1).astype(dtype)
        gscores = np.where(np.arange(m) < 90, 0.9, 0.1).astype(dtype)
        gclasses = np.where(gscores > 0.5, 1, 0)
        loc = np.zeros((m, 4), dtype)
        inputs = (logits, loc, gclasses, loc, gscores)
        cls_neg = _tf_call(inputs, 1, negative_ratio=0.7)[1]
        # candidates 90.. by falling background probability: the hardest n_neg - 1 kept
        want = _bg_ce(logits[90:90 + n_neg - 1]).sum().item()
        assert cls_neg.item() == pytest.approx(want, rel=1e-6)
        want_ref = ref.ssd_losses(*inputs, 1, negative_ratio=0.7)[1]
        assert float(want_ref) == pytest.approx(want, rel=1e-6)


def test_ssd_tf_corner_cases():
    inputs = _tf_inputs(40, 3, 0, p_pos=0.0)
    # no positive: n_neg = batch_size, so batch_size - 1 hardest negatives; loc and pos 0
    got = _tf_call(inputs, 3)
    want = ref.ssd_losses(*inputs, 3)
    assert got[0].item() == 0.0 and got[2].item() == 0.0
    assert got[1].item() == pytest.approx(float(want[1]), rel=1e-6) and got[1].item() > 0
    # no negative candidate: the reference's val[-1] raises; ours keeps no negative
    logits, loc, gclasses, gloc, gscores = inputs
    gscores = np.where(np.arange(40) % 2 == 0, 0.9, -1.0).astype(np.float32)
    gclasses = np.where(gscores > 0.5, 1, 0)
    with pytest.raises(IndexError):
        ref.ssd_losses(logits, loc, gclasses, gloc, gscores, 2)
    got = _tf_call((logits, loc, gclasses, gloc, gscores), 2)
    assert got[1].item() == 0.0 and got[0].item() > 0 and got[2].item() > 0
    with pytest.raises(ValueError, match=r"gclasses of the positives must lie in \[0, 3\)"):
        _tf_call((logits, loc, gclasses + 5, gloc, gscores), 2)
    # a class outside [0, C) on an anchor that is not positive counts for nothing (times 0)
    odd = np.where(gscores > 0.5, gclasses, -1)
    assert [t.item() for t in _tf_call((logits, loc, odd, gloc, gscores), 2)] == [
        t.item() for t in _tf_call((logits, loc, gclasses, gloc, gscores), 2)]
    with pytest.raises(ValueError, match="batch_size"):
        _tf_call(inputs, 0)


def test_ssd_tf_gradient_finite_differences():
    logits, loc, gclasses, gloc, gscores = _tf_inputs(30, 3, 9, np.float64, p_pos=0.3)
    g = torch.from_numpy

    def total(x, l):
        return sum(ssd_losses_tf(x, l, g(gclasses), g(gloc), g(gscores), 2))

    assert torch.autograd.gradcheck(total, (g(logits).requires_grad_(True),
                                            g(loc).requires_grad_(True)), fast_mode=True)
