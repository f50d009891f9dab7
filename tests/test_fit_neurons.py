"""Neuron plans fitted by measured KL (issue 27 item 3): `FitSettings.granularity="neurons"` on tiny models with the
real runtime -- the target lands on its FFN FLOPs share, widths differ by layer, budgets hold on the calibration
windows, the importance criteria, and the CLI's settings check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import run
from tiny_models import tiny_model

from skipprofiler.arch.capture import down_weight
from skipprofiler.evaluation.fidelity import dense_references, make_batches
from skipprofiler.fit.from_profile import FitSettings
from skipprofiler.fit.neurons import (NeuronMoments, fit_neuron_plan, neuron_importance, solve_neuron_map,
                                      solve_neuron_refit)
from skipprofiler.fit.refine import Budget
from skipprofiler.profile import ProfileSettings, profile_model
from skipprofiler.profile.corpus import Batch
from skipprofiler.runtime import apply_plan


def _model(heavy: int | None = 2, layers: int = 5):
    torch.manual_seed(0)
    model = tiny_model("llama", num_layers=layers)
    if heavy is not None:  # one FFN dominates the stream: narrowing it costs far more than any other
        with torch.no_grad():
            model.model.layers[heavy].mlp.down_proj.weight.mul_(8.0)
    return model


def _profile(model):
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        ids = torch.randint(2, 90, (4, 12), generator=g)
        batches.append(Batch(ids, torch.ones_like(ids), torch.zeros(4, dtype=torch.long), 1))
    return profile_model(model, batches, ProfileSettings(generate=8, reservoir_size=16, doc_reservoir_size=4, seed=1),
                         class_names=["a"])


def _references(model, docs=6, length=24, seed=7):
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(2, 90, (length,), generator=g).tolist() for _ in range(docs)]
    return dense_references(model, make_batches(tokens, ["a"] * docs, prompt_len=6, pad_id=0, batch_size=8))


def _fit(model, profile, **kw):
    budget = kw.pop("budget", None)
    settings = FitSettings(granularity="neurons", **kw).resolve()
    refs = _references(model)
    return fit_neuron_plan(model, None, profile, settings, budget=budget, references=refs,
                           confirm_references=_references(model, seed=8),
                           map_batches=[r.batch for r in _references(model, docs=16, seed=9)])


def _runtime_saving(model, plan) -> float:
    """The runtime's `ffn_flops_saved_share` over the calibration windows, teacher forced with the plan applied."""
    with apply_plan(model, plan) as handle, torch.inference_mode():
        for ref in _references(model):
            with handle.decode_from(ref.batch.prompt_len):
                model(input_ids=ref.batch.input_ids, attention_mask=ref.batch.attention_mask, use_cache=False)
        return handle.stats()["ffn_flops_saved_share"]


@pytest.fixture(scope="module")
def heavy():
    model = _model()
    return model, _profile(model)


def test_a_target_fit_lands_on_its_ffn_flops_share_with_widths_chosen_per_layer(heavy):
    model, profile = heavy
    plan = _fit(model, profile, target=0.3, neuron_rounds=3)
    assert plan.fit["expected_ffn_flops_saved"] == pytest.approx(0.3, abs=0.01)
    widths = plan.neurons.widths
    size = model.config.intermediate_size
    full = {l: widths.get(l, size) for l in range(5)}
    assert len(set(full.values())) > 1  # not one uniform width
    assert full[2] == max(full.values())  # the heavy layer keeps the most
    assert plan.fit["kl"] <= plan.fit["uniform_start"]["kl"] + 1e-9
    assert plan.fit["measurements"] > 2 and plan.fit["widths_path"][0]["step"] == "uniform"
    stats = plan.fit["neuron_statistics"]  # auto: both regimes measured at the uniform start, the lower KL kept
    assert stats["regime"] == min(("decode", "prompt"), key=lambda r: stats["probe"][r])
    regime = stats["regime"]
    for l, k in widths.items():  # kept indices ascending, the top k by the criterion; bias W_down[:, drop] E[a_drop]
        kept = plan.neurons.kept(l)
        assert np.all(np.diff(kept) > 0)
        score = neuron_importance(profile, model, "energy", regime)[l]
        assert set(kept) == set(np.argsort(-score, kind="stable")[:k])
        drop = np.setdiff1d(np.arange(size), kept)
        wd = down_weight(model.model.layers[l].mlp.down_proj).detach().double().numpy()
        want = wd[:, drop] @ profile.neuron_mean(regime, l)[drop]
        np.testing.assert_allclose(plan.neurons.bias(l), want, rtol=1e-4, atol=1e-6)
    # the runtime saves what the fit counted
    assert _runtime_saving(model, plan) == pytest.approx(plan.fit["expected_ffn_flops_saved"], abs=1e-3)


