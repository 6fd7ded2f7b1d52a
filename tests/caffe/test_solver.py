"""Caffe's SGD solver: lr policies against their formulas, the update rule by hand, iter_size,
clipping, L1, shared params, resume state, NaN stop, net path resolution, and the Caffe golden run."""

import json
import math
from collections import namedtuple

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from readonly_ohem.caffe import net as caffe_net
from readonly_ohem.errors import SpecError
from readonly_ohem.caffe.proto import caffe_pb2
from readonly_ohem.caffe.solver import NonFiniteLossError, Solver, learning_rate, net_path

LP = namedtuple("LP", "key tensor lr_mult decay_mult owner index")


def solver_param(text: str):
    return text_format.Parse(text, caffe_pb2.SolverParameter())


class FakeNet:
    """A stand-in with the Net API the solver uses: loss = Σ_i a_i·w_i per pass (grad = a)."""

    def __init__(self, params, coeffs, loss_weight=1.0):
        self.params = params  # list of LP
        self.coeffs = coeffs  # pass feed -> {key: tensor a}
        self.loss_weights = {"loss": loss_weight}

    def learnable_params(self):
        return self.params

    def forward(self, feed=None):
        a = feed if feed is not None else self.coeffs
        loss = sum((a[p.key] * p.tensor).sum() for p in self.params if p.key in a)
        return {"loss": loss}

    def total_loss(self, blobs):
        return self.loss_weights["loss"] * blobs["loss"]


def param(key, values, lr_mult=1.0, decay_mult=1.0):
    t = torch.nn.Parameter(torch.tensor(values, dtype=torch.float32), requires_grad=lr_mult != 0)
    return LP(key, t, lr_mult, decay_mult, key, 0)


