"""Caffe's need-backward analysis (``Net::Init``), run on the net as ``InsertSplits`` rewrites it.

Caffe decides which layers run backward, which bottoms get a diff and which params a gradient
on the net *with* the Split layers that ``InsertSplits`` adds wherever a blob has several
consumers (a loss top counts as one more). ``BackwardPlan`` builds that graph, runs Caffe's two
passes on it and writes the result back onto the ``LayerRecord``s; the ``Net`` then runs a layer
with no backward under ``torch.no_grad()``, detaches a bottom that gets no gradient and gives a
param no gradient where Caffe computes none. This is what makes OHEM's readonly head keep no
graph, without special-casing any name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from readonly_ohem.caffe.net.build import LayerRecord

Top = tuple[int, int]  # (layer index, top index): one blob version, as produced


@dataclass
class _Node:
    """A layer of the split graph: one of the net's layers (``rec``), or an inserted Split
    (``split``: the (layer, top) it copies). Blob names of split copies contain ``"\\x00"``."""

    split: Top | None
    bottoms: list[str]
    tops: list[str]
    pd: list | None  # per bottom: propagate_down (True/False) or None (not given); None: no list
    params: list[bool]  # per param: lr_mult != 0
    loss: list[float]  # per top
    force: list[bool]  # per bottom: AllowForceBackward
    rec: LayerRecord | None
    layer: int | None = None  # rec's index in the records
    # the analysis
    need: bool = False
    bneed: list[bool] = field(default_factory=list)  # per bottom
    pgrad: list[bool] = field(default_factory=list)  # per param


class BackwardPlan:
    """Caffe's need-backward analysis on the records of a built net (file order):

    - forward: a layer needs backward if a bottom blob needs it or a param has lr_mult != 0; its
      tops then need it; a bottom's flag is its ``propagate_down`` when given, else the blob's;
    - backward (last layer first): a layer contributes to the loss if a top has a loss weight
      or is under the loss; a layer all of whose tops some consumer does not backprop into is
      skipped with all its bottoms; a layer not contributing to the loss does no backward;
    - ``force_backward``: every layer does backward, bottoms where the layer allows it.

    A bottom the layer class cannot backprop into (``backprop_to_bottoms`` False, or not in its
    ``grad_bottoms``) counts as ``propagate_down: false``: Caffe would run a no-op there.

    Sets each record's ``need_backward``, ``bottom_grad`` and ``param_grad``, and gives the
    ``Net``: ``leaf_grad`` {(blob, version): produced by a source} for every blob version whose
    diff some consumer computes, and ``diff_version`` {blob: the version whose gradient Caffe
    leaves in the blob's diff}.
    """

    def __init__(self, records: list[LayerRecord], force_backward: bool):
        self._bottom_src, counts = self._consumers(records)
        nodes = self._split_graph(records, counts)
        self._forward(nodes)
        self._backward(nodes)
        if force_backward:
            self._force_backward(nodes)
        self._map_back(nodes)
        self.leaf_grad = self._leaf_grads(records)
        self.diff_version = self._diff_versions(records)

    # -- the split graph ----------------------------------------------------------------------
    @staticmethod
    def _consumers(records) -> tuple[dict[Top, Top], dict[Top, int]]:
        """Per (layer, bottom): the (layer, top) it reads; per (layer, top): how many consume it
        (its bottoms, plus one for a loss weight), the count ``InsertSplits`` splits on."""
        last_top: dict[str, Top] = {}
        counts: dict[Top, int] = {}
        bottom_src: dict[Top, Top] = {}
        for i, rec in enumerate(records):
            for j, b in enumerate(rec.bottoms):
                src = last_top[b]
                bottom_src[(i, j)] = src
                counts[src] = counts.get(src, 0) + 1
            for j, t in enumerate(rec.tops):
                last_top[t] = (i, j)
            for j, t in enumerate(rec.tops):
                if rec.loss_weights[j]:
                    counts[(i, j)] = counts.get((i, j), 0) + 1
        return bottom_src, counts

    def _split_graph(self, records, counts: dict[Top, int]) -> list[_Node]:
        """The net as ``InsertSplits`` leaves it: each layer reads its own copy of a blob with
        several consumers, from a Split placed right after the producer; a loss weight on a
        split top moves to the Split's first top."""
        nodes: list[_Node] = []
        split_used: dict[Top, int] = {}
        for i, rec in enumerate(records):
            cls = type(rec.module) if rec.module is not None else None
            cut = self._cut_bottoms(rec, cls)
            pd = [bool(p) for p in rec.param.propagate_down] if len(rec.param.propagate_down) else None
            if any(cut):
                pd = [(pd[k] if pd is not None else None) if not cut[k] else False
                      for k in range(len(rec.bottoms))]
            bnames = []
            for j, b in enumerate(rec.bottoms):
                src = self._bottom_src[(i, j)]
                if counts.get(src, 0) > 1:
                    k = split_used.get(src, 0)
                    split_used[src] = k + 1
                    bnames.append(f"{b}\x00split{src[0]}_{src[1]}_{k}")
                else:
                    bnames.append(b)
            losses = list(rec.loss_weights)
            split_nodes = []
            for j, t in enumerate(rec.tops):
                n = counts.get((i, j), 0)
                if n > 1:
                    w = losses[j]
                    if w:
                        losses[j] = 0.0
                    split_nodes.append(_Node(
                        split=(i, j), bottoms=[t], pd=None,
                        tops=[f"{t}\x00split{i}_{j}_{k}" for k in range(n)],
                        params=[], loss=[w] + [0.0] * (n - 1), force=[True], rec=None))
            nodes.append(_Node(
                split=None, bottoms=bnames, tops=list(rec.tops), pd=pd,
                params=[self._lr_nonzero(rec, k) for k in range(len(rec.param_ids))],
                loss=losses, rec=rec, layer=i,
                force=[self._allow_force(rec, cls, k, cut) for k in range(len(rec.bottoms))]))
            nodes.extend(split_nodes)
        self._split_of = {n.split: n for n in nodes if n.split is not None}
        return nodes

    @staticmethod
    def _cut_bottoms(rec, cls) -> list[bool]:
        """Per bottom: the layer class never backprops into it (``backprop_to_bottoms`` False,
        or not in ``grad_bottoms``)."""
        if cls is None:
            return [False] * len(rec.bottoms)
        if not getattr(cls, "backprop_to_bottoms", True):
            return [True] * len(rec.bottoms)
        allowed = getattr(cls, "grad_bottoms", None)
        if allowed is None:
            return [False] * len(rec.bottoms)
        return [k not in allowed for k in range(len(rec.bottoms))]

    @staticmethod
    def _allow_force(rec, cls, k, cut) -> bool:
        """Caffe's AllowForceBackward: loss layers never force into bottom 1 (the labels)."""
        if cut[k]:
            return False
        if cls is not None and hasattr(cls, "allow_force_backward"):
            return bool(cls.allow_force_backward(k))
        return not (cls is not None and getattr(cls, "loss_by_default", False) and k == 1)

    @staticmethod
    def _lr_nonzero(rec, k) -> bool:
        """Param ``k`` of ``rec`` has lr_mult != 0 in the spec as written.

        As Caffe's Net::Init: a BatchNorm without ``param { lr_mult: 0 }`` still "needs
        backward" there (its forced lr 0 lives in the layer's own copy), which decides which
        blob diffs Caffe computes; its learning rate is 0 all the same."""
        ps = rec.param.param[k] if k < len(rec.param.param) else None
        return ps is None or ps.lr_mult != 0

    # -- Caffe's passes -----------------------------------------------------------------------
    @staticmethod
    def _forward(nodes: list[_Node]) -> None:
        """First pass, in order: a layer needs backward when a bottom blob or a param does; a
        bottom's own flag is its ``propagate_down`` when given, else the blob's."""
        blob_need: dict[str, bool] = {}
        for n in nodes:
            need = False
            n.bneed = []
            for k, b in enumerate(n.bottoms):
                bn = blob_need.get(b, False)
                need |= bn
                if n.pd is not None and n.pd[k] is not None:
                    bn = n.pd[k]
                n.bneed.append(bn)
            n.pgrad = list(n.params)
            need |= any(n.params)
            n.need = need
            for t in n.tops:
                blob_need[t] = blob_need.get(t, False) or need

    @staticmethod
    def _backward(nodes: list[_Node]) -> None:
        """Second pass, last layer first: drop the backward of a layer that does not reach a
        loss, or whose tops all go to consumers that do not backprop into them."""
        under_loss: set[str] = set()
        skip: set[str] = set()
        for n in reversed(nodes):
            contributes = False
            skip_down = True
            for k, t in enumerate(n.tops):
                if n.loss[k] or t in under_loss:
                    contributes = True
                if t not in skip:
                    skip_down = False
                if contributes and not skip_down:
                    break
            if n.need and skip_down:
                n.need = False
                n.bneed = [False] * len(n.bottoms)
            if not contributes:
                n.need = False
            for k, b in enumerate(n.bottoms):
                if contributes:
                    under_loss.add(b)
                else:
                    n.bneed[k] = False
                if not n.bneed[k]:
                    skip.add(b)

    @staticmethod
    def _force_backward(nodes: list[_Node]) -> None:
        """``force_backward``: every layer does backward, into every bottom it allows, and
        every param gets a gradient."""
        for n in nodes:
            n.need = True
            n.bneed = [bn or f for bn, f in zip(n.bneed, n.force)]
            n.pgrad = [True] * len(n.pgrad)

    # -- back onto the records ----------------------------------------------------------------
    def _map_back(self, nodes: list[_Node]) -> None:
        """Each record's flags from its node; a bottom read through a Split gets a gradient only
        when that Split passes one on."""
        for n in nodes:
            rec = n.rec
            if rec is None:
                continue
            rec.param_grad = [n.need and g for g in n.pgrad]
            rec.bottom_grad = []
            for k, b in enumerate(n.bottoms):
                ok = n.need and n.bneed[k]
                if "\x00" in b:
                    s = self._split_of[self._bottom_src[(n.layer, k)]]
                    ok = ok and s.need and s.bneed[0]
                rec.bottom_grad.append(ok)
            # a layer with nothing to send back (e.g. a selector whose bottoms are all cut)
            # computes nothing in backward: no graph for it
            rec.need_backward = n.need and (any(rec.bottom_grad) or any(rec.param_grad))

    def _leaf_grads(self, records) -> dict[tuple[str, int], bool]:
        """(blob, version) whose diff some consumer computes -> whether a source produced it
        (a version counts the in-place layers that rewrote the blob)."""
        leaf_grad: dict[tuple[str, int], bool] = {}
        versions: dict[str, int] = {}
        for i, rec in enumerate(records):
            for k, b in enumerate(rec.bottoms):
                if rec.bottom_grad[k]:
                    src = records[self._bottom_src[(i, k)][0]].is_source
                    leaf_grad[(b, versions[b])] = src
            for j, t in enumerate(rec.tops):
                versions[t] = versions[t] + 1 if rec.inplace[j] else 0
        return leaf_grad

    @staticmethod
    def _diff_versions(records) -> dict[str, int]:
        """Per blob, the version whose gradient Caffe leaves in the shared diff buffer: the input
        of the first in-place layer that writes its bottom diff, else the last version."""
        chains: dict[str, list[tuple[LayerRecord, int]]] = {}
        for rec in records:
            for j, t in enumerate(rec.tops):
                if rec.inplace[j]:
                    chains[t].append((rec, j))
                else:
                    chains[t] = []
        out = {}
        for name, chain in chains.items():
            version = len(chain)
            for v, (rec, j) in enumerate(chain, start=1):
                if rec.need_backward and rec.bottom_grad[j]:
                    version = v - 1
                    break
            out[name] = version
        return out
