"""The ``Python`` layer type: registry resolution, param_str parsing, and the opt-in import of a
Caffe-style layer class from a user module (a tiny module written into the test's tmp dir)."""

import sys
import textwrap

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from readonly_ohem.errors import SpecError
from readonly_ohem.ohem import layer as ohem_layer  # noqa: F401  (registers OHEMDataLayer)
from readonly_ohem.caffe.layers.base import LAYERS, PYTHON_LAYERS, Layer, LayerContext
from readonly_ohem.caffe.layers.python import build_python_layer, parse_param_str, resolve
from readonly_ohem.caffe.net import Net
from readonly_ohem.caffe.proto import caffe_pb2


def layer_param(text):
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def test_param_str_is_read_as_yaml_like_the_original():
    p = layer_param('name: "m" type: "Python" python_param { module: "a" layer: "B" '
                    'param_str: "\'num_classes\': 21" }')
    assert parse_param_str(p) == {"num_classes": 21}
    p.python_param.param_str = ""
    assert parse_param_str(p) == {}
    p.python_param.param_str = "[1, 2"
    with pytest.raises(SpecError, match="layer 'm': python_param.param_str .* not valid YAML"):
        parse_param_str(p)
    p.python_param.param_str = "just a string"
    with pytest.raises(SpecError, match="must be a mapping"):
        parse_param_str(p)


def test_param_str_python_tuple_tag_of_faster_rcnn_specs_is_a_tuple():
    """Faster R-CNN specs write ``'scales': !!python/tuple [...]`` on a second line; that tag
    gives a tuple, every other Python tag stays refused (nothing runs)."""
    p = layer_param('name: "rpn-data" type: "Python" python_param { module: "a" layer: "B" '
                    'param_str: "\'feat_stride\': 16 \\n\'scales\': !!python/tuple [4, 8, 16, 32]" }')
    assert "\n" in p.python_param.param_str  # the text format's escape is a newline
    assert parse_param_str(p) == {"feat_stride": 16, "scales": (4, 8, 16, 32)}
    p.python_param.param_str = "'x': !!python/object/apply:os.system ['true']"
    with pytest.raises(SpecError, match="not valid YAML"):
        parse_param_str(p)


def test_builtin_registry_pairs_resolve():
    p = layer_param('name: "hard_roi_mining" type: "Python" python_param { '
                    'module: "roi_data_layer.layer" layer: "OHEMDataLayer" '
                    'param_str: "\'num_classes\': 21" }')
    cls = resolve(p)
    assert cls is PYTHON_LAYERS[("roi_data_layer.layer", "OHEMDataLayer")]
    assert issubclass(cls, Layer)


def test_python_type_is_registered_and_dispatches():
    @__import__("readonly_ohem.caffe.layers.base", fromlist=["register_python"]).register_python(
        "tests.fake", "Doubler")
    class Doubler(Layer):
        def forward(self, bottoms, params):
            return [2 * bottoms[0]]

    p = layer_param('name: "d" type: "Python" bottom: "x" top: "y" '
                    'python_param { module: "tests.fake" layer: "Doubler" }')
    layer = LAYERS["Python"](p, LayerContext())
    assert isinstance(layer, Doubler)
    assert torch.equal(layer([torch.ones(2)], [])[0], torch.full((2,), 2.0))


def test_unknown_pair_is_refused_without_importing(tmp_path, monkeypatch):
    (tmp_path / "evil_layer_mod.py").write_text("raise SystemExit('imported!')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = layer_param('name: "x" type: "Python" top: "t" '
                    'python_param { module: "evil_layer_mod" layer: "Evil" }')
    with pytest.raises(SpecError) as e:
        build_python_layer(p, LayerContext())
    msg = str(e.value)
    assert msg.startswith("layer 'x': Python layer evil_layer_mod.Evil is not registered")
    assert "allow_python_import=True / --allow-python-import" in msg
    assert "evil_layer_mod" not in sys.modules


