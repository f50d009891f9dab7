"""Neuron plans (`FitSettings.granularity="neurons"`): per layer, which of the FFN's intermediate neurons run at decode
positions, the widths chosen by measured KL on calibration windows.

* Importance (`FitSettings.neuron_importance`), per layer from the profile's decode statistics and the model's weights:
  ``energy``  E[a_j^2] * ||W_down[:, j]||^2 (neuron j's mean output energy);
  ``fluctuation``  Var[a_j] * ||W_down[:, j]||^2 (FLAP: what the mean bias cannot stand in for);
  ``wanda``  sum_i |W_in[j, i]| * sqrt(E[x_i^2]) over every input projection (gate and up; Wanda's |W| * ||x|| on the
  neuron's input weights -- its down-column form ||W_down[:, j]|| * sqrt(E[a_j^2]) ranks exactly as ``energy``).
  A layer keeps its top k (stored ascending); with fill ``mean`` the dropped neurons' mean output
  W_down[:, dropped] @ E[a_dropped] is added as a bias.
* Fill ``map``: the dropped neurons' output predicted from the kept ones' activations a_K,
  W_down[:, D] (mu_D + B (a_K - mu_K)) with B the ridge regression of a_D on a_K, projected onto its top r directions
  (r = `FitSettings.rank`) under a_K's covariance: ``bias + map_out @ (map_in @ a_K)``, 2 r (k + H) FLOPs a row. The
  moments (mean and covariance of a, teacher forced on calibration windows at decode positions, attention sinks out
  as the linear substitutes leave them out) are measured once; each (layer, width) solves its map from them. On
  SmolLM2, the same kept neurons (22 %): KL 0.334 with the mean bias, 0.279 with rank-32 maps, 0.228 at full rank
  (which would need a copy of the kept down columns); at equal FFN FLOPs net the rank-32 map measured 0.313 against
  0.334 at 22 %, but 0.142 against 0.129 at 10 % (its cost outweighs its gain there).
* Fill ``refit``: that prediction at full rank, folded into the kept neurons' down columns: the plan stores the
  regression B [I - k, k] (float16) and the runtime computes W_down[:, K] + W_down[:, D] B once, so a narrowed row
  costs what fill mean's does; the price is a hidden x k copy per narrowed layer in memory. The same kept neurons of
  SmolLM2 at 22 % (uniform widths, confirming windows): KL 0.228 against 0.334 with the mean bias. Ranking the
  neurons for it by greedy OBS (drop the column whose least-squares refit loses least, update, repeat) measured
  worse than output energy (0.237 against 0.228), so refit keeps the importance criterion.
* Fill ``auto``: mean and map each measured at the uniform width that saves the target net of its fill, on the
  choosing windows (beside the regimes, below), the lower KL kept.
* Statistics (`FitSettings.neuron_statistics`): the profile's decode or prompt regime; ``auto`` measures a uniform
  width with each on the choosing windows and keeps the lower KL (on SmolLM2 with 1.6 k decode and 12 k prompt tokens
  profiled, prompt statistics measured KL 0.373 against decode's 0.480 at 22 %).
* Whole-FFN skips (`FitSettings.compensation="linear"`): width 0 skips a layer's FFN and runs its full-rank linear
  substitute (substitute.py, fitted on the maps' calibration windows) -- one plan mixes both kinds. From the uniform
  start, skipping each layer whole is measured on top of it; then the 1, 2, ... layers cheapest per saved FLOP are
  skipped, the others re-widened to the same FFN FLOPs net, while the measured KL falls (`convert_whole`); then the
  exchange rounds. On SmolLM2 at 22 %, fill mean: three middle layers whole took the choosing windows' KL from 0.373
  to 0.358, the two rounds to 0.317; the confirming windows measured 0.291 against the uniform plan's 0.334.
* FLOPs: a narrowed layer saves (I - k) neurons' multiply-adds (every input projection's row and the down
  projection's column) less the bias's H adds; the share is of the decode positions' FFN FLOPs (eligible positions
  only, as plan.model's rule says), the same count as the runtime's `stats()["ffn_flops_saved_share"]`.
* Widths, by measured KL (a `SetEvaluator` whose "sets" are (layer, width) pairs, applied through the runtime, teacher
  forced, decode positions only, prefix reuse from the current plan): start from one uniform width at the target,
  then rounds (`FitSettings.neuron_rounds`) of exchange -- measure narrowing every layer by one step (1/16 of its
  neurons) and widening the 4 layers that measured dearest to narrow, trade the cheapest narrowings against the most valuable widenings (equal FLOPs),
  keep the trade when the measured KL falls, halve the step when no trade helps. A budget fit finds the widest
  saving of the uniform width within the budget, exchanges, then grows by the cheapest measured narrowings while the
  budget holds. The chosen plan is measured once more on more windows (`fit.neurons.confirm`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from .._jsonable import rounded
from .from_profile import (AUTO_FILL, DEFAULT_NEURON_FILL, DEFAULT_NEURON_IMPORTANCE, GRANULARITIES,  # noqa: F401
                           NEURON_IMPORTANCES)
from .measure import SetEvaluator, calibration_references
from .search import Slots, canonical

log = logging.getLogger("skipprofiler")

STEPS = 16  # a move narrows or widens a layer by 1/STEPS of its neurons
WHOLE_MAX_SHARE = 0.25  # compensation linear: at most a quarter of the layers skipped whole
MIN_STEP_DIVISOR = 64  # the step halves down to 1/64 of the neurons

# Choosing windows: 4 documents per class, 32-token dense prompt + 128 decode positions; the confirming measurement
# 8 documents per class, 64-token prompt + 192 decode positions.
CHOOSE_PROMPT_LEN, CHOOSE_WINDOW, CHOOSE_DOCS_PER_CLASS = 32, 160, 4
CONFIRM_PROMPT_LEN, CONFIRM_WINDOW, CONFIRM_DOCS_PER_CLASS = 64, 256, 8


class NeuronFitError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# Importance and the subsets


NEURON_MAP_DOCS_PER_CLASS = 40  # fill map: calibration documents per class whose decode positions give the moments
NEURON_MAP_RIDGE = 1e-3  # fill map: ridge, relative to the mean variance of the kept activations
DEFAULT_NEURON_MAP_RANK = 32
MAX_MOMENT_BYTES = 16 << 30  # fill map: the covariances held at once (SmolLM2: 0.5 GiB; a 7 B Llama: 29 GiB)


@dataclass
class NeuronMoments:
    """One FFN's intermediate activations a at calibration decode positions: mean [I] and covariance [I, I]."""

    mean: np.ndarray
    cov: np.ndarray
    count: int


