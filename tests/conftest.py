"""Shared test fixtures.

``../shared`` (beside the checkout) holds reference facts that exist only on the developers'
machines; tests that read it use the ``shared_dir`` fixture and skip cleanly where it is absent.
Small fixtures copied from it live in ``tests/fixtures/`` and always run.

Tests of the code paths that differ by device are marked ``device`` and take the ``device``
fixture: the CPU by default, ``--device cuda`` (or ``READONLY_OHEM_TEST_DEVICE=cuda``) runs them on
a GPU: ``pytest -m device --device cuda`` (``scripts/gpu_check.sh`` does).
"""

import os
from pathlib import Path

import pytest
import torch

from readonly_ohem.inspect import KeptRoiLogger

from kept_roi_samples import META, REC0, REC1, record

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("READONLY_OHEM_TEST_DEVICE", "cpu"),
                     help="device of the tests marked 'device' (cpu, cuda, cuda:1; default cpu or "
                          "$READONLY_OHEM_TEST_DEVICE)")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: a device path; runs on --device (default cpu)")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device of the ``device`` tests (``--device``); a CUDA device that is not there stops
    the run with that message."""
    name = request.config.getoption("--device")
    try:
        dev = torch.device(name)
    except RuntimeError:
        pytest.exit(f"--device {name!r} is not a torch device", returncode=4)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.exit(f"--device {name}: CUDA is not available on this machine", returncode=4)
    return dev


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared (reference facts) is not present on this machine")
    return SHARED


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def hand_log(tmp_path) -> Path:
    """A two-iteration kept-RoI log of the hand-built selections in ``kept_roi_samples``."""
    path = tmp_path / "kept.jsonl"
    logger = KeptRoiLogger(path, log_every=1)
    logger(record(**REC0), iteration=0, metas=[META])
    logger(record(**REC1), iteration=1, metas=[META])
    return path


@pytest.fixture
def one_thread():
    """torch on one thread for the test: on a busy 2-core machine each parallel region of a small
    op (searchsorted, repeat_interleave) can wait milliseconds for the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
