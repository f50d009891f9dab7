"""`skipprof report`: PNG figures from a profile and (optionally) an eval JSON.

Figures:
* `cosine_by_layer.png` — per-layer distribution of the FFN-SkipLLM cosine cos(h, h + FFN) per class (one heatmap per
  class: layer on x, cosine on y, share of tokens as colour; the median as a line), from the profile's histograms.
* `quality_vs_skip.png` — KL(dense || plan) and held-out perplexity vs realized skip ratio, one series per family
  (fitted plans, each baseline, the oracle), from the eval JSON.
* `speedup_vs_skip.png` — measured decode speedup and the FLOP-ideal speedup vs realized skip ratio.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..atomic import atomic_path
from . import families

# Fixed colours and markers per family so every figure and every run reads the same way. Fitted plans are filled
# markers on solid lines; baselines and references are hollow markers on dotted/dashed lines. No two families share
# a colour, and neighbouring hues (greens, yellows) are avoided.
FAMILY_STYLE = {
    families.FITTED_STATIC: ("tab:blue", "o", "-"),  # the sweep's static plan: unrefined or refined, one series
    families.FITTED_STATIC_REFINED: ("tab:blue", "o", "-"),
    families.FITTED_STATIC_UNREFINED: ("#7fb8e6", "o", ":"),
    families.FITTED_ADAPTIVE: ("tab:green", "s", "-"),
    families.FITTED_STATIC_PER_CLASS: ("#f4a6d7", "P", ":"),
    families.FITTED_STATIC_PER_CLASS_REFINED: ("tab:pink", "P", "-"),
    families.FITTED_ADAPTIVE_PER_CLASS: ("tab:purple", "X", "-"),
    families.ORACLE: ("black", "*", "--"),
    families.SEARCH_REFERENCE: ("dimgray", "*", "--"),
    families.RANDOM_FFN: ("tab:red", "x", ":"),
    families.CONTIGUOUS_WINDOW: ("tab:orange", "^", ":"),
    families.PAPER_DEFAULTS: ("goldenrod", "D", ":"),
    families.LLM_DROP: ("tab:brown", "v", ":"),
    families.SHORTGPT: ("navy", "<", ":"),
}
OTHER_COLOURS = ("tab:cyan", "tab:olive", "teal", "crimson", "slateblue", "sienna")


class ReportError(ValueError):
    """The inputs cannot be drawn (missing data, wrong file)."""


def _atomic_savefig(fig, path: Path) -> Path:
    """Write the figure atomically, close it, return its path."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rebinned(hist_row: np.ndarray, edges: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Fold a fine cosine histogram (underflow, bins, overflow) onto a grid of 1 - cos by bin centre; token shares."""
    counts = hist_row[1:-1].astype(float)
    gap = 1.0 - (edges[:-1] + edges[1:]) / 2
    coarse, _ = np.histogram(np.clip(gap, grid[0], grid[-1] * (1 - 1e-9)), bins=grid, weights=counts)
    coarse[-1] += hist_row[0]  # underflow: cos below the first edge, the largest gaps
    coarse[0] += hist_row[-1]
    total = coarse.sum()
    return coarse / total if total > 0 else coarse


GAP_FLOOR = 1e-5  # 1 - cos below this is drawn in the first row