@dataclass
class LayerNeurons:
    """One FFN's ranking (best first), its neurons' mean-output columns for the bias, FLOPs per neuron; with fill map
    the moments and the down projection the maps are solved from."""

    order: np.ndarray  # int64 [I], most important first
    contrib: np.ndarray | None  # float64 [H, I]: W_down[:, j] * E[a_j] (fill mean)
    flops_per_neuron: float
    hidden: int
    moments: NeuronMoments | None = None  # fill map
    down: np.ndarray | None = None  # float64 [H, I] (fill map)
    rank: int = 0  # fill map: the maps' rank
    refit: bool = False  # fill refit (moments and down set, rank 0)
    _maps: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(len(self.order))

    def kept(self, k: int) -> np.ndarray:
        return np.sort(self.order[:k]).astype(np.int64)

    def bias(self, k: int) -> np.ndarray:
        if self.moments is not None:
            return self.refitted(k)[0] if self.refit else self.neuron_map(k)[0]
        return self.contrib[:, self.order[k:]].sum(axis=1).astype(np.float32)

    def saving(self, k: int, fill: str) -> float:
        """FLOPs a decode row saves with this FFN at width k: the dropped neurons less the fill's cost."""
        return (self.size - k) * self.flops_per_neuron - (self.hidden if fill != "none" else 0) - self.map_flops(k)

    def map_flops(self, k: int) -> float:
        """FLOPs a narrowed row spends on the map (fill map) at width k."""
        return 2.0 * self.rank * (k + self.hidden) if self.moments is not None else 0.0

    def neuron_map(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bias [H], map_in [r, k], map_out [H, r]) float32 of fill map at width k (module docstring)."""
        if k not in self._maps:
            self._maps[k] = solve_neuron_map(self.moments, self.down, self.kept(k), self.rank)
        return self._maps[k]

    def refitted(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(bias [H] float32, regression [I - k, k] float16) of fill refit at width k (module docstring)."""
        if k not in self._maps:
            self._maps[k] = solve_neuron_refit(self.moments, self.down, self.kept(k))
        return self._maps[k]


def _regression(moments: NeuronMoments, kept: np.ndarray):
    """The ridge least-squares regression of the dropped neurons' activations on the kept ones: (B [D, K] =
    C_DK (C_KK + ridge)^-1, the Cholesky factor of C_KK + ridge, mu_D, mu_K, the dropped indices ascending), float64
    torch tensors."""
    import torch

    dropped = np.setdiff1d(np.arange(len(moments.mean)), kept)
    cov = torch.from_numpy(moments.cov)
    mu = torch.from_numpy(moments.mean)
    k_idx, d_idx = torch.from_numpy(kept), torch.from_numpy(dropped)
    ckk = cov[k_idx][:, k_idx]
    ckd = cov[k_idx][:, d_idx]
    ridge = NEURON_MAP_RIDGE * float(ckk.diagonal().mean()) + 1e-12
    chol = torch.linalg.cholesky(ckk + ridge * torch.eye(len(kept), dtype=cov.dtype))
    beta = torch.cholesky_solve(ckd, chol)  # [K, D] = (C_KK + ridge)^-1 C_KD
    return beta.T, chol, mu[d_idx], mu[k_idx], d_idx