USER_MODULE = textwrap.dedent('''
    import caffe
    import numpy as np

    class ScaleLayer(caffe.Layer):
        """top = k * bottom, k from param_str; Caffe-style numpy blobs."""

        def setup(self, bottom, top):
            self.k = float(self.params["k"])
            self.setup_calls = getattr(self, "setup_calls", 0) + 1

        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)

        def forward(self, bottom, top):
            top[0].data[...] = self.k * bottom[0].data

        def backward(self, top, propagate_down, bottom):
            if propagate_down[0]:
                bottom[0].diff[...] = self.k * top[0].diff
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"user_scale_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_opt_in_import_wraps_a_caffe_style_class(user_module):
    text = ('force_backward: true\n'
            'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "s" type: "Python" bottom: "x" top: "y" python_param { '
            f'module: "{user_module}" layer: "ScaleLayer" param_str: "k: 2.5" }} }}\n')
    spec = text_format.Parse(text, caffe_pb2.NetParameter())
    with pytest.raises(SpecError, match="not registered"):
        Net(spec, source="u.prototxt")
    net = Net(spec, source="u.prototxt", allow_python_import=True)
    impl = net.layer("s").impl
    assert impl.params == {"k": 2.5} and impl.param_str == "k: 2.5" and impl.phase == 0
    x = torch.arange(6.0).reshape(2, 3)
    blobs = net.forward({"x": x}, retain_diffs=True)
    torch.testing.assert_close(blobs["y"], 2.5 * x)
    seed = torch.ones(2, 3)
    net.backward(blobs, {"y": seed})
    torch.testing.assert_close(net.blob_diffs()["x"], 2.5 * seed)
    net.forward({"x": x})
    assert impl.setup_calls == 1  # setup once, reshape/forward every time


def test_opt_in_import_errors_name_the_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_layer_mod.py").write_text("x = 1 / 0\n")
    ctx = LayerContext(extras={"allow_python_import": True})
    p = layer_param('name: "b" type: "Python" top: "t" '
                    'python_param { module: "broken_layer_mod" layer: "L" }')
    with pytest.raises(SpecError, match="layer 'b': importing Python layer module "
                                        "'broken_layer_mod' failed: ZeroDivisionError"):
        build_python_layer(p, ctx)
    p.python_param.module = "no_such_module_xyz"
    with pytest.raises(SpecError, match="cannot import Python layer module 'no_such_module_xyz'"):
        build_python_layer(p, ctx)
    (tmp_path / "empty_layer_mod.py").write_text("")
    p.python_param.module = "empty_layer_mod"
    with pytest.raises(SpecError, match="module 'empty_layer_mod' has no class 'L'"):
        build_python_layer(p, ctx)


def test_python_layer_without_module_is_an_error():
    p = layer_param('name: "p" type: "Python" top: "t" python_param { layer: "L" }')
    with pytest.raises(SpecError, match="layer 'p': a Python layer needs python_param.module"):
        build_python_layer(p, LayerContext())


def test_blob_shim_has_caffe_accessors():
    from readonly_ohem.caffe.layers.python import Blob

    b = Blob(np.zeros((2, 3, 4, 5), np.float32))
    assert (b.num, b.channels, b.height, b.width, b.count) == (2, 3, 4, 5, 120)
    b.reshape(7, 2)
    assert b.shape == (7, 2) and b.diff.shape == (7, 2)


def test_unregistered_application_layer_names_its_provider(monkeypatch):
    from readonly_ohem.caffe.layers.python import provider_of

    if provider_of("roi_data_layer.layer", "OHEMDataLayer") is None:
        pytest.skip("readonly-ohem's package metadata is not installed (entry points)")
    monkeypatch.delitem(PYTHON_LAYERS, ("roi_data_layer.layer", "OHEMDataLayer"), raising=False)
    p = layer_param('name: "hard" type: "Python" python_param { module: "roi_data_layer.layer" '
                    'layer: "OHEMDataLayer" param_str: "\'num_classes\': 21" }')
    with pytest.raises(SpecError) as e:
        build_python_layer(p, LayerContext())
    msg = str(e.value)
    assert msg.startswith("layer 'hard': Python layer roi_data_layer.layer.OHEMDataLayer is not "
                          "registered")
    assert "provided by readonly_ohem.ohem.layer (package readonly-ohem)" in msg
