"""The ROIPooling layer: built from its LayerParameter, errors naming the layer, Caffe's golden."""

import json

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from readonly_ohem.errors import DataError, SpecError
from readonly_ohem.caffe.layers.base import LAYERS, LayerContext
from readonly_ohem.ops.roi_pool import roi_pool
from readonly_ohem.caffe.proto import caffe_pb2


def make(text):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return LAYERS[param.type](param, LayerContext(phase="TEST"))


LAYER = ('name: "roi_pool5" type: "ROIPooling" bottom: "conv5_3" bottom: "rois" top: "pool5" '
         'roi_pooling_param { pooled_w: 3 pooled_h: 2 spatial_scale: 0.0625 }')


def test_layer_forwards_the_op_and_keeps_its_shape():
    layer = make(LAYER)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 4, 10, 12, generator=g, requires_grad=True)
    rois = torch.tensor([[0, 0, 0, 191, 159], [1, 30, 40, 100, 90], [1, 8, 8, 8, 8]])
    (top,) = layer.forward([feats, rois.float()], [])
    assert top.shape == (3, 4, 2, 3)
    assert torch.equal(top, roi_pool(feats, rois.float(), 1 / 16, 2, 3))
    # (R, 5, 1, 1) rois, as older data layers produce them
    (top4,) = layer.forward([feats, rois.float().view(3, 5, 1, 1)], [])
    assert torch.equal(top, top4)
    top.sum().backward()
    assert feats.grad.sum() == 2 * 4 * 2 * 3 + 4 * 2 * 3  # every bin sends 1 to one cell
    assert layer.param_blobs([(2, 4, 10, 12), (3, 5)]) == []
    assert layer.top_shapes([(2, 4, 10, 12), (3, 5)]) == [(3, 4, 2, 3)]


def test_whole_map_roi_by_hand():
    layer = make('name: "r" type: "ROIPooling" bottom: "f" bottom: "rois" top: "p" '
                 'roi_pooling_param { pooled_w: 2 pooled_h: 2 spatial_scale: 0.5 }')
    feats = torch.arange(16.0).view(1, 1, 4, 4)
    # x2 = 7 * 0.5 = 3.5 -> 4 (half away from zero): roi 5 wide, bins [0,3) and [2,5) -> [2,4)
    (top,) = layer.forward([feats, torch.tensor([[0.0, 0, 0, 7, 5]])], [])
    # y2 = 2.5 -> 3: roi 4 high, bins rows [0,2), [2,4)
    assert top.view(-1).tolist() == [6.0, 7.0, 14.0, 15.0]


@pytest.mark.parametrize("text,message", [
    ('roi_pooling_param { pooled_w: 7 spatial_scale: 0.0625 }', "pooled_h"),
    ('roi_pooling_param { pooled_w: 0 pooled_h: 7 }', "pooled_h and pooled_w"),
])
def test_bad_params_name_the_layer(text, message):
    with pytest.raises(SpecError, match=message) as err:
        make(f'name: "bad_roi" type: "ROIPooling" bottom: "f" bottom: "r" top: "p" {text}')
    assert "bad_roi" in str(err.value)


def test_arity_and_bad_rois_name_the_layer():
    with pytest.raises(SpecError, match="bottom"):
        make('name: "r" type: "ROIPooling" bottom: "f" top: "p" roi_pooling_param '
             '{ pooled_w: 2 pooled_h: 2 }')
    layer = make(LAYER)
    with pytest.raises(DataError, match="roi_pool5.*batch index 3"):
        layer.forward([torch.zeros(2, 1, 4, 4), torch.tensor([[3.0, 0, 0, 1, 1]])], [])
    with pytest.raises(DataError, match="roi_pool5.*\\(R, 5\\)"):
        layer.forward([torch.zeros(2, 1, 4, 4), torch.zeros(2, 4)], [])


def run_golden(case_dir):
    """The roi_pooling case: build the layer from net.prototxt, feed inputs.npz, seed backward with
    top_diff.npz, compare forward and diff/data at the case's tolerance."""
    meta = json.loads((case_dir / "meta.json").read_text())
    net = text_format.Parse((case_dir / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    saved = caffe_pb2.NetParameter()
    saved.ParseFromString((case_dir / "weights.caffemodel").read_bytes())
    assert all(len(layer.blobs) == 0 for layer in saved.layer)  # ROIPooling has no params
    (lp,) = [layer for layer in net.layer if layer.type == "ROIPooling"]
    layer = LAYERS[lp.type](lp, LayerContext(phase=meta["phase"]))
    inputs = np.load(case_dir / "inputs.npz")
    blobs = {k: torch.tensor(v, requires_grad=True) for k, v in inputs.items()}
    (top,) = layer.forward([blobs[b] for b in lp.bottom], [])
    top_diff = np.load(case_dir / "top_diff.npz")[lp.top[0]]
    top.backward(torch.tensor(top_diff))
    expected = np.load(case_dir / "expected.npz")
    tol = dict(rtol=meta["rtol"], atol=meta["atol"])
    np.testing.assert_allclose(top.detach().numpy(), expected[lp.top[0]], **tol)
    np.testing.assert_allclose(blobs[lp.bottom[0]].grad.numpy(), expected["diff/" + lp.bottom[0]], **tol)
    np.testing.assert_array_equal(expected["diff/" + lp.top[0]], top_diff)
    return top, expected


def test_golden_fixture(fixtures_dir):
    top, expected = run_golden(fixtures_dir / "caffe_goldens" / "roi_pooling")
    assert np.array_equal(top.detach().numpy(), expected["pool"])  # bit for bit, in fact
    assert (expected["pool"] == 0).any()  # the case does exercise empty bins


def test_golden_shared(shared_dir):
    run_golden(shared_dir / "caffe_goldens" / "roi_pooling")