def test_a_budget_fit_holds_its_budget_on_the_calibration_windows(heavy):
    model, profile = heavy
    loose = _fit(model, profile, target=None, max_kl=0.05, budget=Budget(max_kl=0.05), neuron_rounds=1,
                 neuron_statistics="decode")
    assert loose.fit["neuron_statistics"] == {"regime": "decode", "tokens": profile.neuron_tokens("decode", 0),
                                              "chosen_by": "decode"}
    assert loose.fit["kl"] <= 0.05
    assert all(step["kl"] <= 0.05 for step in loose.fit["widths_path"])
    assert loose.fit["expected_ffn_flops_saved"] > 0
    tight = _fit(model, profile, target=None, max_kl=0.01, budget=Budget(max_kl=0.01), neuron_rounds=1)
    assert tight.fit["kl"] <= 0.01
    assert tight.fit["expected_ffn_flops_saved"] <= loose.fit["expected_ffn_flops_saved"]


def test_a_budget_nothing_fits_is_a_clear_error(heavy):
    model, profile = heavy
    from skipprofiler.fit.neurons import NeuronFitError

    with pytest.raises(NeuronFitError, match="no narrowing fits the budget"):
        _fit(model, profile, target=None, max_kl=1e-9, budget=Budget(max_kl=1e-9), neuron_rounds=0)


def test_a_neuron_map_predicts_the_dropped_output_from_the_kept_activations():
    rng = np.random.default_rng(0)
    n, kept_count, hidden = 4000, 6, 5
    a_kept = rng.normal(size=(n, kept_count)) * rng.uniform(0.5, 2.0, kept_count)
    mix = rng.normal(size=(4, 2)) @ rng.normal(size=(2, kept_count))  # the dropped neurons: rank 2 in the kept ones
    a = np.concatenate([a_kept, a_kept @ mix.T + rng.normal(size=4)], axis=1)  # [n, 10]: neurons 6..9 dropped
    a[:, 6:] += 0.01 * rng.normal(size=(n, 4))
    down = rng.normal(size=(hidden, 10))
    mean = a.mean(0)
    moments = NeuronMoments(mean, np.cov(a.T, bias=True), n)
    kept = np.arange(kept_count)
    target = a[:, 6:] @ down[:, 6:].T  # [n, hidden]: what the dropped neurons add
    error = {}
    for rank in (1, 2, 6):
        bias, m_in, m_out = solve_neuron_map(moments, down, kept, rank)
        assert m_in.shape == (min(rank, hidden), kept_count) and m_out.shape == (hidden, min(rank, hidden))
        assert bias.dtype == m_in.dtype == m_out.dtype == np.float32
        error[rank] = np.mean((a_kept @ m_in.T @ m_out.T + bias - target) ** 2)
    mean_only = np.mean((down[:, 6:] @ mean[6:] - target) ** 2)
    assert error[2] < 1e-3 * mean_only  # the rank of the dependence: predicted up to the noise and the ridge
    assert error[6] <= error[2] * 1.01 and error[1] < mean_only


