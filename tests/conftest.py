"""Shared test fixtures.

``../shared`` (beside the checkout) holds reference facts that exist only on the developers'
machines; tests that read it use the ``shared_dir`` fixture and skip cleanly where it is absent.
Small fixtures copied from it live in ``tests/fixtures/`` and always run.
"""

from pathlib import Path

import pytest
import torch

from readonly_ohem.inspect import KeptRoiLogger

from kept_roi_samples import META, REC0, REC1, record

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

torch.set_num_threads(min(2, torch.get_num_threads()))


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
