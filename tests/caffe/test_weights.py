"""weights.py: caffemodel read/write (new and V1), Caffe's shape check, fillers."""

import math
import re
import warnings

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from readonly_ohem.caffe import weights
from readonly_ohem.errors import SpecError, WeightsError
from readonly_ohem.caffe.proto import caffe_pb2

# The V1 golden's legacy 4-D blobs (meta.json notes): conv NxCxkhxkw, bias 1x1x1xN, fc 1x1xNxK.
V1_SHAPES = {"conv1": [(4, 3, 5, 5), (1, 1, 1, 4)], "conv2": [(6, 4, 3, 3), (1, 1, 1, 6)],
             "fc3": [(1, 1, 5, 24), (1, 1, 1, 5)], "fc4": [(1, 1, 3, 5), (1, 1, 1, 3)]}
# The same params as the net holds them (Caffe's shapes after the upgrade).
V1_TARGET_SHAPES = {"conv1": [(4, 3, 5, 5), (4,)], "conv2": [(6, 4, 3, 3), (6,)],
                    "fc3": [(5, 24), (5,)], "fc4": [(3, 5), (3,)]}


def filler(text: str) -> caffe_pb2.FillerParameter:
    return text_format.Parse(text, caffe_pb2.FillerParameter())


# -- blobs --------------------------------------------------------------------------------------

def test_blob_to_array_shape_legacy_and_double():
    b = caffe_pb2.BlobProto(data=[1, 2, 3, 4, 5, 6])
    b.shape.dim.extend([2, 3])
    np.testing.assert_array_equal(weights.blob_to_array(b), [[1, 2, 3], [4, 5, 6]])
    legacy = caffe_pb2.BlobProto(num=1, channels=1, height=2, width=3, data=range(6))
    assert weights.blob_to_array(legacy).shape == (1, 1, 2, 3)
    dbl = caffe_pb2.BlobProto(double_data=[0.5, 1.5], data=[9, 9])  # double wins, as Caffe
    dbl.shape.dim.append(2)
    got = weights.blob_to_array(dbl)
    assert got.dtype == np.float32 and got.tolist() == [0.5, 1.5]
    bad = caffe_pb2.BlobProto(data=[1, 2])
    bad.shape.dim.append(3)
    with pytest.raises(WeightsError, match="my blob.*3 values.*holds 2"):
        weights.blob_to_array(bad, where="my blob")


def test_array_to_blob_matches_plain_protobuf():
    a = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    ref = caffe_pb2.BlobProto(data=a.ravel().tolist())
    ref.shape.dim.extend([3, 4, 5])
    assert weights.array_to_blob(a) == ref
    assert weights.array_to_blob(torch.from_numpy(a)) == ref
    scalar = weights.array_to_blob(np.float32(2.5))
    assert scalar.HasField("shape") and list(scalar.shape.dim) == [] and list(scalar.data) == [2.5]


def test_shape_equals_caffe_rules():
    legacy = caffe_pb2.BlobProto(num=1, channels=1, height=5, width=24)
    assert weights.shape_equals((5, 24), legacy)
    assert weights.shape_equals((1, 5, 24), legacy)
    assert not weights.shape_equals((24, 5), legacy)
    assert not weights.shape_equals((1, 1, 1, 5, 24), legacy)  # > 4 axes never match legacy
    new = caffe_pb2.BlobProto()
    new.shape.dim.extend([5, 24])
    assert weights.shape_equals((5, 24), new) and not weights.shape_equals((1, 5, 24), new)


# -- files --------------------------------------------------------------------------------------

def test_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    layers = [("conv1", "Convolution", [rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                                        rng.standard_normal(4).astype(np.float32)]),
              ("relu1", "ReLU", []),
              ("fc", "InnerProduct", [torch.randn(2, 36), torch.zeros(2)])]
    p = tmp_path / "m.caffemodel"
    p.write_bytes(b"old contents")
    weights.write_caffemodel(p, "tiny", layers)
    assert [f.name for f in tmp_path.iterdir()] == ["m.caffemodel"]  # no temp file left
    got = weights.read_caffemodel(p)
    assert [(n, t) for n, t, _ in got] == [(n, t) for n, t, _ in layers]
    for (_, _, blobs), (_, _, arrays) in zip(got, layers):
        assert len(blobs) == len(arrays)
        for b, a in zip(blobs, arrays):
            np.testing.assert_array_equal(weights.blob_to_array(b), np.asarray(a))
            assert b.HasField("shape") and not b.HasField("num")
    net = caffe_pb2.NetParameter()
    net.ParseFromString(p.read_bytes())
    assert net.name == "tiny" and len(net.layers) == 0


