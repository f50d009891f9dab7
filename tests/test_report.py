"""Figures and the results Markdown from eval JSON (and a profile's histograms)."""

from __future__ import annotations

import pytest

from skipprofiler.evaluation.report import comparisons, make_report, results_markdown


def _row(name, family, ratio, kl, ppl, speed=None, target=0.25, per_class=None, mode="static"):
    return {"name": name, "family": family, "skip_ratio": ratio, "kl_mean": kl, "ppl": ppl, "ppl_dense": 10.0,
            "ppl_increase": ppl / 10.0 - 1, "top1_agreement": 0.9, "greedy_agreement": 0.8,
            "first_divergence_mean": 5.0, "speedup": speed, "ideal_speedup": 1 + ratio / 2, "target": target,
            "mode": mode, "per_class": per_class or {"a": {"kl_mean": kl}, "b": {"kl_mean": kl}}}


def _result():
    rows = []
    for t in (0.1, 0.25):
        rows += [_row(f"static @{t}", "fitted static (refined)", t, 0.01 * t, 10.5, 1.05, t),
                 _row(f"adaptive @{t}", "fitted adaptive", t + 0.01, 0.008 * t, 10.4, 1.02, t, mode="adaptive"),
                 _row(f"random @{t}", "random FFN", t, 0.05 * t, 12.0, 1.04, t),
                 _row(f"oracle @{t}", "oracle static", t, 0.009 * t, 10.45, 1.05, t),
                 _row(f"LLM-Drop @{t}", "LLM-Drop top-by-cosine", t, 0.02 * t, 11.0, 1.05, t),
                 _row(f"paper @{t}", "FFN-SkipLLM paper defaults", t - 0.02, 0.012 * t, 10.8, 1.0, t, mode="adaptive"),
                 _row(f"drop @{t}", "ShortGPT layer drop", t, 0.1 * t, 15.0, None, t, mode="layer_drop")]
    rows.append(_row("pc", "fitted adaptive per-class (routed by label)", 0.26, 0.0019, 10.3, None, 0.25,
                     {"a": {"kl_mean": 0.001}, "b": {"kl_mean": 0.003}}, mode="adaptive"))
    return {"format": "skipprof-eval", "created": "now", "tool_version": "0.1.0",
            "model": {"name": "tiny", "fingerprint": {"num_layers": 12}},
            "data": {"spec": "held-out", "documents": 8, "window": 64, "prompt_len": 16, "tokens": {"a": 100, "b": 90}},
            "dense": {"ppl": 10.0, "per_class": {"a": {"ppl": 9.0}, "b": {"ppl": 11.0}}}, "plans": rows}


def test_eval_figures_are_written(tmp_path):
    from PIL import Image

    paths = make_report(None, _result(), tmp_path, title="tiny — test")
    assert [p.name for p in paths] == ["quality_vs_skip.png", "speedup_vs_skip.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.size[0] > 600 and im.size[1] > 300


def test_comparisons_state_the_numbers_without_verdicts():
    text = "\n".join(comparisons(_result()))
    assert "- refined static KL 0.0025 = 1.11× the oracle's 0.0022" in text
    assert "- refined static KL 0.0025 vs LLM-Drop top-by-cosine 0.0050" in text
    assert "- fitted adaptive KL 0.0020 (realized 0.260) vs the static oracle 0.0022" in text
    # per-class: class b (0.003) does not beat the global adaptive plan (0.002): counted, with the numbers
    assert "per-class adaptive plans have a lower KL than the global adaptive plan on their own class in 1/2" in text
    assert not any(mark in text for mark in ("✅", "❌", "met:", "bar ≤"))


def test_markdown_has_tables_per_target_and_figures():
    text = results_markdown(_result(), ["results/quality_vs_skip.png"], "scripts/make_results.sh")
    assert "## Target 10%" in text and "## Target 25%" in text
    assert "![quality_vs_skip](results/quality_vs_skip.png)" in text
    assert "`scripts/make_results.sh`" in text


def _tiny_profile():
    import torch
    from tiny_models import tiny_model

    from skipprofiler.profile.corpus import Batch
    from skipprofiler.profile import ProfileSettings, profile_model

    model = tiny_model("llama", num_layers=4)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randint(2, 96, (4, 16), generator=g), torch.ones(4, 16, dtype=torch.long),
                  torch.tensor([0, 0, 1, 1]), 2)
    return profile_model(model, [batch], ProfileSettings(generate=4), class_names=["prose", "code"])


def test_cosine_figure_from_a_real_profile(tmp_path):
    from PIL import Image

    paths = make_report(_tiny_profile(), None, tmp_path, title="tiny llama — random tokens")
    assert [p.name for p in paths] == ["cosine_by_layer.png"]
    with Image.open(paths[0]) as im:
        assert im.size[0] > 600 and im.size[1] > 300


def test_report_rejects_an_eval_without_rows(tmp_path):
    from skipprofiler.evaluation.report import ReportError

    with pytest.raises(ReportError, match="no plan rows"):
        make_report(None, dict(_result(), plans=[]), tmp_path)


def test_axes_do_not_zoom_into_a_few_close_points():
    """Two plans 4 % apart: the skip axis still starts at dense (0) and the log-KL axis spans a decade, so a small
    difference is drawn small."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skipprofiler.evaluation.report import _log_span, _skip_axis

    fig, ax = plt.subplots()
    points = [(0.240, 0.0525), (0.250, 0.0545)]
    ax.set_yscale("log")
    ax.plot(*zip(*points))
    _skip_axis(ax, points)
    _log_span(ax, [y for _, y in points])
    lo, hi = ax.get_xlim()
    assert lo <= 0.0 and 0.25 < hi < 0.35
    bottom, top = ax.get_ylim()
    assert top / bottom == pytest.approx(10.0, rel=1e-6) and bottom < 0.0525 and top > 0.0545
    plt.close(fig)


def test_every_family_has_its_own_colour():
    from skipprofiler.evaluation.report import FAMILY_STYLE

    colours = {}
    for family, (colour, _, _) in FAMILY_STYLE.items():
        colours.setdefault(colour, set()).add(family)
    shared = {c: f for c, f in colours.items() if len(f) > 1}
    # The sweep's static plan: "fitted static" without refining, "fitted static (refined)" with (one series per run).
    assert shared == {"tab:blue": {"fitted static", "fitted static (refined)"}}
