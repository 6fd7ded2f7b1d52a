"""Net semantics on small nets of stand-in layers (registered here under ``Test*`` names, so
these tests do not depend on the real layer implementations): in-place chains, gradient sums of
blobs consumed twice, param sharing and mults, propagate_down, phase rules, loss weights, Caffe's
backward pruning (the OHEM readonly branch keeps no graph), feeding, weights round trip."""

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from readonly_ohem.errors import SpecError
from readonly_ohem.caffe.layers.base import Layer, ParamBlob, register
from readonly_ohem.caffe.net import Net
from readonly_ohem.caffe.proto import caffe_pb2


# -- stand-in layers --------------------------------------------------------------------------
@register("TestIP")
class StandInIP(Layer):
    """InnerProduct: (N, ...) -> (N, num_output); W (num_output, K), b (num_output)."""

    min_bottoms = max_bottoms = 1

    def param_blobs(self, bottom_shapes):
        p = self.param.inner_product_param
        k = int(np.prod(bottom_shapes[0][1:]))
        return [ParamBlob((p.num_output, k), p.weight_filler),
                ParamBlob((p.num_output,), p.bias_filler)]

    def forward(self, bottoms, params):
        x = bottoms[0].reshape(bottoms[0].shape[0], -1)
        return [x @ params[0].t() + params[1]]


@register("TestReLU")
class StandInReLU(Layer):
    def forward(self, bottoms, params):
        return [torch.relu(bottoms[0])]


@register("TestScale")
class StandInScale(Layer):
    """top = 3 * bottom (a distinct op for in-place chains)."""

    def forward(self, bottoms, params):
        return [3.0 * bottoms[0]]


@register("TestSum")
class StandInSum(Layer):
    def forward(self, bottoms, params):
        return [bottoms[0] + bottoms[1]]


@register("TestIdentity")
class StandInIdentity(Layer):
    """Returns its bottom object itself (as a TEST-phase Dropout may)."""

    def forward(self, bottoms, params):
        return [bottoms[0]]


@register("TestLoss")
class StandInLoss(Layer):
    """0.5 * sum(x^2): a loss layer (top 0 weighted 1 by default)."""

    loss_by_default = True

    def forward(self, bottoms, params):
        return [0.5 * (bottoms[0] ** 2).sum()]


@register("TestNoDefaultLoss")
class StandInNoDefaultLoss(StandInLoss):
    """Like the Fast R-CNN SmoothL1Loss: no loss weight unless the spec gives one."""

    loss_by_default = False


@register("TestPick")
class StandInPick(Layer):
    """An OHEM-like selector: keeps the 2 rows of bottom 1 with the largest bottom-0 score.
    No backward (as OHEMDataLayer)."""

    backprop_to_bottoms = False

    def forward(self, bottoms, params):
        keep = torch.argsort(bottoms[0].sum(dim=1), descending=True)[:2]
        return [bottoms[1][keep]]


def make_net(text, **kw):
    return Net(text_format.Parse(text, caffe_pb2.NetParameter()), source="test.prototxt", **kw)


INPUT = 'layer { name: "%s" type: "Input" top: "%s" input_param { shape { dim: %d dim: %d } } }\n'
GAUSS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "uniform" min: -1 max: 1 }'


def ip(name, bottom, top, n, extra=""):
    return (f'layer {{ name: "{name}" type: "TestIP" bottom: "{bottom}" top: "{top}" {extra} '
            f'inner_product_param {{ num_output: {n} {GAUSS} }} }}\n')


