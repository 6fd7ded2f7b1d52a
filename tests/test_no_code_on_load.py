"""Nothing loaded from a user's file runs code: for every loader, a crafted file whose unsafe
reading would run ``os.system("touch marker")`` gives a one-line error naming the file, and the
marker never appears. (The training state: tests/test_train.py and tests/test_train_state.py.)"""

import json
import pickle
import zlib

import numpy as np
import pytest
import torch
import yaml

from malicious import assert_live, object_array, pickle_bytes, torch_save_file
from readonly_ohem.caffe.layers.python import parse_param_str
from readonly_ohem.caffe.net import Net
from readonly_ohem.caffe.proto import caffe_pb2
from readonly_ohem.caffe.weights import read_caffemodel
from readonly_ohem.commands.run import read_npz
from readonly_ohem.config import default_config, load_config
from readonly_ohem.datasets import cache, get_imdb
from readonly_ohem.datasets.proposals import load_image_proposals, load_proposals
from readonly_ohem.errors import ConfigError, DataError, SpecError, WeightsError
from readonly_ohem.inspect import read_log
from readonly_ohem.inspect.log import blobs_path
from readonly_ohem.pretrained import load_torchvision_vgg16
from readonly_ohem.train import load_initial_weights

NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "conv1_1" type: "Convolution" bottom: "data" top: "c"
        convolution_param { num_output: 2 kernel_size: 3 pad: 1 } }
