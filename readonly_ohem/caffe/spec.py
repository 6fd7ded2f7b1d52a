"""Reading Caffe specs: text/binary parsing, Caffe's upgrade of old formats, phase filtering.

The one entry point the net uses is ``load_net_spec(path_or_param, phase)`` = read (text, or
binary when the file is binary) + ``upgrade_net`` (Caffe's ``UpgradeNetAsNeeded``) +
``filter_net`` (Caffe's ``Net::FilterNet`` / ``StateMeetsRule``). Every failure is a
``SpecError`` naming the file, and for syntax errors ``FILE:LINE:COL``, as for a byte that
cannot be in a text file (a corrupted byte) when the file is text (``looks_binary``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable

from google.protobuf import text_format
from google.protobuf.message import DecodeError

from readonly_ohem.errors import SpecError
from readonly_ohem.caffe.proto import caffe_pb2

# Caffe's UpgradeV1LayerType: V1 enum name -> layer type string.
V1_TYPE_NAMES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

# Caffe's UpgradeSolverType: SolverParameter.solver_type enum -> type string.
SOLVER_TYPE_NAMES = {"SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad",
                     "RMSPROP": "RMSProp", "ADADELTA": "AdaDelta", "ADAM": "Adam"}

_PHASES = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST}


def v1_type_name(v1_type: int) -> str:
    """The new type string of a ``V1LayerParameter.LayerType`` value (``4`` -> ``"Convolution"``)."""
    name = caffe_pb2.V1LayerParameter.LayerType.Name(v1_type)
    return V1_TYPE_NAMES[name]


def phase_value(phase) -> int:
    """``"TRAIN"``/``"TEST"`` (any case) or ``caffe_pb2.TRAIN``/``TEST`` -> the enum value."""
    if isinstance(phase, str):
        try:
            return _PHASES[phase.upper()]
        except KeyError:
            raise SpecError(f"unknown phase {phase!r}: use TRAIN or TEST") from None
    if phase in (caffe_pb2.TRAIN, caffe_pb2.TEST):
        return int(phase)
    raise SpecError(f"unknown phase {phase!r}: use TRAIN or TEST")


# -- parsing ------------------------------------------------------------------------------------

def _read_bytes(path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, expected a {what} file") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read {what} file: {e.strerror or e}") from None


def _parse_text(text: str, message, source: str):
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        msg = str(e)
        line, col = e.GetLine(), e.GetColumn()
        if line is not None:
            prefix = f"{line}:{col} : "
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
            raise SpecError(f"{source}:{line}:{col}: {msg}") from None
        raise SpecError(f"{source}: {msg}") from None
    return message


# A text prototxt is UTF-8 without control characters besides whitespace (\t \n \v \f \r).
# Decoded with "surrogateescape", each byte that is not UTF-8 becomes one U+DC80..U+DCFF.
_NON_TEXT = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\udc80-\udcff]")
TEXT_SAMPLE = 1 << 16  # bytes of a file looked at to tell text from binary


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def looks_binary(data: bytes) -> bool:
    """True when ``data`` is not a text prototxt: in its first 64 KiB, more than one byte in a
    hundred (and more than one byte) is not text (not UTF-8, or a control character other than
    whitespace).

    A binary NetParameter has a tag or length byte every few bytes (its layer tag, field 100, is
    the pair a2 06: neither UTF-8 nor printable), and blob data is mostly non-text; a text
    prototxt with a corrupted byte or two stays text, so its error keeps ``FILE:LINE:COL``.
    """
    sample = data[:TEXT_SAMPLE]
    return len(_NON_TEXT.findall(_decode(sample))) > max(1, len(sample) // 100)


def decode_text(data: bytes, source: str) -> str:
    """``data`` as text; the first character that cannot be in a text prototxt (a byte that is
    not UTF-8, a control character other than whitespace) is a ``SpecError`` at its
    ``FILE:LINE:COL`` (1-based, columns in characters, as the text parser's errors)."""
    text = _decode(data)
    m = _NON_TEXT.search(text)
    if m is None:
        return text
    i = m.start()
    line = text.count("\n", 0, i) + 1
    col = i - text.rfind("\n", 0, i)
    c = ord(text[i])
    what = (f"byte 0x{c - 0xDC00:02x} is not UTF-8" if c >= 0xDC80
            else f"control character U+{c:04X}")
    raise SpecError(f"{source}:{line}:{col}: {what} (a text prototxt holds printable UTF-8 "
                    "text only; is the file corrupted?)")


def parse_net_text(text: str, source: str = "<string>") -> caffe_pb2.NetParameter:
    """Parse a text prototxt (not upgraded). Syntax errors: ``SpecError("SOURCE:LINE:COL: ...")``."""
    return _parse_text(text, caffe_pb2.NetParameter(), source)


def read_net(path) -> caffe_pb2.NetParameter:
    """Parse a text prototxt file as written (no upgrade, no filtering)."""
    data = _read_bytes(path, "net prototxt")
    if looks_binary(data):
        raise SpecError(f"{path}: not a text prototxt (binary data); "
                        "for a binary net use read_net_binary")
    return parse_net_text(decode_text(data, str(path)), str(path))


def read_net_binary(path) -> caffe_pb2.NetParameter:
    """Parse a binary NetParameter (a .caffemodel or binaryproto net), not upgraded."""
    data = _read_bytes(path, "binary net")
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data)
    except DecodeError as e:
        raise SpecError(f"{path}: not a valid binary NetParameter (corrupt or truncated): {e}") from None
    return net


