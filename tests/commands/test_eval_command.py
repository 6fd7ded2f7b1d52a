"""``readonly-ohem eval``: the AP table and JSON of devkit result files, as the original's
``voc_eval`` (transcribed in ``tests/original_code.py``) computes them."""

import json
from pathlib import Path

import numpy as np
import pytest

from readonly_ohem.commands.eval import eval_command
from readonly_ohem.datasets.voc_eval import VOC_CLASSES

from original_code import parse_rec, voc_eval as _orig_voc_eval

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "original_test"
VOC = FIX / "VOCdevkit" / "VOC2007"


def _fixture_annotations():
    ids = (VOC / "ImageSets" / "Main" / "test.txt").read_text().split()
    return {i: parse_rec(VOC / "Annotations" / f"{i}.xml") for i in ids}


def test_eval_command_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "ap.json"
    assert eval_command(str(VOC), "test", str(FIX / "expected_results"), "voc07", str(out)) == 0
    expected = json.loads((FIX / "expected_ap.json").read_text())
    got = json.loads(out.read_text())
    assert set(got) == {"mAP", "per_class"}
    assert got["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    for cls, ap in expected["per_class"].items():
        assert got["per_class"][cls] == pytest.approx(ap, abs=1e-6)
    text = capsys.readouterr().out
    assert "motorbike" in text and "0.0294" in text and "mAP" in text and "0.3070" in text
    # --metric area: the original's area-under-envelope APs of the same files
    eval_command(str(VOC), "test", str(FIX / "expected_results"), "area", str(out))
    annos = _fixture_annotations()
    for cls, ap in json.loads(out.read_text())["per_class"].items():
        lines = (FIX / "expected_results" / f"comp4_det_test_{cls}.txt").read_text().splitlines()
        rap = _orig_voc_eval(lines, annos, cls, 0.5, False)[2]
        assert ap == (0.0 if np.isnan(rap) else rap), cls


def test_eval_command_counts_repeated_image_set_lines(tmp_path):
    """A repeated line of ImageSets/Main/<set>.txt doubles that image's npos, as the original."""
    import shutil

    voc = tmp_path / "VOC2007"
    shutil.copytree(VOC / "Annotations", voc / "Annotations")
    ids = (VOC / "ImageSets" / "Main" / "test.txt").read_text().split()
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids + ids[:1]) + "\n")
    out = tmp_path / "ap.json"
    eval_command(str(voc), "test", str(FIX / "expected_results"), "voc07", str(out))
    got = json.loads(out.read_text())["per_class"]
    annos = _fixture_annotations()
    for cls in VOC_CLASSES:
        lines = (FIX / "expected_results" / f"comp4_det_test_{cls}.txt").read_text().splitlines()
        rap = _orig_voc_eval(lines, annos, cls, 0.5, True, imagenames=ids + ids[:1])[2]
        assert got[cls] == (0.0 if np.isnan(rap) else rap), cls
