"""``readonly-ohem inspect``: its argument and lookup errors."""

import pytest

from readonly_ohem.commands.inspect import inspect_command
from readonly_ohem.errors import ConfigError, DataError


def test_cli_errors(hand_log, tmp_path):
    with pytest.raises(DataError, match="iteration 7 was not logged"):
        inspect_command(str(hand_log), iteration=7, out=str(tmp_path / "a.png"))
    with pytest.raises(DataError, match="no image 'zzz'"):
        inspect_command(str(hand_log), iteration=0, image="zzz", out=str(tmp_path / "a.png"))
    with pytest.raises(ConfigError, match="needs --def"):
        inspect_command(def_path="x.prototxt")
    with pytest.raises(ConfigError, match="needs a log"):
        inspect_command()