def test_v1_caffemodel_fixture(fixtures_dir):
    got = weights.read_caffemodel(fixtures_dir / "spec" / "v1_caffemodel" / "weights.caffemodel")
    with_blobs = {n: [weights.blob_to_array(b).shape for b in bl] for n, _, bl in got if bl}
    assert with_blobs == V1_SHAPES
    types = {n: t for n, t, _ in got}
    assert types["conv1"] == "Convolution" and types["fc3"] == "InnerProduct"
    assert types["prob"] == "Softmax"


def test_load_into_v1_legacy_shapes(fixtures_dir):
    path = fixtures_dir / "spec" / "v1_caffemodel" / "weights.caffemodel"
    targets = {n: [torch.zeros(s) for s in shapes] for n, shapes in V1_TARGET_SHAPES.items()}
    targets["extra"] = [torch.zeros(2)]
    targets["relu1"] = []
    report = weights.load_into(targets, path)
    assert report.loaded == ["conv1", "conv2", "fc3", "fc4"]
    assert report.missing == ["extra"] and report.unknown == []
    raw = {n: [weights.blob_to_array(b) for b in bl] for n, _, bl in weights.read_caffemodel(path)}
    np.testing.assert_array_equal(targets["fc3"][0].numpy(), raw["fc3"][0].reshape(5, 24))
    np.testing.assert_array_equal(targets["conv2"][1].numpy(), raw["conv2"][1].ravel())
    assert "extra" in str(report)


def test_golden_caffemodels_read(shared_dir):
    paths = sorted((shared_dir / "caffe_goldens").glob("*/*.caffemodel"))
    assert len(paths) >= 14
    for p in paths:
        layers = weights.read_caffemodel(p)
        assert layers, p
        for name, _, blobs in layers:
            for b in blobs:
                assert weights.blob_to_array(b, where=f"{p} {name}").size > 0
    d = shared_dir / "caffe_goldens" / "solver_step_small"
    exp = np.load(d / "expected.npz")
    for fname, key in (("weights.caffemodel", "initial_param"), ("final.caffemodel", "final_param")):
        for name, _, blobs in weights.read_caffemodel(d / fname):
            for i, b in enumerate(blobs):
                np.testing.assert_array_equal(weights.blob_to_array(b), exp[f"{key}/{name}/{i}"])
    v1 = weights.read_caffemodel(shared_dir / "caffe_goldens" / "v1_caffemodel" / "weights.caffemodel")
    assert {n: [weights.blob_shape(b) for b in bl] for n, _, bl in v1 if bl} == V1_SHAPES


def test_load_into_reports_unknown_and_rewrites_round_trip(tmp_path):
    p = tmp_path / "w.caffemodel"
    weights.write_caffemodel(p, "n", [("a", "InnerProduct", [np.ones((2, 3)), np.arange(2)]),
                                      ("gone", "InnerProduct", [np.ones(1)]),
                                      ("relu", "ReLU", [])])
    t = {"a": [torch.zeros(2, 3, dtype=torch.float64), torch.nn.Parameter(torch.zeros(2))]}
    report = weights.load_into(t, p)
    assert report.unknown == ["gone"] and report.missing == [] and report.loaded == ["a"]
    assert t["a"][0].dtype == torch.float64 and t["a"][0].sum().item() == 6
    assert t["a"][1].tolist() == [0, 1] and t["a"][1].requires_grad


def test_load_into_shared_params_not_reported_missing(tmp_path):
    p = tmp_path / "imagenet.caffemodel"
    weights.write_caffemodel(p, "n", [("fc6", "InnerProduct", [np.full((2, 3), 7.0), np.ones(2)])])
    w, b = torch.zeros(2, 3), torch.zeros(2)
    targets = {"fc6_readonly": [w, b], "fc6": [w, b], "fc7": [torch.zeros(1)]}
    report = weights.load_into(targets, p)
    assert report.loaded == ["fc6"] and report.missing == ["fc7"]
    assert (w == 7).all() and (b == 1).all()


