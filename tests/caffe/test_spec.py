"""spec.py: parsing with FILE:LINE:COL errors, Caffe's V1/input upgrade, FilterNet rules."""

from pathlib import Path

import pytest
from google.protobuf import text_format

from readonly_ohem.caffe import spec
from readonly_ohem.errors import SpecError
from readonly_ohem.caffe.proto import caffe_pb2


def net(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


# -- parsing ------------------------------------------------------------------------------------

def test_syntax_error_names_file_line_col(tmp_path):
    p = tmp_path / "bad.prototxt"
    p.write_text('name: "x"\nlayer {\n  nme: "conv1"\n}\n')
    with pytest.raises(SpecError) as e:
        spec.read_net(p)
    assert str(e.value).startswith(f"{p}:3:3: ")
    assert "nme" in str(e.value)


def test_parse_net_text_source_and_type_error():
    with pytest.raises(SpecError, match=r"^my.prototxt:2:35: .*integer"):
        spec.parse_net_text('layer {\n  convolution_param { num_output: "a" } }', "my.prototxt")


def test_unterminated_message_is_a_spec_error():
    with pytest.raises(SpecError, match=r"^<string>:\d+:\d+: "):
        spec.parse_net_text('layer { name: "a" ')


def test_missing_file_named(tmp_path):
    missing = tmp_path / "nope.prototxt"
    for fn in (spec.read_net, spec.read_net_binary, spec.read_solver):
        with pytest.raises(SpecError, match="nope.prototxt.*not found"):
            fn(missing)
    with pytest.raises(SpecError, match="nope.prototxt"):
        spec.load_net_spec(missing, "TEST")


def test_read_net_parses_quotes_and_comments(tmp_path):
    p = tmp_path / "n.prototxt"
    p.write_text("name: 'n'  # comment\nlayer { name: 'data' type: 'Python' top: 'data'\n"
                 "  python_param { module: 'm' layer: 'L' param_str: \"'num_classes': 21\" } }\n")
    n = spec.read_net(p)
    assert n.name == "n" and n.layer[0].python_param.param_str == "'num_classes': 21"


def test_read_solver_and_error(tmp_path):
    p = tmp_path / "solver.prototxt"
    p.write_text('train_net: "t.prototxt"\nbase_lr: 0.001\niter_size: 2\nsolver_type: NESTEROV\n')
    s = spec.read_solver(p)
    assert s.base_lr == pytest.approx(0.001) and s.iter_size == 2
    assert s.type == "Nesterov" and not s.HasField("solver_type")  # Caffe's UpgradeSolverType
    p.write_text("base_lr: 0.001\nmomentum 0.9\n")
    with pytest.raises(SpecError, match=rf"^{p}:2:\d+: "):
        spec.read_solver(p)
    p.write_text('solver_type: SGD\ntype: "Adam"\n')
    with pytest.raises(SpecError, match="solver_type"):
        spec.read_solver(p)


def test_text_or_binary_rule():
    """Binary when more than max(1, n // 100) of the first 64 KiB are not text (not UTF-8, or a
    control character other than whitespace)."""
    text = b'name: "n"\t\v\f\r\n' + b"# " + "é ü".encode() + b"\n" * 179  # 200 bytes
    assert len(text) == 200 and not spec.looks_binary(text)
    assert not spec.looks_binary(text[:100] + b"\x01\xff" + text[102:])  # 2 of 200: text
    assert spec.looks_binary(text[:100] + b"\x01\xff\x7f" + text[103:])  # 3 of 200: binary
    assert not spec.looks_binary(b"ab\x00")  # one bad byte in a tiny file: text
    assert spec.looks_binary("a\u0085\u0090".encode())  # C1 controls count, as UTF-8 pairs
    binary = caffe_pb2.NetParameter(name="n")
    binary.layer.add(name="conv1", type="Convolution", bottom=["data"], top=["conv1"])
    binary.layer.add(name="relu1", type="ReLU", bottom=["conv1"], top=["conv1"])
    assert spec.looks_binary(binary.SerializeToString())
    late = b"# x\n" * (spec.TEXT_SAMPLE // 4) + b"\x00" * 1000  # defects past the sample
    assert not spec.looks_binary(late)


def test_corrupted_byte_named_at_file_line_col(tmp_path):
    p = tmp_path / "n.prototxt"
    for bad, what in ((b"\xff", "byte 0xff is not UTF-8"), (b"\x02", "control character U+0002"),
                      ("\u009b".encode(), "control character U+009B")):
        p.write_bytes("name: \"n\"\nlayer {\n  name: \"é".encode() + bad + b'" }\n')
        for read in (spec.read_net, lambda f: spec.load_net_spec(f, "TEST")):
            with pytest.raises(SpecError) as e:
                read(p)
            assert str(e.value).startswith(f"{p}:3:11: {what} ")  # columns count characters
    s = tmp_path / "solver.prototxt"
    s.write_bytes(b"base_lr: 0.1\nmomentum:\x000.9\n")
    with pytest.raises(SpecError, match=rf"^{s}:2:10: control character U\+0000 "):
        spec.read_solver(s)
    binary = tmp_path / "b.prototxt"
    binary.write_bytes(caffe_pb2.NetParameter(name="n", layer=[caffe_pb2.LayerParameter(
        name="a", type="ReLU")]).SerializeToString())
    with pytest.raises(SpecError, match="b.prototxt: not a text prototxt .*read_net_binary"):
        spec.read_net(binary)
    assert spec.load_net_spec(binary, "TEST").layer[0].name == "a"


def test_non_finite_fields_paths():
    lp = caffe_pb2.LayerParameter(name="x", loss_weight=[1, float("inf")])
    lp.param.add(lr_mult=1)
    lp.param.add(lr_mult=float("nan"), decay_mult=-float("inf"))
    lp.lrn_param.beta = float("nan")
    lp.convolution_param.weight_filler.std = 0.01
    lp.blobs.add(data=[float("nan")])  # weights in a binary spec: not a parameter
    got = [(k, str(v)) for k, v in spec.non_finite_fields(lp)]
    assert got == [("loss_weight[1]", "inf"), ("param[1].lr_mult", "nan"),
                   ("param[1].decay_mult", "-inf"), ("lrn_param.beta", "nan")]
    assert spec.non_finite_fields(caffe_pb2.LayerParameter(name="ok", loss_weight=[2])) == []


def test_solver_net_path_resolves_cwd_then_solver_dir(tmp_path, monkeypatch):
    d = tmp_path / "models" / "x"
    d.mkdir(parents=True)
    (d / "train.prototxt").write_text("")
    solver = caffe_pb2.SolverParameter(train_net="train.prototxt")
    monkeypatch.chdir(tmp_path)
    assert spec.solver_net_path(solver, d / "solver.prototxt") == d.resolve() / "train.prototxt"
    solver.train_net = "models/x/train.prototxt"  # relative to the CWD, as Caffe
    assert spec.solver_net_path(solver, d / "solver.prototxt") == Path("models/x/train.prototxt")
    solver.train_net = "other.prototxt"
    with pytest.raises(SpecError, match="other.prototxt"):
        spec.solver_net_path(solver, d / "solver.prototxt")


# -- upgrade ------------------------------------------------------------------------------------

def test_v1_upgrade_equals_caffes_own(fixtures_dir):
    d = fixtures_dir / "spec" / "v1_caffemodel"
    ours = spec.upgrade_net(spec.read_net(d / "net.prototxt"))
    caffes = spec.read_net(d / "upgraded_by_caffe.prototxt")
    assert ours == caffes, text_format.MessageToString(ours)


def test_v1_upgrade_equals_caffes_own_shared(shared_dir):
    d = shared_dir / "caffe_goldens" / "v1_caffemodel"
    ours = spec.upgrade_net(spec.read_net(d / "net.prototxt"))
    assert ours == spec.read_net(d / "upgraded_by_caffe.prototxt")


def test_v1_layer_fields_move():
    v1 = net("""
      layers { name: "a" type: INNER_PRODUCT bottom: "x" top: "y" top: "z"
        param: "w_shared" blob_share_mode: PERMISSIVE blob_share_mode: STRICT
        blobs_lr: 0 blobs_lr: 0 blobs_lr: 3 weight_decay: 5 loss_weight: 2 loss_weight: 0.5
        include { phase: TRAIN stage: "s" } exclude { min_level: 1 }
        blobs { num: 1 channels: 1 height: 2 width: 1 data: 1 data: 2 }
        inner_product_param { num_output: 2 } transform_param { scale: 0.5 }
        loss_param { ignore_label: 4 } }
      layers { name: "d" type: DATA top: "data" data_param { scale: 0.25 mirror: true batch_size: 3 } }
      layers { name: "l" type: SOFTMAX_LOSS bottom: "y" }""")
    up = spec.upgrade_net(v1)
    assert len(up.layers) == 0 and [l.type for l in up.layer] == ["InnerProduct", "Data",
                                                                   "SoftmaxWithLoss"]
    a = up.layer[0]
    assert list(a.bottom) == ["x"] and list(a.top) == ["y", "z"]
    assert len(a.param) == 3
    assert a.param[0].name == "w_shared" and a.param[0].share_mode == caffe_pb2.ParamSpec.PERMISSIVE
    assert a.param[1].share_mode == caffe_pb2.ParamSpec.STRICT and not a.param[1].HasField("name")
    assert [p.lr_mult for p in a.param] == [0, 0, 3]
    assert a.param[0].decay_mult == 5 and not a.param[1].HasField("decay_mult")
    assert list(a.loss_weight) == [2, 0.5]
    assert a.include[0].phase == caffe_pb2.TRAIN and list(a.include[0].stage) == ["s"]
    assert a.exclude[0].min_level == 1
    assert a.blobs[0].height == 2 and list(a.blobs[0].data) == [1, 2]
    assert a.inner_product_param.num_output == 2 and a.transform_param.scale == 0.5
    assert a.loss_param.ignore_label == 4
    d = up.layer[1]  # Caffe's UpgradeNetDataTransformation
    assert d.transform_param.scale == 0.25 and d.transform_param.mirror
    assert not d.data_param.HasField("scale") and d.data_param.batch_size == 3


def test_input_shape_and_input_dim_become_input_layer():
    n = net('input: "data" input: "rois" input_shape { dim: 1 dim: 3 dim: 5 dim: 6 }\n'
            'input_shape { dim: 4 dim: 5 } layer { name: "c" type: "ReLU" bottom: "data" top: "c" }')
    up = spec.upgrade_net(n)
    assert [l.name for l in up.layer] == ["input", "c"]
    inp = up.layer[0]
    assert inp.type == "Input" and list(inp.top) == ["data", "rois"]
    assert [list(s.dim) for s in inp.input_param.shape] == [[1, 3, 5, 6], [4, 5]]
    assert not len(up.input) and not len(up.input_shape) and not len(up.input_dim)
    n = net('input: "a" input: "b" ' + " ".join(f"input_dim: {i}" for i in range(1, 9)))
    up = spec.upgrade_net(n)
    assert [list(s.dim) for s in up.layer[0].input_param.shape] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert n.input == ["a", "b"]  # the argument is not modified


def test_input_alone_is_dropped_and_bad_dims_rejected():
    up = spec.upgrade_net(net('input: "data"'))  # legacy caffemodels
    assert len(up.layer) == 0 and len(up.input) == 0
    with pytest.raises(SpecError, match="f.prototxt.*input_dim"):
        spec.upgrade_net(net('input: "a" input_dim: 1 input_dim: 2'), "f.prototxt")


def test_mixed_layer_and_layers_is_an_error_naming_the_file(tmp_path):
    p = tmp_path / "mixed.prototxt"
    p.write_text('layer { name: "a" type: "ReLU" }\nlayers { name: "b" type: RELU }\n')
    with pytest.raises(SpecError, match="mixed.prototxt.*'layer'.*'layers'"):
        spec.load_net_spec(p, "TEST")


def test_batchnorm_three_params_upgrade():
    up = spec.upgrade_net(net('layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 } '
                              'param { lr_mult: 1 } param { lr_mult: 1 decay_mult: 3 } }'))
    assert all(p.lr_mult == 0 and p.decay_mult == 0 for p in up.layer[0].param)


# -- filtering ----------------------------------------------------------------------------------

RULES = net("""
  state { stage: "file_stage" }
  layer { name: "always" }
  layer { name: "train" include { phase: TRAIN } }
  layer { name: "test" include { phase: TEST } }
  layer { name: "not_test" exclude { phase: TEST } }
  layer { name: "train_or_lvl2" include { phase: TRAIN } include { min_level: 2 } }
  layer { name: "lvl_le1" include { max_level: 1 } }
  layer { name: "stage_ab" include { stage: "a" stage: "b" } }
  layer { name: "not_a" include { not_stage: "a" } }
  layer { name: "excl_a_or_lvl3" exclude { stage: "a" } exclude { min_level: 3 } }
  layer { name: "file_stage" include { stage: "file_stage" } }
  layer { name: "phase_kept" phase: TRAIN include { phase: TEST } }
""")


def kept(phase, level=0, stages=()):
    return [l.name for l in spec.filter_net(RULES, phase, level, stages).layer]


def test_filter_phase():
    assert kept("TRAIN") == ["always", "train", "not_test", "train_or_lvl2", "lvl_le1", "not_a",
                             "excl_a_or_lvl3", "file_stage"]
    assert kept("TEST") == ["always", "test", "lvl_le1", "not_a", "excl_a_or_lvl3", "file_stage",
                            "phase_kept"]


def test_filter_levels_and_stages():
    assert "train_or_lvl2" in kept("TEST", level=2)  # any include rule suffices
    assert "lvl_le1" not in kept("TEST", level=2)
    assert "excl_a_or_lvl3" not in kept("TEST", level=3)
    got = kept("TEST", stages=["a"])
    assert "stage_ab" not in got and "not_a" not in got and "excl_a_or_lvl3" not in got
    assert "stage_ab" in kept("TEST", stages=["b", "a"])  # needs ALL of the rule's stages


def test_filter_keeps_layer_phase_and_records_state():
    out = spec.filter_net(RULES, caffe_pb2.TEST, 1, ["x"])
    assert out.layer[-1].name == "phase_kept" and out.layer[-1].phase == caffe_pb2.TRAIN
    assert out.state.phase == caffe_pb2.TEST and out.state.level == 1
    assert list(out.state.stage) == ["file_stage", "x"]  # Caffe appends to the file's stages
    assert len(RULES.layer) == 11  # the argument is not modified


def test_filter_include_and_exclude_is_an_error():
    n = net('layer { name: "both" include { phase: TRAIN } exclude { phase: TEST } }')
    with pytest.raises(SpecError, match="f.prototxt.*'both'.*not both"):
        spec.filter_net(n, "TRAIN", source="f.prototxt")


def test_unknown_phase():
    with pytest.raises(SpecError, match="phase"):
        spec.filter_net(RULES, "VAL")


# -- the entry point ----------------------------------------------------------------------------

def test_load_net_spec_text_binary_and_param(tmp_path, fixtures_dir):
    d = fixtures_dir / "spec" / "v1_caffemodel"
    text = spec.load_net_spec(d / "net.prototxt", "TEST")
    assert [l.name for l in text.layer][:2] == ["input", "conv1"]
    binary = spec.load_net_spec(d / "weights.caffemodel", "TEST")  # a binary V1 NetParameter
    assert [l.name for l in binary.layer] == [l.name for l in text.layer]
    assert binary.layer[1].type == "Convolution" and len(binary.layer[1].blobs) == 2
    raw = spec.read_net(d / "net.prototxt")
    from_param = spec.load_net_spec(raw, "TEST")
    assert from_param == text and len(raw.layers) == 10  # not modified
    junk = tmp_path / "junk.prototxt"
    junk.write_bytes(b"\xa2\x06\xff\xff\xff")
    with pytest.raises(SpecError, match="junk.prototxt"):
        spec.load_net_spec(junk, "TEST")


def test_golden_nets_load(shared_dir):
    for p in sorted((shared_dir / "caffe_goldens").glob("*/net.prototxt")):
        n = spec.load_net_spec(p, "TEST")
        assert len(n.layer) > 0 and len(n.layers) == 0 and len(n.input) == 0, p
