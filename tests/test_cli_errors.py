"""Every class of bad input to ``readonly-ohem net`` / ``run``: a non-zero exit, no traceback, one
message naming the file and line (syntax), field, layer, blob, param or module at fault."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from readonly_ohem.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "caffe_goldens"
CASE = FIXTURES / "conv_basic"

GOOD = """name: "t"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "labels" type: "Input" top: "labels" input_param { shape { dim: 2 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
        param { name: "w" } inner_product_param { num_output: 4 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "labels" top: "loss" }
"""


def run_error(capsys, argv):
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc != 0
    err = captured.err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def net_error(capsys, tmp_path, text, extra=()):
    path = tmp_path / "bad.prototxt"
    path.write_text(text)
    np.savez(tmp_path / "in.npz", data=np.zeros((2, 3), np.float32),
             labels=np.zeros(2, np.float32))
    msg = run_error(capsys, ["run", str(path), "--inputs", str(tmp_path / "in.npz"),
                             "--out", str(tmp_path / "o.npz"), *extra])
    assert str(path) in msg
    return msg


@pytest.mark.parametrize("edit, expected", [
    # syntax: file and line:column
    (lambda t: t.replace('top: "fc"\n', 'top: "fc"\n  bogus_field: 3\n'), [":5:", "bogus_field"]),
    (lambda t: t.replace("num_output: 4 }", "num_output: 4"), [":6:1:"]),
    # unknown type, unknown blob, duplicate top, arity
    (lambda t: t.replace('"InnerProduct"', '"InnerProdukt"'),
     ["layer 'fc'", "unknown layer type 'InnerProdukt'", "'InnerProduct'"]),
    (lambda t: t.replace('bottom: "data" top: "fc"', 'bottom: "dta" top: "fc"'),
     ["layer 'fc'", "bottom blob 'dta'"]),
    (lambda t: t + 'layer { name: "again" type: "ReLU" bottom: "data" top: "fc" }\n',
     ["layer 'again'", "top blob 'fc'"]),
    (lambda t: t.replace('bottom: "fc" bottom: "labels"', 'bottom: "fc"'), ["layer 'loss'"]),
    # a layer's own parameter check
    (lambda t: t.replace("num_output: 4", ""), ["layer 'fc'", "num_output"]),
    # param sharing: a shape clash and a mult conflict name the param
    (lambda t: t + 'layer { name: "fc2" type: "InnerProduct" bottom: "data" top: "fc2" '
                   'param { name: "w" } inner_product_param { num_output: 5 } }\n',
     ["layer 'fc2'", "shared param 'w'", "'fc'"]),
    (lambda t: t.replace('param { name: "w" }', 'param { name: "w" lr_mult: 1 }')
     + 'layer { name: "fc2" type: "InnerProduct" bottom: "data" top: "fc2" '
       'param { name: "w" lr_mult: 2 } inner_product_param { num_output: 4 } }\n',
     ["layer 'fc2'", "shared param 'w'", "lr_mult"]),
    # propagate_down / loss_weight counts
    (lambda t: t.replace('top: "loss"', 'top: "loss" propagate_down: false'),
     ["layer 'loss'", "propagate_down"]),
    (lambda t: t.replace('top: "loss"', 'top: "loss" loss_weight: 1 loss_weight: 2'),
     ["layer 'loss'", "loss_weight"]),
    # a Python layer we do not have, and no opt-in
    (lambda t: t + 'layer { name: "py" type: "Python" bottom: "fc" top: "y" python_param { '
                   'module: "my.module" layer: "Mine" } }\n',
     ["layer 'py'", "my.module.Mine is not registered", "--allow-python-import"]),
    # phase rules
    (lambda t: t.replace('top: "loss"', 'top: "loss" include { phase: TRAIN } '
                                        'exclude { phase: TEST }'),
     ["layer 'loss'", "include", "exclude"]),
])
def test_bad_net_specs(capsys, tmp_path, edit, expected):
    msg = net_error(capsys, tmp_path, edit(GOOD))
    assert msg.startswith("readonly-ohem run: error: ")
    for part in expected:
        assert part in msg, (part, msg)


def test_missing_prototxt(capsys, tmp_path):
    msg = run_error(capsys, ["net", str(tmp_path / "nope.prototxt")])
    assert "nope.prototxt" in msg and "not found" in msg


def test_corrupt_caffemodel(capsys, tmp_path):
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"\x0a\xff\xff\xff\x0fgarbage")
    msg = run_error(capsys, ["run", str(CASE / "net.prototxt"), "--inputs",
                             str(CASE / "inputs.npz"), "--out", str(tmp_path / "o.npz"),
                             "--weights", str(bad)])
    assert str(bad) in msg


def test_missing_caffemodel(capsys, tmp_path):
    msg = run_error(capsys, ["net", str(CASE / "net.prototxt"), "--weights",
                             str(tmp_path / "none.caffemodel")])
    assert "none.caffemodel" in msg and "not found" in msg


def test_mismatched_caffemodel(capsys, tmp_path):
    """conv_basic's weights into a net whose conv1 has 5 outputs: names layer and shapes."""
    text = (CASE / "net.prototxt").read_text().replace("num_output: 6", "num_output: 5")
    (tmp_path / "net.prototxt").write_text(text)
    msg = run_error(capsys, ["net", str(tmp_path / "net.prototxt"), "--weights",
                             str(CASE / "weights.caffemodel")])
    assert "weights.caffemodel" in msg and "'conv1'" in msg
    assert "6 3 7 7" in msg and "5 3 7 7" in msg


def test_bad_inputs_file_and_keys(capsys, tmp_path):
    args = ["run", str(CASE / "net.prototxt"), "--out", str(tmp_path / "o.npz")]
    msg = run_error(capsys, args + ["--inputs", str(tmp_path / "missing.npz")])
    assert "missing.npz" in msg and "not found" in msg
    (tmp_path / "junk.npz").write_text("not a zip")
    msg = run_error(capsys, args + ["--inputs", str(tmp_path / "junk.npz")])
    assert "junk.npz" in msg and "npz archive" in msg and "pickle" not in msg
    np.save(tmp_path / "plain.npy", np.zeros(3, np.float32))  # a .npy is not an archive
    msg = run_error(capsys, args + ["--inputs", str(tmp_path / "plain.npy")])
    assert "plain.npy" in msg and "npz archive" in msg
    np.savez(tmp_path / "extra.npz", data=np.zeros((2, 3, 17, 20), np.float32),
             conv1=np.zeros(3, np.float32))
    msg = run_error(capsys, args + ["--inputs", str(tmp_path / "extra.npz")])
    assert "'conv1'" in msg and "extra.npz" in msg
    np.savez(tmp_path / "short.npz", data=np.zeros((2, 3, 4, 4), np.float32))
    msg = run_error(capsys, args + ["--inputs", str(tmp_path / "short.npz")])
    assert "layer 'conv1'" in msg  # 4x4 is smaller than the 7x7 kernel


def test_bad_top_diff(capsys, tmp_path):
    np.savez(tmp_path / "td.npz", nope=np.zeros(3, np.float32))
    msg = run_error(capsys, ["run", str(CASE / "net.prototxt"), "--inputs",
                             str(CASE / "inputs.npz"), "--out", str(tmp_path / "o.npz"),
                             "--top-diff", str(tmp_path / "td.npz")])
    assert "'nope'" in msg and "td.npz" in msg
    np.savez(tmp_path / "td2.npz", conv2=np.zeros(3, np.float32))
    msg = run_error(capsys, ["run", str(CASE / "net.prototxt"), "--inputs",
                             str(CASE / "inputs.npz"), "--out", str(tmp_path / "o.npz"),
                             "--top-diff", str(tmp_path / "td2.npz")])
    assert "'conv2'" in msg and "shape" in msg


def test_bad_config_key_and_file(capsys, tmp_path):
    args = ["run", str(CASE / "net.prototxt"), "--inputs", str(CASE / "inputs.npz"),
            "--out", str(tmp_path / "o.npz")]
    msg = run_error(capsys, args + ["--set", "TRAIN.NO_SUCH_KEY", "1"])
    assert "TRAIN.NO_SUCH_KEY" in msg
    (tmp_path / "c.yml").write_text("TRAIN:\n  BATCH_SIZ: 3\n")
    msg = run_error(capsys, args + ["--cfg", str(tmp_path / "c.yml")])
    assert "c.yml" in msg and "BATCH_SIZ" in msg


def test_bad_solver(capsys, tmp_path):
    case = FIXTURES / "solver_step_small"
    shutil.copy(case / "net.prototxt", tmp_path / "net.prototxt")
    (tmp_path / "s.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.1\nlr_polcy: "step"\n')
    msg = run_error(capsys, ["run", str(tmp_path / "net.prototxt"), "--inputs",
                             str(case / "inputs.npz"), "--out", str(tmp_path / "o.npz"),
                             "--solver", str(tmp_path / "s.prototxt")])
    assert "s.prototxt:3" in msg and "lr_polcy" in msg


def test_summary_data_layer_without_shape(capsys, tmp_path):
    (tmp_path / "d.prototxt").write_text(
        'layer { name: "data" type: "Python" top: "data" top: "rois" python_param { '
        'module: "roi_data_layer.layer" layer: "RoIDataLayer" param_str: "\'num_classes\': 21" } }\n')
    msg = run_error(capsys, ["net", str(tmp_path / "d.prototxt"), "--shape", "data=1,3,8,8"])
    assert "layer 'data'" in msg and "--shape rois=" in msg


def test_console_entry_point_prints_no_traceback(tmp_path):
    (tmp_path / "bad.prototxt").write_text('layer { name: "a" type: "ReLU" bottom: "x" top: "y" }\n')
    proc = subprocess.run([sys.executable, "-m", "readonly_ohem", "net",
                           str(tmp_path / "bad.prototxt")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "layer 'a'" in proc.stderr and "bottom blob 'x'" in proc.stderr


def test_unwritable_json_path_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = run_error(capsys, ["net", str(CASE / "net.prototxt"), "--json",
                              str(blocker / "s.json")])
    assert str(blocker / "s.json") in line


def test_oserror_in_a_command_is_one_line(capsys, tmp_path, monkeypatch):
    from readonly_ohem.commands import net

    def boom(**kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "gone" / "x"))

    monkeypatch.setattr(net, "net_command", boom)
    line = run_error(capsys, ["net", str(CASE / "net.prototxt")])
    assert line == f"readonly-ohem net: error: {tmp_path / 'gone' / 'x'}: No such file or directory"


def test_negative_shape_dims_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["net", str(CASE / "net.prototxt"), "--shape", "data=1,-3,4,4"])
    assert e.value.code == 2
    assert "--shape wants BLOB=d0,d1,..." in capsys.readouterr().err