"""


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "MARKER"
    yield m
    assert not m.exists(), "a crafted file ran code"


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def net(tmp_path):
    (tmp_path / "n.prototxt").write_text(NET)
    return Net.from_file(tmp_path / "n.prototxt", phase="TEST")


def test_caffemodel_that_is_a_pickle(tmp_path, marker):
    evil = tmp_path / "evil.caffemodel"
    evil.write_bytes(pickle_bytes(marker))
    assert_live(lambda p: pickle.loads(p.read_bytes()), evil, marker)
    with pytest.raises(WeightsError) as e:
        read_caffemodel(evil)
    assert str(evil) in one_line(e)
    with pytest.raises(WeightsError, match="evil.caffemodel"):
        net(tmp_path).load_caffemodel(str(evil))


def test_torch_weights_pth_holding_code(tmp_path, marker):
    """``train --weights vgg16.pth`` (and a zip named .caffemodel, which takes the same path)."""
    g = torch.Generator().manual_seed(0)
    for name in ("vgg16.pth", "renamed.caffemodel"):
        evil = torch_save_file(tmp_path / name, marker,
                               **{"features.0.weight": torch.randn(2, 3, 3, 3, generator=g)})
        assert_live(lambda p: torch.load(p, weights_only=False), evil, marker)
        with pytest.raises(WeightsError) as e:
            load_initial_weights(net(tmp_path), evil, default_config())
        msg = one_line(e)
        assert str(evil) in msg and "refused without running it" in msg and ".system" in msg
    with pytest.raises(WeightsError, match="refused without running it"):
        load_torchvision_vgg16(net(tmp_path), tmp_path / "vgg16.pth", default_config().PIXEL_MEANS)


def test_proposals_npz_with_a_pickled_array_and_pkl_files(tmp_path, marker):
    evil = tmp_path / "props.npz"
    np.savez(evil, **{"000001": object_array(marker)})  # numpy pickles object arrays on save
    assert_live(lambda p: np.load(p, allow_pickle=True)["000001"], evil, marker)
    with pytest.raises(DataError) as e:
        load_proposals(evil, ["000001"])
    assert str(evil) in one_line(e) and "allow_pickle=False" in one_line(e)
    with pytest.raises(DataError, match="props.npz"):
        load_image_proposals(evil, "000001")
    pkl = tmp_path / "props.pkl"
    pkl.write_bytes(pickle_bytes(marker))
    for load in (lambda: load_proposals(pkl, ["000001"]), lambda: load_image_proposals(pkl, "000001")):
        with pytest.raises(DataError) as e:
            load()
        assert str(pkl) in one_line(e) and "pickled proposals are refused" in one_line(e)
    disguised = tmp_path / "props.mat"  # a pickle given a .mat name
    disguised.write_bytes(pickle_bytes(marker))
    with pytest.raises(DataError, match="props.mat: cannot read proposals .mat"):
        load_proposals(disguised, ["000001"])


def test_run_inputs_npz_with_a_pickled_array(tmp_path, marker):
    evil = tmp_path / "in.npz"
    np.savez(evil, data=object_array(marker))
    assert_live(lambda p: np.load(p, allow_pickle=True)["data"], evil, marker)
    with pytest.raises(DataError) as e:
        read_npz(evil, "--inputs")
    assert str(evil) in one_line(e)
    raw = tmp_path / "raw.npz"  # a bare pickle: numpy would unpickle it with allow_pickle=True
    raw.write_bytes(pickle_bytes(marker))
    with pytest.raises(DataError, match="raw.npz: --inputs must be an .npz archive"):
        read_npz(raw, "--inputs")


def test_kept_roi_log_blob_with_a_pickled_array(hand_log, marker):
    """A record whose blob (CRC and all correct) is an npz holding an object array."""
    import io

    buf = io.BytesIO()
    np.savez(buf, boxes=object_array(marker))
    data = buf.getvalue()
    blobs = blobs_path(hand_log)
    offset = blobs.stat().st_size
    with open(blobs, "ab") as f:
        f.write(data)
    lines = hand_log.read_text().splitlines()
    rec = json.loads(next(ln for ln in reversed(lines) if '"record"' in ln))
    rec.update(iter=7, offset=offset, length=len(data), crc32=zlib.crc32(data))
    with open(hand_log, "a") as f:
        f.write(json.dumps(rec) + "\n")
    sel = [s for s in read_log(hand_log) if s.iter == 7]
    assert len(sel) == 1
    with pytest.raises(DataError) as e:
        sel[0].read_arrays()
    assert str(blobs) in one_line(e) and "iteration 7" in one_line(e)


def test_roidb_cache_with_a_pickled_array_is_ignored_with_a_warning(fixtures_dir, tmp_path, marker):
    d = fixtures_dir / "original_pipeline" / "train"

    def imdb():
        return get_imdb("voc_2007_trainval", d, proposals=d / "voc_2007_trainval.mat",
                        cache_dir=tmp_path / "c")

    good = imdb().roidb
    (npz,) = (tmp_path / "c").glob("*.npz")
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["boxes"] = object_array(marker)
    with open(npz, "wb") as f:  # the key in the .json beside it still matches
        np.savez(f, **arrays)
    with pytest.warns(UserWarning, match=f"{npz}: ignoring the roidb cache.*allow_pickle=False"):
        assert cache.load(imdb()) is None
    with pytest.warns(UserWarning, match="ignoring the roidb cache"):
        rebuilt = imdb().roidb  # rebuilt from the dataset, and the cache rewritten
    np.testing.assert_array_equal(rebuilt[0]["boxes"], good[0]["boxes"])
    assert cache.load(imdb()) is not None


def test_yaml_config_and_param_str_with_python_tags(tmp_path, marker):
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    yml = tmp_path / "evil.yml"
    yml.write_text(f"TRAIN:\n  SCALES: {tag}\n")
    assert_live(lambda p: yaml.unsafe_load(p.read_text()), yml, marker)
    with pytest.raises(ConfigError) as e:
        load_config([str(yml)])
    assert str(yml) in one_line(e)
    param = caffe_pb2.LayerParameter(name="data", type="Python")
    param.python_param.param_str = f"num_classes: {tag}"
    with pytest.raises(SpecError, match="layer 'data': python_param.param_str"):
        parse_param_str(param)

