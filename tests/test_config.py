"""The original config keys, yml merge and --set parsing (SPEC §1)."""

import numpy as np
import pytest

from readonly_ohem.config import default_config, load_config
from readonly_ohem.errors import ConfigError

OHEM_YML = """\
EXP_DIR: fast_rcnn_ohem
MATLAB: /opt/matlab/8.1/bin/matlab
TRAIN:
  BG_THRESH_LO: 0.0
  IMS_PER_BATCH: 1
  BATCH_SIZE: 64
  USE_OHEM: True
  ASPECT_GROUPING: False
"""


def test_defaults_are_the_originals():
    cfg = default_config()
    assert cfg.TRAIN.SCALES == (600,) and cfg.TRAIN.MAX_SIZE == 1000
    assert cfg.TRAIN.IMS_PER_BATCH == 2 and cfg.TRAIN.BATCH_SIZE == 128
    assert cfg.TRAIN.BG_THRESH_LO == 0.1 and cfg.TRAIN.OHEM_NMS_THRESH == 0.7
    assert cfg.TRAIN.OHEM_USE_NMS is True and cfg.TRAIN.USE_OHEM is False
    assert cfg.TRAIN.BBOX_NORMALIZE_STDS == (0.1, 0.1, 0.2, 0.2)
    assert cfg.TEST.NMS == 0.3 and cfg.DEDUP_BOXES == 1.0 / 16 and cfg.RNG_SEED == 3
    assert cfg.EPS == 1e-14
    np.testing.assert_array_equal(cfg.PIXEL_MEANS, [[[102.9801, 115.9465, 122.7717]]])


def test_configs_are_independent():
    a, b = default_config(), default_config()
    a.TRAIN.BATCH_SIZE = 7
    assert b.TRAIN.BATCH_SIZE == 128
    c = a.clone()
    c.TRAIN.BATCH_SIZE = 9
    assert a.TRAIN.BATCH_SIZE == 7


def test_ohem_yml_merges(tmp_path):
    f = tmp_path / "fast_rcnn_ohem.yml"
    f.write_text(OHEM_YML)
    cfg = load_config([f])
    assert cfg.TRAIN.BG_THRESH_LO == 0.0 and cfg.TRAIN.IMS_PER_BATCH == 1
    assert cfg.TRAIN.BATCH_SIZE == 64 and cfg.TRAIN.USE_OHEM is True
    assert cfg.TRAIN.ASPECT_GROUPING is False and cfg.EXP_DIR == "fast_rcnn_ohem"
    assert cfg.TRAIN.FG_THRESH == 0.5  # untouched keys keep their defaults


def test_reference_yml_loads_unmodified(shared_dir):
    cfg = load_config([shared_dir / "reference_cfgs" / "fast_rcnn_ohem.yml"])
    assert cfg.TRAIN.BATCH_SIZE == 64 and cfg.TRAIN.USE_OHEM is True


def test_set_reads_python_literals():
    cfg = load_config(set_pairs=[["TRAIN.OHEM_USE_NMS", "False"], ["TRAIN.BATCH_SIZE", "32"],
                                 ["TRAIN.SCALES", "(480, 576)"], ["EXP_DIR", "my_run"],
                                 ["TRAIN.OHEM_NMS_THRESH", "1"]])
    assert cfg.TRAIN.OHEM_USE_NMS is False and cfg.TRAIN.BATCH_SIZE == 32
    assert cfg.TRAIN.SCALES == (480, 576)
    assert cfg.EXP_DIR == "my_run"  # does not parse as a literal: stays a string
    assert cfg.TRAIN.OHEM_NMS_THRESH == 1.0 and isinstance(cfg.TRAIN.OHEM_NMS_THRESH, float)
    cfg.set_list(["TRAIN.FG_FRACTION", "0.5", "PIXEL_MEANS", "[[[1, 2, 3]]]"])
    assert cfg.TRAIN.FG_FRACTION == 0.5
    assert cfg.PIXEL_MEANS.dtype == np.float64 and cfg.PIXEL_MEANS.tolist() == [[[1, 2, 3]]]


@pytest.mark.parametrize("key,value,needle", [
    ("TRAIN.NO_SUCH_KEY", "1", "TRAIN.NO_SUCH_KEY"),
    ("NOPE.BATCH_SIZE", "1", "NOPE"),
    ("TRAIN.BATCH_SIZE", "'many'", "TRAIN.BATCH_SIZE"),
    ("TRAIN.USE_OHEM", "1", "TRAIN.USE_OHEM"),
])
def test_bad_set_names_the_key(key, value, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(set_pairs=[[key, value]])


def test_bad_yml_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yml"
    f.write_text("TRAIN:\n  BATCH_SIZ: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yml.*TRAIN\.BATCH_SIZ"):
        load_config([f])
    g = tmp_path / "broken.yml"
    g.write_text("TRAIN: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yml"):
        load_config([g])
    with pytest.raises(ConfigError, match="missing.yml"):
        load_config([tmp_path / "missing.yml"])


def test_entry_point_defaults_come_before_files_and_set(tmp_path):
    f = tmp_path / "a.yml"
    f.write_text("TRAIN:\n  BATCH_SIZE: 32\n")
    cfg = load_config([f], [["TRAIN.IMS_PER_BATCH", "4"]],
                      defaults={"TRAIN": dict(BATCH_SIZE=64, IMS_PER_BATCH=1, USE_OHEM=True)})
    assert (cfg.TRAIN.BATCH_SIZE, cfg.TRAIN.IMS_PER_BATCH, cfg.TRAIN.USE_OHEM) == (32, 4, True)
    with pytest.raises(ConfigError, match="TRAIN.NOPE"):
        load_config(defaults={"TRAIN": {"NOPE": 1}})
