"""``readonly-ohem run``: one forward (and backward), or N solver iterations, on arrays from a file.

IN.npz holds arrays by blob name (net inputs, or tops of data layers: a data layer whose tops
are all given is not built). Keys ``batch<k>/<blob>`` give K batches: forward pass number f
(counting ``iter_size`` passes per solver iteration) takes batch ``f mod K``; plain keys apply to
every pass. OUT.npz gets every blob by name (in-place blobs: the final value; scalar losses as
0-d arrays); with ``--backward`` (or ``--top-diff``) also ``diff/<blob>`` (Caffe's meaning: for
an in-place chain, the diff left after the whole backward) and ``param_diff/<layer>/<i>`` (shared
params under each layer using them); with ``--solver``: ``loss_per_iter`` (the weighted total,
mean over the ``iter_size`` passes, Caffe's reported loss), ``lr_per_iter``, for each loss top T
``T_per_iter`` (T's own value per iteration, unweighted, mean over the passes; ``top/T_per_iter``
for a top named ``loss`` or ``lr``) and ``final_param/<layer>/<i>``.
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from readonly_ohem import python_layers  # noqa: F401  (registers RoIDataLayer, OHEMDataLayer)
from readonly_ohem.caffe import use_caffe_float32
from readonly_ohem.caffe.net import Net
from readonly_ohem.caffe.solver import Solver
from readonly_ohem.caffe.spec import read_solver
from readonly_ohem.config import load_config
from readonly_ohem.errors import DataError, SpecError

_BATCH_KEY = re.compile(r"^batch(\d+)/(.+)$")


def read_npz(path, what: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz file; ``DataError`` naming the file when it cannot be read."""
    try:
        if Path(path).is_file() and not zipfile.is_zipfile(path):  # numpy would talk of pickles
            raise DataError(f"{path}: {what} must be an .npz archive of arrays by blob name "
                            f"(numpy.savez)")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz {what} file ({e})") from None


def split_batches(arrays: dict[str, np.ndarray], source: str) -> list[dict[str, np.ndarray]]:
    """``batch<k>/<blob>`` keys -> one feed per batch k = 0..K-1 (plain keys added to each)."""
    plain = {k: v for k, v in arrays.items() if not _BATCH_KEY.match(k)}
    batches: dict[int, dict[str, np.ndarray]] = {}
    for k, v in arrays.items():
        m = _BATCH_KEY.match(k)
        if m:
            batches.setdefault(int(m.group(1)), {})[m.group(2)] = v
    if not batches:
        return [plain]
    K = max(batches) + 1
    missing = [k for k in range(K) if k not in batches]
    if missing:
        raise DataError(f"{source}: batch keys must number 0..{K - 1}; batch{missing[0]}/... "
                        "is missing")
    return [{**plain, **batches[k]} for k in range(K)]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _scalar_blobs(net) -> set[str]:
    """Blobs Caffe holds as 0-d: the tops of loss layers and of Accuracy."""
    names = set(net.loss_weights)
    for rec in net.layers:
        if rec.type.endswith("Loss") or rec.type == "Accuracy" or \
                getattr(rec.module, "loss_by_default", False):
            names.update(rec.tops)
    return names


def _blob_outputs(net, blobs, prefix: str = "") -> dict[str, np.ndarray]:
    scalars = _scalar_blobs(net)
    out = {}
    for name, t in blobs.items():
        a = _to_numpy(t)
        if name in scalars and a.size == 1:
            a = a.reshape(())
        out[prefix + name] = a
    return out


