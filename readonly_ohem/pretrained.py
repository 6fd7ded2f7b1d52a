"""Initial weights from a torchvision VGG16 state dict (``torch.save(vgg16().state_dict())``).

The file is read without running code: a ``.safetensors`` file with ``safetensors``, a ``.pth``
(torchvision's download; a pickle in a zip) only with ``torch.load(weights_only=True)``, torch's
restricted unpickler, which builds tensors and plain containers and refuses any other global a
pickle names (on torch >= 2.6; earlier versions had a hole there, CVE-2025-32434, so there a
``.pth`` is refused: convert it to ``.safetensors`` on a trusted machine). A ``.pth`` that names
anything else is refused with one line, and nothing of it runs.

torchvision's VGG16 reads RGB in [0, 1] normalized by the ImageNet mean/std; our nets read, as
the original, BGR 0–255 minus ``PIXEL_MEANS`` (no std). Only conv1_1 sees the input, so the
conversion folds everything into it, exactly:

    z_r = (p_r / 255 − m_r) / s_r              torchvision's input, channel r (RGB)
    p_r = y_b + PM_b                           our input y (BGR, mean-subtracted), b = BGR index of r
    ⇒ W'[:, b] = W[:, r] / (255 · s_r),   b' = b + Σ_r Σ_kernel W[:, r] · (PM_b / 255 − m_r) / s_r

Border difference (documented, not a bug): both nets zero-pad conv1_1's input, but "zero" means a
different pixel in each — torchvision pads with the ImageNet mean (255·m = 123.7, 116.3, 103.5
RGB), we pad with PIXEL_MEANS (122.8, 115.9, 103.0). The folded bias assumes every tap sees a real
pixel, so at the one-pixel border of conv1_1's output each padded tap adds
W'·(PM_b − 255·m_r) = W·(PM_b/255 − m_r)/s_r, at most 1.6% of a unit of torchvision's
normalized input (≤ 0.9 grey level). The interior is identical up to float rounding.

The other layers map by name: features.{0,2,5,7,10,12,14,17,19,21,24,26,28} → conv1_1 … conv5_3,
classifier.{0,3,6} → fc6, fc7, fc8 (same (out, in) layout as Caffe's InnerProduct; fc6's input is
flattened C×H×W in both). As Caffe's ``copy_from``, layers are matched by name and the rest of the
net (cls_score, bbox_pred, fc8 absent from Fast R-CNN nets) is left as the fillers made it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from readonly_ohem.errors import WeightsError

# torch.load(weights_only=True) can be trusted with a hostile file from torch 2.6 on
SAFE_WEIGHTS_ONLY = torch.__version__ >= (2, 6)

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)

VGG16_NAMES = {
    "features.0": "conv1_1", "features.2": "conv1_2",
    "features.5": "conv2_1", "features.7": "conv2_2",
    "features.10": "conv3_1", "features.12": "conv3_2", "features.14": "conv3_3",
    "features.17": "conv4_1", "features.19": "conv4_2", "features.21": "conv4_3",
    "features.24": "conv5_1", "features.26": "conv5_2", "features.28": "conv5_3",
    "classifier.0": "fc6", "classifier.3": "fc7", "classifier.6": "fc8",
}


def is_torch_file(path: str | Path) -> bool:
    """A ``torch.save`` file (zip container, or a ``.pth``/``.pt`` name) or a ``.safetensors`` file
    rather than a caffemodel."""
    path = Path(path)
    return path.suffix in (".pth", ".pt", ".safetensors") or zipfile.is_zipfile(path)


def read_state_dict(path: str | Path) -> dict:
    """A state dict file -> {name: tensor} on the CPU, without running anything from the file
    (see the module docstring); ``WeightsError`` naming the file otherwise."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors' error class varies by version
            raise WeightsError(f"{path}: cannot read as a safetensors state dict ({e})") from None
    if not SAFE_WEIGHTS_ONLY:
        raise WeightsError(f"{path}: reading a pickle (.pth) safely needs torch >= 2.6 (this is "
                           f"{torch.__version__}); convert it to .safetensors on a trusted machine")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's weights problem
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else type(e).__name__)
        raise WeightsError(f"{path}: cannot read as a torch state dict of tensors; refused "
                           f"without running it ({why})") from None


