"""The layer table Caffe prints at start-up, without running the net (``readonly-ohem net``).

For each layer: name, type, bottoms -> tops with their shapes, learnable params with shapes,
shared names (and the owner) and the effective lr/decay mults (after Caffe's adoption of a
sharer's mults); then totals (learnable values, shared counted once; memory for the data blobs,
counted per top as Caffe's "Memory required for data").

The net is built by the caller (``commands/net.py``): data layers (Python ones included) are
not built or run there, their tops take the shapes given (``--shape BLOB=d0,d1,...``), as do net
inputs when given; params live on the meta device (no memory, no fill) unless weights are loaded.
"""

from __future__ import annotations

import math


def _dims(shape) -> str:
    """Caffe's "Top shape: 1 3 224 224 (150528)" form; a 0-d blob is "scalar (1)"."""
    return (" ".join(str(d) for d in shape) or "scalar") + f" ({math.prod(shape)})"


def summarize(net) -> dict:
    """The full summary of a built ``Net`` (what the table shows): ``{"name", "phase",
    "layers": [...], "blobs": {name: dims}}``; ``json_summary`` keeps the documented keys."""
    layers = []
    unique = net.learnable_params()
    for rec in net.layers:
        params = []
        for j, pid in enumerate(rec.param_ids):
            info = net.param_info(pid)
            lp = unique[pid]
            params.append({
                "name": info.name or str(j),  # Caffe's display name: the param name, else its index
                "shape": list(info.shape),
                "lr_mult": lp.lr_mult,
                "decay_mult": lp.decay_mult,
                "shared": bool(info.name) and len(info.users) > 1,
                "owner": info.owner,
            })
        layers.append({
            "name": rec.name,
            "type": rec.type,
            "bottoms": list(rec.bottoms),
            "tops": list(rec.tops),
            "top_shapes": [list(s) for s in rec.top_shapes],
            "inplace": [t for t, ip in zip(rec.tops, rec.inplace) if ip],
            "loss_weights": {t: w for t, w in zip(rec.tops, rec.loss_weights) if w},
            "params": params,
        })
    return {"name": net.net_name, "phase": net.phase, "layers": layers,
            "blobs": {k: list(v) for k, v in net.blob_shapes.items()}}


def json_summary(summary: dict) -> dict:
    """The ``--json`` form, exactly the documented keys: ``{"layers": [{"name", "type", "bottoms",
    "tops", "params": [{"name", "shape", "lr_mult", "decay_mult"}]}], "blobs": {name: dims}}``."""
    param_keys = ("name", "shape", "lr_mult", "decay_mult")
    layers = [{"name": layer["name"], "type": layer["type"], "bottoms": layer["bottoms"],
               "tops": layer["tops"],
               "params": [{k: p[k] for k in param_keys} for p in layer["params"]]}
              for layer in summary["layers"]]
    return {"layers": layers, "blobs": summary["blobs"]}


def format_table(net, summary: dict) -> str:
    lines = [f'Net "{summary["name"]}" ({net.source}, phase {summary["phase"]})']
    shapes_now: dict[str, tuple] = {}
    data_memory = 0
    for i, (rec, layer) in enumerate(zip(net.layers, summary["layers"])):
        lines.append(f"[{i:3d}] {rec.name} ({rec.type})")
        bottoms = ", ".join(rec.bottoms) if rec.bottoms else "(none)"
        lines.append(f"      bottoms: {bottoms}")
        for t, s, ip, w in zip(rec.tops, rec.top_shapes, rec.inplace, rec.loss_weights):
            note = " [in-place]" if ip else ""
            if w:
                note += f" [loss weight {w:g}]"
            lines.append(f"      top {t}: {_dims(s)}{note}")
            data_memory += 4 * math.prod(s)
            shapes_now[t] = s
        for j, p in enumerate(layer["params"]):
            shared = ""
            if p["shared"]:
                shared = f" shared '{p['name']}'" + (f" (owner {p['owner']})"
                                                      if p["owner"] != rec.name else " (owner)")
            lines.append(f"      param {j}: {_dims(tuple(p['shape']))} lr_mult {p['lr_mult']:g} "
                         f"decay_mult {p['decay_mult']:g}{shared}")
    unique = net.learnable_params()
    n_values = sum(math.prod(net.param_info(k).shape) for k in range(len(unique)))
    trainable = sum(math.prod(net.param_info(k).shape) for k, q in enumerate(unique)
                    if q.lr_mult != 0)
    lines.append(f"Totals: {len(net.layers)} layers, {len(net.blob_shapes)} blobs; "
                 f"{n_values:,} learnable values in {len(unique)} param blobs (shared counted "
                 f"once; {trainable:,} with lr_mult != 0, {4 * n_values / 2**20:.1f} MiB)")
    lines.append(f"Memory required for data: {data_memory:,} bytes "
                 f"({data_memory / 2**20:.1f} MiB, float32, every top counted as Caffe does)")
    if net.loss_weights:
        lines.append("Losses: " + ", ".join(f"{t} x {w:g}" for t, w in net.loss_weights.items()))
    return "\n".join(lines)
