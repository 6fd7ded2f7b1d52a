"""TF32 off is the entry points' choice (``caffe.precision.use_caffe_float32``), never an import
side effect of the engine: checked in a fresh interpreter, where nothing was imported before."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

ENGINE_MODULES = ["readonly_ohem.caffe", "readonly_ohem.caffe.net", "readonly_ohem.caffe.layers",
                  "readonly_ohem.caffe.solver", "readonly_ohem.caffe.weights",
                  "readonly_ohem.caffe.spec", "readonly_ohem.caffe.summary"]

SCRIPT = textwrap.dedent("""
    import importlib
    import pkgutil
    import sys

    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    def flags():
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def imported(name):
        module = importlib.import_module(name)
        assert flags() == (True, True), (name, flags())
        return module

    names = list(sys.argv[1:])  # the engine's entry modules first, then every module of it
    for name in names:
        imported(name)
    for package in ("readonly_ohem.caffe", "readonly_ohem.ops"):
        path = imported(package).__path__
        for info in pkgutil.walk_packages(path, package + "."):
            names.append(info.name)
            imported(info.name)
    import readonly_ohem.caffe

    readonly_ohem.caffe.use_caffe_float32()
    assert flags() == (False, False), flags()
    print(len(names), "modules")
""")


def test_import_leaves_tf32_alone_and_use_caffe_float32_turns_it_off():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *ENGINE_MODULES], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "modules" in proc.stdout