def read_solver(path) -> caffe_pb2.SolverParameter:
    """Parse a text solver prototxt and apply Caffe's solver upgrade (solver_type -> type)."""
    data = _read_bytes(path, "solver prototxt")
    if looks_binary(data):
        raise SpecError(f"{path}: not a text solver prototxt (binary data)")
    solver = _parse_text(decode_text(data, str(path)), caffe_pb2.SolverParameter(), str(path))
    return upgrade_solver(solver, str(path))


def upgrade_solver(solver, source: str = "<string>"):
    """Caffe's UpgradeSolverAsNeeded: the old ``solver_type`` enum becomes the ``type`` string."""
    if solver.HasField("solver_type"):
        if solver.HasField("type"):
            raise SpecError(f"{source}: solver sets both the old 'solver_type' and the new 'type'; "
                            "keep only 'type'")
        name = caffe_pb2.SolverParameter.SolverType.Name(solver.solver_type)
        solver.type = SOLVER_TYPE_NAMES[name]
        solver.ClearField("solver_type")
    return solver


def resolve_path(ref: str, relative_to) -> Path:
    """A path named inside a spec file (a solver's ``train_net``): as given if it exists
    (relative to the CWD, as Caffe), else relative to the directory of the file ``relative_to``.
    Returns the CWD-relative path when neither exists, so the later error names it as written."""
    p = Path(ref)
    if p.is_absolute() or p.exists():
        return p
    alt = Path(relative_to).resolve().parent / p
    return alt if alt.exists() else p


def solver_net_path(solver, solver_path) -> Path:
    """The train net a solver names (``train_net`` or ``net``), resolved by ``resolve_path``."""
    ref = solver.train_net or solver.net
    if not ref:
        raise SpecError(f"{solver_path}: the solver names no 'train_net' (or 'net')")
    path = resolve_path(ref, solver_path)
    if not path.exists():
        raise SpecError(f"{solver_path}: train net {ref!r} not found (looked relative to the "
                        f"current directory and to {Path(solver_path).resolve().parent})")
    return path


def non_finite_fields(message, prefix: str = "") -> list[tuple[str, float]]:
    """``[(field path, value)]`` of every NaN or infinite float in ``message`` and the messages
    it holds (``"lrn_param.beta"``, ``"loss_weight[1]"``), in field order; ``blobs`` (weights
    carried in a binary spec) are not looked at."""
    out = []
    for fd, value in message.ListFields():
        if fd.name == "blobs":
            continue
        repeated = fd.is_repeated
        values = list(value) if repeated else [value]
        for i, v in enumerate(values):
            path = f"{prefix}{fd.name}" + (f"[{i}]" if repeated else "")
            if fd.cpp_type == fd.CPPTYPE_MESSAGE:
                out += non_finite_fields(v, path + ".")
            elif fd.cpp_type in (fd.CPPTYPE_FLOAT, fd.CPPTYPE_DOUBLE) and not math.isfinite(v):
                out.append((path, v))
    return out


