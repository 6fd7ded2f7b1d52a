"""``readonly-ohem net``: the layer table and its JSON, on every reference prototxt and on the
golden nets (params on the meta device: VGG16 is summarized without allocating its weights)."""

import json
from pathlib import Path

import numpy as np
import pytest

from readonly_ohem.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "caffe_goldens"

DATA_SHAPES = ["--shape", "data=1,3,600,1000", "--shape", "rois=128,5", "--shape", "labels=128",
               "--shape", "bbox_targets=128,84", "--shape", "bbox_inside_weights=128,84",
               "--shape", "bbox_outside_weights=128,84"]


def reference_nets(shared_dir):
    """The original Fast R-CNN nets (the Faster R-CNN end-to-end nets need the RPN Python layers)."""
    return sorted(p for p in (shared_dir / "reference_prototxt").rglob("*.prototxt")
                  if p.name in ("train.prototxt", "test.prototxt")
                  and p.parent.name in ("fast_rcnn", "fast_rcnn_ohem"))


def summarize(path, tmp_path, args=()):
    out = tmp_path / "s.json"
    assert main(["net", str(path), "--json", str(out), *args]) == 0
    return json.loads(out.read_text())


def test_every_reference_net_is_summarized(shared_dir, tmp_path, capsys):
    nets = reference_nets(shared_dir)
    assert len(nets) == 6
    for path in nets:
        args = DATA_SHAPES if path.name == "train.prototxt" else ["--shape", "rois=300,5"]
        s = summarize(path, tmp_path, args)
        table = capsys.readouterr().out
        assert "Totals:" in table and "Memory required for data" in table
        names = [layer["name"] for layer in s["layers"]]
        assert names[-1] in table
        blobs = s["blobs"]
        if path.name == "test.prototxt":
            assert blobs["rois"] == [300, 5] and blobs["data"] == [1, 3, 224, 224]
            assert blobs["cls_prob"] == [300, 21] and blobs["bbox_pred"] == [300, 84]
        else:
            assert blobs["data"] == [1, 3, 600, 1000]
            assert blobs["loss_cls"] == [] and blobs["loss_bbox"] == []
        vgg16 = "VGG16" in str(path)
        # VGG16: four ceil-mode 2x2 pools; VGG_CNN_M: conv1 7/2, pool 3/2, conv2 5/2 pad 1, pool 3/2
        expect_conv5 = {(True, "train.prototxt"): [1, 512, 38, 63],
                        (True, "test.prototxt"): [1, 512, 14, 14],
                        (False, "train.prototxt"): [1, 512, 36, 61],
                        (False, "test.prototxt"): [1, 512, 13, 13]}[(vgg16, path.name)]
        conv5 = "conv5_3" if vgg16 else "conv5"
        assert blobs[conv5] == expect_conv5, (path, blobs[conv5])
        fc6 = next(layer for layer in s["layers"] if layer["name"] == "fc6")
        k = 512 * 7 * 7 if vgg16 else 512 * 6 * 6
        assert fc6["params"][0]["shape"] == [4096, k]
        assert fc6["params"][1]["lr_mult"] == 2
        first = s["layers"][1]
        if first["params"]:
            assert first["params"][0]["lr_mult"] == 0  # frozen conv1 (VGG16: conv1_1)


def test_ohem_net_shares_and_upper_bound(shared_dir, tmp_path, capsys):
    path = shared_dir / "reference_prototxt/pascal_voc/VGG_CNN_M_1024/fast_rcnn_ohem/train.prototxt"
    s = summarize(path, tmp_path, DATA_SHAPES)
    table = capsys.readouterr().out
    layers = {layer["name"]: layer for layer in s["layers"]}
    ro, tr = layers["fc6_readonly"]["params"], layers["fc6"]["params"]
    assert [p["name"] for p in ro] == ["fc6_w", "fc6_b"] == [p["name"] for p in tr]
    # the owner (readonly, no mults) adopts the trainable layer's mults
    assert [(p["lr_mult"], p["decay_mult"]) for p in ro] == [(1, 1), (2, 0)]
    assert "shared 'fc6_w' (owner fc6_readonly)" in table
    # OHEM tops: an upper bound of TRAIN.BATCH_SIZE hard RoIs (default 128)
    assert s["blobs"]["rois_hard"] == [128, 5] and s["blobs"]["labels_hard"] == [128]
    assert layers["relu6_readonly"]["tops"] == ["fc6_readonly"]
    assert "top fc6_readonly: 128 4096 (524288) [in-place]" in table


def test_missing_data_shape_tells_which_shape_to_pass(shared_dir, capsys):
    path = shared_dir / "reference_prototxt/pascal_voc/VGG_CNN_M_1024/fast_rcnn/train.prototxt"
    assert main(["net", str(path), "--shape", "data=1,3,600,1000"]) == 2
    err = capsys.readouterr().err
    assert "layer 'data' (Python)" in err and "--shape rois=d0,d1,..." in err
    assert "Traceback" not in err