def solve_neuron_map(moments: NeuronMoments, down: np.ndarray, kept: np.ndarray, rank: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rank-`rank` least-squares map from the kept activations a_K onto the dropped neurons' output
    W_down[:, D] a_D, and its bias (module docstring). float64 solves, float32 results."""
    import torch

    b, chol, mu_d, mu_k, d_idx = _regression(moments, kept)
    wd = torch.from_numpy(down)[:, d_idx]  # [H, D]
    full = wd @ b  # [H, K]; times chol: the map's error weighting is a_K's covariance
    u, sv, vh = torch.linalg.svd(full @ chol, full_matrices=False)
    r = min(rank, int(sv.shape[0]))
    map_out = u[:, :r] * sv[:r]  # [H, r]
    map_in = torch.linalg.solve_triangular(chol.T, vh[:r].T, upper=True).T  # [r, K]: vh_r chol^-1
    bias = wd @ mu_d - map_out @ (map_in @ mu_k)
    return bias.float().numpy(), map_in.float().contiguous().numpy(), map_out.float().contiguous().numpy()


def solve_neuron_refit(moments: NeuronMoments, down: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bias [H] float32, regression [D, K] float16) of fill refit: the dropped activations regressed on the kept
    ones, a_D ~ mu_D + B (a_K - mu_K), stored in half precision (the sidecar holds D x K numbers per layer; float32
    where a coefficient overflows it) and the
    bias computed from the rounded B, so W_down[:, K] + W_down[:, D] B (what the runtime folds) and the bias agree."""
    import torch

    b, _, mu_d, mu_k, d_idx = _regression(moments, kept)
    stored = b.to(torch.float16)
    if not bool(torch.isfinite(stored).all()):  # a coefficient beyond half precision's range: keep float32
        stored = b.float()
    wd = torch.from_numpy(down)[:, d_idx]  # [H, D]
    bias = wd @ (mu_d - stored.double() @ mu_k)
    return bias.float().numpy(), stored.contiguous().numpy()


def intermediate_width(model) -> int:
    """The FFN width I of the model's first FFN (neuron plans need one down projection per FFN)."""
    from ..arch.capture import down_projection, intermediate_size
    from ..arch.registry import resolve

    return intermediate_size(down_projection(resolve(model).sites[0])[1])


def neuron_moments(model, batches, sink_factor: float | None = None) -> dict[int, NeuronMoments]:
    """Per layer, the mean and covariance of the FFN's intermediate activations at the decode positions of `batches`
    (fidelity.TokenBatch, teacher forced, the dense model), attention sinks left out (substitute.without_sinks)."""
    import torch

    from ..arch.capture import FFNCapture
    from ..evaluation.fidelity import model_forward
    from .substitute import SINK_NORM_FACTOR, decode_mask, without_sinks

    factor = SINK_NORM_FACTOR if sink_factor is None else sink_factor
    sums: dict[int, list] = {}
    state: dict[str, torch.Tensor] = {}

    def on_layer(t):
        keep = without_sinks(state["mask"].to(t.ffn_hidden.device), t.stream_in_ffn, factor)
        a = t.ffn_hidden[keep].float()
        entry = sums.setdefault(t.index, [0, 0.0, 0.0])
        entry[0] += int(a.shape[0])
        entry[1] = entry[1] + a.double().sum(0)
        # one batch's products in float32 (a float64 GEMM of every layer's I x I product costs the fit minutes), the
        # running sums in float64
        entry[2] = entry[2] + (a.T @ a).double()

    forward = model_forward(model)
    with FFNCapture(model, on_layer, neurons=True), torch.inference_mode():
        for batch in batches:
            state["mask"] = decode_mask(batch)
            forward(batch)
    out = {}
    for layer, (n, s1, s2) in sorted(sums.items()):
        if n < 2:
            raise NeuronFitError(f"fill map: {n} calibration decode positions in layer {layer}; more calibration text "
                                 "is needed")
        mean = s1 / n
        out[layer] = NeuronMoments(mean.cpu().numpy(), (s2 / n - torch.outer(mean, mean)).cpu().numpy(), n)
    return out


def neuron_importance(profile, model, criterion: str, regime: str = "decode") -> dict[int, np.ndarray]:
    """Per layer, each neuron's importance under `criterion` (module docstring), from the profile's statistics and the
    model's weights (read unpermuted: call before a plan is applied)."""
    import torch

    from ..arch.capture import down_projection, down_weight
    from ..arch.registry import resolve
    from ..runtime.neurons import CONV1D, FUSED, projections

    arch = resolve(model)
    out = {}
    with torch.no_grad():
        for site in arch.sites:
            layer = site.index
            wd = down_weight(down_projection(site)[1]).double().cpu().numpy()  # [H, I]
            col = (wd ** 2).sum(axis=0)
            if criterion == "energy":
                score = profile.neuron_energy(regime, layer) * col
            elif criterion == "fluctuation":
                score = profile.neuron_variance(regime, layer) * col
            elif criterion == "wanda":
                norm = np.sqrt(np.maximum(profile.input_sq_mean(regime, layer), 0.0))
                ins, _, size = projections(site)
                score = np.zeros(size)
                for module, kind in ins:
                    w = module.weight.double().cpu().numpy()
                    w = w.T if kind == CONV1D else w  # [rows, H]
                    s = np.abs(w) @ norm
                    score += s[:size] + s[size:] if kind == FUSED else s
            else:
                raise NeuronFitError(f"unknown neuron importance {criterion!r}")
            out[layer] = np.asarray(score, dtype=np.float64)
    return out


def layer_neurons(profile, model, criterion: str, fill: str, regime: str = "decode",
                  moments: dict[int, NeuronMoments] | None = None, rank: int = 0) -> dict[int, LayerNeurons]:
    import torch

    from ..arch.capture import down_projection, down_weight
    from ..arch.flops import token_flops
    from ..arch.registry import resolve

    arch = resolve(model)
    scores = neuron_importance(profile, model, criterion, regime)
    ffn = token_flops(model)["ffn"]
    out = {}
    with torch.no_grad():
        for site in arch.sites:
            wd = down_weight(down_projection(site)[1]).double().cpu().numpy()
            size = wd.shape[1]
            order = np.argsort(-scores[site.index], kind="stable").astype(np.int64)
            contrib = wd * profile.neuron_mean(regime, site.index)[None, :] if fill == "mean" else None
            if fill in ("map", "refit"):
                out[site.index] = LayerNeurons(order, None, ffn / size, int(wd.shape[0]), moments[site.index], wd,
                                               rank if fill == "map" else 0, refit=fill == "refit")
            else:
                out[site.index] = LayerNeurons(order, contrib, ffn / size, int(wd.shape[0]))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Plans of widths


@dataclass
class WidthPlans:
    """Builds the SkipPlan of a widths assignment and counts the FFN FLOPs it saves."""

    template: Any  # SkipPlan: eligibility settings
    layers: dict[int, LayerNeurons]
    fill: str
    ffn_flops: float
    eligible: float  # share of decode positions the rule lets a plan act on
    whole: dict[int, Any] = field(default_factory=dict)  # layer -> substitute.FittedMap: width 0 skips the FFN whole
    whole_rank: int | None = None  # the whole-FFN maps' rank (None: full d x d)

    def whole_saving(self) -> float:
        """FLOPs a decode row saves in a layer skipped whole: the FFN less its linear substitute."""
        from ..plan.model import LinearMaps

        hidden = next(iter(self.layers.values())).hidden
        return self.ffn_flops - LinearMaps(self.whole_rank, {}).flops_per_call(hidden)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def key(self, widths: dict[int, int]) -> Slots:
        return canonical((l, float(w)) for l, w in widths.items() if w < self.layers[l].size)

    def widths_of(self, key: Slots) -> dict[int, int]:
        widths = {l: n.size for l, n in self.layers.items()}
        widths.update({l: int(w) for l, w in key})
        return widths

    def saved(self, widths: dict[int, int]) -> float:
        """Share of the decode positions' FFN FLOPs the plan saves, net of the mean bias's adds."""
        total = 0.0
        for l, w in widths.items():
            n = self.layers[l]
            if w == 0:
                total += self.whole_saving()
            elif w < n.size:
                total += n.saving(w, self.fill)
        return self.eligible * total / (self.num_layers * self.ffn_flops)

    def plan(self, key: Slots):
        from ..plan.model import LinearMaps, NeuronSubsets

        tensors = {}
        size = rank = None
        whole = [l for l, w in key if w == 0]
        for l, w in key:
            if w == 0:
                continue
            n = self.layers[l]
            size = n.size
            tensors[f"{l}.kept"] = n.kept(int(w))
            if self.fill == "map":
                rank = n.rank
                tensors[f"{l}.bias"], tensors[f"{l}.map_in"], tensors[f"{l}.map_out"] = n.neuron_map(int(w))
            elif self.fill == "refit":
                tensors[f"{l}.bias"], tensors[f"{l}.regression"] = n.refitted(int(w))
            elif self.fill == "mean":
                tensors[f"{l}.bias"] = n.bias(int(w))
        neurons = NeuronSubsets(self.fill, tensors, intermediate_size=size, rank=rank) if tensors else None
        skips = {}
        if whole:
            maps = {k: v for l in whole for k, v in self.whole[l].tensors(str(l)).items()}
            skips = {"skip_layers": {l: 1.0 for l in whole}, "compensation": "linear",
                     "linear": LinearMaps(self.whole_rank, maps)}
        return replace(self.template, mode="static", tau=None, max_skip=0, neurons=neurons,
                       fit=dict(self.template.fit), **{"skip_layers": {}, **skips})


@dataclass
class NeuronEvaluator(SetEvaluator):
    """SetEvaluator over width assignments: a key is ((layer, width), ...) for the narrowed layers."""

    build: Callable[[Slots], Any] | None = None
    max_anchors: int = 2  # plans whose layer inputs are kept besides the dense model's (the current one, a trial)

    def _plan(self, key: Slots):
        return self.build(key)

    def __call__(self, slots: Slots) -> float:
        key = canonical(slots)
        if not key:  # the dense model
            self.ppl_ratio[key] = 1.0
            return 0.0
        return super().__call__(key)

    def set_anchor(self, slots: Slots) -> None:
        """Measure `slots` keeping its per-layer stream (unless kept already), beside the most recent other anchor:
        a trial plan is measured as an anchor, and the current plan stays one if the trial is refused."""
        key = canonical(slots)
        if not key:
            return
        if not self.reuse_prefix or key in self._anchors:
            if key not in self.cache:
                self(key)
            return
        others = [a for a in self._anchors if a]
        for old in others[:max(0, len(others) - (self.max_anchors - 1))]:
            del self._anchors[old]
        kl = self._measure(key, record=True)
        if key not in self.cache:
            self.cache[key] = kl
            log.info("set %d (anchor): KL %.4f ppl %+.1f%% (%.0f s)", len(self.cache), kl,
                     100 * (self.ppl_ratio[key] - 1.0), time.perf_counter() - self._started)


# ---------------------------------------------------------------------------------------------------------------------
# The search


@dataclass
class Search:
    evaluate: NeuronEvaluator
    plans: WidthPlans
    budget: Any = None  # refine.Budget for budget fits
    path: list = field(default_factory=list)
    whole_costs: dict = field(default_factory=dict)  # convert_whole: KL per saved FLOP share of skipping each layer

    def kl(self, widths: dict[int, int]) -> float:
        return self.evaluate(self.plans.key(widths))

    def anchor(self, widths: dict[int, int]) -> float:
        """Measure a plan the search may move from (its layer inputs kept for the next measurements)."""
        self.evaluate.set_anchor(self.plans.key(widths))
        return self.kl(widths)

    def ppl(self, widths: dict[int, int]) -> float:
        key = self.plans.key(widths)
        self.evaluate(key)
        return self.evaluate.ppl_ratio[key]

    def within(self, widths: dict[int, int]) -> bool:
        return self.budget.allows(self.kl(widths), self.ppl(widths))

    def note(self, what: str, widths: dict[int, int]) -> None:
        sizes = [self.plans.layers[l].size for l in sorted(widths)]
        self.path.append({"step": what, "ffn_flops_saved": rounded(self.plans.saved(widths)),
                          "kl": rounded(self.kl(widths)), "ppl_increase": rounded(self.ppl(widths) - 1.0),
                          "widths": [int(widths[l]) if widths[l] < s else s for l, s in zip(sorted(widths), sizes)]})
        log.info("neurons %s: saved %.3f KL %.4f ppl %+.1f%%", what, self.plans.saved(widths), self.kl(widths),
                 100 * (self.ppl(widths) - 1))

    # -- moves

    def narrowed(self, widths, layer, step):
        w = widths[layer] - step
        if widths[layer] == 0 or w < step_floor(self.plans.layers[layer].size):
            return None  # a layer skipped whole stays so (convert_whole decides those)
        return {**widths, layer: w}

    def widened(self, widths, layer, step):
        size = self.plans.layers[layer].size
        if widths[layer] >= size or widths[layer] == 0:
            return None
        return {**widths, layer: min(size, widths[layer] + step)}

    def marginals(self, widths, step, widen_count: int):
        """(narrowing cost per saved FLOP share, widening gain per FLOP share) measured from `widths`."""
        self.evaluate.set_anchor(self.plans.key(widths))
        base_kl, base_saved = self.kl(widths), self.plans.saved(widths)
        narrow = {}
        for layer in sorted(widths):
            cand = self.narrowed(widths, layer, step)
            if cand is not None:
                narrow[layer] = (self.kl(cand) - base_kl) / max(self.plans.saved(cand) - base_saved, 1e-12)
        dear = sorted((l for l in widths if self.widened(widths, l, step) is not None),
                      key=lambda l: -narrow.get(l, math.inf))[:widen_count]
        widen = {}
        for layer in dear:
            cand = self.widened(widths, layer, step)
            widen[layer] = (base_kl - self.kl(cand)) / max(base_saved - self.plans.saved(cand), 1e-12)
        return narrow, widen

    def exchange(self, widths, step, narrow, widen):
        """Trade the cheapest narrowings for the most valuable widenings of one step each (equal FLOPs): the trades
        while each pair's narrowing costs less than its widening gains, all at once, then half as many."""
        cheap = sorted(narrow, key=narrow.get)
        valuable = sorted(widen, key=lambda l: -widen[l])
        pairs, used = [], set()
        for b in valuable:
            a = next((a for a in cheap if a not in used and a != b and a not in widen), None)
            if a is None or narrow[a] >= widen[b]:
                break
            if widths[b] + step > self.plans.layers[b].size:
                continue
            pairs.append((a, b))
            used |= {a, b}
        base_kl = self.kl(widths)
        while pairs:
            cand = dict(widths)
            for a, b in pairs:
                cand[a] -= step
                cand[b] += step
            if self.anchor(cand) < base_kl and (self.budget is None or self.within(cand)):
                return cand
            pairs = pairs[:len(pairs) // 2]
        return None

    def grow(self, widths, step, narrow):
        """Narrow the layers measured cheapest to narrow, as many at once as the budget allows (halving)."""
        order = [l for l in sorted(narrow, key=narrow.get)]
        m = max(1, len(order) // 2)
        while order and m >= 1:
            cand = dict(widths)
            for l in order[:m]:
                cand = self.narrowed(cand, l, step) or cand
            if cand != widths and self.anchor(cand) >= 0 and self.within(cand):
                widths, order = cand, order[m:]
                self.note(f"grow {m}", widths)
            else:
                m //= 2
        return widths


def step_floor(size: int) -> int:
    """The narrowest a layer gets: one neuron (the runtime runs widths 1 .. I - 1)."""
    return 1


def uniform_widths(plans: WidthPlans, share: float, whole: tuple[int, ...] | list[int] = ()) -> dict[int, int]:
    """Every layer at the width whose saving is `share` (neuron granularity: some layers one neuron narrower); the
    layers in `whole` skipped whole (width 0), the others at one width that makes up the rest of the share."""
    first = next(iter(plans.layers.values()))
    size = first.size
    rest = [l for l in sorted(plans.layers) if l not in set(whole)]
    count = len(rest)
    need = share / plans.eligible * plans.num_layers * plans.ffn_flops - len(whole) * plans.whole_saving()
    widths = {l: 0 for l in whole}
    if need <= 0 or not rest:
        return {**widths, **{l: size for l in rest}}
    wide = next((k for k in range(size - 1, 0, -1) if count * first.saving(k, plans.fill) >= need), 1)
    # every layer at `wide` saves enough; the last ones back at wide + 1 to come as close to `need` as a neuron allows
    over = count * first.saving(wide, plans.fill) - need
    step = first.saving(wide, plans.fill) - first.saving(min(size, wide + 1), plans.fill)
    back = min(count, int(round(over / step))) if step > 0 else 0
    return {**widths, **{l: (wide if i < count - back or wide + 1 >= size else wide + 1) for i, l in enumerate(rest)}}


def convert_whole(search: Search, plans: WidthPlans, widths: dict[int, int], max_share: float = WHOLE_MAX_SHARE
                  ) -> dict[int, int]:
    """Whole-FFN skips as moves: from one uniform width, measure skipping each layer whole (its linear substitute in
    place) on top of it; then skip the 1, 2, 3, ... layers that measured cheapest per saved FLOP, the other layers at
    the uniform width that keeps the FFN FLOPs saved, while the measured KL falls (and the budget holds)."""
    share = plans.saved(widths)
    base = search.anchor(widths)
    cost = {}
    for layer in sorted(plans.whole):
        if widths[layer] == 0:
            continue
        cand = {**widths, layer: 0}
        cost[layer] = (search.kl(cand) - base) / max(plans.saved(cand) - share, 1e-12)
    search.whole_costs = {l: rounded(c) for l, c in sorted(cost.items())}
    order = sorted(cost, key=cost.get)
    best, best_kl = widths, base
    for m in range(1, int(max_share * plans.num_layers) + 1):
        cand = uniform_widths(plans, share, order[:m])
        kl = search.anchor(cand)
        if kl >= best_kl or (search.budget is not None and not search.within(cand)):
            break
        best, best_kl = cand, kl
        search.note(f"whole {m}", best)
    return best


def land_on(plans: WidthPlans, widths: dict[int, int], share: float, narrow: dict[int, float] | None) -> dict:
    """Adjust one layer by single neurons so the saving is as close to `share` as a neuron allows: the layer measured
    cheapest to narrow when more must be dropped, the dearest when neurons come back."""
    widths = dict(widths)
    n0 = next(iter(plans.layers.values()))
    per = plans.eligible * (n0.saving(n0.size - 2, plans.fill) - n0.saving(n0.size - 1, plans.fill)) / (
        plans.num_layers * plans.ffn_flops)
    hint = narrow or {}
    for _ in range(2 * len(widths)):
        count = int(round((share - plans.saved(widths)) / per))
        if count == 0:
            break
        ranked = sorted((l for l in widths if widths[l] > 0), key=lambda l: hint.get(l, 0.0), reverse=count < 0)
        for l in ranked:
            w = min(max(widths[l] - count, 1), plans.layers[l].size)
            if w != widths[l]:
                widths[l] = w
                break
        else:
            break
    return widths


def fit_neuron_plan(model, tokenizer, profile, settings, *, budget=None, references=None,
                    confirm_references=None, map_batches=None) -> Any:
    """A static SkipPlan with neuron subsets at `settings.target` (FFN FLOPs share saved) or within `budget`
    (refine.Budget). `references` (choosing) and `confirm_references` (the confirming measurement): dense references
    of calibration windows; `map_batches` (fill map): token batches whose decode positions give the maps' moments;
    default: the calibration split of `settings.data` read with `tokenizer` (the maps': other documents than the
    measuring windows')."""
    from ..arch.registry import resolve
    from ..plan.model import SkipPlan
    from .from_profile import eligible_share

    started = time.perf_counter()
    if not getattr(profile, "has_neurons", False):
        raise NeuronFitError("the profile has no per-neuron FFN statistics: record it again with `skipprof profile` "
                             "(it records them for dense FFNs) to fit FitSettings.granularity=\"neurons\"")
    arch = resolve(model)
    criterion = settings.neuron_importance
    maps_wanted = settings.neuron_fill in ("map", "refit", AUTO_FILL)
    template = SkipPlan(mode="static", apply_to=settings.apply_to, warmup_tokens=settings.warmup_tokens,
                        dense_every=settings.dense_every, compensation="none")
    eligible = eligible_share(settings.warmup_tokens, settings.dense_every, settings.horizon)
    refs = references if references is not None else calibration_references(
        model, tokenizer, settings.data, prompt_len=CHOOSE_PROMPT_LEN, window=CHOOSE_WINDOW,
        docs_per_class=CHOOSE_DOCS_PER_CLASS, text_column=settings.text_column, class_column=settings.class_column)
    moments, map_record, whole, whole_record = None, None, {}, None
    batches = None
    if maps_wanted or settings.compensation == "linear":
        from .substitute import calibration_batches

        # the maps' calibration windows: other documents than the measuring windows'
        batches = map_batches if map_batches is not None else calibration_batches(
            model, tokenizer, settings.data, skip_docs_per_class=CONFIRM_DOCS_PER_CLASS,
            docs_per_class=NEURON_MAP_DOCS_PER_CLASS, prompt_len=CONFIRM_PROMPT_LEN,
            gen_len=CONFIRM_WINDOW - CONFIRM_PROMPT_LEN, text_column=settings.text_column,
            class_column=settings.class_column)
    if settings.compensation == "linear":  # whole-FFN skips among the moves, each with its linear substitute
        from .substitute import fit_substitutes

        begun = time.perf_counter()
        whole = fit_substitutes(model, batches, range(arch.num_layers))
        first = next(iter(whole.values())).record
        whole_record = {"rank": None, "tokens": first["tokens"], "heldout_tokens": first["heldout_tokens"],
                        "seconds": rounded(time.perf_counter() - begun)}
    width = intermediate_width(model)
    too_wide = arch.num_layers * width * width * 8 > MAX_MOMENT_BYTES
    if too_wide and settings.neuron_fill in ("map", "refit"):
        raise NeuronFitError(f"fill {settings.neuron_fill} keeps every FFN's activation covariance "
                             f"({arch.num_layers} x {width}^2 "
                             f"float64 = {arch.num_layers * width * width * 8 / 2**30:.1f} GiB here, above "
                             f"{MAX_MOMENT_BYTES / 2**30:.0f} GiB): use fill mean for a model this wide")
    if maps_wanted and not too_wide:  # fill auto on a model too wide for the maps: mean only
        begun = time.perf_counter()
        moments = neuron_moments(model, batches)
        map_record = {"rank": neuron_map_rank(settings), "positions": next(iter(moments.values())).count,
                      "windows": sum(int(b.input_ids.shape[0]) for b in batches), "ridge": NEURON_MAP_RIDGE,
                      "seconds": rounded(time.perf_counter() - begun)}
        log.info("neuron maps: moments of %d layers on %d decode positions (%.0f s)", len(moments),
                 map_record["positions"], map_record["seconds"])
    regime, plans, ev, statistics = _statistics(profile, model, settings, refs, template, eligible,
                                                 settings.target if budget is None else AUTO_PROBE_SHARE, moments)
    fill = plans.fill
    if fill not in ("map", "refit"):
        map_record = None
    elif fill == "refit":
        map_record = {k: v for k, v in map_record.items() if k != "rank"}
    layers = plans.layers
    plans.whole = whole
    search = Search(ev, plans, budget)
    size = next(iter(layers.values())).size
    step = max(1, size // STEPS)
    min_step = max(1, size // MIN_STEP_DIVISOR)
    rounds = settings.neuron_rounds
    widen_count = min(4, arch.num_layers)
    narrow: dict[int, float] = {}

    if budget is None:
        target = settings.target
        widths = uniform_widths(plans, target)
        search.anchor(widths)
        search.note("uniform", widths)
        uniform = search.path[-1]
    else:
        widths, uniform = _uniform_within(search, plans, step)
    if whole and plans.key(widths):
        widths = convert_whole(search, plans, widths)
        whole_record.update(layers=sorted(l for l, w in widths.items() if w == 0), measured=search.whole_costs)
    for r in range(rounds):
        narrow, widen = search.marginals(widths, step, widen_count)
        better = search.exchange(widths, step, narrow, widen)
        if better is not None:
            widths = better
            search.note(f"exchange {r + 1} (step {step})", widths)
        if budget is not None:
            widths = search.grow(widths, step, narrow)
        if better is None and step // 2 >= min_step:
            step //= 2
    if budget is None:
        widths = land_on(plans, widths, target, narrow)
        search.note("landed", widths)
    key = plans.key(widths)
    if not key:
        cheapest = min(narrow, key=narrow.get) if narrow else None
        raise NeuronFitError(f"no narrowing fits the budget {budget.describe()}" + (
            f": the cheapest move measured, 1/{STEPS} of layer {cheapest}'s neurons, costs KL "
            f"{search.kl(search.narrowed(widths, cheapest, max(1, size // STEPS))):.4f}" if cheapest is not None else ""))
    chosen = plans.plan(key)
    confirm_refs = confirm_references if confirm_references is not None else calibration_references(
        model, tokenizer, settings.data, prompt_len=CONFIRM_PROMPT_LEN, window=CONFIRM_WINDOW,
        docs_per_class=CONFIRM_DOCS_PER_CLASS, text_column=settings.text_column, class_column=settings.class_column)
    confirm = NeuronEvaluator(model, confirm_refs, template, build=plans.plan, reuse_prefix=False)
    confirm_kl = confirm(key)
    saved = plans.saved(widths)
    record = {
        "method": "neurons-measured",
        "granularity": "neurons",
        "neuron_importance": criterion,
        "neuron_fill": fill,
        "regime": regime,
        "neuron_statistics": statistics,
        **({"neuron_map": map_record} if map_record else {}),
        **({"whole_ffn": whole_record} if whole_record else {}),
        "target_ffn_flops_saved": settings.target,
        "expected_ffn_flops_saved": rounded(saved),
        "kl": rounded(ev(key)),
        "ppl_increase": rounded(ev.ppl_ratio[key] - 1.0),
        "uniform_start": uniform,
        "confirm": {"kl": rounded(confirm_kl), "ppl_increase": rounded(confirm.ppl_ratio[key] - 1.0),
                    "windows": sum(int(r.batch.input_ids.shape[0]) for r in confirm_refs),
                    "positions": sum(int(r.mask.sum()) for r in confirm_refs),
                    "prompt_len": int(confirm_refs[0].batch.prompt_len), "window": CONFIRM_WINDOW},
        "data": {"spec": settings.data or "bundled calibration split", "prompt_len": int(refs[0].batch.prompt_len),
                 "window": CHOOSE_WINDOW, "windows": sum(int(r.batch.input_ids.shape[0]) for r in refs),
                 "tokens": sum(int(r.mask.sum()) for r in refs)},
        "measurements": ev.evaluations + 1,  # the choosing windows' sets + the confirming one
        "layer_forwards": ev.layers_run,
        "rounds": rounds,
        "widths_path": search.path,
        "gen_len": settings.gen_len,
        "horizon": settings.horizon,
        "seconds": rounded(time.perf_counter() - started),
    }
    if budget is not None:
        record["budget"] = budget.describe()
    skipped_whole = sum(1 for w in widths.values() if w == 0)  # FFN calls skipped whole: the layers at width 0
    plan = replace(chosen, expected_skip_ratio=rounded(eligible * skipped_whole / arch.num_layers), fit=record)
    return plan


AUTO_PROBE_SHARE = 0.10  # budget fits: the FFN FLOPs share the statistics regimes are compared at


def neuron_map_rank(settings) -> int:
    return settings.rank if settings.rank is not None else DEFAULT_NEURON_MAP_RANK


def _statistics(profile, model, settings, refs, template, eligible, share, moments=None):
    """(regime, WidthPlans, evaluator, record): the profile's neuron statistics of one regime -- `neuron_statistics`,
    or with "auto" each regime that has tokens measured at one uniform width at `share` on the choosing windows, the
    lower KL kept (decode statistics are the regime the plan acts on; prompt statistics are often many more tokens).
    Fill "auto" is chosen the same way, mean against map (each at the width that saves `share` net of its fill), in
    every regime measured; the maps need `moments` (fill auto without them: mean)."""
    from ..arch.flops import token_flops

    ffn = token_flops(model)["ffn"]
    wanted = settings.neuron_statistics
    regimes = [r for r in ("decode", "prompt") if profile.neuron_tokens(r, 0) > 0]
    if wanted != "auto":
        if wanted not in regimes:
            raise NeuronFitError(f"the profile has no {wanted} neuron statistics")
        regimes = [wanted]
    if not regimes:
        raise NeuronFitError("the profile's neuron statistics count no tokens")
    fills = [settings.neuron_fill]
    if settings.neuron_fill == AUTO_FILL:
        fills = ["mean", "map"] if moments is not None else ["mean"]
    found, dense = [], None
    for regime in regimes:
        for fill in fills:
            layers = layer_neurons(profile, model, settings.neuron_importance, fill, regime, moments,
                                   neuron_map_rank(settings))
            if any(n.size != profile.num_neurons for n in layers.values()):
                raise NeuronFitError(f"the profile's neuron statistics have {profile.num_neurons} neurons per FFN but "
                                     f"the model's FFNs have {next(iter(layers.values())).size}")
            plans = WidthPlans(template, layers, fill, ffn, eligible)
            ev = NeuronEvaluator(model, refs, template, build=plans.plan)
            if dense is not None:  # the dense model's layer inputs are the same for every candidate
                ev._anchors[()] = dense
            kl = None
            if len(regimes) * len(fills) > 1:
                key = plans.key(uniform_widths(plans, share))
                ev.set_anchor(key)
                kl = ev(key)
                dense = ev._anchors.get(())
            found.append((regime, fill, plans, ev, kl))
    regime, fill, plans, ev, _ = min(found, key=lambda f: f[4] if f[4] is not None else 0.0)
    record = {"regime": regime, "tokens": int(profile.neuron_tokens(regime, 0)), "chosen_by": wanted}
    if settings.neuron_fill == AUTO_FILL:
        record["fill"] = fill
    if len(found) > 1:
        name = (lambda r, f: r) if len(fills) == 1 else (lambda r, f: f"{r}, fill {f}")
        record["probe"] = {"ffn_flops_saved": rounded(share), **{name(r, f): rounded(kl) for r, f, _, _, kl in found}}
        ev.layers_run += sum(e.layers_run for *_, e, _ in found if e is not ev)
    return regime, plans, ev, record


def _uniform_within(search: Search, plans: WidthPlans, step: int, top: float = 0.5, tries: int = 5):
    """The widest saving of one uniform width within the budget, by bisection on the FFN FLOPs share in [0, top]
    (`tries` measurements); the dense model (every layer whole) when even the first tries break it -- the growth by
    measured moves starts from there."""
    size = next(iter(plans.layers.values())).size
    lo, hi = 0.0, top
    best = {l: size for l in plans.layers}
    for _ in range(tries):
        mid = (lo + hi) / 2
        widths = uniform_widths(plans, mid)
        if search.anchor(widths) >= 0 and search.within(widths):
            lo, best = mid, widths
        else:
            hi = mid
    if lo == 0.0:
        search.path.append({"step": "uniform", "ffn_flops_saved": 0.0, "kl": 0.0, "ppl_increase": 0.0,
                            "note": f"no uniform width measured within the budget (tried down to {hi:.3f})"})
        return best, search.path[-1]
    search.note("uniform", best)
    return best, search.path[-1]
