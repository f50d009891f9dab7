"""Fit skip plans from a profile: static layer sets, adaptive FFN-SkipLLM thresholds, per-class plans, a prompt router.

Everything here works on a `Profile` (contract in docs/DESIGN.md) and returns plan.py objects; the CLI
(`skipprof export-plan`) and docs/plan-format.md describe the choices. Summary:

* Regime: decode statistics when the profile has generated tokens, else prompt statistics.
* Skip ratio: skipped FFN calls / (decode positions after warm-up x layers), as defined in plan.py. Forced-dense
  positions (`dense_every`) stay in the denominator, so every fit aims at ``target / eligible_share`` on eligible
  positions; the eligible share is counted over `horizon` decode positions after warm-up.
* Cold layers: layer 0 and the last layer always, plus the neighbouring layers at either edge that are saturated
  (cos > tau) on fewer than `cold_floor` of tokens. Static fits use tau = the (1 - R) quantile of all (token, layer)
  cosines, i.e. "a call among the R most saturated"; adaptive fits use the fitted tau (iterated to a fixed point).
* Static: rank the non-cold layers by their mean `residual` cosine, take whole layers and one fractional layer until
  the expected ratio equals R (the fraction solved with scipy's brentq on the exact plan.py pattern).
* Adaptive: simulate the plan.py rule on the profile's per-token reservoir (vectorised, float32 comparisons like the
  runtime); brentq on tau (one tau, or per-layer quantile level q) for each run length k; keep the k whose skipped
  calls have the highest mean cosine (the runs that remove the least work-doing FFNs).
* Pooled (global) fits weight each class's reservoir rows by that class's token count, so a class is represented by
  its share of the calibration tokens, not by its reservoir size.
* Adaptive plans for batched decoding (`batch_decision: shared`): B rows fire together at the first layer where all
  pass, i.e. where the elementwise minimum of their cosines passes. The reservoir is resampled (by weight, seeded)
  into groups of B and each group becomes one row of minima; the rule is simulated on those rows.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.optimize import brentq

from .._jsonable import jsonable, rounded
from ..plan.model import PlanFile, Router, SkipPlan, fraction_pattern, is_eligible

log = logging.getLogger("skipprofiler")

DEFAULT_HORIZON = 4096  # decode positions after warm-up over which static patterns and dense_every are counted
DEFAULT_GEN_LEN = 256  # generated tokens per request a plan is fitted for (warm-up and ratio are counted over these)
RATIO_TOLERANCE = 0.01  # largest |expected - target| a fit accepts; beyond it the target is out of reach
ROUND = 6  # decimals kept for fitted floats (YAML stays short and byte-stable)
DEFAULT_SHARED_BATCH = 8  # batch size assumed for shared-decision plans whose fit record does not say


TAU_MODES = ("global", "per-layer")  # adaptive: one tau for all layers, or each layer's quantile at one level
GRANULARITIES = ("ffn", "neurons")  # FitSettings.granularity: whole FFN calls, or part of each FFN (fit/neurons.py)
NEURON_IMPORTANCES = ("energy", "fluctuation", "wanda")  # how a neuron plan ranks an FFN's neurons (fit/neurons.py)
DEFAULT_NEURON_IMPORTANCE = "energy"
DEFAULT_NEURON_FILL = "mean"
AUTO_FILL = "auto"  # FitSettings.neuron_fill: mean or map, whichever measures the lower KL at the uniform start
NEURON_STATISTICS = ("auto", "decode", "prompt")  # which profile regime's neuron statistics a neuron plan uses


class FitError(ValueError):
    """A plan cannot be fitted as asked (unattainable target, empty profile, ...); the message says what to change."""


@dataclass
class FitSettings:
    """Everything that shapes a fit besides the profile. None = the mode's default (see `resolve`)."""

    target: float | None  # skip ratio to reach; None for budget fits (refine.fit_budget_plan chooses the ratio)
    mode: str = "static"
    apply_to: str = "decode"
    warmup_tokens: int | None = None
    dense_every: int | None = None
    compensation: str = "none"
    rank: int | None = None  # compensation linear: rank of the maps (None: full d x d); neuron_fill map: of its maps (None: 32)
    error_aware: bool = False  # compensation linear: refit the chosen maps in layer order, keep if KL drops
    max_skip: int | None = None  # adaptive run length k; None: search 1..L-2
    tau_mode: str = "global"  # adaptive: "global" (one tau) or "per-layer" (each layer's quantile at one level q)
    cold_floor: float = 0.05
    min_class_tokens: int = 256
    gen_len: int = DEFAULT_GEN_LEN  # the generation length the plan is for
    horizon: int | None = None  # decode positions after warm-up the ratio is counted over; None: gen_len - warm-up
    seed: int = 0
    batch_decision: str = "per_sequence"  # adaptive: "shared" fits for rows of a batch firing together
    batch_size: int = DEFAULT_SHARED_BATCH  # with shared: the serving batch size the fit assumes
    # what `skipprofiler.fit_plan` fits besides the global plan, and how it measures
    per_class: bool = False  # add a plan per profile class and a prompt router
    classes: list[str] | None = None  # class plans for these classes only (no router)
    max_ppl_increase: float | None = None  # quality budget instead of `target` (static, global plan): share, 0.10
    max_kl: float | None = None  # quality budget: mean KL(dense || plan) on calibration windows
    refine: bool = False  # choose by measured KL on calibration windows (needs the model)
    data: str | None = None  # calibration --data spec for refine and budgets; None: the bundled calibration split
    text_column: str | None = None  # of `data`, read as `skipprof profile` reads it
    class_column: str | None = None
    # neuron plans (fit/neurons.py): part of every FFN at decode positions, widths chosen by measured KL
    granularity: str = "ffn"  # "ffn": whole FFN calls (skip_layers); "neurons": intermediate neurons per layer
    neuron_fill: str | None = None  # neurons: "none", "mean" (the dropped neurons' mean output as a bias), "map" (a
    #   rank-`rank` map from the kept neurons' activations onto the dropped ones' output, plus the bias), "refit"
    #   (that map at full rank folded into a copy of the kept down columns: no FLOPs, one [hidden, k] matrix per
    #   layer in memory) or "auto" (mean or map, whichever measures the lower KL at the uniform start); None: mean
    neuron_importance: str | None = None  # neurons: energy, fluctuation or wanda; None: the default (neurons.py)
    neuron_statistics: str | None = None  # neurons: the profile regime ranking neurons and giving the bias: decode,
    #   prompt, or auto (each measured at one uniform width, the lower KL kept); None: auto
    neuron_rounds: int = 2  # neurons: exchange rounds of the width search (each measures every layer once or twice)

    @property
    def budget_fit(self) -> bool:
        return self.max_ppl_increase is not None or self.max_kl is not None

    @property
    def needs_model(self) -> bool:
        """Refining and budgets measure plans on the model itself (and fit mean outputs and linear maps there)."""
        return self.refine or self.budget_fit or self.granularity == "neurons"

    def problems(self) -> list[str]:
        """Every invalid or conflicting setting, each as one line naming the fields (`FitSettings.target`); the CLI
        prints the options that set them instead."""
        out = self._value_problems()
        if not self.budget_fit and self.target is None:
            out.append("set FitSettings.target (a skip ratio), or a quality budget: FitSettings.max_ppl_increase "
                       "and/or FitSettings.max_kl")
        if self.budget_fit and self.target is not None:
            out.append("FitSettings.target and a quality budget (FitSettings.max_ppl_increase/FitSettings.max_kl) "
                       "exclude each other")
        if self.budget_fit and self.mode != "static":
            out.append('a quality budget fits static plans, not FitSettings.mode="adaptive"')
        if self.budget_fit and (self.per_class or self.classes):
            out.append("a quality budget fits the global plan only, not FitSettings.per_class/FitSettings.classes")
        if self.batch_decision == "shared" and self.mode != "adaptive":
            out.append('FitSettings.batch_decision="shared" applies to FitSettings.mode="adaptive" only (static plans '
                       "skip the same layers in every row already)")
        if self.max_skip is not None and self.mode != "adaptive":
            out.append('FitSettings.max_skip applies to FitSettings.mode="adaptive" only')
        if self.compensation == "mean_output" and not self.needs_model:
            out.append('FitSettings.compensation="mean_output" averages the FFN outputs on calibration text with the '
                       "model: it needs FitSettings.refine (or a quality budget)")
        if self.compensation == "linear" and not self.needs_model:
            out.append('FitSettings.compensation="linear" fits maps on calibration text with the model and chooses '
                       "the layers with them in place: it needs FitSettings.refine (or a quality budget)")
        if self.compensation == "linear" and self.mode != "static":
            out.append('FitSettings.compensation="linear" fits static plans, not FitSettings.mode="adaptive"')
        if self.rank is not None and self.compensation != "linear" and not (
                self.granularity == "neurons" and self.neuron_fill in ("map", AUTO_FILL)):
            out.append('FitSettings.rank applies to FitSettings.compensation="linear" and to '
                       'FitSettings.neuron_fill="map" only')
        if self.error_aware and (self.compensation != "linear" or not self.refine):
            out.append('FitSettings.error_aware applies to FitSettings.compensation="linear" with FitSettings.refine')
        if self.granularity == "neurons":
            if self.mode != "static":
                out.append('FitSettings.granularity="neurons" fits static plans, not FitSettings.mode="adaptive"')
            if self.per_class or self.classes:
                out.append('FitSettings.granularity="neurons" fits the global plan only, not '
                           "FitSettings.per_class/FitSettings.classes")
            if self.rank is not None and self.compensation == "linear" and self.neuron_fill not in ("map", AUTO_FILL):
                out.append('FitSettings.rank with FitSettings.granularity="neurons" is the rank of FitSettings.'
                           'neuron_fill="map"\'s maps (the whole-FFN substitutes are full rank)')
            if self.compensation not in ("none", "linear"):
                out.append('FitSettings.granularity="neurons": FitSettings.compensation is "none" (narrowing moves only) '
                           'or "linear" (whole-FFN skips with linear substitutes among the moves), not '
                           f'"{self.compensation}" (what replaces dropped neurons is FitSettings.neuron_fill)')
        else:
            for name, value in (("neuron_fill", self.neuron_fill), ("neuron_importance", self.neuron_importance),
                                ("neuron_statistics", self.neuron_statistics),
                                ("neuron_rounds", None if self.neuron_rounds == 2 else self.neuron_rounds)):
                if value is not None:
                    out.append(f'FitSettings.{name} applies to FitSettings.granularity="neurons" only')
        if self.refine and self.mode == "adaptive" and (self.per_class or self.classes):
            out.append('FitSettings.refine with FitSettings.mode="adaptive" fits the global plan only, not '
                       "FitSettings.per_class/FitSettings.classes")
        return out

    def _value_problems(self) -> list[str]:
        """Settings invalid on their own (the plan-file rules for the eligibility settings, plan.validate)."""
        from ..plan.model import BATCH_DECISIONS, MODES
        from ..plan import eligibility_problems

        out = []
        if self.target is not None and not 0.0 < self.target < 1.0:
            out.append(f"FitSettings.target must be in (0, 1), got {self.target:g}")
        for field_name, value in (("max_ppl_increase", self.max_ppl_increase), ("max_kl", self.max_kl)):
            if value is not None and not value > 0:
                out.append(f"FitSettings.{field_name} must be > 0, got {value:g}")
        for field_name, value, allowed in (("mode", self.mode, MODES), ("tau_mode", self.tau_mode, TAU_MODES),
                                           ("batch_decision", self.batch_decision, BATCH_DECISIONS)):
            if value not in allowed:
                out.append(f"FitSettings.{field_name} must be one of {', '.join(allowed)}, got {value!r}")
        out += eligibility_problems("FitSettings", {"apply_to": self.apply_to, "warmup_tokens": self.warmup_tokens,
                                                    "dense_every": self.dense_every,
                                                    "compensation": self.compensation})
        if self.max_skip is not None and self.max_skip < 1:
            out.append(f"FitSettings.max_skip must be >= 1, got {self.max_skip}")
        if not 0.0 <= self.cold_floor < 1.0:
            out.append(f"FitSettings.cold_floor must be in [0, 1), got {self.cold_floor:g}")
        if self.gen_len < 1:
            out.append(f"FitSettings.gen_len must be >= 1, got {self.gen_len}")
        if self.rank is not None and self.rank < 1:
            out.append(f"FitSettings.rank must be >= 1, got {self.rank}")
        from ..plan.model import NEURON_FILLS as PLAN_FILLS

        NEURON_FILLS = (*PLAN_FILLS, AUTO_FILL)

        for field_name, value, allowed in (("granularity", self.granularity, GRANULARITIES),
                                           ("neuron_fill", self.neuron_fill, NEURON_FILLS),
                                           ("neuron_importance", self.neuron_importance, NEURON_IMPORTANCES),
                                           ("neuron_statistics", self.neuron_statistics, NEURON_STATISTICS)):
            if value is not None and value not in allowed:
                out.append(f"FitSettings.{field_name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.neuron_rounds < 0:
            out.append(f"FitSettings.neuron_rounds must be >= 0, got {self.neuron_rounds}")
        return out

    def resolve(self) -> FitSettings:
        """Fill mode defaults: adaptive like the paper (dense_every 6, warm-up = generation length // 64, the paper's
        max_seq_len // 64), static 0 / 0; the ratio is counted over the generated positions after the warm-up.
        Raises FitError for settings invalid on their own (`problems` also reports conflicting ones)."""
        problems = self._value_problems()
        if problems:
            raise FitError("; ".join(problems))
        out = copy.copy(self)
        if out.dense_every is None:
            out.dense_every = 6 if self.mode == "adaptive" else 0
        if out.warmup_tokens is None:
            out.warmup_tokens = self.gen_len // 64 if self.mode == "adaptive" else 0
        if out.warmup_tokens >= out.gen_len:
            raise FitError(f"warm-up of {out.warmup_tokens} tokens covers the whole generation length "
                           f"({out.gen_len}): nothing would be skipped; lower FitSettings.warmup_tokens or raise "
                           "FitSettings.gen_len")
        if out.horizon is None:
            out.horizon = out.gen_len - out.warmup_tokens
        if out.granularity == "neurons":
            out.neuron_fill = out.neuron_fill or DEFAULT_NEURON_FILL
            out.neuron_importance = out.neuron_importance or DEFAULT_NEURON_IMPORTANCE
            out.neuron_statistics = out.neuron_statistics or "auto"
        return out


@dataclass
class FitResult:
    plan_file: PlanFile
    warnings: list[str] = field(default_factory=list)  # what the caller should know about the plan
    notes: list[str] = field(default_factory=list)  # what was measured on the way (budget fits)


# --------------------------------------------------------------------------------------------------------------------
# Shared pieces


def fitting_regime(profile) -> str:
    return "decode" if profile.tokens("decode") > 0 else "prompt"


def eligible_positions(warmup_tokens: int, dense_every: int, horizon: int = DEFAULT_HORIZON) -> np.ndarray:
    """Decode indices d in [warm-up, warm-up + horizon) and whether each is eligible (plan.py's rule)."""
    d = np.arange(warmup_tokens, warmup_tokens + horizon, dtype=np.int64)
    return d, is_eligible(d, warmup_tokens, dense_every)


def eligible_share(warmup_tokens: int, dense_every: int, horizon: int = DEFAULT_HORIZON) -> float:
    _, eligible = eligible_positions(warmup_tokens, dense_every, horizon)
    return float(eligible.mean())


def _fraction_hits(d: np.ndarray, eligible: np.ndarray, fraction: float) -> int:
    """Eligible positions where a layer with this fraction is skipped (plan.py's pattern)."""
    return int((fraction_pattern(fraction, d) & eligible).sum())


def static_skip_ratio(plan: SkipPlan, num_layers: int, horizon: int = DEFAULT_HORIZON) -> float:
    """Exact skip ratio of a static plan over `horizon` decode positions after warm-up."""
    d, eligible = eligible_positions(plan.warmup_tokens, plan.dense_every, horizon)
    skipped = sum(_fraction_hits(d, eligible, f) for f in plan.skip_layers.values())
    return skipped / (horizon * num_layers)


def cold_edges(saturated_share: Sequence[float], floor: float) -> tuple[int, int]:
    """(cold_start, cold_end): layer 0 and the last layer, plus edge layers saturated on fewer than `floor` of tokens."""
    n = len(saturated_share)
    start = 1
    while start < n - 1 and saturated_share[start] < floor:
        start += 1
    end = 1
    while n - 1 - end >= start and saturated_share[n - 1 - end] < floor:
        end += 1
    return start, end


@dataclass
class TokenRows:
    """Per-token `residual` cosines [N, L] with weights (pooled classes weighted by their token counts)."""

    rows: np.ndarray
    weights: np.ndarray
    tokens: int

    @property
    def num_layers(self) -> int:
        return int(self.rows.shape[1])

    def mean(self, values: np.ndarray) -> float:
        return float(np.average(values, weights=self.weights)) if len(values) else 0.0

    def layer_quantiles(self, q: float) -> np.ndarray:
        """Weighted q-quantile of each layer's cosine (sorted columns cached: brentq calls this many times)."""
        if not hasattr(self, "_sorted"):
            order = np.argsort(self.rows, axis=0, kind="stable")
            w = self.weights[order]
            self._sorted = (np.take_along_axis(self.rows, order, axis=0), np.cumsum(w, axis=0) - 0.5 * w)
        values, cum = self._sorted
        total = self.weights.sum()
        return np.array([np.interp(q * total, cum[:, l], values[:, l]) for l in range(self.num_layers)])

    def batched(self, batch: int, seed: int = 0) -> TokenRows:
        """Rows of a `batch`-row decode step deciding together: per layer the minimum cosine of `batch` rows drawn
        by weight (a batch fires at a layer iff every row passes there). As many groups as rows (at least 2048)."""
        if batch <= 1 or len(self.rows) == 0:
            return self
        groups = max(len(self.rows), 2048)
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(self.rows), size=(groups, batch), p=self.weights / self.weights.sum())
        return TokenRows(self.rows[idx].min(axis=1), np.ones(groups), self.tokens)