def test_a_refit_folds_the_full_rank_map_into_the_kept_down_columns():
    rng = np.random.default_rng(1)
    n, hidden = 4000, 5
    a_kept = rng.normal(size=(n, 6)) * rng.uniform(0.5, 2.0, 6)
    a = np.concatenate([a_kept, a_kept @ rng.normal(size=(6, 4)) + rng.normal(size=4)], axis=1)
    down = rng.normal(size=(hidden, 10))
    moments = NeuronMoments(a.mean(0), np.cov(a.T, bias=True), n)
    kept = np.arange(6)
    bias, regression = solve_neuron_refit(moments, down, kept)
    assert regression.shape == (4, 6) and regression.dtype == np.float16 and bias.dtype == np.float32
    refit = down[:, :6] + down[:, 6:] @ regression.astype(np.float64)  # what the runtime folds
    # the whole FFN output from the kept activations alone: exact here up to the ridge and half precision (the
    # dropped ones are linear in them), where the model's own kept columns and the mean bias miss their variation
    error = np.mean((a_kept @ refit.T + bias - a @ down.T) ** 2)
    mean_only = np.mean((a_kept @ down[:, :6].T + down[:, 6:] @ a[:, 6:].mean(0) - a @ down.T) ** 2)
    assert error < 1e-3 * mean_only
    scaled = NeuronMoments(moments.mean * np.r_[np.ones(6), 1e6 * np.ones(4)], moments.cov.copy(), n)
    scaled.cov[6:, :] *= 1e6
    scaled.cov[:, 6:] *= 1e6  # the dropped neurons a million times larger: B beyond float16's range
    assert solve_neuron_refit(scaled, down, kept)[1].dtype == np.float32
    m_bias, m_in, m_out = solve_neuron_map(moments, down, kept, 6)  # the same prediction, unfolded
    np.testing.assert_allclose(a_kept @ (down[:, :6] + m_out @ m_in).T + m_bias, a_kept @ refit.T + bias, atol=0.02)


def test_a_refit_fill_fit_costs_no_flops_beyond_the_bias_and_beats_the_mean(heavy, tmp_path):
    from skipprofiler.arch.registry import model_fingerprint
    from skipprofiler.plan import load_plan, save_plan
    from skipprofiler.plan.model import PlanFile

    model, profile = heavy
    plan = _fit(model, profile, target=0.3, neuron_rounds=0, neuron_fill="refit", neuron_statistics="decode")
    mean_plan = _fit(model, profile, target=0.3, neuron_rounds=0, neuron_fill="mean", neuron_statistics="decode")
    assert plan.neurons.fill == "refit" and plan.neurons.rank is None
    assert plan.fit["neuron_fill"] == "refit" and "rank" not in plan.fit["neuron_map"]
    assert plan.neurons.widths == mean_plan.neurons.widths  # the same FLOPs: the same uniform start
    assert plan.fit["uniform_start"]["kl"] < mean_plan.fit["uniform_start"]["kl"]
    size = model.config.intermediate_size
    assert all(plan.neurons.regression(l).shape == (size - k, k) for l, k in plan.neurons.widths.items())
    path = tmp_path / "p.yaml"
    save_plan(PlanFile(model={"name": "tiny", "fingerprint": model_fingerprint(model)}, global_plan=plan), path)
    loaded = load_plan(path).global_plan
    assert all(np.array_equal(loaded.neurons.regression(l), plan.neurons.regression(l)) for l in plan.neurons.widths)
    assert _runtime_saving(model, loaded) == pytest.approx(plan.fit["expected_ffn_flops_saved"], abs=1e-3)


