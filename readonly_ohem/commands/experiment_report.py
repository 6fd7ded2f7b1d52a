"""The experiment's summary, table and picture (``readonly-ohem experiment``'s results.*).

``summarize(runs, methods, seeds, baseline)``: per method the mean mAP over seeds with a 95%
Student-t interval; per method the paired differences to the baseline, seed by seed, and their
mean with a 95% t-interval (the design's measure: the OHEM - FRCN interval is to be narrower than
+-1.5 mAP points); the pairing checks; the hard-negative audit of the baseline's runs; a verdict.
mAP values are fractions (0..1) in the JSON, points (x100) in the table and the picture.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import stats

POWER_HALF_WIDTH = 0.015  # the design's target: 95% interval of the mean paired difference
HARD_KEYS = ("bg", "pool", "hard", "hard_in_pool", "kept")


def t_interval(values) -> dict:
    """``{"n", "mean", "sd", "half_width", "ci95": [lo, hi]}``; sd/half_width/ci95 None for n < 2."""
    v = np.asarray(list(values), dtype=np.float64)
    n = int(v.size)
    out = {"n": n, "mean": float(v.mean()) if n else None, "sd": None, "half_width": None,
           "ci95": None}
    if n >= 2:
        sd = float(v.std(ddof=1))
        half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))
        out.update(sd=sd, half_width=half, ci95=[out["mean"] - half, out["mean"] + half])
    return out


def _call(interval: dict) -> str:
    """better / worse / within noise, by where the 95% interval of a difference lies."""
    if interval["ci95"] is None:
        return "one seed: no interval"
    lo, hi = interval["ci95"]
    return "better" if lo > 0 else "worse" if hi < 0 else "within noise"


def pairing(runs: list[dict], seeds) -> dict:
    """Per seed: one init file for every method, and the same images in the same order (the
    first ``iters`` passes, which every method has; the whole sequence among methods with as
    many passes)."""
    per_seed = {}
    for seed in seeds:
        rs = [r for r in runs if r["seed"] == seed]
        by_passes = {}
        for r in rs:
            by_passes.setdefault(r["image_passes"], set()).add(r["image_order_sha256"])
        per_seed[str(seed)] = {
            "same_init": len({r["init_sha256"] for r in rs}) == 1,
            "same_images": (len({r["image_order_first_sha256"] for r in rs}) == 1
                            and all(len(v) == 1 for v in by_passes.values())),
        }
    return {"same_init": all(p["same_init"] for p in per_seed.values()),
            "same_images": all(p["same_images"] for p in per_seed.values()),
            "per_seed": per_seed}


def hard_negative_shares(runs: list[dict]) -> dict | None:
    """The audit counts of every run that has them, summed, and the shares they give."""
    audited = [r["hard_negatives"] for r in runs if r.get("hard_negatives")]
    if not audited:
        return None
    c = {k: int(sum(a[k] for a in audited)) for k in HARD_KEYS}

    def share(a, b):
        return c[a] / c[b] if c[b] else None

    return {"counts": c, "runs": len(audited),
            "hard_share_in_frcn_pool": share("hard_in_pool", "pool"),
            "hard_share_of_all_bg": share("hard", "bg"),
            "hard_bg_in_frcn_pool": share("hard_in_pool", "hard"),
            "bg_in_frcn_pool": share("pool", "bg"),
            "bg_share_of_kept": share("hard", "kept")}


def summarize(runs: list[dict], methods, seeds, baseline: str = "frcn") -> dict:
    """See the module docstring."""
    by = {(r["method"], r["seed"]): r for r in runs}
    out = {"baseline": baseline, "methods": {}, "paired": {}}
    for m in methods:
        rs = [by[(m, s)] for s in seeds if (m, s) in by]
        out["methods"][m] = {
            "mAP": t_interval(r["mAP"] for r in rs),
            "fg_fraction": float(np.mean([r["fg_fraction"] for r in rs])),
            "sec_per_iter": float(np.mean([r["sec_per_iter"] for r in rs])),
            "train_seconds": float(np.mean([r["train_seconds"] for r in rs])),
            "per_seed": {str(r["seed"]): r["mAP"] for r in rs},
        }
        if m != baseline and baseline in methods:
            diffs = {str(s): by[(m, s)]["mAP"] - by[(baseline, s)]["mAP"] for s in seeds
                     if (m, s) in by and (baseline, s) in by}
            interval = t_interval(diffs.values())
            out["paired"][m] = interval | {"diffs": diffs, "call": _call(interval)}
    out["pairing"] = pairing(runs, seeds)
    out["hard_negatives"] = hard_negative_shares(runs)
    out["verdict"] = verdict(out)
    return out


def verdict(summary: dict) -> str:
    """One paragraph: OHEM - FRCN with its interval, whether the design's power was reached, and
    the other methods' calls."""
    paired, base = summary["paired"], summary["baseline"]
    lines = []
    if "ohem" in paired:
        p = paired["ohem"]
        if p["ci95"] is None:
            lines.append(f"ohem - {base}: {100 * p['mean']:+.2f} mAP points from one seed (no interval).")
        else:
            lo, hi = (100 * x for x in p["ci95"])
            call = {"better": f"OHEM beats {base}", "worse": f"{base} beats OHEM",
                    "within noise": f"no difference detected between OHEM and {base}"}[p["call"]]
            lines.append(f"{call}: mean paired difference {100 * p['mean']:+.2f} mAP points, 95% "
                         f"interval [{lo:+.2f}, {hi:+.2f}] over {p['n']} seeds.")
            powered = p["half_width"] <= POWER_HALF_WIDTH
            lines.append(f"Interval half-width {100 * p['half_width']:.2f} points: "
                         + ("within" if powered else "NOT within")
                         + f" the design's +-{100 * POWER_HALF_WIDTH:.1f}.")
    others = [f"{m} {p['call']} ({100 * p['mean']:+.2f})" for m, p in paired.items() if m != "ohem"]
    if others:
        lines.append(f"Versus {base} (paired, 95%): " + "; ".join(others) + ".")
    return " ".join(lines)