def token_rows(profile, regime: str, cls: str | None) -> TokenRows:
    classes = [cls] if cls is not None else list(profile.classes)
    parts, weights, total = [], [], 0
    for name in classes:
        rows = np.asarray(profile.tokens_reservoir(regime, name), dtype=np.float32)
        tokens = int(profile.tokens(regime, name))
        if len(rows) == 0 or tokens == 0:
            continue
        parts.append(rows)
        weights.append(np.full(len(rows), tokens / len(rows)))
        total += tokens
    if not parts:
        return TokenRows(np.zeros((0, profile.num_layers), np.float32), np.zeros(0), 0)
    return TokenRows(np.concatenate(parts), np.concatenate(weights), total)


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cum = np.cumsum(w) - 0.5 * w
    return float(np.interp(q * w.sum(), cum, v))


def _settings_plan(settings: FitSettings, mode: str) -> SkipPlan:
    return SkipPlan(mode=mode, apply_to=settings.apply_to, warmup_tokens=int(settings.warmup_tokens),
                    dense_every=int(settings.dense_every), compensation=settings.compensation)


def _norm_gain(profile, regime: str, cls: str | None) -> list[float]:
    gain = np.asarray(profile.layer_stats("stream_gain", regime, cls)["mean"], dtype=np.float64)
    if not np.all(np.isfinite(gain)) or np.any(gain <= 0):
        raise FitError("the profile's stream_gain means are missing or non-finite; cannot use compensation norm_ratio")
    return [rounded(g, ROUND, decimals=True) for g in gain]