def test_a_map_fill_fit_lands_on_its_share_net_of_the_maps_and_the_runtime_agrees(heavy, tmp_path):
    from skipprofiler.arch.registry import model_fingerprint
    from skipprofiler.plan import load_plan, save_plan
    from skipprofiler.plan.model import PlanFile

    model, profile = heavy
    plan = _fit(model, profile, target=0.3, neuron_rounds=1, neuron_fill="map", rank=3, neuron_statistics="decode")
    assert plan.neurons.fill == "map" and plan.neurons.rank == 3
    assert plan.fit["expected_ffn_flops_saved"] == pytest.approx(0.3, abs=0.01)
    assert plan.fit["neuron_map"]["rank"] == 3 and plan.fit["neuron_map"]["positions"] > 0
    mean_plan = _fit(model, profile, target=0.3, neuron_rounds=0, neuron_fill="mean", neuron_statistics="decode")
    hidden = model.config.hidden_size
    for l, k in plan.neurons.widths.items():
        m_in, m_out = plan.neurons.neuron_map(l)
        assert m_in.shape == (3, k) and m_out.shape == (hidden, 3)
    # the maps cost FLOPs: the same net share drops more neurons than the mean bias does
    assert sum(plan.neurons.widths.values()) < sum(mean_plan.neurons.widths.values())
    path = tmp_path / "p.yaml"
    save_plan(PlanFile(model={"name": "tiny", "fingerprint": model_fingerprint(model)}, global_plan=plan), path)
    loaded = load_plan(path).global_plan
    assert loaded.neurons.rank == 3 and all(np.array_equal(loaded.neurons.neuron_map(l)[1], plan.neurons.neuron_map(l)[1])
                                            for l in plan.neurons.widths)
    assert _runtime_saving(model, loaded) == pytest.approx(plan.fit["expected_ffn_flops_saved"], abs=1e-3)


def test_fill_auto_keeps_the_fill_that_measures_lower_at_the_uniform_start(heavy, monkeypatch):
    from skipprofiler.fit import neurons

    model, profile = heavy
    plan = _fit(model, profile, target=0.3, neuron_rounds=0, neuron_fill="auto", rank=3, neuron_statistics="decode")
    stats = plan.fit["neuron_statistics"]
    probe = {f: stats["probe"][f"decode, fill {f}"] for f in ("mean", "map")}
    assert stats["fill"] == plan.neurons.fill == plan.fit["neuron_fill"] == min(probe, key=probe.get)
    assert ("neuron_map" in plan.fit) == (plan.neurons.fill == "map")
    assert plan.fit["expected_ffn_flops_saved"] == pytest.approx(0.3, abs=0.01)
    # a model too wide for the maps' covariances: auto measures the mean only, no error
    monkeypatch.setattr(neurons, "MAX_MOMENT_BYTES", 1024)
    narrow = _fit(model, profile, target=0.3, neuron_rounds=0, neuron_fill="auto", neuron_statistics="decode")
    assert narrow.neurons.fill == "mean" and "neuron_map" not in narrow.fit


def test_a_map_fill_too_wide_to_hold_its_covariances_is_a_clear_error(heavy, monkeypatch):
    from skipprofiler.fit import neurons
    from skipprofiler.fit.neurons import NeuronFitError

    model, profile = heavy
    monkeypatch.setattr(neurons, "MAX_MOMENT_BYTES", 1024)
    with pytest.raises(NeuronFitError, match="keeps every FFN's activation covariance .* use fill mean"):
        _fit(model, profile, target=0.3, neuron_rounds=0, neuron_fill="map", rank=2)


def test_the_criteria_rank_differently_and_wanda_reads_the_input_weights(heavy):
    model, profile = heavy
    scores = {c: neuron_importance(profile, model, c)[1] for c in ("energy", "fluctuation", "wanda")}
    assert not np.array_equal(np.argsort(scores["energy"]), np.argsort(scores["wanda"]))
    mlp = model.model.layers[1].mlp
    x = np.sqrt(profile.input_sq_mean("decode", 1))
    want = (np.abs(mlp.gate_proj.weight.detach().double().numpy()) @ x + np.abs(mlp.up_proj.weight.detach().double().numpy()) @ x)
    np.testing.assert_allclose(scores["wanda"], want, rtol=1e-10)
    assert np.all(scores["fluctuation"] <= scores["energy"] + 1e-12)


