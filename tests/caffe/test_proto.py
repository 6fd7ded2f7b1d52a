"""The checked-in caffe_pb2.py is what protoc makes of caffe.proto; the reference specs parse."""

import pytest

from readonly_ohem.caffe import spec
from readonly_ohem.caffe.proto import caffe_pb2


def test_generated_module_matches_schema(tmp_path):
    pytest.importorskip("grpc_tools")
    from readonly_ohem.caffe.proto import regenerate

    fresh = regenerate.generate(tmp_path)
    checked_in = regenerate.HERE / "caffe_pb2.py"
    assert fresh.read_text() == checked_in.read_text(), (
        "caffe_pb2.py is stale: run `python -m readonly_ohem.caffe.proto.regenerate`")


def test_fast_rcnn_fork_fields():
    lp = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    assert lp["roi_pooling_param"].number == 8266711
    assert lp["smooth_l1_loss_param"].number == 8266712
    assert caffe_pb2.DropoutParameter.DESCRIPTOR.fields_by_name["scale_train"].number == 2
    assert caffe_pb2.DropoutParameter().scale_train is True


def test_every_reference_prototxt_parses(shared_dir):
    files = sorted(p for p in (shared_dir / "reference_prototxt").rglob("*.prototxt")
                   if p.parent.name in ("fast_rcnn", "fast_rcnn_ohem"))  # the Fast R-CNN nets
    assert len(files) == 10
    for p in files:
        if p.name == "solver.prototxt":
            s = spec.read_solver(p)
            assert s.train_net and s.base_lr > 0, p
        else:
            n = spec.read_net(p)
            assert len(n.layer) > 10, p
            inputs = 1 if len(n.input) else 0  # net-level inputs become one Input layer
            for phase in ("TRAIN", "TEST"):
                assert len(spec.load_net_spec(p, phase).layer) == len(n.layer) + inputs


def test_every_reference_end2end_prototxt_parses(shared_dir):
    files = sorted(p for p in (shared_dir / "reference_prototxt").rglob("*.prototxt")
                   if p.parent.name == "faster_rcnn_end2end")  # VGG16, VGG_CNN_M_1024, ZF
    assert len(files) == 9
    for p in files:
        if p.name == "solver.prototxt":
            s = spec.read_solver(p)
            assert s.train_net and s.base_lr > 0 and s.stepsize == 50000, p
            continue
        n = spec.read_net(p)
        types = [layer.type for layer in n.layer]
        assert types.count("Reshape") == 2 and "ROIPooling" in types, p
        inputs = 1 if len(n.input) else 0  # the test nets' data and im_info become one Input layer
        for phase in ("TRAIN", "TEST"):
            assert len(spec.load_net_spec(p, phase).layer) == len(n.layer) + inputs