# -- upgrade (Caffe's upgrade_proto.cpp) -----------------------------------------------------

_V1_PARAM_FIELDS = [f.name for f in caffe_pb2.V1LayerParameter.DESCRIPTOR.fields
                    if f.name.endswith("_param")]


def _upgrade_v1_data_transform(net) -> None:
    """Caffe's UpgradeNetDataTransformation: V1 data layers' scale/mean_file/crop_size/mirror move
    into transform_param."""
    V1 = caffe_pb2.V1LayerParameter
    kinds = {V1.DATA: "data_param", V1.IMAGE_DATA: "image_data_param",
             V1.WINDOW_DATA: "window_data_param"}
    for v1 in net.layers:
        field = kinds.get(v1.type)
        if field is None:
            continue
        src = getattr(v1, field)
        dst = v1.transform_param
        for name in ("scale", "mean_file", "crop_size", "mirror"):
            if src.HasField(name):
                setattr(dst, name, getattr(src, name))
                src.ClearField(name)


def upgrade_v1_layer(v1, out=None) -> caffe_pb2.LayerParameter:
    """Caffe's UpgradeV1LayerParameter: one ``layers { ... }`` entry -> a ``LayerParameter``."""
    layer = out if out is not None else caffe_pb2.LayerParameter()
    layer.Clear()
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    if v1.HasField("name"):
        layer.name = v1.name
    for rule in v1.include:
        layer.include.add().CopyFrom(rule)
    for rule in v1.exclude:
        layer.exclude.add().CopyFrom(rule)
    if v1.HasField("type"):
        layer.type = v1_type_name(v1.type)
    for blob in v1.blobs:
        layer.blobs.add().CopyFrom(blob)

    def param(i):
        while len(layer.param) <= i:
            layer.param.add()
        return layer.param[i]

    for i, name in enumerate(v1.param):
        param(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        param(i).share_mode = mode  # STRICT/PERMISSIVE have the same numbers in both enums
    for i, lr in enumerate(v1.blobs_lr):
        param(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        param(i).decay_mult = decay
    layer.loss_weight.extend(v1.loss_weight)
    for field in _V1_PARAM_FIELDS:
        if v1.HasField(field):
            getattr(layer, field).CopyFrom(getattr(v1, field))
    return layer


def _upgrade_input(net, source: str) -> None:
    """Caffe's UpgradeNetInput: net-level ``input`` + ``input_shape``/``input_dim`` become one
    Input layer named "input", first in the net; ``input`` alone (old caffemodels) is dropped."""
    has_shape, has_dim = len(net.input_shape) > 0, len(net.input_dim) > 0
    if has_shape or has_dim:
        n = len(net.input)
        if has_shape and len(net.input_shape) != n:
            raise SpecError(f"{source}: {n} net input(s) but {len(net.input_shape)} input_shape(s)")
        if not has_shape and len(net.input_dim) != 4 * n:
            raise SpecError(f"{source}: {n} net input(s) need {4 * n} input_dim values "
                            f"(4 per input), got {len(net.input_dim)}")
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        for i, top in enumerate(net.input):
            layer.top.append(top)
            shape = layer.input_param.shape.add()
            if has_shape:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i:4 * i + 4])
        old = list(net.layer)
        del net.layer[:]
        net.layer.add().CopyFrom(layer)
        for lp in old:
            net.layer.add().CopyFrom(lp)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")