def test_golden_net_json_and_weights(tmp_path, capsys):
    case = FIXTURES / "fast_rcnn_mini_forward"
    s = summarize(case / "net.prototxt", tmp_path, ["--weights", str(case / "weights.caffemodel"),
                                                    "--phase", "TEST"])
    out = capsys.readouterr().out
    assert "loaded 5 layer(s)" in out  # conv1, conv2, fc6, cls_score, bbox_pred
    assert "not in the file" not in out
    expected = np.load(case / "expected.npz")
    for blob in expected.files:
        assert s["blobs"][blob] == list(expected[blob].shape), blob
    layers = {layer["name"]: layer for layer in s["layers"]}
    assert layers["input"]["tops"] == ["data", "rois"] and layers["input"]["type"] == "Input"
    assert layers["conv1"]["params"] == [
        {"name": "0", "shape": [8, 3, 3, 3], "lr_mult": 1.0, "decay_mult": 1.0},
        {"name": "1", "shape": [8], "lr_mult": 2.0, "decay_mult": 1.0}]


def test_json_has_exactly_the_documented_keys(capsys):
    """The contract: {"layers": [{"name", "type", "bottoms", "tops", "params": [{"name", "shape",
    "lr_mult", "decay_mult"}]}], "blobs": {...}}, nothing more (stdout: the JSON alone, the
    weights report goes to stderr)."""
    case = FIXTURES / "sharing_readonly"
    assert main(["net", str(case / "net.prototxt"), "--json", "-",
                 "--weights", str(case / "weights.caffemodel")]) == 0
    captured = capsys.readouterr()
    s = json.loads(captured.out)
    assert "loaded 2 layer(s)" in captured.err
    assert set(s) == {"layers", "blobs"}
    assert all(set(layer) == {"name", "type", "bottoms", "tops", "params"} for layer in s["layers"])
    params = [p for layer in s["layers"] for p in layer["params"]]
    assert params and all(set(p) == {"name", "shape", "lr_mult", "decay_mult"} for p in params)
    assert [p["name"] for p in params] == ["head_w", "head_b", "head_w", "head_b"]
    assert s["blobs"]["ro"] == [5, 4]


