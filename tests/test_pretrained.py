"""torchvision VGG16 -> our BGR 0-255 mean-subtracted input: conv1_1 folding, checked numerically."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from readonly_ohem.errors import WeightsError
from readonly_ohem.pretrained import (IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, VGG16_NAMES,
                                      convert_vgg16_state_dict, fold_input_transform)

PIXEL_MEANS = np.array([[[102.9801, 115.9465, 122.7717]]])


def test_folded_conv1_equals_torchvision_in_the_interior_and_differs_by_the_mean_gap_at_borders():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    bgr = torch.rand(1, 3, 9, 11, generator=g, dtype=torch.float64) * 255  # raw BGR pixels
    # torchvision: RGB in [0, 1], normalized
    mean = torch.tensor(IMAGENET_MEAN_RGB, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_RGB, dtype=torch.float64).view(1, 3, 1, 1)
    z = (bgr.flip(1) / 255 - mean) / std
    ref = F.conv2d(z, w, b, padding=1)
    # ours: BGR minus PIXEL_MEANS
    y = bgr - torch.tensor(PIXEL_MEANS.ravel()).view(1, 3, 1, 1)
    w2, b2 = fold_input_transform(w, b, PIXEL_MEANS)
    assert w2.dtype == torch.float32
    ours = F.conv2d(y, w2.double(), b2.double(), padding=1)
    np.testing.assert_allclose(ours[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], rtol=1e-5, atol=1e-4)
    # borders: each padded tap adds W·(PM/255 - m)/s; reproduce the difference exactly
    shift = (torch.tensor(PIXEL_MEANS.ravel()).flip(0) / 255 - mean.view(3)) / std.view(3)
    ones = torch.ones(1, 3, 9, 11, dtype=torch.float64) * shift.view(1, 3, 1, 1)
    inside = F.conv2d(ones, w, padding=1)  # taps that see real pixels
    full = (w.sum(dim=(2, 3)) * shift).sum(1).view(1, 8, 1, 1)
    np.testing.assert_allclose(ours - ref, full - inside, rtol=1e-4, atol=1e-4)
    assert (ours - ref).abs().max() < 0.05 * w.abs().sum(dim=(1, 2, 3)).max()


def test_convert_maps_names_and_rejects_other_dicts():
    state = {}
    for prefix in VGG16_NAMES:
        state[f"{prefix}.weight"] = torch.zeros(4, 3, 3, 3) if prefix == "features.0" else torch.ones(2, 2)
        state[f"{prefix}.bias"] = torch.zeros(4) if prefix == "features.0" else torch.ones(2)
    out = convert_vgg16_state_dict(state, PIXEL_MEANS)
    assert set(out) == set(VGG16_NAMES.values())
    assert torch.equal(out["fc6"][0], state["classifier.0.weight"])
    with pytest.raises(WeightsError, match="torchvision VGG16"):
        convert_vgg16_state_dict({"fc.weight": torch.zeros(1)}, PIXEL_MEANS)


def test_load_into_a_net_by_caffe_layer_name(tmp_path):
    from readonly_ohem.caffe.net import Net
    from readonly_ohem.pretrained import load_torchvision_vgg16

    (tmp_path / "n.prototxt").write_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "conv1_1" type: "Convolution" bottom: "data" top: "c"
        convolution_param { num_output: 2 kernel_size: 3 pad: 1 } }
layer { name: "fc6" type: "InnerProduct" bottom: "c" top: "f" inner_product_param { num_output: 3 } }
layer { name: "cls_score" type: "InnerProduct" bottom: "f" top: "s" inner_product_param { num_output: 2 } }
""")
    net = Net.from_file(tmp_path / "n.prototxt", phase="TEST")
    g = torch.Generator().manual_seed(0)
    state = {"features.0.weight": torch.randn(2, 3, 3, 3, generator=g),
             "features.0.bias": torch.randn(2, generator=g),
             "classifier.0.weight": torch.randn(3, 32, generator=g),
             "classifier.0.bias": torch.randn(3, generator=g),
             "classifier.6.weight": torch.randn(1000, 3, generator=g),
             "classifier.6.bias": torch.randn(1000, generator=g)}
    torch.save(state, tmp_path / "vgg16.pth")
    report = load_torchvision_vgg16(net, tmp_path / "vgg16.pth", PIXEL_MEANS)
    assert report["loaded"] == ["conv1_1", "fc6"] and report["missing_in_net"] == ["fc8"]
    assert report["missing_in_file"] == ["cls_score"]
    w, b = fold_input_transform(state["features.0.weight"], state["features.0.bias"], PIXEL_MEANS)
    assert torch.equal(net.layer_params("conv1_1")[0].detach(), w)
    assert torch.equal(net.layer_params("fc6")[0].detach(), state["classifier.0.weight"])


def test_a_safetensors_state_dict_loads_as_the_pth_does(tmp_path):
    """``--weights vgg16.safetensors``: same tensors in, same net out (no pickle involved)."""
    import safetensors.torch

    from readonly_ohem.caffe.net import Net
    from readonly_ohem.pretrained import is_torch_file, load_torchvision_vgg16, read_state_dict

    (tmp_path / "n.prototxt").write_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "conv1_1" type: "Convolution" bottom: "data" top: "c"
        convolution_param { num_output: 2 kernel_size: 3 pad: 1 } }
""")
    g = torch.Generator().manual_seed(1)
    state = {"features.0.weight": torch.randn(2, 3, 3, 3, generator=g),
             "features.0.bias": torch.randn(2, generator=g)}
    torch.save(state, tmp_path / "vgg16.pth")
    safetensors.torch.save_file(state, tmp_path / "vgg16.safetensors")
    assert is_torch_file(tmp_path / "vgg16.safetensors")
    assert all(torch.equal(read_state_dict(tmp_path / "vgg16.safetensors")[k], v) for k, v in state.items())
    nets = []
    for name in ("vgg16.pth", "vgg16.safetensors"):
        net = Net.from_file(tmp_path / "n.prototxt", phase="TEST")
        assert load_torchvision_vgg16(net, tmp_path / name, PIXEL_MEANS)["loaded"] == ["conv1_1"]
        nets.append([p.detach().clone() for p in net.layer_params("conv1_1")])
    assert all(torch.equal(a, b) for a, b in zip(*nets))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "vgg16.safetensors").read_bytes()[:-4])
    with pytest.raises(WeightsError, match="cut.safetensors: cannot read as a safetensors state dict"):
        read_state_dict(tmp_path / "cut.safetensors")
