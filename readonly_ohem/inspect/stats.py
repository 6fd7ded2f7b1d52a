"""Statistics of a kept-RoI log over a run: what OHEM kept, how hard it was, what NMS took away.

Per logged iteration: foreground fraction among kept RoIs, mean loss of the kept vs all scored
RoIs, NMS-suppressed RoIs and those of them harder than the easiest kept RoI of their pass
("harder_than_kept": NMS removed a RoI the loss alone would have kept). Over the run: kept
counts by class, and loss histograms of the kept and the discarded RoIs (log-spaced bins).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from itertools import groupby
from pathlib import Path

import numpy as np

from readonly_ohem.errors import ConfigError
from readonly_ohem.inspect.draw import render_selection
from readonly_ohem.inspect.log import KeptRoiLog, find_record, read_log

HIST_BINS = 12


def _loss(a: dict) -> np.ndarray:
    return a["loss_cls"].astype(np.float64) + a["loss_bbox"].astype(np.float64)


def _mean(total: float, n: int) -> float | None:
    return total / n if n else None


def iteration_stats(iteration: int, images) -> dict:
    """The numbers of one logged iteration from its selections: ``images`` = [(meta, arrays)] of
    every pass and image (a log's records, or ``inspect.log.split_record`` of live selections with
    ``pass`` in the meta). Means and shares are None where nothing was counted.

    Returns iter, images, passes, rois, kept, kept_fg, fg_fraction (of kept), kept_mean_loss,
    all_mean_loss, suppressed, harder_than_kept, passes_with_harder, fg (of all), all_fg_fraction,
    kept_loss_min, kept_loss_max (the layer's float64 values, from the metas).
    """
    s = dict(rois=0, kept=0, kept_fg=0, fg=0, kept_loss=0.0, all_loss=0.0, suppressed=0,
             harder_than_kept=0)
    pass_harder: dict[int, int] = defaultdict(int)
    kept_min, kept_max = [], []
    for meta, a in images:
        loss = _loss(a)
        kept, labels = a["kept"].astype(bool), a["labels"].astype(np.int64)
        s["rois"] += int(loss.size)
        s["kept"] += int(kept.sum())
        s["kept_fg"] += int((kept & (labels > 0)).sum())
        s["fg"] += int((labels > 0).sum())
        s["kept_loss"] += float(loss[kept].sum())
        s["all_loss"] += float(loss.sum())
        s["suppressed"] += int(a["suppressed"].sum())
        h = int(a["harder_than_kept"].sum())
        s["harder_than_kept"] += h
        pass_harder[int(meta.get("pass", 0))] += h
        if meta.get("kept_loss_min") is not None:
            kept_min.append(float(meta["kept_loss_min"]))
            kept_max.append(float(meta["kept_loss_max"]))
    return dict(iter=int(iteration), images=len(images), passes=len(pass_harder), rois=s["rois"],
                kept=s["kept"], kept_fg=s["kept_fg"], fg_fraction=_mean(s["kept_fg"], s["kept"]),
                kept_mean_loss=_mean(s["kept_loss"], s["kept"]),
                all_mean_loss=_mean(s["all_loss"], s["rois"]),
                suppressed=s["suppressed"], harder_than_kept=s["harder_than_kept"],
                passes_with_harder=sum(v > 0 for v in pass_harder.values()),
                fg=s["fg"], all_fg_fraction=_mean(s["fg"], s["rois"]),
                kept_loss_min=min(kept_min) if kept_min else None,
                kept_loss_max=max(kept_max) if kept_max else None)


def logged_iterations(log):
    """``(iteration, [(meta, arrays)])`` of a log (``read_log`` result), one logged iteration at a
    time, in order (the arrays of one iteration in memory at once)."""
    for it, recs in groupby(log, key=lambda r: int(r.meta["iter"])):
        yield it, [(r.meta, r.read_arrays()) for r in recs]


def selection_stats(log) -> dict:
    """Numbers of a log (``read_log`` result or path). Means are None where nothing was counted.

    Returns ``{iterations: [per-iteration dict], totals: dict, by_class: {name: {kept, rois}},
    histogram: {edges, kept, discarded}}``; per iteration the ``iteration_stats`` dict (iter,
    images, passes, rois, kept, kept_fg, fg_fraction, kept_mean_loss, all_mean_loss, suppressed,
    harder_than_kept, passes_with_harder, ...).
    """
    log = log if isinstance(log, KeptRoiLog) else read_log(log)
    classes = log.classes or []
    rows = []
    class_kept: dict[int, int] = defaultdict(int)
    class_rois: dict[int, int] = defaultdict(int)
    kept_losses, disc_losses = [], []
    for it, images in logged_iterations(log):
        rows.append(iteration_stats(it, images))
        for _, a in images:
            loss = _loss(a)
            kept, labels = a["kept"].astype(bool), a["labels"].astype(np.int64)
            for k, n in zip(*np.unique(labels[kept], return_counts=True)):
                class_kept[int(k)] += int(n)
            for k, n in zip(*np.unique(labels, return_counts=True)):
                class_rois[int(k)] += int(n)
            kept_losses.append(loss[kept])
            disc_losses.append(loss[~kept])

    kl = np.concatenate(kept_losses) if kept_losses else np.zeros(0)
    dl = np.concatenate(disc_losses) if disc_losses else np.zeros(0)
    n_kept, n_all = int(kl.size), int(kl.size + dl.size)
    n_fg = sum(r["kept_fg"] for r in rows)
    totals = dict(records=len(log), iterations=len(rows), passes=sum(r["passes"] for r in rows),
                  rois=n_all, kept=n_kept, kept_fg=n_fg, fg_fraction=_mean(n_fg, n_kept),
                  kept_mean_loss=_mean(float(kl.sum()), n_kept),
                  all_mean_loss=_mean(float(kl.sum() + dl.sum()), n_all),
                  discarded_mean_loss=_mean(float(dl.sum()), int(dl.size)),
                  suppressed=sum(r["suppressed"] for r in rows),
                  harder_than_kept=sum(r["harder_than_kept"] for r in rows),
                  passes_with_harder=sum(r["passes_with_harder"] for r in rows),
                  skipped=int(getattr(log, "skipped", 0)))

    def name(k):
        return classes[k] if 0 <= k < len(classes) else f"class{k}"

    by_class = {name(k): dict(index=k, kept=class_kept.get(k, 0), rois=class_rois[k])
                for k in sorted(class_rois)}
    allv = np.concatenate([kl, dl])
    if allv.size:
        lo = max(float(allv[allv > 0].min()) if (allv > 0).any() else 1e-6, 1e-6)
        hi = max(float(allv.max()), lo * 10)
        edges = np.geomspace(lo, hi, HIST_BINS + 1)
        edges[0], edges[-1] = 0.0, hi  # the first bin also takes zero losses
        hk = np.histogram(np.clip(kl, 0, hi), edges)[0]
        hd = np.histogram(np.clip(dl, 0, hi), edges)[0]
    else:
        edges, hk, hd = np.zeros(1), np.zeros(0, int), np.zeros(0, int)
    return dict(iterations=rows, totals=totals, by_class=by_class,
                histogram=dict(edges=edges.tolist(), kept=hk.tolist(), discarded=hd.tolist()))


def _f(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def format_stats(stats: dict, max_rows: int = 20) -> str:
    """The terminal table: per iteration (at most ``max_rows``, evenly spaced), by class, histogram."""
    rows, t = stats["iterations"], stats["totals"]
    out = [f"kept-RoI log: {t['records']} image record(s), {t['iterations']} iteration(s), "
           f"{t['passes']} pass(es)" + (f"; {t['skipped']} torn record(s) skipped" if t["skipped"] else "")]
    head = (f"{'iter':>8} {'imgs':>4} {'RoIs':>7} {'kept':>6} {'fg%':>6} {'loss kept':>10} "
            f"{'loss all':>9} {'NMS supp':>8} {'harder':>6}")
    out += ["", head, "-" * len(head)]
    shown = rows
    if len(rows) > max_rows:
        idx = np.unique(np.round(np.linspace(0, len(rows) - 1, max_rows)).astype(int))
        shown = [rows[i] for i in idx]
    for r in shown:
        fg = None if r["fg_fraction"] is None else 100 * r["fg_fraction"]
        out.append(f"{r['iter']:>8} {r['images']:>4} {r['rois']:>7} {r['kept']:>6} {_f(fg, '.1f'):>6} "
                   f"{_f(r['kept_mean_loss']):>10} {_f(r['all_mean_loss']):>9} {r['suppressed']:>8} "
                   f"{r['harder_than_kept']:>6}")
    if len(rows) > max_rows:
        out.append(f"{'':>8} ({len(rows) - len(shown)} more iterations not shown)")
    out.append("-" * len(head))
    fg = None if t["fg_fraction"] is None else 100 * t["fg_fraction"]
    out.append(f"{'all':>8} {t['records']:>4} {t['rois']:>7} {t['kept']:>6} {_f(fg, '.1f'):>6} "
               f"{_f(t['kept_mean_loss']):>10} {_f(t['all_mean_loss']):>9} {t['suppressed']:>8} "
               f"{t['harder_than_kept']:>6}")
    out.append(f"mean loss: kept {_f(t['kept_mean_loss'])}, discarded {_f(t['discarded_mean_loss'])}, "
               f"all {_f(t['all_mean_loss'])}")
    if t["passes"]:
        out.append(f"NMS removed a RoI harder than the easiest kept one in {t['passes_with_harder']} of "
                   f"{t['passes']} passes ({100 * t['passes_with_harder'] / t['passes']:.1f}%), "
                   f"{t['harder_than_kept'] / t['passes']:.2f} per pass")
    out += ["", f"{'class':<16} {'kept':>7} {'% of kept':>9} {'RoIs':>8} {'% kept':>7}"]
    for name, c in sorted(stats["by_class"].items(), key=lambda kv: -kv[1]["kept"]):
        pk = 100 * c["kept"] / t["kept"] if t["kept"] else 0.0
        pr = 100 * c["kept"] / c["rois"] if c["rois"] else 0.0
        out.append(f"{name:<16} {c['kept']:>7} {pk:>8.1f}% {c['rois']:>8} {pr:>6.1f}%")
    h = stats["histogram"]
    if h["kept"]:
        out += ["", "loss histogram (RoIs per bin; # = kept, . = discarded, bars scaled per column)",
                f"{'loss from':>10} {'to':>8} {'kept':>7} {'discarded':>9}"]
        mk, md = max(max(h["kept"]), 1), max(max(h["discarded"]), 1)
        for lo, hi, k, d in zip(h["edges"][:-1], h["edges"][1:], h["kept"], h["discarded"]):
            out.append(f"{lo:>10.3g} {hi:>8.3g} {k:>7} {d:>9}  "
                       f"{'#' * round(20 * k / mk):<20} {'.' * round(20 * d / md)}")
    return "\n".join(out)


def plot_stats(stats: dict, out) -> Path:
    """Five panels (fg fraction, mean losses, NMS, kept by class, loss histogram) to a PNG.
    Needs matplotlib (the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("inspect --stats --out PNG draws with matplotlib, which is not installed: "
                          "pip install 'readonly-ohem[plot]' (the table above needs nothing)") from None
    rows = stats["iterations"]
    its = [r["iter"] for r in rows]

    def col(k):
        return [np.nan if r[k] is None else r[k] for r in rows]

    fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
    style = dict(marker="o" if len(its) < 40 else None, markersize=3)
    ax[0, 0].plot(its, [100 * v for v in col("fg_fraction")], color="tab:green", **style)
    ax[0, 0].set(title="foreground among kept RoIs", xlabel="iteration", ylabel="%", ylim=(0, 100))
    ax[0, 1].plot(its, col("kept_mean_loss"), label="kept RoIs", color="tab:red", **style)
    ax[0, 1].plot(its, col("all_mean_loss"), label="all scored RoIs", color="tab:blue", **style)
    ax[0, 1].set(title="mean per-RoI loss", xlabel="iteration", ylabel="loss (cls + bbox)")
    ax[0, 1].legend()
    ax[0, 2].plot(its, col("suppressed"), label="suppressed by NMS", color="tab:gray", **style)
    ax[0, 2].plot(its, col("harder_than_kept"), label="of them harder than the easiest kept",
                  color="tab:purple", **style)
    ax[0, 2].set(title="OHEM NMS", xlabel="iteration", ylabel="RoIs per iteration")
    ax[0, 2].legend()
    bc = sorted(stats["by_class"].items(), key=lambda kv: -kv[1]["kept"])
    names = [n for n, _ in bc]
    ax[1, 0].barh(names[::-1], [c["kept"] for _, c in bc][::-1], color="tab:orange")
    ax[1, 0].set(title="kept RoIs by class (all logged iterations)", xlabel="RoIs")
    h = stats["histogram"]
    if h["kept"]:
        e = np.asarray(h["edges"])
        e[0] = e[1] / (e[2] / e[1])  # a finite left edge for the log axis
        ax[1, 1].stairs(h["discarded"], e, label="discarded", fill=True, alpha=0.5, color="tab:blue")
        ax[1, 1].stairs(h["kept"], e, label="kept", fill=True, alpha=0.6, color="tab:red")
        ax[1, 1].set(xscale="log", yscale="log", title="loss histogram", xlabel="per-RoI loss",
                     ylabel="RoIs")
        ax[1, 1].legend()
    t = stats["totals"]
    ax[1, 2].axis("off")
    text = [f"records {t['records']}, iterations {t['iterations']}",
            f"RoIs scored {t['rois']}, kept {t['kept']}",
            f"fg among kept {_f(None if t['fg_fraction'] is None else 100 * t['fg_fraction'], '.1f')}%",
            f"mean loss kept {_f(t['kept_mean_loss'])}",
            f"mean loss discarded {_f(t['discarded_mean_loss'])}",
            f"NMS suppressed {t['suppressed']}",
            f"harder than kept {t['harder_than_kept']} "
            f"({t['passes_with_harder']} of {t['passes']} passes)"]
    ax[1, 2].text(0.0, 1.0, "\n".join(text), va="top", family="monospace", fontsize=11)
    fig.suptitle("Which RoIs OHEM kept")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def summarize_selection(log, stream=None, plot=None, picture=None, iteration=None, image=None) -> dict:
    """For the demo and scripts: print the table, optionally write the stats plot (``plot``,
    needs matplotlib) and one selection picture (``picture``: the last logged iteration's first
    image unless ``iteration``/``image`` say otherwise). Returns ``selection_stats`` plus
    ``table`` and the written paths."""
    log = log if isinstance(log, KeptRoiLog) else read_log(log)
    stats = selection_stats(log)
    stats["table"] = format_stats(stats)
    print(stats["table"], file=stream if stream is not None else sys.stdout)
    if plot:
        stats["plot"] = str(plot_stats(stats, plot))
    if picture:
        rec = find_record(log, iteration, image)
        render_selection(rec.meta, rec.arrays, log.classes, picture)
        stats["picture"] = str(picture)
    return stats