def upgrade_net(net_param, source: str = "<string>") -> caffe_pb2.NetParameter:
    """Caffe's UpgradeNetAsNeeded on a copy: V1 ``layers`` -> ``layer``, net inputs -> an Input
    layer, old 3-param BatchNorm -> lr/decay 0. ``source`` names the file in errors."""
    net = caffe_pb2.NetParameter()
    net.CopyFrom(net_param)
    if len(net.layers):
        if len(net.layer):
            raise SpecError(f"{source}: the net mixes new 'layer' and old V1 'layers' fields; "
                            "use one format")
        _upgrade_v1_data_transform(net)
        v1_layers = list(net.layers)
        net.ClearField("layers")
        for v1 in v1_layers:
            upgrade_v1_layer(v1, net.layer.add())
    if len(net.input):
        _upgrade_input(net, source)
    for layer in net.layer:  # Caffe's UpgradeNetBatchNorm
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for p in layer.param:
                p.lr_mult = 0.0
                p.decay_mult = 0.0
    return net


# -- filtering (Caffe's Net::FilterNet / StateMeetsRule) --------------------------------------

def state_meets_rule(state, rule) -> bool:
    """Caffe's StateMeetsRule: phase equal (if set), level within [min_level, max_level] (if
    set), every ``stage`` present in the state, no ``not_stage`` present."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def net_state(net_param, phase, level: int = 0, stages: Iterable[str] = ()) -> caffe_pb2.NetState:
    """The NetState Caffe's ``Net(file, phase, level, stages)`` uses: the file's ``state`` with
    phase and level replaced and ``stages`` appended to its stages."""
    state = caffe_pb2.NetState()
    state.CopyFrom(net_param.state)
    state.phase = phase_value(phase)
    state.level = int(level)
    state.stage.extend(stages)
    return state


def filter_net(net_param, phase, level: int = 0, stages: Iterable[str] = (),
               source: str = "<string>") -> caffe_pb2.NetParameter:
    """Caffe's FilterNet on a copy: a layer with no include rules is kept unless ANY exclude rule
    is met; a layer with include rules is kept if ANY is met. The result's ``state`` is the state
    used; ``layer.phase`` is left as written."""
    state = net_state(net_param, phase, level, stages)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    out.ClearField("layer")
    out.state.CopyFrom(state)
    for layer in net_param.layer:
        if len(layer.include) and len(layer.exclude):
            raise SpecError(f"{source}: layer {layer.name!r}: specify either include rules or "
                            "exclude rules, not both")
        if len(layer.include):
            keep = any(state_meets_rule(state, r) for r in layer.include)
        else:
            keep = not any(state_meets_rule(state, r) for r in layer.exclude)
        if keep:
            out.layer.add().CopyFrom(layer)
    return out


# -- the entry point ----------------------------------------------------------------------------

def read_net_any(path) -> caffe_pb2.NetParameter:
    """Read a net file as text, or as a binary NetParameter when the bytes are not text
    (``looks_binary``); a text file's errors name ``FILE:LINE:COL``."""
    data = _read_bytes(path, "net prototxt")
    if looks_binary(data):
        net = caffe_pb2.NetParameter()
        try:
            net.ParseFromString(data)
        except DecodeError as e:
            raise SpecError(f"{path}: neither a text prototxt nor a valid binary NetParameter "
                            f"({e})") from None
        return net
    return parse_net_text(decode_text(data, str(path)), str(path))


def load_net_spec(path_or_param, phase, level: int = 0, stages: Iterable[str] = (),
                  source: str | None = None) -> caffe_pb2.NetParameter:
    """What ``Net`` builds from: read (path, text or binary; or a NetParameter, not modified),
    upgrade as Caffe, keep the layers of ``phase``/``level``/``stages``."""
    if isinstance(path_or_param, (str, os.PathLike)):
        src = source or str(path_or_param)
        raw = read_net_any(path_or_param)
    elif isinstance(path_or_param, caffe_pb2.NetParameter):
        src = source or "<NetParameter>"
        raw = path_or_param
    else:
        raise TypeError(f"load_net_spec: expected a path or NetParameter, got {type(path_or_param)}")
    return filter_net(upgrade_net(raw, src), phase, level, stages, source=src)