def cosine_figure(profile, out: Path, title: str) -> Path:
    """Heatmap per class: layer on x, 1 - cos on a log axis (saturated FFNs sit near the bottom), share as colour."""
    plt = _plt()
    from ..profile import REGIMES

    regime = "decode" if profile.tokens("decode") > 0 else "prompt"
    r = REGIMES.index(regime)  # histogram axis 0 follows profile.REGIMES
    edges = np.asarray(profile.edges["residual"], dtype=float)
    hist = np.asarray(profile.hist["residual"])
    grid = np.logspace(np.log10(GAP_FLOOR), np.log10(2.0), 49)
    classes = list(profile.classes)
    cols = min(2, len(classes))
    rows = (len(classes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.8 * rows), squeeze=False, sharey=True,
                             layout="constrained")
    num_layers = profile.num_layers
    x_edges = np.arange(num_layers + 1) - 0.5
    shares = [np.stack([_rebinned(hist[r, l, i], edges, grid) for l in range(num_layers)], axis=1)
              for i in range(len(classes))]
    # One scale for every panel. A layer whose tokens all fall in one bin (often layer 0) would set a max that
    # washes out the rest, so the scale tops at the typical layer's peak share and brighter cells saturate.
    peaks = np.concatenate([s.max(axis=0) for s in shares])
    vmax = max(float(np.median(peaks)) * 1.5, 1e-9)
    mesh = None
    for i, cls in enumerate(classes):
        ax = axes[i // cols][i % cols]
        mesh = ax.pcolormesh(x_edges, grid, shares[i], cmap="viridis", vmin=0, vmax=vmax)
        median = 1.0 - np.asarray(profile.layer_stats("residual", regime, cls=cls)["p50"], dtype=float)
        ax.plot(range(num_layers), np.clip(median, GAP_FLOOR, 2.0), color="white", marker=".", lw=1.2,
                label="median")
        ax.axhline(0.05, color="tab:red", lw=1.0, ls="--", label="τ = 0.95 (paper)")
        ax.set_yscale("log")
        ax.set_ylim(grid[0], grid[-1])
        ax.set_title(f"{cls}  ({profile.tokens(regime, cls):,} {regime} tokens)", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_xticks(range(0, num_layers, 1 if num_layers <= 16 else 2))
        if i % cols == 0:
            ax.set_ylabel("1 − cos(h, h + FFN)  (log; lower = more saturated)")
        ax.legend(loc="upper right", fontsize=7)
    for j in range(len(classes), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.colorbar(mesh, ax=axes, shrink=0.8, extend="max" if float(peaks.max()) > vmax else "neither",
                 label="share of the layer's tokens")
    fig.suptitle(title + f"\nper-layer FFN saturation by class ({regime} regime)", fontsize=11)
    return _atomic_savefig(fig, out / "cosine_by_layer.png")


def rows_by_family(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in result.get("plans", []):
        grouped[row.get("family") or row["name"]].append(row)
    for rows in grouped.values():
        rows.sort(key=lambda r: r["skip_ratio"])
    return grouped


def _style(family: str, index: int):
    if family in FAMILY_STYLE:
        return FAMILY_STYLE[family]
    return OTHER_COLOURS[index % len(OTHER_COLOURS)], "o", "-"


def _is_fitted(family: str) -> bool:
    return family.startswith("fitted") or family not in FAMILY_STYLE


def _series(ax, grouped, key: str) -> list[tuple[float, float]]:
    """One line per family; fitted plans filled, baselines hollow (so coinciding points stay visible). Returns the
    plotted points."""
    plotted = []
    for i, (family, rows) in enumerate(grouped.items()):
        points = [(r["skip_ratio"], r[key]) for r in rows if r.get(key) is not None]
        if not points:
            continue
        color, marker, ls = _style(family, i)
        xs, ys = zip(*points)
        fitted = _is_fitted(family)
        ax.plot(xs, ys, marker=marker, ls=ls if len(xs) > 1 else "none", color=color, label=family,
                ms=8 if fitted else 9, mfc=color if fitted else "none", mew=1.5, zorder=3 if fitted else 2)
        plotted += points
    ax.set_xlabel("realized FFN skip ratio (decode tokens)")
    ax.grid(alpha=0.3)
    return plotted


def _skip_axis(ax, points) -> None:
    """Skip ratio from 0 (dense) to a little past the largest point: a few close plans must not fill the axis."""
    top = max([x for x, _ in points] + [0.05])
    ax.set_xlim(-0.01, top * 1.15 + 0.01)


def _log_span(ax, values, decades: float = 1.0) -> None:
    """A log axis spanning at least `decades` around the data, so a few-percent difference does not look huge."""
    values = [v for v in values if v > 0]
    if not values:
        return
    lo, hi = min(values), max(values)
    centre = (np.log10(lo) + np.log10(hi)) / 2
    half = max((np.log10(hi) - np.log10(lo)) / 2 * 1.2, decades / 2)
    ax.set_ylim(10 ** (centre - half), 10 ** (centre + half))


def _shared_legend(fig, axes) -> None:
    """One legend for the whole figure, from every panel's entries (each label once)."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)


def quality_figure(result: dict[str, Any], out: Path, title: str) -> Path:
    plt = _plt()
    grouped = rows_by_family(result)
    fig, (ax_kl, ax_ppl) = plt.subplots(1, 2, figsize=(13, 4.8))
    kl_points = _series(ax_kl, grouped, "kl_mean")
    ax_kl.set_yscale("log")
    _log_span(ax_kl, [y for _, y in kl_points])
    ax_kl.set_ylabel("mean KL(dense ‖ plan) per token (log)")
    ax_kl.set_title("teacher-forced KL on held-out decode positions (dense: 0)", fontsize=10)
    dense_ppl = result["dense"]["ppl"]
    ppl_points = _series(ax_ppl, grouped, "ppl")
    ax_ppl.plot([0.0], [dense_ppl], marker="o", color="black", ls="none", ms=8, label="dense", zorder=4)
    ax_ppl.axhline(dense_ppl, color="black", lw=0.8, ls="--")
    top = max([y for _, y in ppl_points] + [dense_ppl])
    ax_ppl.set_ylim(0, max(top * 1.08, dense_ppl * 1.25))  # from zero: the increase reads at its true size
    ax_ppl.set_ylabel("held-out perplexity")
    ax_ppl.set_title("perplexity (decode positions)", fontsize=10)
    for ax in (ax_kl, ax_ppl):
        _skip_axis(ax, kl_points + ppl_points)
    _shared_legend(fig, (ax_kl, ax_ppl))
    fig.suptitle(title + "\nquality vs skip ratio", fontsize=11)
    fig.tight_layout()
    return _atomic_savefig(fig, out / "quality_vs_skip.png")


def speed_figure(result: dict[str, Any], out: Path, title: str) -> Path:
    plt = _plt()
    grouped = rows_by_family(result)
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    points = _series(ax, grouped, "speedup")
    for i, (family, rows) in enumerate(grouped.items()):  # each point's per-round range: this run's timing noise
        ranged = [r for r in rows if r.get("speedup") is not None and r.get("speedup_min") is not None]
        for r in ranged:
            ax.vlines(r["skip_ratio"], r["speedup_min"], r["speedup_max"], color=_style(family, i)[0], lw=1, alpha=0.5)
    ideal = sorted({(r["skip_ratio"], r["ideal_speedup"]) for rows in grouped.values() for r in rows
                    if r.get("mode") != "layer_drop" and r.get("ideal_speedup") is not None})
    if ideal:
        ax.plot(*zip(*ideal), color="black", ls="--", lw=1, label="FLOP-ideal (FFN skip)")
    ax.plot([0.0], [1.0], marker="o", color="black", ls="none", ms=8, label="dense")
    ax.axhline(1.0, color="gray", lw=0.8)
    ys = [y for _, y in points + ideal] + [1.0]
    ax.set_ylim(min(0.9, min(ys) - 0.05), max(1.1, max(ys) + 0.05))  # at least ±10 %: timing noise is that large
    _skip_axis(ax, points + ideal)
    ax.set_ylabel("decode speedup vs dense (median, interleaved;\nbars: range of per-round ratios)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    ax.set_title(title + "\nmeasured decode speedup vs skip ratio", fontsize=11)
    return _atomic_savefig(fig, out / "speedup_vs_skip.png")


def lm_eval_figure(result: dict[str, Any], out: Path, title: str) -> Path:
    """lm-evaluation-harness numbers (`skipprof eval --lm-eval`): one panel per task and metric, each plan at its
    realized skip ratio on the held-out data, dense at 0; bars: the harness's stderr where it reports one."""
    plt = _plt()
    dense = result["dense"]["lm_eval"]["results"]
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in dense))
    rows = [r for r in result["plans"] if r.get("lm_eval")]
    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.8 * nrows), squeeze=False)
    for ax, (task, metric) in zip(axes.flat, keys):
        def value(section):
            hit = next((r for r in section["results"] if (r["task"], r["metric"]) == (task, metric)), None)
            return (hit["value"], hit.get("stderr")) if hit and hit["value"] is not None else (None, None)

        for i, row in enumerate([None] + rows):
            y, err = value(result["dense"]["lm_eval"] if row is None else row["lm_eval"])
            if y is None:
                continue
            x = 0.0 if row is None else row["skip_ratio"]
            color = "black" if row is None else OTHER_COLOURS[(i - 1) % len(OTHER_COLOURS)]
            ax.errorbar([x], [y], yerr=[err] if err else None, marker="o", color=color, ls="none", ms=7, capsize=3,
                        label="dense" if row is None else row["name"])
        ax.set_title(f"{task}: {metric}", fontsize=9)
        ax.set_xlabel("realized FFN skip ratio (held-out decode tokens)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    _shared_legend(fig, list(axes.flat)[:len(keys)])
    fig.suptitle(title + "\nlm-evaluation-harness, dense and each plan (decode-only semantics)", fontsize=11)
    fig.tight_layout()
    return _atomic_savefig(fig, out / "lm_eval_vs_skip.png")


def make_report(profile, result: dict[str, Any] | None, out: Path, title: str | None = None) -> list[Path]:
    """Write every figure the inputs allow into `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if title is None:
        model = (profile.header.get("model") or {}).get("name") if profile is not None else None
        model = model or (result or {}).get("model", {}).get("name") or "model"
        corpus = (result or {}).get("data", {}).get("spec") or "held-out data"
        title = f"{model} — {corpus}"
        # The cosine figure shows the profile, so it names the profile's own (calibration) corpus.
        specs = [Path(str(c.get("spec", "?"))).name for c in (profile.header.get("corpus") or [])] if profile else []
        profile_title = f"{model} — profile of {', '.join(specs) or 'calibration corpus'}"
    else:
        profile_title = title
    paths = []
    if profile is not None:
        paths.append(cosine_figure(profile, out, profile_title))
    if result is not None:
        if not result.get("plans"):
            raise ReportError("the eval JSON has no plan rows")
        paths.append(quality_figure(result, out, title))
        if any(r.get("speedup") is not None for r in result["plans"]):
            paths.append(speed_figure(result, out, title))
        if (result.get("dense") or {}).get("lm_eval"):
            paths.append(lm_eval_figure(result, out, title))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Markdown tables (docs/results.md)


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def plan_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| plan | realized skip | KL(dense‖plan) | ppl (Δ vs dense) | top-1 agree | greedy agree | "
             "1st divergence | speedup (per-round range) | FLOP-ideal |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {_fmt(r['skip_ratio'], '.3f')} | {_fmt(r['kl_mean'], '.4f')} | "
                     f"{_fmt(r['ppl'], '.2f')} ({_fmt(r['ppl_increase'], '+.1%')}) | {_fmt(r['top1_agreement'], '.3f')} | "
                     f"{_fmt(r.get('greedy_agreement'), '.3f')} | {_fmt(r.get('first_divergence_mean'), '.1f')} | "
                     f"{_speed(r)} | {_fmt(r.get('ideal_speedup'), '.3f')}× |")
    return lines


def _speed(row: dict[str, Any]) -> str:
    """Median speedup and, when measured, the per-round range (the run's timing noise)."""
    text = f"{_fmt(row.get('speedup'), '.3f')}×"
    if row.get("speedup") is not None and row.get("speedup_min") is not None:
        text += f" ({row['speedup_min']:.2f}–{row['speedup_max']:.2f})"
    return text


def _by_family(rows: list[dict[str, Any]], family: str) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("family") == family), None)


