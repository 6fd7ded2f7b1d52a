"""The engine on ``--device`` (see conftest): the real Caffe solver run of the golden case, and
layers under autocast there."""

import json

import numpy as np
import pytest
import torch

from readonly_ohem.caffe import use_caffe_float32
from readonly_ohem.caffe.net import Net
from readonly_ohem.caffe.solver import Solver, net_path
from readonly_ohem.caffe.spec import read_solver

pytestmark = pytest.mark.device


def test_caffe_golden_solver_run_on_the_device(fixtures_dir, device):
    use_caffe_float32()  # true float32 on GPUs (no TF32), as the commands
    case = fixtures_dir / "caffe_goldens" / "solver_step_small"
    meta = json.loads((case / "meta.json").read_text())
    sp = read_solver(str(case / "solver.prototxt"))
    net = Net.from_file(str(net_path(sp, case / "solver.prototxt")), phase="TRAIN")
    net.load_caffemodel(str(case / "weights.caffemodel"))
    net.to(device)
    solver = Solver(sp, net, source=case / "solver.prototxt")
    inputs = np.load(case / "inputs.npz")
    feed = {k: torch.from_numpy(inputs[k]).to(device) for k in inputs.files}
    exp = np.load(case / "expected.npz")
    losses = [solver.step(lambda i: feed)["loss"] for _ in range(meta["iterations"])]
    tol = dict(rtol=meta["rtol"], atol=meta["atol"])
    np.testing.assert_allclose(losses, exp["loss_per_iter"], **tol)
    for layer in ("conv1", "fc"):
        for i, t in enumerate(net.layer_params(layer)):
            assert t.device.type == device.type
            np.testing.assert_allclose(t.detach().cpu().numpy(), exp[f"final_param/{layer}/{i}"],
                                       **tol)


def test_bfloat16_layers_on_the_device_are_close_to_float32(fixtures_dir, device):
    case = fixtures_dir / "caffe_goldens" / "solver_step_small"
    net = Net.from_file(str(case / "net.prototxt"), phase="TRAIN").to(device)
    net.load_caffemodel(str(case / "weights.caffemodel"))
    inputs = np.load(case / "inputs.npz")
    feed = {k: torch.from_numpy(inputs[k]).to(device) for k in inputs.files}
    with torch.no_grad():
        want = net.forward(feed)
        net.set_compute_dtype(["conv1", "fc"], torch.bfloat16)
        got = net.forward(feed)
    for blob in ("conv1", "fc"):
        assert got[blob].dtype == torch.float32 and not torch.equal(got[blob], want[blob])
        torch.testing.assert_close(got[blob], want[blob], rtol=0.02, atol=0.05)