# --------------------------------------------------------------------------------------------------------------------
# Static


def fit_static(profile, settings: FitSettings, cls: str | None = None) -> SkipPlan:
    """Most saturated non-cold layers (by mean residual cos) plus one fractional layer, so the ratio equals R."""
    settings = settings.resolve()  # no-op for resolved settings
    regime = fitting_regime(profile)
    L = profile.num_layers
    mean_cos = np.asarray(profile.layer_stats("residual", regime, cls)["mean"], dtype=np.float64)
    data = token_rows(profile, regime, cls)
    if data.tokens == 0 or not np.all(np.isfinite(mean_cos)):
        raise FitError(f"no {regime} tokens for {_who(cls)} in the profile")
    tau_ref = weighted_quantile(data.rows.ravel(), np.repeat(data.weights, L), 1.0 - settings.target)
    share = [data.mean((data.rows[:, l] > np.float32(tau_ref)).astype(np.float64)) for l in range(L)]
    cold_start, cold_end = cold_edges(share, settings.cold_floor)
    candidates = sorted(range(cold_start, L - cold_end), key=lambda l: (-mean_cos[l], l))

    plan = _settings_plan(settings, "static")
    d, eligible = eligible_positions(plan.warmup_tokens, plan.dense_every, settings.horizon)
    full_share = eligible.sum() / (settings.horizon * L)  # ratio added by one whole layer
    whole = min(int(settings.target / full_share), len(candidates))
    plan.skip_layers = {l: 1.0 for l in candidates[:whole]}
    remainder = settings.target - whole * full_share
    if remainder > 0.5 / (settings.horizon * L) and whole < len(candidates):
        fraction = _solve_fraction(d, eligible, remainder * settings.horizon * L)
        if fraction > 0:
            plan.skip_layers[candidates[whole]] = fraction
    ratio = static_skip_ratio(plan, L, settings.horizon)
    if abs(ratio - settings.target) > RATIO_TOLERANCE:
        most = len(candidates) * full_share
        raise FitError(f"target skip {settings.target:g} is out of reach for {_who(cls)}: {len(candidates)} non-cold "
                       f"layers of {L} give at most {most:.3f} (cold layers 0..{cold_start - 1} and "
                       f"{L - cold_end}..{L - 1}); lower FitSettings.target or FitSettings.cold_floor")
    plan.expected_skip_ratio = rounded(ratio, ROUND, decimals=True)
    plan.fit = {
        "method": "static-rank",
        "statistic": f"mean residual cos ({regime} tokens)",
        "target_skip": settings.target,
        "regime": regime,
        "tokens": data.tokens,
        "cold_layers": list(range(cold_start)) + list(range(L - cold_end, L)),
        "saturation_tau": rounded(tau_ref, ROUND, decimals=True),
        "layer_mean_cos": [rounded(m, ROUND, decimals=True) for m in mean_cos],
        "gen_len": settings.gen_len,
        "horizon": settings.horizon,
    }
    if settings.compensation == "norm_ratio":
        plan.norm_gain = _norm_gain(profile, regime, cls)
    return plan