def fold_input_transform(weight: torch.Tensor, bias: torch.Tensor, pixel_means_bgr,
                         mean_rgb=IMAGENET_MEAN_RGB, std_rgb=IMAGENET_STD_RGB):
    """conv1_1 for BGR 0–255 mean-subtracted input from torchvision's RGB-normalized conv1_1.

    weight: (O, 3, kh, kw) RGB; bias: (O,). Returns (weight', bias') float32, BGR input channels.
    """
    w = weight.detach().to(torch.float64).cpu()
    b = bias.detach().to(torch.float64).cpu()
    pm_bgr = torch.tensor(np.asarray(pixel_means_bgr, dtype=np.float64).reshape(-1))
    if w.ndim != 4 or w.shape[1] != 3 or pm_bgr.numel() != 3:
        raise WeightsError(f"conv1_1 weight must be (O, 3, kh, kw) with 3 pixel means, "
                           f"got {tuple(w.shape)} and {pm_bgr.numel()} means")
    mean = torch.tensor(mean_rgb, dtype=torch.float64)
    std = torch.tensor(std_rgb, dtype=torch.float64)
    pm_rgb = pm_bgr.flip(0)
    shift = (pm_rgb / 255.0 - mean) / std  # (3,) z value of a zero pixel of ours, per RGB channel
    b_new = b + (w.sum(dim=(2, 3)) * shift).sum(dim=1)
    w_new = (w / (255.0 * std).view(1, 3, 1, 1)).flip(1)  # RGB -> BGR input channels
    return w_new.float().contiguous(), b_new.float()


def convert_vgg16_state_dict(state: dict, pixel_means_bgr) -> dict[str, list[torch.Tensor]]:
    """torchvision VGG16 state dict -> {caffe layer name: [weight, bias]} (conv1_1 folded)."""
    out: dict[str, list[torch.Tensor]] = {}
    for prefix, name in VGG16_NAMES.items():
        wk, bk = f"{prefix}.weight", f"{prefix}.bias"
        if wk not in state or bk not in state:
            continue
        out[name] = [state[wk].detach().float(), state[bk].detach().float()]
    if "conv1_1" not in out:
        raise WeightsError("not a torchvision VGG16 state dict: no features.0.weight/bias "
                           f"(keys start {sorted(state)[:4]})")
    out["conv1_1"] = list(fold_input_transform(*out["conv1_1"], pixel_means_bgr))
    return out


def load_torchvision_vgg16(net, path: str | Path, pixel_means_bgr) -> dict:
    """Copy a torchvision VGG16 state dict file into ``net`` by Caffe layer name.

    Returns ``{"loaded": [...], "missing_in_net": [...], "missing_in_file": [...]}`` like
    ``net.load_caffemodel``. A shape mismatch raises ``WeightsError`` naming the layer.
    """
    path = Path(path)
    state = read_state_dict(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    blobs = convert_vgg16_state_dict(state, pixel_means_bgr)
    layer_names = [rec.name for rec in net.layers]
    report = {"loaded": [], "missing_in_net": [], "missing_in_file": []}
    for name, values in blobs.items():
        if name not in layer_names:
            report["missing_in_net"].append(name)
            continue
        params = net.layer_params(name)
        if len(params) != len(values):
            raise WeightsError(f"{path}: layer {name!r} has {len(params)} param blobs, the file "
                               f"{len(values)}")
        for i, (p, v) in enumerate(zip(params, values)):
            if p.numel() != v.numel():
                raise WeightsError(f"{path}: layer {name!r} blob {i}: the net wants "
                                   f"{tuple(p.shape)}, the file has {tuple(v.shape)}")
            with torch.no_grad():
                p.copy_(v.reshape(p.shape).to(device=p.device, dtype=p.dtype))
        report["loaded"].append(name)
    with_params = [rec.name for rec in net.layers if net.layer_params(rec.name)]
    report["missing_in_file"] = [n for n in with_params if n not in blobs]
    return report