def _kl_at(row: dict[str, Any], cls: str) -> str:
    entry = row["per_class"][cls]
    ratio = entry.get("skip_ratio")
    return f"{entry['kl_mean']:.4f}" + (f" @{ratio:.3f}" if ratio is not None else "")


def comparisons(result: dict[str, Any], target: float = 0.25) -> list[str]:
    """The fitted plans against the oracle and the baselines at `target`, as measured (numbers only, no verdicts)."""
    rows = [r for r in result["plans"] if r.get("target") is not None and abs(r["target"] - target) < 1e-9]
    if not rows:
        return [f"- no sweep rows at target {target}"]
    get = lambda fam: _by_family(rows, fam)  # noqa: E731
    # The sweep's static plan: refined when the sweep refined (it is then the reference of the baselines), else as
    # fitted from the profile.
    refined = get(families.FITTED_STATIC_REFINED)
    static = refined or get(families.FITTED_STATIC)
    static_label = "refined static" if refined else "fitted static"
    oracle, llm, rnd = get(families.ORACLE), get(families.LLM_DROP), get(families.RANDOM_FFN)
    adaptive, paper = get(families.FITTED_ADAPTIVE), get(families.PAPER_DEFAULTS)
    lines = []
    if static and oracle:
        lines.append(f"- {static_label} KL {static['kl_mean']:.4f} = {static['kl_mean'] / oracle['kl_mean']:.2f}× the "
                     f"oracle's {oracle['kl_mean']:.4f}")
    if static and llm:
        same_set = static.get("layers") is not None and static.get("layers") == llm.get("layers")
        same = " (the same layer set: top-by-cosine already picks it here)" if same_set else ""
        lines.append(f"- {static_label} KL {static['kl_mean']:.4f} vs LLM-Drop top-by-cosine {llm['kl_mean']:.4f}"
                     f"{same}")
    if static and rnd:
        lines.append(f"- {static_label} KL {static['kl_mean']:.4f} vs random {rnd['kl_mean']:.4f} "
                     f"({rnd['kl_mean'] / max(static['kl_mean'], 1e-12):.1f}×)")
    for other, label in ((oracle, "the static oracle"), (paper, "the paper-default rule")):
        if adaptive and other:
            lines.append(f"- fitted adaptive KL {adaptive['kl_mean']:.4f} (realized {adaptive['skip_ratio']:.3f}) vs "
                         f"{label} {other['kl_mean']:.4f} (realized {other['skip_ratio']:.3f})")
    # (per-class family, the global families it is compared with, first found; label)
    pairs = ((families.FITTED_STATIC_PER_CLASS, (families.FITTED_STATIC_UNREFINED, families.FITTED_STATIC),
              "static (cosine-fitted)"),
             (families.FITTED_STATIC_PER_CLASS_REFINED, (families.FITTED_STATIC_REFINED,), "static (refined)"),
             (families.FITTED_ADAPTIVE_PER_CLASS, (families.FITTED_ADAPTIVE,), "adaptive"))
    for routed_family, global_families, label in pairs:
        routed = get(routed_family)
        glob = next((row for row in map(get, global_families) if row), None)
        if routed and glob:
            wins = [c for c in routed["per_class"] if routed["per_class"][c]["kl_mean"] < glob["per_class"][c]["kl_mean"]]
            detail = ", ".join(f"{c} {_kl_at(routed, c)} vs {_kl_at(glob, c)}" for c in routed["per_class"])
            lines.append(f"- per-class {label} plans have a lower KL than the global {label} plan on their own class "
                         f"in {len(wins)}/{len(routed['per_class'])} classes (class: per-class vs global KL @ realized "
                         f"skip on that class; {detail})")
    if static:
        lines.append(f"- held-out perplexity increase of the {static_label} plan: {static['ppl_increase']:+.1%} "
                     f"({static['ppl_dense']:.2f} → {static['ppl']:.2f})")
    return lines