def _solve_fraction(d: np.ndarray, eligible: np.ndarray, wanted_hits: float) -> float:
    """Fraction f in (0, 1] whose skip pattern hits `wanted_hits` eligible positions (dense_every can alias with it)."""
    total = int(eligible.sum())
    if wanted_hits >= total:
        return 1.0
    g = lambda f: _fraction_hits(d, eligible, f) - wanted_hits  # noqa: E731 -- monotone step function of f
    if g(1.0) <= 0:
        return 1.0
    f = brentq(g, 1e-9, 1.0, xtol=1e-7)
    # a short decimal keeps the YAML readable; take the neighbour that hits the count best
    near = [x for x in (round(f, 4) - 1e-4, round(f, 4), round(f, 4) + 1e-4) if 0.0 < x <= 1.0]
    return round(min(near, key=lambda x: (abs(g(x)), x)), 4)


# --------------------------------------------------------------------------------------------------------------------
# Adaptive (FFN-SkipLLM)


def simulate_adaptive(rows: np.ndarray, tau: np.ndarray, cold_start: int, cold_end: int,
                      max_skip: int) -> tuple[np.ndarray, np.ndarray]:
    """plan.py's adaptive rule on dense per-token cosines [N, L]: (skipped FFNs per row, first skipped layer or -1).

    The rows come from dense forwards, so a layer after a skipped run is judged on its dense cosine; the runtime sees
    the stream without the skipped FFNs (the profile cannot know those values) -- eval measures the realised ratio.
    """
    n, L = rows.shape
    end = L - cold_end
    lo = max(cold_start - 1, 0)
    hi = end - 1  # trigger layers l with l + 1 < end
    if max_skip <= 0 or hi <= lo or n == 0:
        return np.zeros(n, np.int64), np.full(n, -1, np.int64)
    fires = rows[:, lo:hi] > np.asarray(tau, dtype=np.float32)[lo:hi]
    any_fire = fires.any(axis=1)
    first = np.argmax(fires, axis=1) + lo + 1
    skipped = np.where(any_fire, np.minimum(max_skip, end - first), 0)
    return skipped.astype(np.int64), np.where(any_fire, first, -1)


