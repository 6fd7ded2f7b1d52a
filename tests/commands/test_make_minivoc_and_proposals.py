"""``readonly-ohem make-minivoc`` and ``proposals``: the built-in dataset and OpenCV's selective
search through the command line, read back by our own dataset reader."""

import importlib.util

import pytest
import scipy.io

from readonly_ohem.cli import main
from readonly_ohem.datasets import get_imdb


def test_cli_make_minivoc_and_proposals_without_opencv(tmp_path, capsys):
    assert main(["make-minivoc", str(tmp_path / "m"), "--seed", "3", "--images", "4"]) in (0, None)
    assert "4/4 images" in capsys.readouterr().out
    assert get_imdb("voc_2007_test", tmp_path / "m", cache_dir=False).num_images == 2
    if importlib.util.find_spec("cv2") is None:
        assert main(["proposals", str(tmp_path / "m/VOCdevkit/VOC2007"), "--out", str(tmp_path / "p.mat")]) == 2
        assert "opencv" in capsys.readouterr().err


def test_opencv_selective_search_proposals_load_back(tmp_path):
    """With the optional OpenCV extra: the `proposals` command writes the Fast R-CNN .mat layout
    that our own reader loads (1-based [y1 x1 y2 x2] rows, one matrix per image in set order)."""
    pytest.importorskip("cv2.ximgproc", reason="opencv-contrib (pip install '.[proposals]')")

    assert main(["make-minivoc", str(tmp_path / "m"), "--seed", "1", "--images", "4"]) in (0, None)
    out = tmp_path / "ss.mat"
    assert main(["proposals", str(tmp_path / "m/VOCdevkit/VOC2007"), "--imageset", "test",
                 "--out", str(out)]) in (0, None)
    raw = scipy.io.loadmat(out)["boxes"]
    imdb = get_imdb("voc_2007_test", tmp_path / "m", proposals=out, cache_dir=False)
    assert raw.shape == (1, imdb.num_images)
    for i in range(imdb.num_images):
        rows = raw[0, i]
        assert rows.shape[1] == 4 and len(rows) > 10
        w, h = imdb.image_sizes[i]
        xy = rows[:, [1, 0, 3, 2]] - 1  # back to 0-based [x1 y1 x2 y2]
        assert (xy[:, 2] >= xy[:, 0]).all() and (xy[:, 3] >= xy[:, 1]).all()
        assert xy[:, :2].min() >= 0 and xy[:, 2].max() <= w - 1 and xy[:, 3].max() <= h - 1
        assert 0 < len(imdb.proposal_boxes(i)) <= len(rows)