def _pts(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(100 * x)


def _ci(interval) -> str:
    ci = interval["ci95"]
    return "-" if ci is None else f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


def markdown(results: dict) -> str:
    """``results.md``: the design, the table, mAP per seed, the verdict, the audit, the checks."""
    s, runs = results["summary"], results["runs"]
    d = s["design"]
    methods, seeds = list(s["methods"]), d["seeds"]
    lines = [
        "# readonly-ohem experiment: Fast R-CNN vs OHEM and its rivals on the mini-VOC", "",
        f"mini-VOC (dataset seed {d['dataset_seed']}, {d['images']} images: 60% trainval, 40% "
        f"test), small net, {d['iters']} SGD iterations per run, seeds {', '.join(map(str, seeds))}; "
        f"every method tested at {d['test'][0]} detections per image, score > {d['test'][1]:g} "
        "(VOC07 11-point mAP over the 6 classes present, in points). Intervals: 95% Student t over "
        "seeds; differences are paired by seed (same initial weights and images).", "",
        "| method | mAP | 95% interval | paired diff vs " + s["baseline"] + " | 95% interval | "
        "call | fg of trained RoIs | s/iter | train min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        r, p = s["methods"][m], s["paired"].get(m)
        lo_hi = "-" if r["mAP"]["ci95"] is None else \
            f"[{100 * r['mAP']['ci95'][0]:.2f}, {100 * r['mAP']['ci95'][1]:.2f}]"
        lines.append(
            f"| {m} | {_pts(r['mAP']['mean'])} | {lo_hi} | "
            f"{'-' if p is None else _pts(p['mean'], '{:+.2f}')} | {'-' if p is None else _ci(p)} | "
            f"{'baseline' if p is None else p['call']} | {100 * r['fg_fraction']:.1f}% | "
            f"{r['sec_per_iter']:.3f} | {r['train_seconds'] / 60:.1f} |")
    lines += ["", "mAP per seed:", "",
              "| method | " + " | ".join(f"seed {x}" for x in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for m in methods:
        per = s["methods"][m]["per_seed"]
        lines.append(f"| {m} | " + " | ".join(_pts(per.get(str(x))) for x in seeds) + " |")
    lines += ["", f"**Verdict.** {s['verdict']}", ""]
    h = s.get("hard_negatives")
    if h:
        lines += [
            f"**Hard negatives FRCN's sampler sees** (the trained {s['baseline']} weights scoring "
            f"{h['counts']['bg'] // max(h['runs'], 1)} bg RoIs of {d['audit_passes']} training images "
            f"per seed as OHEM would, {h['runs']} seed(s)): of the bg RoIs FRCN draws from (IoU in "
            f"[0.1, 0.5), {_pts(h['bg_in_frcn_pool'], '{:.1f}')}% of all bg), "
            f"{_pts(h['hard_share_in_frcn_pool'], '{:.1f}')}% are hard (among OHEM's 64 per image), "
            f"against {_pts(h['hard_share_of_all_bg'], '{:.1f}')}% of all bg; "
            f"{_pts(h['hard_bg_in_frcn_pool'], '{:.1f}')}% of OHEM's hard negatives lie in FRCN's "
            f"range; bg are {_pts(h['bg_share_of_kept'], '{:.1f}')}% of the RoIs OHEM keeps.", ""]
    pr = s["pairing"]
    train = sum(r["train_seconds"] for r in runs) / 60
    test = sum(r["test_seconds"] for r in runs) / 60
    lines.append(f"Pairing checked per seed: same initial weights {'yes' if pr['same_init'] else 'NO'}, "
                 f"same images in the same order {'yes' if pr['same_images'] else 'NO'}. "
                 f"{len(runs)} runs: {train:.0f} min training and {test:.0f} min testing, wall "
                 f"time of their processes; this call {d['total_seconds'] / 60:.1f} min.")
    lines += ["", "Methods:", ""] + [f"- `{m}`: {about}" for m, about in d["methods"].items()]
    return "\n".join(lines) + "\n"


def write_markdown(results: dict, path: Path) -> None:
    Path(path).write_text(markdown(results))


def plot_results(results: dict, path: Path) -> None:
    """``results.png``: left, mAP per method (seeds as dots, mean with its 95% interval); right,
    the paired differences to the baseline per seed (OHEM highlighted) with their 95% intervals."""
    import matplotlib  # heavy, optional ('.[plot]')

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    methods, base = list(s["methods"]), s["baseline"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1]})
    ax = axes[0]
    for i, m in enumerate(methods):
        r = s["methods"][m]
        ys = [100 * v for v in r["per_seed"].values()]
        ax.scatter(np.full(len(ys), i) + np.linspace(-0.12, 0.12, len(ys)), ys, s=14,
                   color="0.6", zorder=2)
        half = r["mAP"]["half_width"]
        ax.errorbar(i, 100 * r["mAP"]["mean"], yerr=None if half is None else 100 * half, fmt="o",
                    color="C3" if m == "ohem" else "C0", capsize=5, zorder=3)
    ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right")
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_ylabel("mAP (points)")
    ax.set_title("mAP per method: seeds (grey), mean and 95% interval")
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1]
    others = [m for m in methods if m in s["paired"]]
    ax.axhline(0, color="k", lw=0.8)
    ax.axhspan(-100 * POWER_HALF_WIDTH, 100 * POWER_HALF_WIDTH, color="0.9", zorder=0,
               label=f"+-{100 * POWER_HALF_WIDTH:.1f} (design)")
    for i, m in enumerate(others):
        p = s["paired"][m]
        colour = "C3" if m == "ohem" else "C0"
        seeds = list(p["diffs"])
        ys = [100 * p["diffs"][x] for x in seeds]
        xs = np.full(len(ys), i) + np.linspace(-0.15, 0.15, len(ys))
        ax.scatter(xs, ys, s=16 if m != "ohem" else 26, color=colour, alpha=0.5, zorder=2)
        if m == "ohem":
            for x, y, seed in zip(xs, ys, seeds):
                ax.annotate(seed, (x, y), textcoords="offset points", xytext=(4, 2), fontsize=7)
        half = p["half_width"]
        ax.errorbar(i + 0.3, 100 * p["mean"], yerr=None if half is None else 100 * half, fmt="D",
                    color=colour, capsize=5, zorder=3)
    ax.set_xticks(range(len(others)), others, rotation=35, ha="right")
    ax.set_xlim(-0.6, len(others) - 0.2)
    ax.set_ylabel(f"mAP - {base} mAP, same seed (points)")
    ax.set_title(f"paired differences to {base}: per seed (dots), mean and 95% interval")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    d = s["design"]
    fig.suptitle(f"mini-VOC, {d['images']} images, {d['iters']} iterations, "
                 f"{len(d['seeds'])} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