def test_non_finite_blobs_warn_naming_layer_and_blob(tmp_path):
    """Loaded as they are (Caffe does), with one warning naming the file, layer and blob."""
    p = tmp_path / "diverged.caffemodel"
    w = np.ones((2, 3), np.float32)
    w[0, 1], w[1, 2] = np.nan, -np.inf
    b = np.array([np.nan, np.nan], np.float32)
    weights.write_caffemodel(p, "n", [("conv1", "Convolution", [np.ones((4,)), np.zeros(1)]),
                                      ("fc6", "InnerProduct", [w, b])])
    t = {"conv1": [torch.zeros(4), torch.zeros(1)], "fc6": [torch.zeros(2, 3), torch.zeros(2)]}
    with pytest.warns(UserWarning) as record:
        report = weights.load_into(t, p)
    assert len(record) == 1
    assert str(record[0].message) == (
        f"{p}: non-finite weights, loaded as they are (a diverged snapshot?): "
        "layer 'fc6' blob 0 (1 NaN, 1 inf of 6); layer 'fc6' blob 1 (2 NaN, 0 inf of 2)")
    assert report.non_finite == ["layer 'fc6' blob 0 (1 NaN, 1 inf of 6)",
                                 "layer 'fc6' blob 1 (2 NaN, 0 inf of 2)"]
    assert "NaN/inf values (loaded as they are): layer 'fc6' blob 0" in str(report)
    np.testing.assert_array_equal(t["fc6"][0].numpy(), w)  # NaN and -inf where they were
    assert torch.isnan(t["fc6"][1]).all() and (t["conv1"][0] == 1).all()


