"""The entry points that run nets turn TF32 off (Caffe computes in true float32); importing the
package does not (tests/caffe/test_precision.py)."""

from pathlib import Path

import pytest
import torch

from readonly_ohem.cli import main
from readonly_ohem.train import Trainer

SMALL = Path(__file__).resolve().parents[2] / "prototxt" / "small" / "fast_rcnn" / "test.prototxt"


@pytest.fixture
def tf32_on():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_net_command_turns_tf32_off(tf32_on, capsys):
    assert main(["net", str(SMALL), "--phase", "TEST"]) == 0
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False


def test_a_trainer_turns_tf32_off(tf32_on):
    class FakeSolver:
        net = None

    Trainer(FakeSolver(), cfg=None, output_dir="unused")
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False
