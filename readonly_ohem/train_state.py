"""The training state file ``--resume`` reads: safetensors and JSON, nothing that can run code.

A snapshot's ``…_iter_{n}.state.safetensors`` is one `safetensors <https://github.com/huggingface/safetensors>`_
file: a length-prefixed JSON header, then raw tensor bytes. Reading it parses; it never executes
anything the file names (a pickle — ``torch.save``, the ``.state.pt`` of earlier versions — can).

- Tensors, each under its place in the state, ``/``-joined: ``weights/<param key>`` (the learnable
  params as trained), ``solver/history/<param key>`` (momentum), ``rng/torch`` (torch's generator,
  uint8), ``rng/cuda/<i>``; under torchrun ``ranks/<r>/rng/torch`` for every process.
- Metadata ``format`` = ``FORMAT``, and ``state``: the rest as JSON, each tensor replaced by
  ``{"$tensor": "<its name>"}``: ``iter``; ``solver`` (``iter``, ``current_step``, ``history``, the
  loss windows ``losses``/``blob_losses``); ``rng`` (``numpy``: MT19937 ``name, keys, pos,
  has_gauss, cached_gaussian``; ``python``: ``version, internal, gauss_next``); ``data`` (each data
  layer's order, cursor and random state); ``layer_rng`` (layer name -> the MT19937 state of each
  layer with a generator of its own: the RPN layers' subsampling); ``config`` (the config tree,
  for the record and a warning when a resume changes it); ``ranks`` (torchrun: each process's
  ``rng``, ``data`` and ``layer_rng``).

Inspect one with ``safetensors.safe_open(path, "pt")`` (``.keys()``, ``.metadata()``) or ``json`` on
its header. Written atomically (``readonly_ohem.atomic``). Anything else is refused with one line
naming the file: a pickle, a truncated or foreign file, a tensor the JSON names but the file lacks;
``require`` names the key a state lacks.
"""

from __future__ import annotations

import glob
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from readonly_ohem.atomic import atomic_write
from readonly_ohem.errors import ConfigError

FORMAT = "readonly-ohem train state 2"
SUFFIX = ".state.safetensors"
LEGACY_SUFFIX = ".state.pt"  # pickles of readonly-ohem <= 0.1: refused, never unpickled
_TENSOR = "$tensor"
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle")


# -- RNG states as tensors and JSON -----------------------------------------------------------------
def rng_state() -> dict:
    """This process's torch (and CUDA) generator states as uint8 tensors; numpy's and Python's
    ``random`` state as JSON-able ints and floats (exact: JSON keeps a float's every bit)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": dict(name=name, keys=keys.tolist(), pos=int(pos), has_gauss=int(has_gauss),
                           cached_gaussian=float(gauss)),
             "python": dict(version=version, internal=list(internal), gauss_next=gauss_next)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _apply_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_rng_state(state: dict, path: str | Path = "<state>", key: str = "rng") -> None:
    """Restore ``rng_state()``. A malformed part is a ``ConfigError`` naming ``path`` and its key,
    and leaves every generator as it was."""
    for part in ("torch", "numpy", "python"):
        require(state, part, path, prefix=key)
    before = rng_state()
    for part in ("torch", "numpy", "python", "cuda"):
        try:
            _apply_rng_state({**before, part: state[part]} if part in state else before)
        except Exception as e:  # noqa: BLE001 - torch, numpy and random each raise their own
            _apply_rng_state(before)
            raise ConfigError(f"{path}: key '{key}.{part}' is not a {part} generator state "
                              f"({type(e).__name__}: {e})") from None
    _apply_rng_state(state)


# -- nested dict <-> (JSON, tensors) -------------------------------------------------------------
def _encode(obj, name: str, tensors: dict) -> Any:
    """``obj`` as JSON, its tensors moved to ``tensors`` under their ``/``-joined place."""
    if isinstance(obj, torch.Tensor):
        if name in tensors:
            raise ValueError(f"two tensors of the training state would be named {name!r}")
        tensors[name] = obj.detach().cpu().contiguous()
        return {_TENSOR: name}
    if isinstance(obj, dict):
        return {str(k): _encode(v, f"{name}/{k}" if name else str(k), tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, f"{name}/{i}" if name else str(i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state: {name!r} is a {type(obj).__name__}, not JSON or a tensor")


def _decode(obj, tensors: dict, path: Path) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            name = obj[_TENSOR]
            if not isinstance(name, str) or name not in tensors:
                raise ConfigError(f"{path}: the state names tensor {name!r}, which the file does "
                                  "not hold (damaged or not written by readonly-ohem)")
            return tensors[name]
        return {k: _decode(v, tensors, path) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors, path) for v in obj]
    return obj


def save_state(path: str | Path, state: dict) -> None:
    """Write ``state`` (a dict of dicts/lists of tensors and JSON values) as one safetensors file,
    atomically (a killed write leaves the previous file)."""
    tensors: dict[str, torch.Tensor] = {}
    body = _encode(state, "", tensors)
    storages = set()
    for name, t in tensors.items():  # safetensors stores no aliases: copy a tensor sharing memory
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:
            tensors[name] = t.clone()
        storages.add(ptr)
    data = safetensors.torch.save(tensors, metadata={"format": FORMAT, "state": json.dumps(body)})
    with atomic_write(path) as f:
        f.write(data)


# -- reading -------------------------------------------------------------------------------------
def _looks_like_pickle(path: Path) -> bool:
    """A ``torch.save`` zip or a binary pickle (protocol 2+), for the refusal message only."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) == 9 and head[8:9] == b"{":  # a safetensors header (length, then JSON)
        return False
    return (head.startswith(b"PK\x03\x04") or path.suffix in _PICKLE_SUFFIXES
            or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5))