def skipped_mean_cos(rows: np.ndarray, weights: np.ndarray, skipped: np.ndarray, first: np.ndarray) -> float:
    """Weighted mean residual cos of the (token, layer) calls the rule skips."""
    if skipped.sum() == 0:
        return -math.inf
    cum = np.concatenate([np.zeros((len(rows), 1)), np.cumsum(rows, axis=1, dtype=np.float64)], axis=1)
    idx = np.arange(len(rows))
    start = np.maximum(first, 0)
    sums = np.where(skipped > 0, cum[idx, start + skipped] - cum[idx, start], 0.0)
    return float((sums * weights).sum() / (skipped * weights).sum())


@dataclass
class AdaptiveCandidate:
    tau: np.ndarray
    cold_start: int
    cold_end: int
    max_skip: int
    ratio: float
    score: float
    level: float  # global tau, or quantile level q in per-layer mode


def _tau_vector(data: TokenRows, level: float, tau_mode: str) -> np.ndarray:
    if tau_mode == "global":
        return np.full(data.num_layers, level)
    return data.layer_quantiles(level)


def _fit_level(data: TokenRows, share: float, target: float, cold: tuple[int, int], k: int,
               tau_mode: str) -> tuple[float, np.ndarray, float] | None:
    """Solve ratio(level) = target with brentq (ratio falls as tau or q rises); None when unattainable."""

    def ratio_at(level: float) -> tuple[float, np.ndarray]:
        tau = np.round(np.clip(_tau_vector(data, level, tau_mode), -1.0, 1.0), ROUND)
        skipped, _ = simulate_adaptive(data.rows, tau, cold[0], cold[1], k)
        return share * data.mean(skipped) / data.num_layers, tau

    lo, hi = (-1.0, 1.0) if tau_mode == "global" else (0.0, 1.0)
    most = ratio_at(lo)[0]
    if most < target - RATIO_TOLERANCE:
        return None
    if most <= target:
        level = lo
    else:
        level = brentq(lambda x: ratio_at(x)[0] - target, lo, hi, xtol=1e-7)
    # brentq lands on a step of a step function: take the closest of the neighbouring rounded levels
    near = {round(level + dx, ROUND) for dx in (-2e-6, -1e-6, 0.0, 1e-6, 2e-6)}
    ratio, tau, level = min(((*ratio_at(x), x) for x in near if lo <= x <= hi),
                            key=lambda t: abs(t[0] - target))
    return ratio, tau, level


