"""scripts/gpu_check.sh where there is no CUDA: one clear message, a non-zero exit, nothing run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the script would run it all")
def test_without_cuda_the_gpu_check_stops_with_a_message(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_OUT=str(tmp_path / "out"))
    res = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert "CUDA is not available on this machine" in res.stderr
    assert "Nothing was run" in res.stderr and res.stdout == ""
    assert not (tmp_path / "out").exists()  # no step started