def _read(path: Path, with_tensors: bool) -> dict:
    """The decoded state; without tensors, each stands as None (only the header is read)."""
    if not path.is_file():
        raise ConfigError(f"{path}: training state not found")
    try:
        handle = safetensors.safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors' own error class varies by version
        if _looks_like_pickle(path):
            raise ConfigError(f"{path}: not a readonly-ohem training state but a pickle (torch.save; "
                              f"the {LEGACY_SUFFIX} of earlier versions): refused, since loading a "
                              f"pickle can run any code it names; resume from a {SUFFIX}") from None
        raise ConfigError(f"{path}: not a readonly-ohem training state, or a truncated one "
                          f"(safetensors: {e})") from None
    with handle:
        meta = handle.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{path}: not a readonly-ohem training state (format "
                              f"{meta.get('format')!r}, expected {FORMAT!r})")
        try:
            body = json.loads(meta.get("state", ""))
        except (ValueError, RecursionError) as e:
            raise ConfigError(f"{path}: the training state's JSON does not parse ({e})") from None
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: the training state's JSON is not an object")
        try:
            tensors = {k: handle.get_tensor(k) if with_tensors else None for k in handle.keys()}
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{path}: cannot read the training state's tensors ({e})") from None
    try:
        return _decode(body, tensors, path)
    except RecursionError:
        raise ConfigError(f"{path}: the training state's JSON is nested too deeply") from None


def check_state(path: str | Path) -> None:
    """Raise ``ConfigError`` unless ``path`` is a whole training state: readable header, our
    format, JSON that parses, every tensor it names present and inside the file (safetensors
    checks that the tensors cover the file exactly, so a truncated file fails here). Reads no
    tensor bytes."""
    _read(Path(path), with_tensors=False)


def read_state(path: str | Path) -> dict:
    """The state ``save_state`` wrote, tensors on the CPU; ``ConfigError`` naming ``path`` for
    anything else (see ``check_state``). Nothing in the file is executed."""
    return _read(Path(path), with_tensors=True)


_KINDS = {int: "an integer", float: "a number", str: "a string", dict: "an object",
          list: "a list", torch.Tensor: "a tensor"}


def require(state: dict, key: str, path: str | Path, kind: type | None = None, prefix: str = ""):
    """``state[k1][k2]…`` for ``key = "k1.k2"``, else a ``ConfigError`` naming ``path`` and the
    key (``prefix.key`` when given); ``kind``: the type the value must have."""
    full = f"{prefix}.{key}" if prefix else key
    node = state
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise ConfigError(f"{path}: the training state has no key {full!r}")
    if kind is not None:
        ok = isinstance(node, (int, float) if kind is float else kind)
        if not ok or (kind in (int, float) and isinstance(node, bool)):
            raise ConfigError(f"{path}: key {full!r} of the training state should be "
                              f"{_KINDS.get(kind, kind.__name__)}, not {type(node).__name__}")
    return node


# -- finding the newest one ----------------------------------------------------------------------
_STATE_NAME = re.compile(r"^(?P<stem>.+)_iter_(?P<iter>\d+)\.state\.(safetensors|pt)$")


def snapshot_states(stem: Path, legacy: bool = False) -> list[Path]:
    """The ``{stem}_iter_{n}.state.safetensors`` files (``legacy``: the ``.state.pt`` ones), newest
    first (highest n; equal n: latest mtime)."""
    suffix = LEGACY_SUFFIX if legacy else SUFFIX
    found = []
    for p in stem.parent.glob(f"{glob.escape(stem.name)}_iter_*{suffix}"):
        m = _STATE_NAME.match(p.name)
        if m and m["stem"] == stem.name and p.name.endswith(suffix):
            found.append((int(m["iter"]), p.stat().st_mtime_ns, p))
    return [p for *_, p in sorted(found, key=lambda t: t[:2], reverse=True)]


def state_stem(path: str | Path) -> Path | None:
    """``DIR/prefix`` of a snapshot state ``DIR/prefix_iter_{n}.state.{safetensors,pt}``, else None."""
    path = Path(path)
    m = _STATE_NAME.match(path.name)
    return path.with_name(m["stem"]) if m else None


def newest_loadable(stem: Path, exclude: Path | None = None) -> tuple[Path | None, list]:
    """(the newest state of ``stem`` that passes ``check_state``, or None; [(newer path that
    did not, why), ...]). ``exclude``: a path not to consider."""
    skipped = []
    for p in snapshot_states(stem):
        if exclude is not None and p.resolve() == Path(exclude).resolve():
            continue
        try:
            check_state(p)
        except ConfigError as e:
            skipped.append((p, str(e).removeprefix(f"{p}: ")))
            continue
        return p, skipped
    return None, skipped