def _as_float32(arrays: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Caffe blobs are float32 (labels are float class ids): numeric arrays are converted."""
    out = {}
    for k, v in arrays.items():
        if not (np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_):
            raise DataError(f"{source}: array {k!r} has dtype {v.dtype}, expected numbers")
        out[k] = v.astype(np.float32, copy=False)
    return out


def _check_feed(net, feed: dict, source: str) -> None:
    sources = {t for r in net.layers if r.is_source for t in r.tops}
    for name in feed:
        if name not in sources:
            raise SpecError(f"{source}: array {name!r} is not a net input or data-layer top of "
                            f"{net.source} (those are: {', '.join(sorted(sources)) or 'none'})")
    for rec in net.layers:
        if hasattr(rec.module, "set_roidb"):  # a RoI data layer: `run` has no roidb to give it
            missing = [t for t in rec.tops if t not in feed]
            raise SpecError(f"{source}: layer {rec.name!r} ({rec.type}) is a data layer that "
                            "`run` cannot drive; give all its tops so that it is skipped "
                            f"(missing: {', '.join(missing)})")
        if rec.type == "Input":
            for t in rec.tops:
                if t not in feed:
                    print(f"note: net input {t!r} is not in {source}; it holds zeros of its "
                          "declared shape", file=sys.stderr)


def run_command(prototxt, inputs, out, weights=None, phase: str = "TRAIN", backward: bool = False,
                top_diff=None, solver=None, iters: int = 1, cfg=(), set_pairs=(),
                allow_python_import: bool = False) -> int:
    """One forward/backward (or ``iters`` solver iterations) of ``prototxt`` on ``inputs``."""
    use_caffe_float32()  # Caffe computes in true float32: no TF32 on GPUs
    config = load_config(cfg or (), set_pairs or ())
    feeds = split_batches(_as_float32(read_npz(inputs, "inputs"), str(inputs)), str(inputs))
    if solver is not None:
        phase = "TRAIN"  # a solver trains its TRAIN-phase net
    shapes = {k: tuple(v.shape) for k, v in feeds[0].items()}
    net = Net.from_file(prototxt, phase=phase, cfg=config, input_shapes=shapes,
                        allow_python_import=allow_python_import)
    for f in feeds:
        _check_feed(net, f, str(inputs))
    if weights:
        report = net.load_caffemodel(weights)
        print(str(report), file=sys.stderr)
    if solver is not None:
        result = _run_solver(net, solver, feeds, iters)
    else:
        result = _run_once(net, feeds[0], backward or top_diff is not None, top_diff)
    _write_npz(out, result)
    print(f"wrote {out}: {len(result)} arrays")
    return 0


def _run_once(net, feed, backward: bool, top_diff) -> dict[str, np.ndarray]:
    if not backward:
        with torch.no_grad():
            return _blob_outputs(net, net.forward(feed))
    diffs = (_as_float32(read_npz(top_diff, "top diff"), str(top_diff))
             if top_diff is not None else None)
    for p in net.learnable_params():
        p.tensor.grad = None
    blobs = net.forward(feed, retain_diffs=True)
    if diffs:
        for name, d in diffs.items():
            if name not in blobs:
                raise SpecError(f"{top_diff}: array {name!r} is not a blob of {net.source}")
            if d.size != blobs[name].numel():
                raise SpecError(f"{top_diff}: diff {name!r} has shape {list(d.shape)}, the blob "
                                f"is {list(blobs[name].shape)}")
    net.backward(blobs, diffs)
    result = _blob_outputs(net, blobs)
    result.update(_blob_outputs(net, net.blob_diffs(), prefix="diff/"))
    for layer, grads in net.param_diffs().items():
        for i, g in enumerate(grads):
            result[f"param_diff/{layer}/{i}"] = _to_numpy(g)
    return result


def _run_solver(net, solver_path, feeds, iters: int) -> dict[str, np.ndarray]:
    if iters < 1:
        raise SpecError(f"--iters must be >= 1, got {iters}")
    param = read_solver(solver_path)
    s = Solver(param, net, source=solver_path)
    passes = [0]

    def feed_fn(i: int):
        f = feeds[passes[0] % len(feeds)]
        passes[0] += 1
        return f

    losses, rates, tops = [], [], {}
    for _ in range(iters):
        r = s.step(feed_fn)
        losses.append(r["loss"])
        rates.append(r["lr"])
        for top, value in r["losses"].items():
            tops.setdefault(top, []).append(value)
    result = {"loss_per_iter": np.asarray(losses, dtype=np.float64),
              "lr_per_iter": np.asarray(rates, dtype=np.float64)}
    for top, values in tops.items():  # each loss top, unweighted, mean over the iter_size passes
        key = f"{top}_per_iter"
        result["top/" + key if key in result else key] = np.asarray(values, dtype=np.float64)
    for rec in net.layers:
        for i, p in enumerate(net.layer_params(rec.name)):
            result[f"final_param/{rec.name}/{i}"] = _to_numpy(p)
    return result


def _write_npz(path, arrays: dict[str, np.ndarray]) -> None:
    path = Path(path)
    try:
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    except OSError as e:
        raise DataError(f"{path}: cannot write the output file ({e.strerror or e})") from None