def _saturation(data: TokenRows, tau: np.ndarray) -> list[float]:
    return [data.mean((data.rows[:, l] > np.float32(tau[l])).astype(np.float64)) for l in range(data.num_layers)]


def _fit_adaptive_k(data: TokenRows, share: float, settings: FitSettings, k: int) -> AdaptiveCandidate | None:
    """Fit tau for one run length k; cold layers iterated to a fixed point with the fitted tau."""
    cold = (1, 1)
    seen: set[tuple[int, int]] = set()
    for _ in range(8):
        seen.add(cold)
        solved = _fit_level(data, share, settings.target, cold, k, settings.tau_mode)
        if solved is None:
            return None
        ratio, tau, level = solved
        new_cold = cold_edges(_saturation(data, tau), settings.cold_floor)
        if new_cold == cold or new_cold in seen:
            break
        cold = new_cold
    skipped, first = simulate_adaptive(data.rows, tau, cold[0], cold[1], k)
    score = skipped_mean_cos(data.rows, data.weights, skipped, first)
    return AdaptiveCandidate(tau, cold[0], cold[1], k, ratio, score, level)


def fit_adaptive(profile, settings: FitSettings, cls: str | None = None) -> SkipPlan:
    """FFN-SkipLLM's rule with tau (and k) fitted so the simulated ratio on the reservoir equals R."""
    settings = settings.resolve()  # no-op for resolved settings
    regime = fitting_regime(profile)
    data = token_rows(profile, regime, cls)
    L = profile.num_layers
    if data.tokens == 0:
        raise FitError(f"no {regime} tokens for {_who(cls)} in the profile")
    shared = settings.batch_decision == "shared"
    if shared:
        data = data.batched(settings.batch_size, settings.seed)
    plan = _settings_plan(settings, "adaptive")
    plan.batch_decision = settings.batch_decision
    share = eligible_share(plan.warmup_tokens, plan.dense_every, settings.horizon)
    ks = [settings.max_skip] if settings.max_skip is not None else list(range(1, max(L - 1, 1)))
    candidates = [c for k in ks if (c := _fit_adaptive_k(data, share, settings, k)) is not None
                  and abs(c.ratio - settings.target) <= RATIO_TOLERANCE]
    if not candidates:
        raise FitError(f"target skip {settings.target:g} is out of reach for {_who(cls)} with an adaptive plan "
                       f"(max_skip {ks if len(ks) > 1 else ks[0]}, dense_every {plan.dense_every}: eligible share "
                       f"{share:.3f}); lower FitSettings.target, FitSettings.dense_every=0 or FitSettings.cold_floor")
    best = max(candidates, key=lambda c: (c.score, -c.max_skip))
    plan.tau = [float(t) for t in best.tau]
    plan.cold_start, plan.cold_end, plan.max_skip = best.cold_start, best.cold_end, best.max_skip
    plan.expected_skip_ratio = rounded(best.ratio, ROUND, decimals=True)
    plan.fit = {
        "method": "adaptive-simulated",
        "target_skip": settings.target,
        "regime": regime,
        "tokens": data.tokens,
        "reservoir_rows": int(len(data.rows)),
        "tau_mode": settings.tau_mode,
        "eligible_share": rounded(share, ROUND, decimals=True),
        "skipped_mean_cos": rounded(best.score, ROUND, decimals=True),
        "k_search": [[c.max_skip, rounded(c.ratio, ROUND, decimals=True), rounded(c.score, ROUND, decimals=True)]
                     for c in candidates],  # k, ratio, score
        "gen_len": settings.gen_len,
        "horizon": settings.horizon,
    }
    if shared:
        plan.fit["batch_size"] = settings.batch_size
    if settings.tau_mode == "per-layer":
        plan.fit["quantile_level"] = rounded(best.level, ROUND, decimals=True)
    if settings.compensation == "norm_ratio":
        plan.norm_gain = _norm_gain(profile, regime, cls)
    return plan


