"""Every Caffe golden case (numbers from the real Caffe with the Fast R-CNN layers) through
``readonly-ohem run``: forward, backward (from the losses or seeded by top_diff.npz) and the
solver case, compared with ``numpy.allclose`` at the case's rtol/atol.

Two sources: the copies in ``tests/fixtures/caffe_goldens`` (always run) and ``../shared``
(``shared_dir``; skipped where absent) so a newly added shared case is covered too.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from readonly_ohem.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "caffe_goldens"
SHARED_CASES = ["accuracy_tie", "conv_basic", "fast_rcnn_mini_forward",
                "inner_product_relu_dropout_test", "lrn_across", "pooling_ave_pad",
                "pooling_max_ceil", "roi_pooling", "sharing_readonly", "smooth_l1_fast_rcnn",
                "smooth_l1_no_loss_weight", "softmax_with_loss_valid", "solver_step_small",
                "v1_caffemodel"]


def _fixture_cases():
    return sorted(p.name for p in FIXTURES.iterdir() if (p / "meta.json").is_file())


def run_case(case: Path, tmp_path: Path) -> None:
    meta = json.loads((case / "meta.json").read_text())
    out = tmp_path / "out.npz"
    args = ["run", str(case / "net.prototxt"), "--inputs", str(case / "inputs.npz"),
            "--out", str(out), "--weights", str(case / "weights.caffemodel"),
            "--phase", meta["phase"]]
    if "solver" in meta:
        args += ["--solver", str(case / meta["solver"]), "--iters", str(meta["iterations"])]
    elif meta["backward"]:
        args.append("--backward")
        if (case / "top_diff.npz").is_file():
            args += ["--top-diff", str(case / "top_diff.npz")]
    assert main(args) == 0
    got = np.load(out)
    expected = np.load(case / "expected.npz")
    checked = 0
    for key in expected.files:
        if key.startswith("initial_param/"):
            continue  # the weights file itself; final_param/ is what the solver computed
        assert key in got.files, f"{case.name}: {key} missing from the output"
        assert got[key].shape == expected[key].shape, (case.name, key)
        np.testing.assert_allclose(got[key], expected[key], rtol=meta["rtol"], atol=meta["atol"],
                                   err_msg=f"{case.name}: {key}")
        checked += 1
    assert checked >= 2
    if meta.get("backward") and "solver" not in meta:
        assert any(k.startswith("diff/") for k in expected.files)


@pytest.mark.parametrize("name", _fixture_cases())
def test_golden_fixture(name, tmp_path):
    run_case(FIXTURES / name, tmp_path)


@pytest.mark.parametrize("name", SHARED_CASES)
def test_golden_shared(name, shared_dir, tmp_path):
    case = shared_dir / "caffe_goldens" / name
    if not case.is_dir():
        pytest.skip(f"{case} is not present")
    run_case(case, tmp_path)


def test_every_shared_case_is_listed(shared_dir):
    on_disk = {p.name for p in (shared_dir / "caffe_goldens").iterdir()
               if (p / "meta.json").is_file()}
    assert on_disk <= set(SHARED_CASES), sorted(on_disk - set(SHARED_CASES))


def test_fixture_copies_include_the_required_cases():
    assert {"fast_rcnn_mini_forward", "sharing_readonly", "v1_caffemodel",
            "solver_step_small"} <= set(_fixture_cases())


def test_blob_outputs_cover_every_blob(tmp_path):
    """OUT.npz has every blob (in-place ones once, with the final value) and 0-d losses."""
    case = FIXTURES / "sharing_readonly"
    out = tmp_path / "o.npz"
    assert main(["run", str(case / "net.prototxt"), "--inputs", str(case / "inputs.npz"),
                 "--out", str(out), "--weights", str(case / "weights.caffemodel"),
                 "--backward"]) == 0
    got = np.load(out)
    blobs = {k for k in got.files if "/" not in k}
    assert blobs == {"data", "data2", "labels", "ro", "tr", "mix", "loss"}
    assert got["loss"].shape == () and got["diff/loss"] == 1.0
    # the readonly head gets no gradient; both sharers report the trainable path's diff
    assert not got["diff/ro"].any()
    np.testing.assert_array_equal(got["param_diff/ip_ro/0"], got["param_diff/ip_tr/0"])
