"""The readonly branch of an OHEM net, and the precision it runs in (``TRAIN.OHEM_READONLY_DTYPE``).

The readonly branch scores every RoI only so that ``OHEMDataLayer`` can rank them: its layers are
those whose tops are read by OHEM layers or by other layers of the branch alone (in the shipped
nets ``roi_pool5_readonly`` .. ``cls_prob_readonly``, ``bbox_pred_readonly``), found from the
graph, not from names. Its matrix products are most of OHEM's extra cost; with
``TRAIN.OHEM_READONLY_DTYPE: bfloat16`` they run under ``torch.autocast`` (``Net.set_compute_dtype``),
its tops back in float32. The losses then carry bfloat16 rounding (about 3 significant digits),
so RoIs with nearly equal losses may swap: a deliberate, opt-in difference from the original,
whose float32 is the default.
"""

from __future__ import annotations

import torch

from readonly_ohem.errors import ConfigError
from readonly_ohem.ohem.layer import OHEMDataLayer

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def readonly_branch(net) -> list[str]:
    """Names of the layers (file order) whose every top is read only by OHEM layers or by other
    such layers, that compute no gradient and no loss: what only the mining needs."""
    layers = net.layers
    readers: dict[tuple[int, int], list[int]] = {}  # (layer, top) -> layers reading that version
    last: dict[str, tuple[int, int]] = {}
    for i, rec in enumerate(layers):
        for b in rec.bottoms:
            if b in last:
                readers[last[b]].append(i)
        for j, t in enumerate(rec.tops):
            readers[(i, j)] = []
            last[t] = (i, j)
    ohem = {i for i, rec in enumerate(layers) if isinstance(rec.module, OHEMDataLayer)}
    branch: set[int] = set()
    for i in range(len(layers) - 1, -1, -1):
        rec = layers[i]
        if i in ohem or rec.is_source or rec.module is None or rec.need_backward \
                or any(rec.loss_weights):
            continue
        read_by = [r for j in range(len(rec.tops)) for r in readers[(i, j)]]
        if read_by and all(r in ohem or r in branch for r in read_by):
            branch.add(i)
    return [layers[i].name for i in sorted(branch)]


def apply_readonly_dtype(net, cfg) -> list[str]:
    """Run the readonly branch of ``net`` in ``TRAIN.OHEM_READONLY_DTYPE``; returns its layers
    (none for float32). ``ConfigError`` for a dtype that is not float32, bfloat16 or float16."""
    name = str(cfg.TRAIN.OHEM_READONLY_DTYPE)
    if name not in DTYPES:
        raise ConfigError(f"TRAIN.OHEM_READONLY_DTYPE must be one of {', '.join(DTYPES)}, "
                          f"got {name!r}")
    layers = readonly_branch(net)
    net.set_compute_dtype(layers, DTYPES[name])
    return layers if DTYPES[name] is not None else []