def adaptive_ratio_on(profile, plan: SkipPlan, cls: str | None, horizon: int | None = None) -> float | None:
    """Simulated skip ratio of an adaptive plan on one class's (or the pooled) reservoir, over `horizon` positions
    after the warm-up (default: the horizon the plan was fitted for)."""
    horizon = horizon or int(plan.fit.get("horizon") or DEFAULT_HORIZON)
    data = token_rows(profile, fitting_regime(profile), cls)
    if data.tokens == 0:
        return None
    if plan.batch_decision == "shared":
        data = data.batched(int(plan.fit.get("batch_size", DEFAULT_SHARED_BATCH)))
    skipped, _ = simulate_adaptive(data.rows, np.asarray(plan.tau), plan.cold_start, plan.cold_end, plan.max_skip)
    share = eligible_share(plan.warmup_tokens, plan.dense_every, horizon)
    return share * data.mean(skipped) / data.num_layers


# --------------------------------------------------------------------------------------------------------------------
# Router


def fit_router(profile, seed: int = 0, train_share: float = 0.7) -> tuple[Router | None, str | None]:
    """Nearest-centroid (cosine) router over per-document mean hidden states; (router, or None and the reason)."""
    features = np.asarray(getattr(profile, "doc_features", np.zeros((0, 0, 0))), dtype=np.float64)
    doc_len = np.asarray(getattr(profile, "doc_len", np.zeros(0)), dtype=np.int64)
    classes = list(profile.classes)
    if len(classes) < 2 or features.ndim != 3 or features.shape[0] != len(classes) or features.shape[2] == 0:
        return None, "the profile has no per-document features for two or more classes"
    short = [c for c, n in zip(classes, doc_len) if n < 2]
    if short:
        return None, f"classes {short} have fewer than 2 documents in the profile"
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c, n in enumerate(doc_len):
        order = rng.permutation(int(n))
        cut = min(max(1, int(round(train_share * n))), int(n) - 1)
        train.append(_unit(features[c, order[:cut]]))
        test.append(_unit(features[c, order[cut:]]))
    centroids = np.stack([_unit(t.mean(axis=0)) for t in train])
    hits = sum(int((np.argmax(t @ centroids.T, axis=1) == c).sum()) for c, t in enumerate(test))
    accuracy = hits / sum(len(t) for t in test)
    final = np.stack([_unit(_unit(features[c, :n]).mean(axis=0)) for c, n in enumerate(doc_len)])
    # Profiles written before the pooling was recorded pooled every prompt token.
    router = Router(layer=int(profile.router_layer), classes=classes,
                    pooling=str(profile.header.get("router_pooling", "mean")),
                    centroids=[[rounded(x, ROUND, decimals=True) for x in vec] for vec in final], metric="cosine",
                    heldout_accuracy=rounded(accuracy, ROUND, decimals=True))
    return router, None


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Whole plan files