def results_markdown(result: dict[str, Any], figures: Sequence[str], command: str) -> str:
    data = result["data"]
    per_class_ppl = ", ".join(f"{c} {v['ppl']:.1f}" for c, v in result["dense"]["per_class"].items())
    out = ["# Results on the bundled demo model", "",
           f"Regenerate everything on this page with `{command}` (numbers below are from {result['created']}, "
           f"skipprofiler {result['tool_version']}).", "",
           f"Model: {result['model']['name']} ({result['model']['fingerprint'].get('num_layers')} layers). "
           f"Held-out data: {data['spec']}, {data['documents']} documents, windows of {data['window']} tokens with a "
           f"dense prompt of {data['prompt_len']}; {sum(data['tokens'].values())} measured decode positions. "
           f"Dense held-out perplexity {result['dense']['ppl']:.2f} "
           f"({per_class_ppl}).", "",
           "## Comparisons (target 25 %)", ""]
    out += comparisons(result)
    out += ["", "Definitions of every column and baseline: [eval-schema.md](eval-schema.md). Speeds were timed on the "
                "machine that ran the command; the bracket after each speedup is the range of its per-round ratios "
                "(dense and plan run side by side), that run's timing noise.", ""]
    targets = sorted({r["target"] for r in result["plans"] if r.get("target") is not None})
    for target in targets:
        out += [f"## Target {target:.0%}", ""]
        out += plan_table([r for r in result["plans"] if r.get("target") == target])
        out.append("")
    others = [r for r in result["plans"] if r.get("target") is None]
    if others:
        out += ["## Other plans", ""] + plan_table(others) + [""]
    if figures:
        out += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    return "\n".join(out)