# -- learning-rate policies ---------------------------------------------------------------------
POLICY_CASES = {
    "fixed": ('lr_policy: "fixed" base_lr: 0.01', lambda i: 0.01),
    "step": ('lr_policy: "step" base_lr: 0.01 gamma: 0.1 stepsize: 5',
             lambda i: 0.01 * 0.1 ** (i // 5)),
    "exp": ('lr_policy: "exp" base_lr: 0.01 gamma: 0.9', lambda i: 0.01 * 0.9 ** i),
    "inv": ('lr_policy: "inv" base_lr: 0.01 gamma: 0.0001 power: 0.75',
            lambda i: 0.01 * (1 + 0.0001 * i) ** -0.75),
    "poly": ('lr_policy: "poly" base_lr: 0.01 power: 2 max_iter: 20',
             lambda i: 0.01 * (1 - i / 20) ** 2),
    "sigmoid": ('lr_policy: "sigmoid" base_lr: 0.01 gamma: -0.5 stepsize: 8',
                lambda i: 0.01 / (1 + math.exp(0.5 * (i - 8)))),
    "multistep": ('lr_policy: "multistep" base_lr: 0.01 gamma: 0.5 stepvalue: 3 stepvalue: 7 '
                  'stepvalue: 12', lambda i: 0.01 * 0.5 ** sum(i >= s for s in (3, 7, 12))),
}


@pytest.mark.parametrize("policy", sorted(POLICY_CASES))
def test_lr_policy_matches_formula(policy):
    text, formula = POLICY_CASES[policy]
    p = solver_param(text)
    step = 0
    for i in range(20):
        rate, step = learning_rate(p, i, step)
        assert rate == pytest.approx(formula(i), rel=1e-6, abs=1e-12), (policy, i)
        assert rate == float(np.float32(rate))  # Caffe's Dtype rate


def test_multistep_advances_one_step_per_call_as_caffe():
    # Caffe's GetLearningRate uses `if`, so two equal stepvalues take two iterations to pass.
    p = solver_param('lr_policy: "multistep" base_lr: 1 gamma: 0.1 stepvalue: 2 stepvalue: 2')
    step, rates = 0, []
    for i in range(5):
        r, step = learning_rate(p, i, step)
        rates.append(r)
    np.testing.assert_allclose(rates, [1, 1, 0.1, 0.01, 0.01], rtol=1e-6)


def test_bad_solver_is_a_spec_error():
    net = FakeNet([param("w", [1.0])], {"w": torch.tensor([1.0])})
    for text in ('base_lr: 0.1', 'lr_policy: "cosine" base_lr: 0.1',
                 'lr_policy: "step" base_lr: 0.1', 'lr_policy: "fixed" regularization_type: "L3"',
                 'lr_policy: "fixed" type: "Adam"'):
        with pytest.raises(SpecError, match="my_solver.prototxt"):
            Solver(solver_param(text), net, source="my_solver.prototxt")


# -- the update rule ----------------------------------------------------------------------------
def test_one_and_two_sgd_steps_by_hand():
    # w0 = [1, -2], grad a = [3, -1], lr_mult 2, decay_mult 0.5, wd 0.1, momentum 0.9, lr 0.01:
    # g0 = a + 0.05 w0 = [3.05, -1.1]; h1 = 0.02 g0 = [0.061, -0.022]; w1 = [0.939, -1.978]
    # g1 = a + 0.05 w1 = [3.04695, -1.0989]; h2 = 0.9 h1 + 0.02 g1 = [0.115839, -0.041778]
    # w2 = w1 - h2 = [0.823161, -1.936222]
    w = param("w", [1.0, -2.0], lr_mult=2, decay_mult=0.5)
    net = FakeNet([w], {"w": torch.tensor([3.0, -1.0])})
    s = Solver(solver_param('lr_policy: "fixed" base_lr: 0.01 momentum: 0.9 weight_decay: 0.1'), net)
    out = s.step()
    assert out["lr"] == pytest.approx(0.01)
    assert out["loss"] == pytest.approx(3 * 1 + (-1) * (-2))
    np.testing.assert_allclose(w.tensor.detach().numpy(), [0.939, -1.978], rtol=1e-6)
    np.testing.assert_allclose(s.history["w"].numpy(), [0.061, -0.022], rtol=1e-5)
    s.step()
    np.testing.assert_allclose(w.tensor.detach().numpy(), [0.823161, -1.936222], rtol=1e-6)
    assert s.iter == 2


def test_l1_regularization_uses_sign():
    # g = a + wd*dm*sign(w) = [3, -1] + 0.1*[1, -1] = [3.1, -1.1]; w1 = w0 - 0.01 g
    w = param("w", [1.0, -2.0])
    net = FakeNet([w], {"w": torch.tensor([3.0, -1.0])})
    s = Solver(solver_param('lr_policy: "fixed" base_lr: 0.01 weight_decay: 0.1 '
                            'regularization_type: "L1"'), net)
    s.step()
    np.testing.assert_allclose(w.tensor.detach().numpy(), [1 - 0.031, -2 + 0.011], rtol=1e-6)


def test_iter_size_accumulates_and_divides():
    # pass 0 grad [2, 0], pass 1 grad [0, 4] -> g = [1, 2]; loss = mean of the two pass losses
    w = param("w", [1.0, 1.0])
    feeds = [{"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
    net = FakeNet([w], None)
    s = Solver(solver_param('lr_policy: "fixed" base_lr: 0.1 iter_size: 2'), net)
    out = s.step(lambda i: feeds[i])
    assert out["loss"] == pytest.approx((2.0 + 4.0) / 2)
    np.testing.assert_allclose(w.tensor.detach().numpy(), [0.9, 0.8], rtol=1e-6)


def test_clip_gradients_before_iter_size_normalization():
    # Caffe clips the summed diff: [6, 8] (norm 10 > 4) * 0.4 = [2.4, 3.2], then /2 -> [1.2, 1.6].
    # Clipping after the /iter_size would give [3, 4] (norm 5) * 0.8 / 1 = [2.4, 3.2] instead.
    w = param("w", [0.0, 0.0])
    a = {"w": torch.tensor([3.0, 4.0])}
    net = FakeNet([w], a)
    s = Solver(solver_param('lr_policy: "fixed" base_lr: 1 iter_size: 2 clip_gradients: 4'), net)
    s.step()
    np.testing.assert_allclose(w.tensor.detach().numpy(), [-1.2, -1.6], rtol=1e-6)
    # below the threshold: untouched
    w2 = param("w", [0.0, 0.0])
    s2 = Solver(solver_param('lr_policy: "fixed" base_lr: 1 clip_gradients: 100'), FakeNet([w2], a))
    s2.step()
    np.testing.assert_allclose(w2.tensor.detach().numpy(), [-3.0, -4.0], rtol=1e-6)


def test_clip_uses_global_norm_over_all_params():
    u, v = param("u", [3.0]), param("v", [4.0])
    net = FakeNet([u, v], {"u": torch.tensor([3.0]), "v": torch.tensor([4.0])})
    s = Solver(solver_param('lr_policy: "fixed" base_lr: 1 clip_gradients: 1'), net)
    s.step()
    np.testing.assert_allclose([u.tensor.item(), v.tensor.item()], [3 - 0.6, 4 - 0.8], rtol=1e-6)


def test_lr_mult_zero_is_never_touched_and_no_grad_params_are_decayed():
    frozen = param("frozen", [1.0, 2.0], lr_mult=0, decay_mult=1)
    idle = param("idle", [1.0, -1.0])  # gets no gradient: Caffe's diff 0, still decayed
    live = param("live", [0.5])
    net = FakeNet([frozen, idle, live], {"live": torch.tensor([1.0])})
    s = Solver(solver_param('lr_policy: "fixed" base_lr: 0.1 momentum: 0.9 weight_decay: 0.5'), net)
    for _ in range(3):
        s.step()
    assert frozen.tensor.tolist() == [1.0, 2.0] and "frozen" not in s.history
    # idle: w_{t+1} = w_t - h_{t+1}, h_{t+1} = 0.9 h_t + 0.1*0.5*w_t
    w, h = np.array([1.0, -1.0]), 0.0
    for _ in range(3):
        h = 0.9 * h + 0.05 * w
        w = w - h
    np.testing.assert_allclose(idle.tensor.detach().numpy(), w, rtol=1e-6)


def test_shared_param_updated_once_with_the_summed_diff():
    # Two "layers" use the same tensor (learnable_params lists it once): diff = a1 + a2.
    w = param("shared_w", [1.0])

    class SharedNet(FakeNet):
        def forward(self, feed=None):
            t = self.params[0].tensor
            return {"loss": 2.0 * t.sum() + 3.0 * t.sum()}

    s = Solver(solver_param('lr_policy: "fixed" base_lr: 0.1'), SharedNet([w], None))
    s.step()
    assert w.tensor.item() == pytest.approx(1.0 - 0.1 * 5.0)


def test_nonfinite_loss_stops_before_the_update():
    w = param("w", [1.0])
    net = FakeNet([w], {"w": torch.tensor([float("nan")])})
    net.layers = [namedtuple("Rec", "name tops")("loss_cls", ["loss"])]
    s = Solver(solver_param('lr_policy: "fixed" base_lr: 0.1'), net)
    with pytest.raises(NonFiniteLossError, match=r"iteration 0.*'loss'.*'loss_cls'"):
        s.step()
    assert w.tensor.item() == 1.0 and s.iter == 0


def test_state_dict_resume_equals_straight_run():
    def make():
        w = param("w", [1.0, -2.0], lr_mult=1, decay_mult=1)
        net = FakeNet([w], {"w": torch.tensor([0.3, -0.7])})
        text = 'lr_policy: "multistep" base_lr: 0.1 gamma: 0.5 stepvalue: 2 momentum: 0.9 ' \
               'weight_decay: 0.01 average_loss: 3'
        return w, Solver(solver_param(text), net)

    w_a, a = make()
    for _ in range(5):
        a.step()
    w_b, b = make()
    b.step(), b.step()
    state = b.state_dict()
    w_c, c = make()
    with torch.no_grad():
        w_c.tensor.copy_(w_b.tensor)
    c.load_state_dict(state)
    for _ in range(3):
        c.step()
    assert c.iter == 5 and c.current_step == a.current_step
    assert torch.equal(w_a.tensor, w_c.tensor)
    assert c.smoothed_loss() == a.smoothed_loss()


def test_smoothed_loss_window():
    w = param("w", [1.0])
    net = FakeNet([w], {"w": torch.tensor([1.0])})
    s = Solver(solver_param('lr_policy: "fixed" base_lr: 0.5 average_loss: 2'), net)
    losses = [s.step()["loss"] for _ in range(3)]  # 1, 0.5, 0
    assert losses == [1.0, 0.5, 0.0]
    assert s.smoothed_loss() == pytest.approx(0.25)
    assert s.smoothed_losses() == {"loss": pytest.approx(0.25)}


# -- net path -----------------------------------------------------------------------------------
def test_net_path_cwd_first_then_solver_dir(tmp_path, monkeypatch):
    sub = tmp_path / "exp"
    sub.mkdir()
    (sub / "train.prototxt").write_text("")
    solver_file = sub / "solver.prototxt"
    p = solver_param('train_net: "train.prototxt" lr_policy: "fixed"')
    monkeypatch.chdir(tmp_path)
    assert net_path(p, solver_file) == sub / "train.prototxt"
    (tmp_path / "train.prototxt").write_text("")
    assert net_path(p, solver_file).resolve() == (tmp_path / "train.prototxt").resolve()
    with pytest.raises(SpecError, match="missing.prototxt"):
        net_path(solver_param('net: "missing.prototxt"'), solver_file)


# -- the Caffe golden run -----------------------------------------------------------------------
def test_caffe_golden_solver_step_small(fixtures_dir):
    net_mod = caffe_net
    case = fixtures_dir / "caffe_goldens" / "solver_step_small"
    meta = json.loads((case / "meta.json").read_text())
    try:
        from readonly_ohem.caffe.spec import read_solver
        sp = read_solver(str(case / "solver.prototxt"))
    except ImportError:
        sp = text_format.Parse((case / "solver.prototxt").read_text(), caffe_pb2.SolverParameter())
    net = net_mod.Net.from_file(str(net_path(sp, case / "solver.prototxt")), phase="TRAIN")
    net.load_caffemodel(str(case / "weights.caffemodel"))
    solver = Solver(sp, net, source=case / "solver.prototxt")
    inputs = np.load(case / "inputs.npz")
    feed = {k: torch.from_numpy(inputs[k]) for k in inputs.files}
    exp = np.load(case / "expected.npz")
    losses, lrs = [], []
    for _ in range(meta["iterations"]):
        out = solver.step(lambda i: feed)
        losses.append(out["loss"])
        lrs.append(out["lr"])
    tol = dict(rtol=meta["rtol"], atol=meta["atol"])
    np.testing.assert_allclose(losses, exp["loss_per_iter"], **tol)
    np.testing.assert_allclose(lrs, exp["lr_per_iter"], **tol)
    for layer in ("conv1", "fc"):
        for i, t in enumerate(net.layer_params(layer)):
            np.testing.assert_allclose(t.detach().numpy(), exp[f"final_param/{layer}/{i}"], **tol)


def test_from_file_builds_the_net_next_to_the_solver(fixtures_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # net.prototxt is not in the CWD: found beside the solver
    s = Solver.from_file(fixtures_dir / "caffe_goldens" / "solver_step_small" / "solver.prototxt")
    assert [q.key for q in s.net.learnable_params()] == ["conv1/0", "conv1/1", "fc/0", "fc/1"]
    assert [q.lr_mult for q in s.net.learnable_params()] == [1, 2, 1, 2]