def test_whole_ffn_skips_are_moves_where_they_measure_cheaper_than_narrowing(tmp_path):
    """compensation linear: a layer whose FFN barely writes to the stream is skipped whole (its linear substitute in
    place) and the others narrow less; the plan file keeps both kinds, and the runtime saves what the fit counted."""
    from skipprofiler.arch.registry import model_fingerprint
    from skipprofiler.plan import load_plan, save_plan
    from skipprofiler.plan.model import PlanFile

    model = _model(heavy=2)
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight.mul_(0.02)
    profile = _profile(model)
    narrowing = _fit(model, profile, target=0.3, neuron_rounds=0, neuron_statistics="decode")
    mixed = _fit(model, profile, target=0.3, neuron_rounds=1, neuron_statistics="decode", compensation="linear")
    record = mixed.fit["whole_ffn"]
    assert 3 in record["layers"] and set(record["measured"]) == set(range(5))
    assert min(record["measured"], key=record["measured"].get) == 3
    assert mixed.skip_layers == {l: 1.0 for l in record["layers"]} and mixed.compensation == "linear"
    assert set(mixed.linear.layers) == set(record["layers"]) and 3 not in mixed.neurons.widths
    assert mixed.fit["expected_ffn_flops_saved"] == pytest.approx(0.3, abs=0.01)
    assert mixed.expected_skip_ratio == pytest.approx(len(record["layers"]) / 5) and narrowing.expected_skip_ratio == 0
    assert mixed.fit["kl"] < narrowing.fit["kl"]
    assert any(step["step"].startswith("whole") for step in mixed.fit["widths_path"])
    path = tmp_path / "mixed.yaml"
    save_plan(PlanFile(model={"name": "tiny", "fingerprint": model_fingerprint(model)}, global_plan=mixed), path)
    loaded = load_plan(path).global_plan
    assert loaded.skip_layers == mixed.skip_layers and loaded.neurons.widths == mixed.neurons.widths
    # decoding (teacher forcing would also count the substitute's work on the prompt rows of a mixed forward)
    prompts = torch.randint(2, 90, (3, 6), generator=torch.Generator().manual_seed(5))
    with apply_plan(model, loaded) as handle, torch.inference_mode():
        model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=12, do_sample=False,
                       pad_token_id=0)
        assert handle.stats()["ffn_flops_saved_share"] == pytest.approx(mixed.fit["expected_ffn_flops_saved"],
                                                                        abs=1e-3)


def test_bad_neuron_settings_are_all_reported_at_once(tmp_path, capsys):
    assert FitSettings(target=0.2, granularity="neurons", compensation="linear").problems() == []
    assert "rank of FitSettings.neuron_fill=\"map\"'s maps" in "\n".join(
        FitSettings(target=0.2, granularity="neurons", compensation="linear", rank=4).problems())
    problems = FitSettings(target=0.2, granularity="neurons", mode="adaptive", neuron_fill="zero",
                           neuron_importance="magic", per_class=True, compensation="norm_ratio",
                           neuron_statistics="both").problems()
    text = "\n".join(problems)
    for part in ("neuron_fill must be one of none, mean, map, refit, auto", "neuron_importance must be one of",
                 "neuron_statistics must be one of auto, decode, prompt", "mode=\"adaptive\"",
                 "per_class", "compensation"):
        assert part in text, part
    assert FitSettings(target=0.2, neuron_fill="mean").problems() == [
        'FitSettings.neuron_fill applies to FitSettings.granularity="neurons" only']
    assert FitSettings(target=0.2, granularity="blocks").problems() == [
        "FitSettings.granularity must be one of ffn, neurons, got 'blocks'"]
    assert FitSettings(target=0.2, granularity="neurons").needs_model

    code, _, err = run(["export-plan", tmp_path / "missing.prof", "-r", "0.2", "--granularity", "neurons",
                        "--mode", "adaptive", "--neuron-fill", "zero", "--neuron-importance", "magic", "--out", "-"],
                       capsys)
    assert code == 2
    for part in ("--neuron-fill must be one of none, mean, map, refit, auto, got 'zero'", "--neuron-importance must be one of",
                 "--granularity neurons fits static plans, not --mode adaptive", "beside the plan"):
        assert part in err, (part, err)
    assert "Traceback" not in err