def test_finite_blobs_load_without_warning(tmp_path):
    p = tmp_path / "ok.caffemodel"
    big = np.full((3,), np.finfo(np.float32).max)  # large but finite
    weights.write_caffemodel(p, "n", [("fc", "InnerProduct", [big])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = weights.load_into({"fc": [torch.zeros(3)]}, p)
    assert report.non_finite == [] and "NaN" not in str(report)


def test_load_into_shape_mismatch_names_everything(tmp_path):
    p = tmp_path / "w.caffemodel"
    weights.write_caffemodel(p, "n", [("ok", "InnerProduct", [np.ones((2, 3)), np.ones(2)]),
                                      ("fc7", "InnerProduct", [np.ones((4, 3)), np.ones(4)])])
    t = {"ok": [torch.zeros(2, 3), torch.zeros(2)], "fc7": [torch.zeros(4, 3), torch.zeros(5)]}
    with pytest.raises(WeightsError) as e:
        weights.load_into(t, p)
    msg = str(e.value)
    assert str(p) in msg and "'fc7'" in msg and "param 1" in msg
    assert "4 (4)" in msg and "5 (5)" in msg
    assert t["ok"][0].sum().item() == 0  # nothing copied before the check failed
    t["fc7"] = [torch.zeros(4, 3)]
    with pytest.raises(WeightsError, match=r"w.caffemodel.*'fc7'.*number of blobs.*2.*1"):
        weights.load_into(t, p)


def test_corrupt_truncated_and_missing_files(tmp_path):
    good = tmp_path / "good.caffemodel"
    weights.write_caffemodel(good, "n", [("fc", "InnerProduct", [np.ones((50, 40))])])
    data = good.read_bytes()
    trunc = tmp_path / "trunc.caffemodel"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="trunc.caffemodel"):
        weights.load_into({"fc": [torch.zeros(50, 40)]}, trunc)
    junk = tmp_path / "junk.caffemodel"
    junk.write_bytes(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")
    with pytest.raises(WeightsError, match="junk.caffemodel"):
        weights.read_caffemodel(junk)
    text = tmp_path / "text.caffemodel"
    text.write_text('name: "not binary"\n')
    with pytest.raises(WeightsError, match="text.caffemodel"):
        weights.read_caffemodel(text)
    with pytest.raises(WeightsError, match="absent.caffemodel.*not found"):
        weights.read_caffemodel(tmp_path / "absent.caffemodel")


# -- fillers ------------------------------------------------------------------------------------

def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_constant_and_default_filler():
    t = torch.nn.Parameter(torch.ones(3, 4))
    weights.fill_(t, None)
    assert t.abs().sum().item() == 0 and t.requires_grad  # Caffe's default: constant 0
    weights.fill_(t, filler('type: "constant" value: 0.25'))
    assert (t == 0.25).all()
    with pytest.raises(SpecError, match="sparsity"):
        weights.fill_(t, filler('type: "constant" sparse: 2'))


def test_gaussian_statistics_and_sparse():
    t = torch.empty(400, 500)
    weights.fill_(t, filler('type: "gaussian" mean: 0.5 std: 0.01'), gen())
    assert abs(t.mean().item() - 0.5) < 1e-4 and abs(t.std().item() - 0.01) < 2e-4
    weights.fill_(t, filler('type: "gaussian" std: 1 sparse: 100'), gen(1))
    assert abs((t != 0).float().mean().item() - 100 / 400) < 0.01  # p = sparse / shape[0]
    with pytest.raises(SpecError, match="sparse"):
        weights.fill_(torch.empty(4, 5), filler('type: "gaussian" sparse: 9'))


def test_uniform_bounds_and_mean():
    t = torch.empty(200, 500)
    weights.fill_(t, filler('type: "uniform" min: -2 max: 3'), gen())
    assert t.min().item() >= -2 and t.max().item() <= 3
    assert abs(t.mean().item() - 0.5) < 0.02
    assert abs(t.var().item() - 25 / 12) < 0.05


@pytest.mark.parametrize("norm,n", [("FAN_IN", 64 * 9), ("FAN_OUT", 128 * 9),
                                    ("AVERAGE", (64 * 9 + 128 * 9) / 2)])
def test_xavier_and_msra_fan(norm, n):
    shape = (128, 64, 3, 3)
    t = torch.empty(shape)
    weights.fill_(t, filler(f'type: "xavier" variance_norm: {norm}'), gen())
    scale = math.sqrt(3 / n)
    assert t.abs().max().item() <= scale and t.abs().max().item() > 0.99 * scale
    assert abs(t.std().item() - scale / math.sqrt(3)) < 0.01 * scale
    weights.fill_(t, filler(f'type: "msra" variance_norm: {norm}'), gen(1))
    assert abs(t.std().item() - math.sqrt(2 / n)) < 0.01 * math.sqrt(2 / n)
    assert abs(t.mean().item()) < 0.01 * math.sqrt(2 / n)


def test_xavier_fan_of_fc_and_1d_blob():
    t = torch.empty(1000, 30)  # fc weight: fan_in 30, fan_out 1000
    weights.fill_(t, filler('type: "xavier" variance_norm: FAN_OUT'), gen())
    assert t.abs().max().item() <= math.sqrt(3 / 1000)
    b = torch.empty(5000)  # 1-D: fan_in = 1, fan_out = count
    weights.fill_(b, filler('type: "xavier" variance_norm: FAN_OUT'), gen())
    assert b.abs().max().item() <= math.sqrt(3 / 5000)
    weights.fill_(b, filler('type: "xavier"'), gen())
    assert b.abs().max().item() > 0.9


def test_bilinear_exact_values():
    t = torch.empty(2, 3, 4, 4)
    weights.fill_(t, filler('type: "bilinear"'))
    # K = 4: f = 2, c = 0.75; 1 - |x/2 - 0.75| for x = 0..3
    w = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.equal(t[1, 2], w[:, None] * w[None, :]) and torch.equal(t[0, 0], t[1, 2])
    t3 = torch.empty(1, 1, 3, 3)
    weights.fill_(t3, filler('type: "bilinear"'))  # K = 3: f = 2, c = 0.5
    w3 = torch.tensor([0.5, 1.0, 0.5])
    assert torch.equal(t3[0, 0], w3[:, None] * w3[None, :])
    with pytest.raises(SpecError, match="square"):
        weights.fill_(torch.empty(1, 1, 3, 4), filler('type: "bilinear"'))


def test_positive_unitball_rows_sum_to_one():
    t = torch.empty(7, 3, 2, 2)
    weights.fill_(t, filler('type: "positive_unitball"'), gen())
    assert (t >= 0).all()
    torch.testing.assert_close(t.reshape(7, -1).sum(1), torch.ones(7))


def test_check_filler_without_filling():
    """What ``net`` checks on params it never materializes: the refusals of ``fill_``."""
    weights.check_filler(filler('type: "msra"'), (4, 3, 3, 3))  # fine: returns, fills nothing
    weights.check_filler(None, (4,))  # Caffe's default constant filler
    for text, shape, msg in [('type: ""', (4,), "unknown filler type ''"),
                             ('type: "Eltwise"', (4,), "unknown filler type 'Eltwise'"),
                             ('type: "xavier"', (0, 3), "empty blob"),
                             ('type: "uniform" sparse: 1', (4,), "sparsity"),
                             ('type: "gaussian" sparse: -2', (4,), "sparse must be >= -1"),
                             ('type: "gaussian" sparse: 5', (4, 2), "exceeds the 4 outputs"),
                             ('type: "bilinear"', (4, 3, 3), "4-D blob"),
                             ('type: "bilinear"', (4, 1, 3, 2), "square kernel")]:
        with pytest.raises(SpecError, match=rf"^fc7 param 0: .*{re.escape(msg)}"):
            weights.check_filler(filler(text), shape, where="fc7 param 0")


def test_unknown_filler_and_reproducibility():
    with pytest.raises(SpecError, match="conv1.*'gausian'"):
        weights.fill_(torch.empty(2), filler('type: "gausian"'), where="conv1 weight")
    a, b = torch.empty(10), torch.empty(10)
    weights.fill_(a, filler('type: "gaussian"'), gen(5))
    weights.fill_(b, filler('type: "gaussian"'), gen(5))
    assert torch.equal(a, b)