def fit_skip_plan(profile, settings: FitSettings, cls: str | None = None) -> SkipPlan:
    """One SkipPlan for the pooled classes (cls None) or one class, in the settings' mode."""
    if settings.mode == "static":
        return fit_static(profile, settings, cls)
    if settings.mode == "adaptive":
        return fit_adaptive(profile, settings, cls)
    raise FitError(f"unknown mode {settings.mode!r} (expected static or adaptive)")


def fit_plan_file(profile, settings: FitSettings, per_class: bool = False, classes: Sequence[str] | None = None,
                  profile_ref: dict[str, Any] | None = None) -> FitResult:
    """The global plan, plus class plans (and a router when the profile allows) with `per_class`.

    `classes` restricts the class plans (names must exist in the profile); `profile_ref` ({path, sha256}) goes into
    provenance.
    """
    warnings: list[str] = []
    settings = settings.resolve()
    regime = fitting_regime(profile)
    if regime == "prompt":
        warnings.append("the profile has no decode tokens (profile with ProfileSettings.generate > 0 for decode "
                        "statistics): fitting on prompt tokens")
    global_plan = fit_skip_plan(profile, settings)
    known = list(profile.classes)
    wanted = list(classes) if classes else (known if per_class else [])
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise FitError(f"unknown class {unknown[0]!r}; the profile's classes: {', '.join(known) or 'none'}")
    class_plans = {name: _fit_class(profile, settings, name, global_plan, warnings) for name in wanted}
    if settings.mode == "adaptive" and known:
        global_plan.fit["class_skip_ratio"] = {
            name: rounded(r, ROUND, decimals=True) for name in known
            if (r := adaptive_ratio_on(profile, global_plan, name)) is not None}
    router = None
    if per_class and not classes:
        router, why_not = fit_router(profile, seed=settings.seed)
        if why_not:
            warnings.append(f"no router: {why_not}")
    return FitResult(assemble_plan_file(profile, settings, global_plan, class_plans, router, profile_ref), warnings)


def assemble_plan_file(profile, settings: FitSettings, global_plan: SkipPlan, class_plans: dict[str, SkipPlan] | None = None,
                       router: Router | None = None, profile_ref: dict[str, Any] | None = None) -> PlanFile:
    """A plan file for the profile's model: its name and fingerprint, the settings' defaults, provenance."""
    model = (profile.header or {}).get("model") or {}
    return PlanFile(
        model={"name": str(model.get("name") or "unknown"), "fingerprint": dict(model.get("fingerprint") or {})},
        global_plan=global_plan,
        classes=dict(class_plans or {}),
        router=router,
        defaults={"apply_to": settings.apply_to, "warmup_tokens": settings.warmup_tokens,
                  "dense_every": settings.dense_every, "compensation": settings.compensation},
        provenance=_provenance(profile, profile_ref or {}),
    )


def _fit_class(profile, settings: FitSettings, name: str, global_plan: SkipPlan, warnings: list[str]) -> SkipPlan:
    regime = fitting_regime(profile)
    tokens = int(profile.tokens(regime, name))
    reason = None
    if tokens < settings.min_class_tokens:
        reason = f"{tokens} {regime} tokens < FitSettings.min_class_tokens={settings.min_class_tokens}"
    else:
        try:
            return fit_skip_plan(profile, settings, name)
        except FitError as e:
            reason = str(e)
    warnings.append(f"class {name!r} falls back to the global plan: {reason}")
    plan = copy.deepcopy(global_plan)
    plan.fit = {"fallback": "global", "reason": reason, "tokens": tokens}
    return plan


def _provenance(profile, profile_ref: dict[str, Any]) -> dict[str, Any]:
    from .. import __version__

    header = profile.header or {}
    tokens = {regime: int(profile.tokens(regime)) for regime in ("prompt", "decode")}
    tokens["by_class"] = {name: {regime: int(profile.tokens(regime, name)) for regime in ("prompt", "decode")}
                          for name in profile.classes}
    out: dict[str, Any] = {}
    if profile_ref.get("path"):
        out["profile"] = str(profile_ref["path"])
    if profile_ref.get("sha256"):
        out["profile_sha256"] = str(profile_ref["sha256"])
    out["corpus"] = jsonable(header.get("corpus", []))
    out["tokens"] = tokens
    out["tool_version"] = __version__
    out["created"] = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    if header.get("partial"):
        out["partial_profile"] = True
    return out


def _who(cls: str | None) -> str:
    return "the pooled classes" if cls is None else f"class {cls!r}"