def feed(*names, shape=(3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(shape, generator=g) for n in names}


# -- in-place ---------------------------------------------------------------------------------
def test_inplace_chain_final_value_and_diff_of_first_version():
    net = make_net(INPUT % ("x", "x", 3, 4) + ip("fc", "x", "fc", 5)
                   + 'layer { name: "relu" type: "TestReLU" bottom: "fc" top: "fc" }\n'
                   + 'layer { name: "scale" type: "TestScale" bottom: "fc" top: "fc" }\n'
                   + 'layer { name: "loss" type: "TestLoss" bottom: "fc" top: "loss" }\n')
    f = feed("x")
    blobs = net.forward(f, retain_diffs=True)
    w, b = net.layer_params("fc")
    pre = f["x"] @ w.detach().t() + b.detach()
    torch.testing.assert_close(blobs["fc"], 3 * torch.relu(pre))  # after the whole chain
    net.backward(blobs)
    diffs = net.blob_diffs()
    # Caffe's diff of "fc": w.r.t. the input of the first in-place layer (pre-ReLU)
    expected = 3 * (3 * torch.relu(pre)) * (pre > 0)
    torch.testing.assert_close(diffs["fc"], expected)
    assert diffs["loss"] == 1.0
    assert not diffs["x"].any()  # no force_backward: inputs get no diff


def test_inplace_first_layer_not_writing_keeps_later_version_diff():
    """relu in place with propagate_down false: Caffe's fc diff is the one the loss wrote."""
    net = make_net(INPUT % ("x", "x", 3, 4) + ip("fc", "x", "fc", 5)
                   + 'layer { name: "relu" type: "TestReLU" bottom: "fc" top: "fc" '
                     'propagate_down: false }\n'
                   + 'layer { name: "loss" type: "TestLoss" bottom: "fc" top: "loss" }\n')
    assert not net.record("fc").need_backward  # its top is cut: Caffe skips it entirely
    blobs = net.forward(feed("x"), retain_diffs=True)
    net.backward(blobs)
    torch.testing.assert_close(net.blob_diffs()["fc"], blobs["fc"].detach())
    assert not net.param_diffs()["fc"][0].any()


def test_identity_layer_output_keeps_its_own_diff():
    net = make_net(INPUT % ("x", "x", 2, 3) + ip("fc", "x", "fc", 4)
                   + 'layer { name: "id" type: "TestIdentity" bottom: "fc" top: "same" }\n'
                   + 'layer { name: "loss" type: "TestLoss" bottom: "same" top: "loss" }\n'
                   + 'layer { name: "loss2" type: "TestLoss" bottom: "fc" top: "loss2" '
                     'loss_weight: 2 }\n')
    blobs = net.forward(feed("x", shape=(2, 3)), retain_diffs=True)
    net.backward(blobs)
    d = net.blob_diffs()
    torch.testing.assert_close(d["same"], blobs["same"].detach())
    torch.testing.assert_close(d["fc"], 3 * blobs["fc"].detach())  # 1*fc + 2*fc summed


# -- a blob consumed twice: gradients add (Caffe's Split) ---------------------------------
def test_split_gradient_sum_matches_finite_differences():
    text = (INPUT % ("x", "x", 3, 4) + ip("a", "x", "a", 3)
            + ip("b1", "a", "b1", 2) + ip("b2", "a", "b2", 2)
            + 'layer { name: "l1" type: "TestLoss" bottom: "b1" top: "l1" }\n'
            + 'layer { name: "l2" type: "TestLoss" bottom: "b2" top: "l2" loss_weight: 0.5 }\n')
    net = make_net(text)
    f = feed("x")
    blobs = net.forward(f, retain_diffs=True)
    net.backward(blobs)
    grads = [g.clone() for g in net.param_diffs()["a"]]
    d = net.blob_diffs()
    wb1, wb2 = net.layer_params("b1")[0].detach(), net.layer_params("b2")[0].detach()
    torch.testing.assert_close(d["a"], d["b1"] @ wb1 + d["b2"] @ wb2)
    # central differences (exact for this quadratic loss up to rounding), in float64
    for p, g in zip(net.layer_params("a"), grads):
        flat = p.data.view(-1)
        for idx in range(0, flat.numel(), 3):
            old = flat[idx].item()
            vals = []
            for delta in (1e-2, -1e-2):
                flat[idx] = old + delta
                with torch.no_grad():
                    vals.append(float(net.total_loss(net.forward(f)).double()))
            flat[idx] = old
            fd = (vals[0] - vals[1]) / 2e-2
            assert abs(fd - g.view(-1)[idx].item()) < 2e-3 * max(1.0, abs(fd))


# -- sharing ------------------------------------------------------------------------------
SHARE = (INPUT % ("x", "x", 3, 4) + INPUT % ("y", "y", 3, 4)
         + ip("ro", "x", "ro", 2, 'param { name: "w" } param { name: "b" }')
         + ip("tr", "y", "tr", 2, 'param { name: "w" lr_mult: 1 } '
                                  'param { name: "b" lr_mult: 2 decay_mult: 0 }')
         + 'layer { name: "mix" type: "TestSum" bottom: "tr" bottom: "ro" top: "mix" '
           'propagate_down: true propagate_down: false }\n'
         + 'layer { name: "loss" type: "TestLoss" bottom: "mix" top: "loss" }\n')


def test_sharing_one_tensor_owner_fills_and_mults_adopted():
    net = make_net(SHARE)
    ro, tr = net.layer_params("ro"), net.layer_params("tr")
    assert ro[0] is tr[0] and ro[1] is tr[1]
    lps = net.learnable_params()
    assert [(p.key, p.lr_mult, p.decay_mult, p.owner, p.index) for p in lps] == [
        ("w", 1.0, 1.0, "ro", 0), ("b", 2.0, 0.0, "ro", 1)]


def test_sharing_gradient_only_through_trainable_path():
    net = make_net(SHARE)
    f = feed("x", "y")
    blobs = net.forward(f, retain_diffs=True)
    assert not blobs["ro"].requires_grad and blobs["ro"].grad_fn is None
    net.backward(blobs)
    d = net.blob_diffs()
    assert not d["ro"].any()
    mix = blobs["mix"].detach()
    torch.testing.assert_close(net.param_diffs()["tr"][0], mix.t() @ f["y"])
    torch.testing.assert_close(net.param_diffs()["ro"][0], net.param_diffs()["tr"][0])
    torch.testing.assert_close(net.param_diffs()["tr"][1], mix.sum(0))


def test_sharing_conflicting_mults_is_an_error():
    text = SHARE.replace('param { name: "w" } param { name: "b" }',
                         'param { name: "w" lr_mult: 3 } param { name: "b" }')
    with pytest.raises(SpecError) as e:
        make_net(text)
    msg = str(e.value)
    assert "test.prototxt" in msg and "'w'" in msg and "'tr'" in msg and "'ro'" in msg
    assert "lr_mult" in msg


def test_sharing_shape_clash_is_an_error():
    text = SHARE.replace(ip("tr", "y", "tr", 2, 'param { name: "w" lr_mult: 1 } '
                                                 'param { name: "b" lr_mult: 2 decay_mult: 0 }'),
                         ip("tr", "y", "tr", 3, 'param { name: "w" } param { name: "b" }'))
    with pytest.raises(SpecError, match=r"shared param 'w' has shape \[3, 4\].*\[2, 4\].*'ro'"):
        make_net(text)


def test_sharing_permissive_needs_equal_counts_and_views_the_owner():
    """Caffe's share_mode PERMISSIVE: only the counts must agree; the sharer sees the owner's
    data in its own shape (Blob::ShareData), and its diff lands in the one shared diff."""
    text = (INPUT % ("x", "x", 2, 6) + INPUT % ("y", "y", 2, 3)
            + ip("ro", "x", "ro", 2, 'param { name: "w" } param { name: "b" }')
            + ip("tr", "y", "tr", 4, 'param { name: "w" share_mode: PERMISSIVE } '
                                     'param { name: "b2" }')
            + 'layer { name: "loss" type: "TestLoss" bottom: "tr" top: "loss" }\n')
    net = make_net(text)
    w_ro, w_tr = net.layer_params("ro")[0], net.layer_params("tr")[0]
    assert tuple(w_ro.shape) == (2, 6) and tuple(w_tr.shape) == (4, 3)
    assert torch.equal(w_tr, w_ro.detach().reshape(4, 3))  # one storage, two shapes
    f = feed("x", "y", shape=(2, 3))
    blobs = net.forward({"x": torch.zeros(2, 6), "y": f["y"]})
    expect = f["y"] @ w_ro.detach().reshape(4, 3).t() + net.layer_params("tr")[1].detach()
    torch.testing.assert_close(blobs["tr"], expect)
    net.total_loss(blobs).backward()
    diffs = net.param_diffs()
    assert diffs["ro"][0].shape == (2, 6) and diffs["tr"][0].shape == (4, 3)
    torch.testing.assert_close(diffs["ro"][0].reshape(4, 3), diffs["tr"][0])
    # STRICT (the default) refuses the same net; PERMISSIVE refuses unequal counts
    with pytest.raises(SpecError, match=r"shared param 'w' has shape \[4, 3\].*STRICT"):
        make_net(text.replace(" share_mode: PERMISSIVE", ""))
    with pytest.raises(SpecError, match=r"PERMISSIVE.*15 values"):
        make_net(text.replace("num_output: 4", "num_output: 5"))


def test_default_param_spec_mults_and_lr_mult_zero_freezes():
    net = make_net(INPUT % ("x", "x", 3, 4)
                   + ip("frozen", "x", "h", 3, "param { lr_mult: 0 } param { lr_mult: 0 }")
                   + 'layer { name: "relu" type: "TestReLU" bottom: "h" top: "h" }\n'
                   + ip("fc", "h", "fc", 2)
                   + 'layer { name: "loss" type: "TestLoss" bottom: "fc" top: "loss" }\n')
    lps = {p.key: p for p in net.learnable_params()}
    assert lps["fc/0"].lr_mult == 1 and lps["fc/0"].decay_mult == 1
    assert not lps["frozen/0"].tensor.requires_grad
    assert not net.record("frozen").need_backward and not net.record("relu").need_backward
    blobs = net.forward(feed("x"))
    assert blobs["h"].grad_fn is None  # the frozen trunk keeps no graph
    net.total_loss(blobs).backward()
    assert net.layer_params("frozen")[0].grad is None
    assert net.layer_params("fc")[0].grad is not None


# -- propagate_down, force_backward, loss weights ----------------------------------------------
def test_propagate_down_false_detaches_that_bottom_only():
    net = make_net(INPUT % ("x", "x", 3, 4) + ip("a", "x", "a", 4) + ip("b", "x", "b", 4)
                   + 'layer { name: "s" type: "TestSum" bottom: "a" bottom: "b" top: "s" '
                     'propagate_down: false propagate_down: true }\n'
                   + 'layer { name: "loss" type: "TestLoss" bottom: "s" top: "loss" }\n')
    assert net.record("s").bottom_grad == [False, True]
    assert not net.record("a").need_backward and net.record("b").need_backward
    blobs = net.forward(feed("x"))
    net.total_loss(blobs).backward()
    assert net.layer_params("a")[0].grad is None
    assert net.layer_params("b")[0].grad is not None


def test_force_backward_gives_inputs_a_diff():
    text = (INPUT % ("x", "x", 3, 4) + ip("fc", "x", "fc", 2)
            + 'layer { name: "loss" type: "TestLoss" bottom: "fc" top: "loss" }\n')
    f = feed("x")
    net = make_net("force_backward: true\n" + text)
    blobs = net.forward(f, retain_diffs=True)
    net.backward(blobs)
    w = net.layer_params("fc")[0].detach()
    torch.testing.assert_close(net.blob_diffs()["x"], blobs["fc"].detach() @ w)
    assert not f["x"].requires_grad  # the caller's tensor is untouched


def test_top_diff_seed_backward():
    net = make_net("force_backward: true\n" + INPUT % ("x", "x", 3, 4) + ip("fc", "x", "fc", 2))
    blobs = net.forward(feed("x"), retain_diffs=True)
    seed = torch.arange(6.0).reshape(3, 2)
    net.backward(blobs, {"fc": seed})
    w = net.layer_params("fc")[0].detach()
    torch.testing.assert_close(net.blob_diffs()["x"], seed @ w)
    torch.testing.assert_close(net.blob_diffs()["fc"], seed)


def test_loss_weight_defaults_and_explicit():
    net = make_net(INPUT % ("x", "x", 3, 4)
                   + 'layer { name: "l1" type: "TestLoss" bottom: "x" top: "l1" }\n'
                   + 'layer { name: "l2" type: "TestNoDefaultLoss" bottom: "x" top: "l2" }\n'
                   + 'layer { name: "l3" type: "TestNoDefaultLoss" bottom: "x" top: "l3" '
                     'loss_weight: 0.25 }\n'
                   + 'layer { name: "r" type: "TestReLU" bottom: "x" top: "r" loss_weight: 2 }\n')
    assert net.loss_weights == {"l1": 1.0, "l3": 0.25, "r": 2.0}
    f = feed("x")
    blobs = net.forward(f)
    x = f["x"]
    expected = 1.25 * 0.5 * (x ** 2).sum() + 2 * torch.relu(x).sum()
    torch.testing.assert_close(net.total_loss(blobs), expected)


def test_phase_include_exclude():
    text = (INPUT % ("x", "x", 3, 4)
            + 'layer { name: "tr" type: "TestReLU" bottom: "x" top: "t" include { phase: TRAIN } }\n'
            + 'layer { name: "te" type: "TestScale" bottom: "x" top: "t" include { phase: TEST } }\n'
            + 'layer { name: "nt" type: "TestReLU" bottom: "x" top: "u" exclude { phase: TEST } }\n')
    train, test = make_net(text, phase="TRAIN"), make_net(text, phase="TEST")
    assert [r.name for r in train.layers] == ["x", "tr", "nt"]
    assert [r.name for r in test.layers] == ["x", "te"]
    assert train.ctx.phase == "TRAIN" and test.ctx.phase == "TEST"


# -- the readonly branch -------------------------------------------------------------------------
READONLY = (INPUT % ("feat", "feat", 6, 4)
            + ip("trunk", "feat", "conv", 5)
            + ip("score_ro", "conv", "score_ro", 3,
                 'propagate_down: false param { name: "hw" } param { name: "hb" }')
            + 'layer { name: "relu_ro" type: "TestReLU" bottom: "score_ro" top: "score_ro" '
              'propagate_down: false }\n'
            + 'layer { name: "mine" type: "TestPick" bottom: "score_ro" bottom: "conv" '
              'top: "conv_hard" propagate_down: false propagate_down: false }\n'
            + ip("score", "conv_hard", "score", 3,
                 'param { name: "hw" lr_mult: 1 } param { name: "hb" lr_mult: 2 }')
            + 'layer { name: "loss" type: "TestLoss" bottom: "score" top: "loss" }\n')


def test_readonly_branch_runs_without_graph_and_trains_through_hard_rows():
    net = make_net(READONLY)
    for name in ("score_ro", "relu_ro", "mine"):
        assert not net.record(name).need_backward, name
    assert net.record("score").need_backward
    assert not net.record("trunk").need_backward  # conv reaches the loss only through cut edges
    f = feed("feat", shape=(6, 4))
    blobs = net.forward(f, retain_diffs=True)
    assert not blobs["score_ro"].requires_grad and blobs["score_ro"].grad_fn is None
    assert blobs["conv_hard"].grad_fn is None  # the selector gives no gradient
    net.total_loss(blobs).backward()
    # the shared head's grad is the trainable path's alone
    hard = blobs["conv_hard"].detach()
    score = blobs["score"].detach()
    torch.testing.assert_close(net.layer_params("score")[0].grad, score.t() @ hard)
    assert net.layer_params("score_ro")[0] is net.layer_params("score")[0]
    # conv_hard is cut from conv (as rois_hard), so the trunk only gets what flows through conv
    assert net.layer_params("trunk")[0].grad is None
    # the readonly head reads the current shared weights at every forward
    with torch.no_grad():
        net.layer_params("score")[0].add_(1.0)
    again = net.forward(f)
    assert not torch.equal(again["score_ro"], blobs["score_ro"])


def test_readonly_selection_with_trunk_gradient():
    """The trainable head reads the trunk directly (as roi_pool5 reads conv5): the trunk gets
    gradient from the trainable path only."""
    text = READONLY.replace('bottom: "conv_hard" top: "score"', 'bottom: "conv" top: "score"')
    net = make_net(text)
    f = feed("feat", shape=(6, 4))
    blobs = net.forward(f)
    net.total_loss(blobs).backward()
    w = net.layer_params("score")[0].detach()
    conv_diff = blobs["score"].detach() @ w
    torch.testing.assert_close(net.layer_params("trunk")[0].grad, conv_diff.t() @ f["feat"])


# -- feeding, shapes, errors, weights --------------------------------------------------------------
def test_fed_shapes_override_declared_and_unfed_input_is_zeros():
    net = make_net(INPUT % ("x", "x", 3, 4) + INPUT % ("y", "y", 2, 2)
                   + 'layer { name: "r" type: "TestReLU" bottom: "x" top: "r" }\n')
    blobs = net.forward({"x": np.ones((7, 4), np.float32)})
    assert blobs["r"].shape == (7, 4) and blobs["y"].shape == (2, 2) and not blobs["y"].any()
    with pytest.raises(SpecError, match="'r'.*only net inputs"):
        net.forward({"r": np.ones((1, 1))})


def test_data_layer_with_all_tops_fed_is_not_built():
    text = ('layer { name: "data" type: "Python" top: "a" top: "b" python_param { '
            'module: "no_such_module_anywhere" layer: "Nope" } }\n'
            'layer { name: "s" type: "TestSum" bottom: "a" bottom: "b" top: "s" }\n')
    net = make_net(text, input_shapes={"a": (2, 2), "b": (2, 2)})
    assert net.layer("data") is None
    out = net.forward({"a": torch.ones(2, 2), "b": torch.ones(2, 2)})
    assert (out["s"] == 2).all()
    with pytest.raises(SpecError, match="no_such_module_anywhere.Nope is not registered"):
        make_net(text)


def test_nets_are_deterministic_and_caffemodel_round_trip(tmp_path):
    text = INPUT % ("x", "x", 3, 4) + ip("fc", "x", "fc", 5) + ip("fc2", "fc", "out", 2)
    a, b = make_net(text), make_net(text)
    for p, q in zip(a.learnable_params(), b.learnable_params()):
        assert torch.equal(p.tensor, q.tensor)
    c = make_net(text, seed=1)
    with torch.no_grad():
        a.layer_params("fc")[0].mul_(2)
    path = tmp_path / "w.caffemodel"
    a.save_caffemodel(path)
    report = c.load_caffemodel(path)
    assert sorted(report.loaded) == ["fc", "fc2"] and not report.missing
    for p, q in zip(a.learnable_params(), c.learnable_params()):
        assert torch.equal(p.tensor, q.tensor)


def test_blob_shapes_and_records():
    net = make_net(INPUT % ("x", "x", 3, 4) + ip("fc", "x", "fc", 5)
                   + 'layer { name: "r" type: "TestReLU" bottom: "fc" top: "fc" }\n')
    assert net.blob_shapes == {"x": (3, 4), "fc": (3, 5)}
    assert net.record("r").inplace == [True] and net.record("fc").inplace == [False]
    assert [r.type for r in net.layers] == ["Input", "TestIP", "TestReLU"]


@pytest.mark.parametrize("body, pattern", [
    ('layer { name: "r" type: "TestReLU" bottom: "nope" top: "r" }',
     r"test.prototxt: layer 'r' \(TestReLU\): bottom blob 'nope'"),
    ('layer { name: "r" type: "Frobnicate" bottom: "x" top: "r" }',
     r"layer 'r': unknown layer type 'Frobnicate'"),
    ('layer { name: "r" type: "TestReLU" bottom: "x" top: "x2" }\n'
     'layer { name: "r2" type: "TestReLU" bottom: "x" top: "x2" }',
     r"layer 'r2' \(TestReLU\): top blob 'x2' is produced by an earlier layer"),
    ('layer { name: "r" type: "TestReLU" bottom: "x" top: "r" propagate_down: false '
     'propagate_down: true }', r"layer 'r'.*propagate_down"),
    ('layer { name: "f" type: "TestIP" bottom: "x" bottom: "x" top: "f" }',
     r"layer 'f' \(TestIP\).*bottom"),
    ('layer { name: "x" type: "TestReLU" bottom: "x" top: "y" }', r"duplicate layer name 'x'"),
])
def test_spec_errors_name_file_layer_and_blob(body, pattern):
    with pytest.raises(SpecError, match=pattern):
        make_net(INPUT % ("x", "x", 2, 2) + body)


def test_batchnorm_blobs_are_never_learned():
    """Caffe's BatchNorm forces lr_mult 0 on its three statistics blobs (SPEC §3)."""
    from readonly_ohem.caffe.spec import parse_net_text

    spec = parse_net_text("""
    layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
    layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 4 } } }
    layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "s"
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "y" top: "loss" }
    """)
    net = Net(spec, phase="TRAIN")
    mults = {(p.owner, p.index): p.lr_mult for p in net.learnable_params()}
    assert mults[("bn", 0)] == mults[("bn", 1)] == mults[("bn", 2)] == 0.0
    assert mults[("ip", 0)] == 1.0
    blobs = net.forward({"x": torch.randn(4, 3), "y": torch.tensor([0.0, 1.0, 1.0, 0.0])})
    net.total_loss(blobs).backward()
    assert all(p.grad is None or not p.grad.any() for p in net.layer_params("bn"))
    assert net.layer_params("ip")[0].grad.abs().sum() > 0


def test_batchnorm_without_param_blocks_still_needs_backward_as_in_caffe():
    """Caffe decides "needs backward" from the net's ParamSpec (default lr_mult 1) before
    BatchNorm forces its own copy to lr 0: the blob after it gets a diff, the stats never learn."""
    from readonly_ohem.caffe.spec import parse_net_text

    spec = parse_net_text("""
    layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
    layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 4 } } }
    layer { name: "bn" type: "BatchNorm" bottom: "x" top: "z" }
    layer { name: "ip" type: "InnerProduct" bottom: "z" top: "s"
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "y" top: "loss" }
    """)
    net = Net(spec, phase="TRAIN")
    blobs = net.forward({"x": torch.randn(4, 3), "y": torch.tensor([0.0, 1.0, 1.0, 0.0])},
                        retain_diffs=True)
    net.total_loss(blobs).backward()
    diffs = net.blob_diffs()
    assert diffs["z"].abs().sum() > 0  # Caffe's IP writes its bottom diff here
    assert not diffs["x"].any()  # an Input blob needs no diff without force_backward
    assert all(p.lr_mult == 0.0 for p in net.learnable_params() if p.owner == "bn")


# -- compute dtype: chosen layers under autocast, blobs stay float32 -----------------------------
def test_set_compute_dtype_runs_layers_under_autocast_and_keeps_float32_blobs():
    net = make_net('''
        input: "x" input_shape { dim: 4 dim: 8 }
        layer { name: "ip1" type: "TestIP" bottom: "x" top: "h"
                inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 1 } } }
        layer { name: "ip2" type: "TestIP" bottom: "h" top: "y"
                inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
    ''', phase="TEST")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 3
    want = net.forward({"x": x})
    net.set_compute_dtype(["ip1"], torch.bfloat16)
    got = net.forward({"x": x})
    assert got["h"].dtype == got["y"].dtype == torch.float32
    w, b = net.layer_params("ip1")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h_bf16 = (x @ w.t() + b).float()  # the layer's forward under autocast, cast back
    assert torch.equal(got["h"], h_bf16) and not torch.equal(got["h"], want["h"])
    torch.testing.assert_close(got["h"], want["h"], rtol=0.02, atol=0.1)
    net.set_compute_dtype(["ip1"], None)  # back to float32: the original numbers
    assert torch.equal(net.forward({"x": x})["y"], want["y"])
    with pytest.raises(SpecError, match="no layer named 'ip9'"):
        net.set_compute_dtype(["ip9"], torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        net.set_compute_dtype(["ip1"], torch.int8)