def test_json_to_an_unwritable_path_is_one_line(tmp_path, capsys):
    case = FIXTURES / "sharing_readonly"
    bad = tmp_path / "no_such_dir" / "s.json"
    assert main(["net", str(case / "net.prototxt"), "--json", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_json_to_stdout_and_shape_override(capsys):
    case = FIXTURES / "v1_caffemodel"
    assert main(["net", str(case / "net.prototxt"), "--json", "-", "--shape",
                 "data=5,3,11,13"]) == 0
    s = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone
    assert s["blobs"]["data"] == [5, 3, 11, 13] and s["blobs"]["prob"] == [5, 3]
    assert s["layers"][1]["type"] == "Convolution"  # V1 enum upgraded


def test_unknown_shape_name_is_an_error(capsys):
    case = FIXTURES / "v1_caffemodel"
    assert main(["net", str(case / "net.prototxt"), "--shape", "conv1=1,2"]) == 2
    err = capsys.readouterr().err
    assert "'conv1'" in err and "net input or data-layer top" in err


# -- `net` refuses what a build refuses (issue 16): one code path, the same one-line message ------

INPUT = 'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n'
FED_SOURCE = 'layer { name: "src" type: "{type}" top: "data" }\n'
CONV = ('layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv" {param} '
        'convolution_param {{ num_output: 4 kernel_size: 3 {fillers} }} }}\n')


@pytest.mark.parametrize("text, expected", [
    (INPUT + CONV.format(param="", fillers='weight_filler { type: "" }'),
     ["layer 'conv' (Convolution): param 0: unknown filler type ''"]),
    (INPUT + CONV.format(param="", fillers='weight_filler { type: "gaussian" } '
                                          'bias_filler { type: "Eltwise" }'),
     ["layer 'conv' (Convolution): param 1: unknown filler type 'Eltwise'"]),
    # a sharer's filler is made (and refused) by Caffe too, though the owner's tensor is used
    (INPUT + CONV.format(param='param { name: "w" }', fillers="")
     + CONV.format(param='param { name: "w" }', fillers='weight_filler { type: "xavierr" }')
     .replace('"conv"', '"conv2"'),
     ["layer 'conv2' (Convolution): param 0: unknown filler type 'xavierr'"]),
    (INPUT + CONV.format(param="", fillers='weight_filler { type: "gaussian" sparse: 5 }'),
     ["param 0: gaussian filler: sparse 5 exceeds the 4 outputs"]),
    (FED_SOURCE.replace("{type}", "Bogus"), ["layer 'src': unknown layer type 'Bogus'"]),
    (FED_SOURCE.replace("{type}", "ReLU"), ["layer 'src' (ReLU): takes exactly 1 bottom blob(s)"]),
    (INPUT + 'layer { name: "norm" type: "LRN" bottom: "data" top: "norm" '
             'lrn_param { local_size: 5 beta: nan } }\n',
     ["layer 'norm' (LRN): lrn_param.beta is nan; layer parameters must be finite"]),
    (INPUT + 'layer { name: "norm" type: "LRN" bottom: "data" top: "norm" '
             'lrn_param { local_size: 4 } }\n',
     ["layer 'norm' (LRN): LRN only supports odd values for local_size"]),  # Caffe's CHECK
    (INPUT + 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" loss_weight: inf }\n',
     ["layer 'r' (ReLU): loss_weight[0] is inf"]),
])
def test_net_refuses_what_run_refuses(text, expected, tmp_path, capsys):
    path = tmp_path / "bad.prototxt"
    path.write_text(text)
    np.savez(tmp_path / "in.npz", data=np.zeros((1, 3, 8, 8), np.float32))
    messages = {}
    for argv in (["net", str(path), "--shape", "data=1,3,8,8"],
                 ["run", str(path), "--inputs", str(tmp_path / "in.npz"),
                  "--out", str(tmp_path / "out.npz")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        messages[argv[0]] = err.removeprefix(f"readonly-ohem {argv[0]}: error: ")
    assert messages["net"] == messages["run"]
    assert messages["net"].startswith(f"{path}: ")
    for part in expected:
        assert part in messages["net"], (part, messages["net"])


@pytest.mark.parametrize("source", [
    FED_SOURCE.replace("{type}", "Data"),  # Caffe's own data layer: never run here, tops fed
    'layer { name: "src" type: "Python" top: "data" python_param { module: "my.data" '
    'layer: "Mine" } }\n',  # a fed Python data layer is not built, its module never looked up
])
def test_fed_data_layers_that_are_not_built(source, tmp_path, capsys):
    path = tmp_path / "ok.prototxt"
    path.write_text(source + 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n')
    assert main(["net", str(path), "--shape", "data=1,3,8,8"]) == 0
    assert "top r: 1 3 8 8 (192)" in capsys.readouterr().out


E2E_SHAPES = ["--shape", "data=1,3,600,1000", "--shape", "im_info=1,3", "--shape", "gt_boxes=3,5"]


def test_every_reference_end2end_net_is_summarized(shared_dir, tmp_path, capsys):
    """The original Faster R-CNN end-to-end train and test nets (RPN Python layers, Reshape,
    SoftmaxWithLoss ignore_label -1, SmoothL1Loss sigma 3): tops and shapes at set-up."""
    nets = sorted(p for p in (shared_dir / "reference_prototxt").rglob("*.prototxt")
                  if p.name in ("train.prototxt", "test.prototxt")
                  and p.parent.name == "faster_rcnn_end2end")
    assert len(nets) == 6
    for path in nets:
        train = path.name == "train.prototxt"
        s = summarize(path, tmp_path, E2E_SHAPES if train else ["--phase", "TEST"])
        table = capsys.readouterr().out
        assert "Totals:" in table
        blobs = s["blobs"]
        model = path.parent.parent.name
        # the RPN's map (conv5, stride 16 by each trunk's own rounding) at 600 x 1000 and at the
        # test nets' declared 224 x 224. ZF by hand: conv1 7/2 p3 -> 300 x 500, pool1 3/2 p1
        # (ceil) -> 151 x 251, conv2 5/2 p2 -> 76 x 126, pool2 3/2 p1 -> 39 x 64; at 224:
        # 112, 57, 29, 15. VGG16: 600 -> 300 -> 150 -> 75 -> 38, 1000 -> ... -> 63; 224 -> 14.
        hw = {("VGG16", True): [38, 63], ("VGG16", False): [14, 14],
              ("VGG_CNN_M_1024", True): [36, 61], ("VGG_CNN_M_1024", False): [13, 13],
              ("ZF", True): [39, 64], ("ZF", False): [15, 15]}[(model, train)]
        assert blobs["rpn_cls_score"] == [1, 18] + hw, (path, blobs["rpn_cls_score"])
        assert blobs["rpn_bbox_pred"] == [1, 36] + hw
        assert blobs["rpn_cls_score_reshape"] == [1, 2, 9 * hw[0], hw[1]]  # dim: 0 2 -1 0
        assert blobs["rpn_cls_prob_reshape"] == [1, 18] + hw
        assert blobs["cls_prob" if not train else "cls_score"][1] == 21
        layers = {layer["name"]: layer for layer in s["layers"]}
        if train:
            assert blobs["rpn_labels"] == [1, 1, 9 * hw[0], hw[1]]
            assert blobs["rpn_bbox_targets"] == [1, 36] + hw
            # the ProposalLayer's and ProposalTargetLayer's set-up shapes, as the original's
            assert blobs["rpn_rois"] == [1, 5] and blobs["rois"] == [1, 5] and blobs["labels"] == [1, 1]
            assert blobs["bbox_targets"] == [1, 84]
            assert len([n for n in layers if "loss" in n]) == 4
        else:
            assert blobs["rois"] == [1, 5] and blobs["im_info"] == [1, 3]
