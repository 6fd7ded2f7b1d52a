"""The training state file: safetensors + JSON, exact round trip of every RNG, readable with
safetensors/json alone, every flaw a one-line ConfigError naming the file (and key)."""

import json
import random
import struct

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from readonly_ohem.errors import ConfigError
from readonly_ohem.train_state import (FORMAT, check_state, read_state, require, rng_state,
                                       save_state, set_rng_state, snapshot_states, state_stem)


def draws():
    return (torch.rand(3).tolist(), np.random.standard_normal(3).tolist(),
            np.random.randint(0, 1 << 30, 3).tolist(), random.random(), random.gauss(0, 1))


def test_rng_states_round_trip_bit_exactly_through_the_file(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    np.random.standard_normal()  # numpy now holds a cached gaussian (has_gauss = 1)
    random.gauss(0, 1)  # and Python a gauss_next
    state = rng_state()
    assert state["numpy"]["has_gauss"] == 1 and state["python"]["gauss_next"] is not None
    expected = draws()
    save_state(tmp_path / "s.state.safetensors", {"rng": state})
    draws()  # move every generator on
    set_rng_state(read_state(tmp_path / "s.state.safetensors")["rng"])
    assert draws() == expected


def test_nested_values_keep_their_types_and_bits(tmp_path):
    t = {"f32": torch.randn(2, 3), "f64": torch.randn(4, dtype=torch.float64),
         "u8": torch.arange(7, dtype=torch.uint8), "i64": torch.tensor([[1, -2]]),
         "empty": torch.zeros(0, 4)}
    values = {"iter": 3, "losses": [0.1 + 0.2, 5e-324, -0.0, 1e308], "name": "x/y", "none": None,
              "flag": True, "nested": [{"a": [1, 2]}, []]}
    path = tmp_path / "s.state.safetensors"
    save_state(path, {"t": t, **values, "rows": [t["f32"], {"deep": t["i64"]}]})
    back = read_state(path)
    for k, v in t.items():
        assert back["t"][k].dtype == v.dtype and torch.equal(back["t"][k], v), k
    for k, v in values.items():
        assert back[k] == v and type(back[k]) is type(v), k
    assert [struct.pack("<d", x) for x in back["losses"]] == [struct.pack("<d", x) for x in values["losses"]]
    assert torch.equal(back["rows"][0], t["f32"]) and torch.equal(back["rows"][1]["deep"], t["i64"])
    with pytest.raises(TypeError, match="'obj' is a object, not JSON or a tensor"):
        save_state(tmp_path / "x.state.safetensors", {"obj": object()})


def test_the_file_is_plain_safetensors_with_the_rest_as_json(tmp_path):
    path = tmp_path / "s.state.safetensors"
    save_state(path, {"weights": {"fc6/0": torch.ones(2, 2)}, "iter": 7})
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"weights/fc6/0"}
        meta = f.metadata()
    assert meta["format"] == FORMAT == "readonly-ohem train state 2"
    assert json.loads(meta["state"]) == {"weights": {"fc6/0": {"$tensor": "weights/fc6/0"}}, "iter": 7}
    raw = path.read_bytes()  # and with json alone: 8-byte length, then the header
    (n,) = struct.unpack("<Q", raw[:8])
    assert json.loads(raw[8:8 + n])["__metadata__"] == meta


def test_foreign_or_damaged_files_are_named(tmp_path):
    cases = {
        "other.state.safetensors": (safetensors.torch.save({"w": torch.ones(1)}),
                                    r"not a readonly-ohem training state \(format None, expected"),
        "dangling.state.safetensors": (
            safetensors.torch.save({}, metadata={"format": FORMAT,
                                                 "state": '{"w": {"$tensor": "weights/w"}}'}),
            r"the state names tensor 'weights/w', which the file does not hold"),
        "badjson.state.safetensors": (safetensors.torch.save({}, metadata={"format": FORMAT,
                                                                           "state": "{oops"}),
                                      "the training state's JSON does not parse"),
        "list.state.safetensors": (safetensors.torch.save({}, metadata={"format": FORMAT, "state": "[]"}),
                                   "the training state's JSON is not an object"),
        "text.state.safetensors": (b"iteration 3\n", "not a readonly-ohem training state, or a truncated one"),
    }
    for name, (data, expect) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        for reader in (check_state, read_state):
            with pytest.raises(ConfigError, match=expect) as e:
                reader(path)
            assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value), name
    with pytest.raises(ConfigError, match="training state not found"):
        read_state(tmp_path / "absent.state.safetensors")


def test_require_names_the_key_and_the_kind(tmp_path):
    state = {"solver": {"iter": 3, "history": {}}, "data": [{"cur": 1}], "flag": True}
    assert require(state, "solver.iter", "f", int) == 3
    assert require(state, "data.0.cur", "f", int) == 1
    with pytest.raises(ConfigError, match="^f: the training state has no key 'solver.current_step'$"):
        require(state, "solver.current_step", "f")
    with pytest.raises(ConfigError, match="^f: the training state has no key 'ranks.1.data.1'$"):
        require(state, "data.1", "f", prefix="ranks.1")
    with pytest.raises(ConfigError, match="^f: key 'flag' of the training state should be an integer, not bool$"):
        require(state, "flag", "f", int)


def test_snapshot_states_newest_first_and_only_this_stem(tmp_path):
    for name in ("run_iter_2.state.safetensors", "run_iter_10.state.safetensors",
                 "run_iter_9.state.safetensors", "run_x_iter_99.state.safetensors",
                 "run_iter_50.state.pt", "run_iter_50.caffemodel", "run[1]_iter_70.state.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in snapshot_states(tmp_path / "run")] == [
        "run_iter_10.state.safetensors", "run_iter_9.state.safetensors", "run_iter_2.state.safetensors"]
    assert [p.name for p in snapshot_states(tmp_path / "run[1]")] == ["run[1]_iter_70.state.safetensors"]
    assert state_stem(tmp_path / "vgg16_fast_rcnn_iter_40000.state.pt") == tmp_path / "vgg16_fast_rcnn"
    assert state_stem(tmp_path / "model.safetensors") is None
